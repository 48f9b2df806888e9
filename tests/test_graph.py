"""Drawing the autograd graph: DOT text from real graphs, and pictures from the real `dot` program."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinyres
from tinyres import nn
from tinyres.graph import render, to_dot
from tinyres.tensor import Function

ROOT = Path(__file__).resolve().parents[1]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot program is not installed (apt-get install graphviz)")

_NODE = re.compile(r'^  (\w+) \[label="((?:[^"\\]|\\.)*)"(.*)\];$')
_EDGE = re.compile(r"^  (\w+) -> (\w+);$")


def parse(dot: str) -> tuple[dict[str, tuple[str, str]], list[tuple[str, str]]]:
    """{node: (label, other attributes)} and [(tail, head)] from to_dot's output."""
    nodes, edges = {}, []
    for line in dot.splitlines():
        if m := _NODE.match(line):
            label = re.sub(r"\\(.)", lambda e: "\n" if e[1] == "n" else e[1], m[2])
            nodes[m[1]] = (label, m[3])
        elif m := _EDGE.match(line):
            edges.append((m[1], m[2]))
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    return nodes, edges


def ops(nodes) -> dict[str, str]:
    return {k: label for k, (label, _) in nodes.items() if k.startswith("op")}


def tensors(nodes) -> dict[str, str]:
    return {k: label for k, (label, _) in nodes.items() if k.startswith("t")}


def by_label(nodes, label: str) -> str:
    (node,) = [k for k, (text, _) in nodes.items() if text == label]
    return node


def highlighted(nodes) -> set[str]:
    return {label.split("\n")[0] for label, attrs in nodes.values() if "penwidth=2" in attrs}


def conv_bn_relu(device="cpu"):
    tinyres.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).to(device)
    x = tinyres.randn(2, 3, 5, 5, device=device)
    return net, net(x)


def resnet_block():
    """Block layer2.0 of a CIFAR ResNet-20 (stride 2, option-A shortcut) on an input that needs a gradient."""
    tinyres.manual_seed(0)
    model = tinyres.models.cifar_resnet(20)
    x = tinyres.randn(2, 16, 8, 8, requires_grad=True)
    return model, model.layer2[0](x)


# ---- the forward graph ----------------------------------------------------------------------

def test_conv_bn_relu_forward_graph(device):
    net, y = conv_bn_relu(device)
    nodes, edges = parse(to_dot(y, net))
    assert sorted(ops(nodes).values()) == ["BatchNorm", "Conv2d", "ReLU"]
    assert len(tensors(nodes)) == 7  # x, weight, conv out, gamma, beta, bn out, relu out
    assert len(edges) == 9
    x = by_label(nodes, "input\n(2, 3, 5, 5) float32")
    w = by_label(nodes, "0.weight\n(4, 3, 3, 3) float32")
    conv, bn, relu = (by_label(nodes, name) for name in ("Conv2d", "BatchNorm", "ReLU"))
    assert {(x, conv), (w, conv)} <= set(edges)  # data flows into the op...
    (conv_out,) = [head for tail, head in edges if tail == conv]  # ...and out of it into the next
    assert (conv_out, bn) in edges
    assert {tail for tail, head in edges if head == bn} == {conv_out, by_label(nodes, "1.weight\n(4,) float32"),
                                                             by_label(nodes, "1.bias\n(4,) float32")}
    (y_node,) = [head for tail, head in edges if tail == relu]
    assert nodes[y_node][0] == "(2, 4, 5, 5) float32"
    assert highlighted(nodes) == set()


def test_without_a_model_parameters_are_inputs():
    _, y = conv_bn_relu()
    labels = [label.split("\n")[0] for label in tensors(parse(to_dot(y))[0]).values()]
    assert labels.count("input") == 4  # x, the conv weight, gamma and beta


