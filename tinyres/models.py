"""The residual networks of He et al. (2015), "Deep Residual Learning for Image Recognition".

CIFAR-10 (section 4.2): depth 6n+2, a 3x3 conv, three stages of n basic blocks on 32x32,
16x16 and 8x8 maps with 16, 32 and 64 filters, global average pooling and a 10-way linear
layer. ImageNet (Table 1): ResNet-18/34 of basic blocks and ResNet-50/101/152 of bottleneck
blocks. Module names follow torchvision (`layer1.0.conv1.weight`, `downsample`), so the
state dicts of the ImageNet nets line up with torchvision's (less `num_batches_tracked`).

Shortcut options of section 3.3 and 4.2:
  "A"  identity; where the shape changes, subsample by 2 and pad the new channels with zeros
       (no parameters; the paper's CIFAR choice),
  "B"  identity; where the shape changes, a 1x1 convolution and batch norm (projection),
  "C"  a projection on every block,
  None no shortcut at all: the "plain" network the paper compares against.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import numpy as np

from .backend import device_of, to_device
from .kernels import output_size
from .nn import functional as F
from .nn.layers import AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Linear, MaxPool2d, ReLU
from .nn.modules import Module, Sequential
from .tensor import Tensor, no_grad

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ImageNetResNet",
    "ZeroPadShortcut",
    "cifar_plain",
    "cifar_resnet",
    "count_parameters",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "summary",
]

SHORTCUTS = ("A", "B", "C", None)


class ZeroPadShortcut(Module):
    """Option A: x[:, :, ::stride, ::stride] with zero channels appended up to out_channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x):
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _shortcut(option: str | None, in_channels: int, out_channels: int, stride: int) -> Module | None:
    """The module on the shortcut path of a block; None for the identity (or for no shortcut)."""
    if option not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {option!r}")
    same_shape = stride == 1 and in_channels == out_channels
    if option is None or (option in "AB" and same_shape):
        return None
    if option == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    return Sequential(Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), BatchNorm2d(out_channels))


