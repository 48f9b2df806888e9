"""Draw the autograd graph behind a tensor, in Graphviz's DOT language.

`to_dot(y)` is the forward graph: a box per op, an ellipse per tensor, arrows the way data flows.
`to_dot(y, backward=True)` is the way gradients flow back: arrows reversed, each op's backward
numbered in the order `Tensor.backward()` calls it, and the leaves that receive a `.grad`
highlighted. `render(dot, "graph.svg")` turns the text into a picture with Graphviz's `dot` program.
Draw before calling `backward()`: it frees the graph as it goes.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .atomic import write_bytes
from .nn import Module
from .tensor import Tensor, topological_order

_FORMATS = {".svg": "svg", ".png": "png"}
_HEADER = ('digraph autograd {\n  rankdir=TB;\n  ranksep=0.3;\n  node [fontname="Helvetica", fontsize=10];\n'
           '  edge [arrowsize=0.7];')
_OP_STYLE = {False: 'shape=box, style="rounded,filled", fillcolor="#dbe8f6"',
             True: 'shape=box, style="rounded,filled", fillcolor="#f9dcc4"'}
_PARAMETER_STYLE = 'style=filled, fillcolor="#fff5c2"'
_GRAD_LEAF_STYLE = 'style=filled, fillcolor="#ffcf40", penwidth=2'  # the tensors backward() gives a .grad


def to_dot(t: Tensor, model: Module | None = None, backward: bool = False) -> str:
    """The graph that computed `t` as DOT text; parameters named from `model.named_parameters()`."""
    names = {id(p): name for name, p in model.named_parameters()} if model is not None else {}
    if backward:
        if not t.requires_grad:
            raise RuntimeError(f"to_dot(backward=True): tensor of shape {t.shape} does not require grad, "
                               "so no gradient flows through it")
        tensors = topological_order(t)  # the engine's own visit order, so the numbers below are its steps
    else:
        tensors = _graph_tensors(t)
    index = {id(x): i for i, x in enumerate(tensors)}
    lines = [_HEADER]
    step = 0
    for i, x in enumerate(tensors):
        lines.append(f"  t{i} [label={_quote(_tensor_label(x, names))}{_tensor_style(x, names, backward)}];")
        fn = x.grad_fn
        if fn is None:
            continue
        step += 1
        label = f"{step}. {fn.name} backward" if backward else fn.name
        lines.append(f"  op{i} [label={_quote(label)}, {_OP_STYLE[backward]}];")
        # in the backward graph, inputs that need no gradient are not visited, so not drawn
        inputs = [f"t{index[id(x_in)]}" for x_in in fn.inputs if id(x_in) in index]
        if backward:
            lines += [f"  t{i} -> op{i};"] + [f"  op{i} -> {x_in};" for x_in in inputs]
        else:
            lines += [f"  {x_in} -> op{i};" for x_in in inputs] + [f"  op{i} -> t{i};"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot: str, path: str | os.PathLike) -> None:
    """Write DOT text `dot` as a picture to `path` (.svg or .png; its folder made if needed) with Graphviz's `dot`."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"render: {path} must end in .svg or .png, not {path.suffix!r}")
    try:
        done = subprocess.run(["dot", f"-T{fmt}"], input=dot.encode("utf-8"), capture_output=True, check=False)
    except FileNotFoundError:
        raise RuntimeError(f"render: the Graphviz program 'dot' is not installed (not found on PATH), "
                           f"so {path} cannot be drawn; install graphviz, e.g. apt-get install graphviz") from None
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"render: 'dot -T{fmt}' failed with exit code {done.returncode} "
                           f"drawing {path}: {message}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, done.stdout)


def _graph_tensors(root: Tensor) -> list[Tensor]:
    """Every tensor under `root`, root first, depth-first with inputs in order; a loop, not recursion."""
    order: list[Tensor] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        if t._freed:
            raise RuntimeError(f"to_dot: a tensor of shape {t.shape} in this graph was computed by a graph "
                               "that backward() freed; draw the graph before calling backward()")
        seen.add(id(t))
        order.append(t)
        if t.grad_fn is not None:
            stack.extend(reversed(t.grad_fn.inputs))  # reversed: the first input is visited first
    return order


def _tensor_label(x: Tensor, names: dict[int, str]) -> str:
    """A parameter's name, "constant" and its value for a number, "input" for other leaves; shape and dtype."""
    what = f"{x.shape} {x.dtype}"
    if id(x) in names:
        return f"{names[id(x)]}\n{what}"
    if x.grad_fn is not None:
        return what
    if not x.requires_grad and x.numel() == 1:
        return f"constant {x.item():g}\n{what}"
    return f"input\n{what}"


def _tensor_style(x: Tensor, names: dict[int, str], backward: bool) -> str:
    if backward and x.grad_fn is None:
        return ", " + _GRAD_LEAF_STYLE
    if not backward and id(x) in names:
        return ", " + _PARAMETER_STYLE
    return ""


def _quote(text: str) -> str:
    """`text` as a DOT string: backslashes and quotes escaped, newlines as DOT's centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
