"""The layers of a convolutional network, as `torch.nn` names them: each holds its parameters
(and batch norm its running statistics) and calls the op in `tinyres.nn.functional`."""

from __future__ import annotations

import math

import numpy as np

from . import functional as F
from . import init
from .functional import int_pair
from .modules import Module, Parameter

__all__ = ["AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv2d", "CrossEntropyLoss", "Flatten",
           "Linear", "MaxPool2d", "ReLU"]


class Conv2d(Module):
    """2-D convolution (N, in_channels, H, W) -> (N, out_channels, OH, OW), He-initialized."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = int_pair(kernel_size, "kernel_size", "Conv2d", low=1)
        self.stride, self.padding = int_pair(stride, "stride", "Conv2d", low=1), int_pair(padding, "padding", "Conv2d")
        self.weight = Parameter(np.empty((out_channels, in_channels, *self.kernel_size), dtype=np.float32))
        self.bias = Parameter(np.empty(out_channels, dtype=np.float32)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the weight again (He normal, fan_in) and zero the bias."""
        # He et al. (2015), as the ResNet paper does: std = sqrt(2 / fan_in), zero bias
        init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        return s + ("" if self.bias is not None else ", bias=False")


class _BatchNorm(Module):
    """Shared by BatchNorm1d and BatchNorm2d: per-channel gamma, beta and running statistics."""

    ndim: int  # of the input: 2 or 4, as each subclass sets

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = Parameter(np.ones(num_features, dtype=np.float32))  # gamma
        self.bias = Parameter(np.zeros(num_features, dtype=np.float32))  # beta
        self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))

    def reset_parameters(self) -> None:
        """gamma 1, beta 0, running mean 0, running variance 1."""
        init.ones_(self.weight)
        init.zeros_(self.bias)
        self.running_mean[...] = 0
        self.running_var[...] = 1

    def forward(self, x):
        if x.ndim != self.ndim:
            raise ValueError(f"{type(self).__name__}: expected a {self.ndim}-D input, got shape {tuple(x.shape)}")
        # in training, batch_norm updates running_mean and running_var in place
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=self.training, momentum=self.momentum, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm2d(_BatchNorm):
    """Batch normalization of (N, C, H, W) over N, H and W, per channel."""

    ndim = 4


class BatchNorm1d(_BatchNorm):
    """Batch normalization of (N, C) over N, per feature."""

    ndim = 2


class Linear(Module):
    """x @ weight.T + bias: (N, in_features) -> (N, out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(np.empty((out_features, in_features), dtype=np.float32))
        self.bias = Parameter(np.empty(out_features, dtype=np.float32)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw weight and bias again from PyTorch's default uniform distribution."""
        # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        bound = 1 / math.sqrt(self.in_features)
        init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---- layers without parameters -----------------------------------------------------------

class ReLU(Module):
    """max(x, 0), elementwise."""

    def forward(self, x):
        return F.relu(x)


class _Pool2d(Module):
    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.kernel_size, self.padding = kernel_size, padding
        self.stride = stride if stride is not None else kernel_size

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """Max over kernel_size windows (stride defaults to kernel_size)."""

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)


class AvgPool2d(_Pool2d):
    """Mean over kernel_size windows (stride defaults to kernel_size)."""

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding)


class AdaptiveAvgPool2d(Module):
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1); only output_size 1."""

    def __init__(self, output_size: int | tuple[int, int] = 1):
        super().__init__()
        if int_pair(output_size, "output_size", "AdaptiveAvgPool2d") != (1, 1):
            raise ValueError(f"AdaptiveAvgPool2d: only output_size=1 is supported, got {output_size!r}")
        self.output_size = output_size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 1)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class Flatten(Module):
    """Merge dims start_dim..end_dim: (N, C, H, W) -> (N, C*H*W) by default."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return F.flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


# ---- losses --------------------------------------------------------------------------------

class CrossEntropyLoss(Module):
    """Mean cross-entropy of logits (N, classes) against integer targets (N,), as `torch.nn.CrossEntropyLoss`."""

    def __init__(self, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        self.reduction, self.label_smoothing = reduction, label_smoothing

    def forward(self, input, target):
        return F.cross_entropy(input, target, self.reduction, self.label_smoothing)