class BasicBlock(Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (Fig. 2 of the paper)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str | None = "A"):
        super().__init__()
        self.conv1 = Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(channels)
        self.conv2 = Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(channels)
        self.relu = ReLU()
        self.residual = shortcut is not None
        self.downsample = _shortcut(shortcut, in_channels, channels, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(Module):
    """conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(4x channels)-BN, plus the shortcut, then ReLU (Fig. 5).

    The paper subsamples in the first 1x1 conv; `stride_in_3x3=True` subsamples in the 3x3
    instead (torchvision's "ResNet v1.5": the same parameters, about 6% more multiply-adds).
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, shortcut: str | None = "B",
                 stride_in_3x3: bool = False):
        super().__init__()
        out_channels = channels * self.expansion
        s1, s3 = (1, stride) if stride_in_3x3 else (stride, 1)
        self.conv1 = Conv2d(in_channels, channels, 1, stride=s1, bias=False)
        self.bn1 = BatchNorm2d(channels)
        self.conv2 = Conv2d(channels, channels, 3, stride=s3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(channels)
        self.conv3 = Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = BatchNorm2d(out_channels)
        self.relu = ReLU()
        self.residual = shortcut is not None
        self.downsample = _shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class CifarResNet(Module):
    """The CIFAR-10 network of section 4.2: depth 6n+2, (N, 3, 32, 32) -> (N, num_classes)."""

    def __init__(self, depth: int, shortcut: str | None = "A", num_classes: int = 10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth, self.shortcut = depth, shortcut
        self.conv1 = Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(16)
        self.relu = ReLU()
        self.layer1 = _stage(BasicBlock, 16, 16, n, 1, shortcut=shortcut)
        self.layer2 = _stage(BasicBlock, 16, 32, n, 2, shortcut=shortcut)
        self.layer3 = _stage(BasicBlock, 32, 64, n, 2, shortcut=shortcut)
        self.avgpool = AdaptiveAvgPool2d(1)
        self.fc = Linear(64, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def _stage(block: type, in_channels: int, channels: int, blocks: int, stride: int, **kwargs: Any) -> Sequential:
    """`blocks` blocks; the first one changes the channels and applies the stride."""
    layers = [block(in_channels, channels, stride, **kwargs)]
    for _ in range(blocks - 1):
        layers.append(block(channels * block.expansion, channels, 1, **kwargs))
    return Sequential(*layers)


class ImageNetResNet(Module):
    """The ImageNet networks of Table 1: (N, 3, 224, 224) -> (N, num_classes)."""

    def __init__(self, block: type, layers: list[int], num_classes: int = 1000, shortcut: str | None = "B",
                 stride_in_3x3: bool = False):
        super().__init__()
        kwargs: dict[str, Any] = {"shortcut": shortcut}
        if block is Bottleneck:
            kwargs["stride_in_3x3"] = stride_in_3x3
        self.conv1 = Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = BatchNorm2d(64)
        self.relu = ReLU()
        self.maxpool = MaxPool2d(3, stride=2, padding=1)
        width = block.expansion
        self.layer1 = _stage(block, 64, 64, layers[0], 1, **kwargs)
        self.layer2 = _stage(block, 64 * width, 128, layers[1], 2, **kwargs)
        self.layer3 = _stage(block, 128 * width, 256, layers[2], 2, **kwargs)
        self.layer4 = _stage(block, 256 * width, 512, layers[3], 2, **kwargs)
        self.avgpool = AdaptiveAvgPool2d(1)
        self.fc = Linear(512 * width, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


# ---- constructors ------------------------------------------------------------------------

def cifar_resnet(depth: int, shortcut: str | None = "A", num_classes: int = 10) -> CifarResNet:
    """ResNet-`depth` for CIFAR-10 (depth 6n+2: 20, 32, 44, 56, 110, 1202); shortcut "A", "B" or "C"."""
    if shortcut is None:
        raise ValueError("cifar_resnet: shortcut must be 'A', 'B' or 'C'; use cifar_plain() for no shortcut")
    return CifarResNet(depth, shortcut, num_classes)


def cifar_plain(depth: int, num_classes: int = 10) -> CifarResNet:
    """The plain twin of ResNet-`depth`: the same layers without shortcuts."""
    return CifarResNet(depth, None, num_classes)


def resnet18(num_classes: int = 1000, shortcut: str | None = "B") -> ImageNetResNet:
    """ResNet-18 of Table 1: basic blocks [2, 2, 2, 2]."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes, shortcut)


def resnet34(num_classes: int = 1000, shortcut: str | None = "B") -> ImageNetResNet:
    """ResNet-34 of Table 1: basic blocks [3, 4, 6, 3]."""
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes, shortcut)


def resnet50(num_classes: int = 1000, shortcut: str | None = "B", stride_in_3x3: bool = False) -> ImageNetResNet:
    """ResNet-50 of Table 1: bottleneck blocks [3, 4, 6, 3]."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, shortcut, stride_in_3x3)


def resnet101(num_classes: int = 1000, shortcut: str | None = "B", stride_in_3x3: bool = False) -> ImageNetResNet:
    """ResNet-101 of Table 1: bottleneck blocks [3, 4, 23, 3]."""
    return ImageNetResNet(Bottleneck, [3, 4, 23, 3], num_classes, shortcut, stride_in_3x3)


def resnet152(num_classes: int = 1000, shortcut: str | None = "B", stride_in_3x3: bool = False) -> ImageNetResNet:
    """ResNet-152 of Table 1: bottleneck blocks [3, 8, 36, 3]."""
    return ImageNetResNet(Bottleneck, [3, 8, 36, 3], num_classes, shortcut, stride_in_3x3)


# ---- summary -----------------------------------------------------------------------------

def count_parameters(model: Module) -> int:
    """Number of trainable scalars in `model`."""
    return int(sum(p.numel() for p in model.parameters()))


def _conv_shape_and_macs(conv: Conv2d, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    n, c, h, w = shape
    if c != conv.in_channels:
        raise ValueError(f"summary: {conv!r} got an input with {c} channels, shape {shape}")
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    out = (n, conv.out_channels, output_size(h, kh, sh, ph), output_size(w, kw, sw, pw))
    return out, int(np.prod(out)) * c * kh * kw


def _linear_shape_and_macs(fc: Linear, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    if shape[-1] != fc.in_features:
        raise ValueError(f"summary: {fc!r} got an input of shape {shape}")
    out = (*shape[:-1], fc.out_features)
    return out, int(np.prod(out)) * fc.in_features


def _shape_and_macs(layer: Conv2d | Linear, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    return (_conv_shape_and_macs if isinstance(layer, Conv2d) else _linear_shape_and_macs)(layer, shape)


def _zeros_of_output_shape(layer: Conv2d | Linear) -> Any:
    """A stand-in forward for `layer` that returns zeros of its output's shape: a summary needs only shapes."""
    def forward(x: Tensor) -> Tensor:
        shape, _ = _shape_and_macs(layer, x.shape)
        return Tensor(to_device(np.zeros(shape, dtype=x.dtype), x.device))
    return forward


