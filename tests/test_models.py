"""The ResNets of He et al. (2015): exact sizes, Table 1's costs, shapes, shortcuts, and that they learn."""

from __future__ import annotations

import io

import numpy as np
import pytest

import tinyres
from tinyres import models, nn, optim
from tinyres.nn import functional as F
from tinyres.nn import init


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Section 4.2: the CIFAR-10 nets with option A (parameter-free) shortcuts
CIFAR_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}


@pytest.mark.parametrize("depth", sorted(CIFAR_PARAMS))
def test_cifar_parameter_counts(depth):
    resnet = models.cifar_resnet(depth)
    assert count(resnet) == CIFAR_PARAMS[depth]
    assert count(models.cifar_plain(depth)) == CIFAR_PARAMS[depth]  # shortcut A adds no parameters
    b, c = count(models.cifar_resnet(depth, "B")), count(models.cifar_resnet(depth, "C"))
    assert CIFAR_PARAMS[depth] < b < c  # B: two projections; C: a projection on every block


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 100])
def test_cifar_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n"):
        models.cifar_resnet(depth)


def test_unknown_shortcut_option():
    with pytest.raises(ValueError, match="shortcut"):
        models.cifar_resnet(20, shortcut="D")


# Table 1: parameters (as torchvision counts them) and multiply-adds per 224x224 image. The
# paper's ResNet-50 subsamples in the first 1x1 conv of a bottleneck (3.86e9); torchvision's
# "v1.5" subsamples in the 3x3 conv (4.09e9).
IMAGENET = {
    "resnet18": (models.resnet18, {}, 11_689_512, 1.8e9),
    "resnet34": (models.resnet34, {}, 21_797_672, 3.6e9),
    "resnet50": (models.resnet50, {}, 25_557_032, 3.8e9),
    "resnet101": (models.resnet101, {}, 44_549_160, 7.6e9),
    "resnet152": (models.resnet152, {}, 60_192_808, 11.3e9),
    "resnet50-stride-in-3x3": (models.resnet50, {"stride_in_3x3": True}, 25_557_032, 4.09e9),
}
RESNET50_MACS = {False: 3.86e9, True: 4.09e9}


@pytest.mark.parametrize("name", list(IMAGENET))
def test_imagenet_parameters_and_multiply_adds(name):
    build, kwargs, params, macs = IMAGENET[name]
    out = io.StringIO()
    totals = models.summary(build(**kwargs), (1, 3, 224, 224), file=out)
    assert totals["params"] == params
    assert totals["macs"] == pytest.approx(macs, rel=0.03)
    if build is models.resnet50:
        assert totals["macs"] == pytest.approx(RESNET50_MACS[kwargs.get("stride_in_3x3", False)], rel=0.005)
    assert "layer4" in out.getvalue()


def test_bottleneck_stride_placement():
    paper, v15 = models.Bottleneck(256, 128, stride=2), models.Bottleneck(256, 128, stride=2, stride_in_3x3=True)
    assert paper.conv1.stride == (2, 2) and paper.conv2.stride == (1, 1)
    assert v15.conv1.stride == (1, 1) and v15.conv2.stride == (2, 2)
    x = tinyres.zeros(1, 256, 8, 8)
    assert paper.eval()(x).shape == v15.eval()(x).shape == (1, 512, 4, 4)


def test_summary_reports_layers_and_restores_modes():
    net = models.cifar_resnet(20)
    net.layer2.eval()  # a mixed state that must survive
    out = io.StringIO()
    totals = models.summary(net, file=out)
    assert totals == {"params": 269_722, "macs": 40_551_040}  # ~41M multiply-adds, as section 4.2 says
    text = out.getvalue()
    assert "conv1 (Conv2d)" in text and "(1, 64, 8, 8)" in text and "fc (Linear)" in text and "269,722" in text
    assert net.training and net.layer1.training and not net.layer2.training and not net.layer2[0].bn1.training


def test_output_shapes(device):
    x = tinyres.tensor(np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32), device=device)
    for model in (models.cifar_resnet(8), models.cifar_plain(8), models.cifar_resnet(8, "B", num_classes=7)):
        model.to(device)
        y = model(x)
        assert y.shape == (2, model.fc.out_features) and y.dtype == np.float32 and y.device == device
    resnet18 = models.resnet18().to(device).eval()
    assert resnet18(tinyres.zeros(1, 3, 64, 64, device=device)).shape == (1, 1000)


def test_torchvision_names():
    names = [n for n, _ in models.resnet18().named_parameters()]
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "layer2.0.downsample.0.weight" in names and "layer2.0.downsample.1.bias" in names
    assert names[-2:] == ["fc.weight", "fc.bias"]
    assert "bn1.running_mean" in models.cifar_resnet(20).state_dict()
    assert "layer1.0.conv1.weight" in models.cifar_resnet(20).state_dict()


def test_option_a_shortcut_subsamples_and_pads_with_zeros():
    x = tinyres.tensor(np.random.default_rng(0).standard_normal((2, 16, 8, 8), dtype=np.float32))
    y = models.ZeroPadShortcut(16, 32, stride=2)(x).numpy()
    assert y.shape == (2, 32, 4, 4)
    np.testing.assert_array_equal(y[:, :16], x.numpy()[:, :, ::2, ::2])
    assert not y[:, 16:].any()


def test_residual_block_passes_its_input_when_the_residual_is_zero():
    # With the last BN's gamma at 0 the residual branch outputs 0: a ResNet block then passes
    # relu(x) on, while the plain block outputs 0. This is why deep ResNets are easy to start.
    x = tinyres.tensor(np.random.default_rng(0).standard_normal((2, 16, 8, 8), dtype=np.float32))
    for shortcut in ("A", None):
        block = models.BasicBlock(16, 16, shortcut=shortcut).eval()
        init.zeros_(block.bn2.weight)
        expected = np.maximum(x.numpy(), 0) if shortcut else np.zeros(x.shape)
        np.testing.assert_array_equal(block(x).numpy(), expected)


def test_small_resnet_memorizes_random_labels():
    """ResNet-8 fits 64 random images with random labels: the whole stack (forward, backward, SGD) learns."""
    init.manual_seed(0)
    rng = np.random.default_rng(0)
    x = tinyres.tensor(rng.standard_normal((64, 3, 32, 32), dtype=np.float32))
    y = rng.integers(0, 10, 64)
    model = models.cifar_resnet(8)
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(60):
        logits = model(x)
        accuracy = (logits.numpy().argmax(axis=1) == y).mean()
        if accuracy == 1.0:
            break
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert accuracy == 1.0, f"training accuracy {accuracy:.2f} after {step} steps"
    assert all(p.dtype == np.float32 for p in model.parameters())