def test_resnet_block_forward_graph_names_parameters_from_the_model():
    model, y = resnet_block()
    nodes, edges = parse(to_dot(y, model))
    assert sorted(ops(nodes).values()) == sorted(["Conv2d", "BatchNorm", "ReLU"] * 2 + ["GetItem", "Pad", "Add"])
    assert len(tensors(nodes)) == 16  # x, 6 parameters, 9 op outputs
    assert len(edges) == 25  # one per op input, one per op output
    names = {label.split("\n")[0] for label in tensors(nodes).values() if label.startswith("layer")}
    assert names == {name for name, _ in model.named_parameters() if name.startswith("layer2.0.")}
    assert "layer2.0.conv1.weight\n(32, 16, 3, 3) float32" in tensors(nodes).values()
    x = by_label(nodes, "input\n(2, 16, 8, 8) float32")
    assert sorted(nodes[head][0] for tail, head in edges if tail == x) == ["Conv2d", "GetItem"]  # main, shortcut


def test_constants_and_inputs_are_labelled():
    w = tinyres.tensor([1.0, 2.0], requires_grad=True)
    x = tinyres.tensor([3.0, 4.0])
    labels = sorted(tensors(parse(to_dot(w * 0.5 + x))[0]).values())
    assert labels == ["(2,) float32"] * 2 + ["constant 0.5\n() float32"] + ["input\n(2,) float32"] * 2


class Quoted(Function):
    """The identity, under a name full of characters that DOT must escape."""

    name = 'say "hi"\\ to\nme'

    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        return gy


def test_labels_are_escaped():
    dot = to_dot(Quoted()(tinyres.tensor([1.0], requires_grad=True)))
    assert r'label="say \"hi\"\\ to\nme"' in dot
    assert Quoted.name in ops(parse(dot)[0]).values()


def test_same_graph_same_text():
    net, y = conv_bn_relu()
    assert to_dot(y, net) == to_dot(y, net)
    other_net, other_y = conv_bn_relu()  # new objects at new addresses: no id may leak into the text
    assert to_dot(other_y, other_net) == to_dot(y, net)
    assert to_dot(other_y, other_net, backward=True) == to_dot(y, net, backward=True)


def test_a_deep_chain_needs_no_recursion():
    depth = 5000
    assert depth > sys.getrecursionlimit()
    y = tinyres.randn(3, requires_grad=True)
    for _ in range(depth):
        y = -y
    nodes, edges = parse(to_dot(y))
    assert (len(ops(nodes)), len(tensors(nodes)), len(edges)) == (depth, depth + 1, 2 * depth)
    nodes, edges = parse(to_dot(y, backward=True))
    assert sorted(ops(nodes).values())[:2] == ["1. Neg backward", "10. Neg backward"]
    assert f"{depth}. Neg backward" in ops(nodes).values()
    assert len(edges) == 2 * depth


def test_a_freed_graph_cannot_be_drawn():
    _, y = resnet_block()
    y.sum().backward()
    with pytest.raises(RuntimeError, match=r"freed; draw the graph before calling backward\(\)"):
        to_dot(y)


def test_backward_of_a_tensor_without_gradient_is_an_error():
    with pytest.raises(RuntimeError, match=r"tensor of shape \(2, 3\) does not require grad"):
        to_dot(tinyres.randn(2, 3), backward=True)


# ---- the backward graph ---------------------------------------------------------------------

def test_conv_bn_relu_backward_graph(device):
    net, y = conv_bn_relu(device)
    nodes, edges = parse(to_dot(y, net, backward=True))
    assert sorted(ops(nodes).values()) == ["1. ReLU backward", "2. BatchNorm backward", "3. Conv2d backward"]
    assert len(tensors(nodes)) == 6  # the input x needs no gradient: no gradient flows to it
    assert len(edges) == 8
    assert highlighted(nodes) == {"0.weight", "1.weight", "1.bias"}  # the leaves that get a .grad
    (y_node,) = [tail for tail, head in edges if head == by_label(nodes, "1. ReLU backward")]
    assert all(head != y_node for _, head in edges)  # the gradient starts at y: edges reversed
    conv = by_label(nodes, "3. Conv2d backward")
    assert [nodes[head][0] for tail, head in edges if tail == conv] == ["0.weight\n(4, 3, 3, 3) float32"]