def summary(model: Module, input_shape: tuple[int, ...] = (1, 3, 32, 32), file: TextIO | None = None,
            max_depth: int | None = None) -> dict[str, int]:
    """Print each layer's output shape, parameters and multiply-adds; return {"params", "macs"} totals.

    The model is traced on a zero input of `input_shape` in eval mode under no_grad (modes
    are restored afterwards). Convolutions and linear layers are not computed: their output
    shape and multiply-adds (the only ones counted) follow from their settings, which keeps
    a 224x224 ResNet-152 quick. `max_depth` limits how deeply nested layers are printed.
    """
    names = {id(m): name for name, m in model.named_modules()}
    rows: list[dict[str, Any]] = []  # one per module call, in call order (parents before children)
    open_rows: list[int] = []        # the rows of the calls still running, innermost last

    def enter(module: Module, inputs: tuple) -> None:
        macs = 0
        if isinstance(module, (Conv2d, Linear)):
            _, macs = _shape_and_macs(module, inputs[0].shape)
        rows.append({"name": names.get(id(module), "?"), "type": type(module).__name__, "macs": macs,
                     "params": count_parameters(module)})
        open_rows.append(len(rows) - 1)

    def leave(module: Module, inputs: tuple, output: Any) -> None:
        i = open_rows.pop()
        rows[i]["shape"] = tuple(output.shape)
        rows[i]["total_macs"] = sum(r["macs"] for r in rows[i:])  # its own and those of the calls inside it

    params = next(model.parameters(), None)
    device = device_of(params.data) if params is not None else "cpu"
    modes = {m: m.training for m in model.modules()}
    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    computed = [m for m in model.modules() if isinstance(m, (Conv2d, Linear))]
    for m in computed:
        m.forward = _zeros_of_output_shape(m)
    model.eval()
    try:
        with no_grad():
            model(Tensor(to_device(np.zeros(input_shape, dtype=np.float32), device)))
    finally:
        for m in computed:
            del m.forward  # the class's forward again
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    total_params = count_parameters(model)
    total_macs = sum(r["macs"] for r in rows)
    out = file if file is not None else sys.stdout
    print(f"{'Layer (type)':<44} {'Output shape':<22} {'Params':>12} {'Mult-adds':>16}", file=out)
    print("-" * 97, file=out)
    for r in rows[1:]:  # rows[0] is the model itself: its numbers are the totals below
        level = r["name"].count(".")
        if max_depth is not None and level >= max_depth:
            continue
        label = "  " * level + f"{r['name'].rsplit('.', 1)[-1]} ({r['type']})"
        print(f"{label:<44} {r['shape']!s:<22} {r['params']:>12,} {r['total_macs']:>16,}", file=out)
    print("-" * 97, file=out)
    print(f"{type(model).__name__} on input {tuple(input_shape)}: {total_params:,} parameters, "
          f"{total_macs:,} multiply-adds (conv and linear)", file=out)
    return {"params": int(total_params), "macs": int(total_macs)}