def test_backward_numbers_are_the_order_the_engine_calls_backward():
    model, _ = resnet_block()
    # two identity shortcuts in a row: block 1's output feeds both paths of block 2, so a plain
    # depth-first order would number block 1's ops before block 2's shortcut Add had sent its gradient
    x = tinyres.randn(2, 16, 8, 8, requires_grad=True)
    y = model.layer2[0](model.layer1[1](model.layer1[0](x)))
    nodes, _ = parse(to_dot(y, model, backward=True))
    numbered = sorted((int(label.split(".")[0]), label) for label in ops(nodes).values())
    assert [n for n, _ in numbered] == list(range(1, 7 + 7 + 9 + 1))
    calls = []
    for fn in {id(t.grad_fn): t.grad_fn for t in _all_tensors(y) if t.grad_fn is not None}.values():
        fn.backward = lambda gy, fn=fn, real=fn.backward: (calls.append(fn.name), real(gy))[1]
    y.backward(np.ones(y.shape, dtype=np.float32))
    assert [f"{i}. {name} backward" for i, name in enumerate(calls, 1)] == [label for _, label in numbered]
    blocks = [name for name, _ in model.named_parameters() if name.startswith(("layer1.0.", "layer1.1.", "layer2.0."))]
    assert highlighted(nodes) == set(blocks) | {"input"}


def _all_tensors(root):
    seen, stack = {}, [root]
    while stack:
        t = stack.pop()
        if id(t) not in seen:
            seen[id(t)] = t
            stack.extend(t.grad_fn.inputs if t.grad_fn is not None else ())
    return list(seen.values())


# ---- pictures ----------------------------------------------------------------------------

@needs_dot
def test_render_svg_and_png(tmp_path):
    model, y = resnet_block()
    render(to_dot(y, model), tmp_path / "forward.svg")
    render(to_dot(y, model, backward=True), tmp_path / "backward.png")
    svg = (tmp_path / "forward.svg").read_text()
    assert "<svg" in svg and "layer2.0.conv1.weight" in svg and "GetItem" in svg
    png = (tmp_path / "backward.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backward.png", "forward.svg"]  # no temporary left


@needs_dot
def test_render_makes_the_folder_it_writes_into(tmp_path):
    render("digraph { a -> b }", tmp_path / "graphs" / "new" / "ab.svg")
    assert "<svg" in (tmp_path / "graphs" / "new" / "ab.svg").read_text()


@needs_dot
def test_render_draws_escaped_labels(tmp_path):
    render(to_dot(Quoted()(tinyres.tensor([1.0], requires_grad=True))), tmp_path / "quoted.svg")
    svg = (tmp_path / "quoted.svg").read_text()
    assert "say &quot;hi&quot;\\ to" in svg and ">me<" in svg


@needs_dot
def test_render_names_the_path_when_dot_fails(tmp_path):
    path = tmp_path / "broken.svg"
    with pytest.raises(RuntimeError, match=r"'dot -Tsvg' failed .* drawing .*broken\.svg: .*syntax error"):
        render("digraph { a -> ", path)
    assert not path.exists()


def test_render_wants_svg_or_png(tmp_path):
    with pytest.raises(ValueError, match=r"picture\.pdf must end in \.svg or \.png"):
        render("digraph {}", tmp_path / "picture.pdf")


def test_render_without_graphviz_says_to_install_it(tmp_path):
    path = tmp_path / "graph.svg"
    code = f"from tinyres.graph import render; render('digraph {{ a -> b }}', {str(path)!r})"
    env = {**os.environ, "PATH": "", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 1
    assert "RuntimeError: render: the Graphviz program 'dot' is not installed" in done.stderr
    assert f"so {path} cannot be drawn; install graphviz" in done.stderr
    assert not path.exists()


@needs_dot
def test_readme_code_draws_the_pictures_in_the_repository(tmp_path):
    section = (ROOT / "README.md").read_text().split("### The graph behind a tensor")[1]
    code = section.split("```python\n")[1].split("```")[0]
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   check=True)  # in a fresh folder: the code makes graphs/ itself
    for name in ("block-forward.svg", "block-backward.svg"):
        drawn, kept = (re.findall(r"<text[^>]*>([^<]*)</text>", (folder / name).read_text())
                       for folder in (tmp_path / "graphs", ROOT / "examples/results/graph"))
        assert sorted(drawn) == sorted(kept) and "layer2.0.conv2.weight" in drawn
