"""Weight initializers, as `torch.nn.init`: each fills a tensor in place and returns it.

All of them draw from one module-level NumPy generator (or the `generator` passed in), so
`manual_seed(s)` followed by building a model gives the same weights every time. Values are
drawn on the CPU in float32 and then copied to the tensor's device.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import device_of, to_device
from ..tensor import Tensor, default_generator, manual_seed

__all__ = [
    "calculate_gain",
    "constant_",
    "default_generator",
    "kaiming_normal_",
    "kaiming_uniform_",
    "manual_seed",
    "normal_",
    "ones_",
    "uniform_",
    "zeros_",
]

def _fill(tensor: Tensor, values: np.ndarray) -> Tensor:
    """Copy CPU `values` into `tensor.data`, keeping its dtype and device."""
    tensor.data[...] = to_device(values, device_of(tensor.data))
    return tensor


def _fans(tensor: Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight: (out, in) for linear, (out, in, kh, kw) for conv."""
    if tensor.ndim < 2:
        raise ValueError(f"fan in and fan out need a weight with at least 2 dims, got shape {tensor.shape}")
    receptive = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


_GAINS = {"linear": 1.0, "conv2d": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3, "relu": math.sqrt(2.0)}


def calculate_gain(nonlinearity: str) -> float:
    """The factor by which `nonlinearity` shrinks the standard deviation (sqrt(2) for ReLU)."""
    if nonlinearity not in _GAINS:
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; known: {sorted(_GAINS)}")
    return _GAINS[nonlinearity]


def _kaiming_std(tensor: Tensor, mode: str, nonlinearity: str) -> float:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = _fans(tensor)
    return calculate_gain(nonlinearity) / math.sqrt(fan_in if mode == "fan_in" else fan_out)


def kaiming_normal_(tensor: Tensor, mode: str = "fan_in", nonlinearity: str = "relu",
                    generator: np.random.Generator | None = None) -> Tensor:
    """He et al. (2015) init: N(0, std^2) with std = gain / sqrt(fan), i.e. sqrt(2 / fan) for ReLU."""
    return normal_(tensor, 0.0, _kaiming_std(tensor, mode, nonlinearity), generator)


def kaiming_uniform_(tensor: Tensor, mode: str = "fan_in", nonlinearity: str = "relu",
                     generator: np.random.Generator | None = None) -> Tensor:
    """He init, uniform: U(-b, b) with b = sqrt(3) * gain / sqrt(fan), the same variance as the normal."""
    bound = math.sqrt(3.0) * _kaiming_std(tensor, mode, nonlinearity)
    return uniform_(tensor, -bound, bound, generator)


def uniform_(tensor: Tensor, a: float = 0.0, b: float = 1.0,
             generator: np.random.Generator | None = None) -> Tensor:
    """Fill with values drawn from U(a, b)."""
    u = (generator or default_generator()).random(tensor.shape, dtype=np.float32)
    return _fill(tensor, u * np.float32(b - a) + np.float32(a))


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0,
            generator: np.random.Generator | None = None) -> Tensor:
    """Fill with values drawn from N(mean, std^2)."""
    z = (generator or default_generator()).standard_normal(tensor.shape, dtype=np.float32)
    return _fill(tensor, z * np.float32(std) + np.float32(mean))


def constant_(tensor: Tensor, value: float) -> Tensor:
    """Fill with `value`."""
    tensor.data[...] = value
    return tensor


def zeros_(tensor: Tensor) -> Tensor:
    """Fill with zeros."""
    return constant_(tensor, 0)


def ones_(tensor: Tensor) -> Tensor:
    """Fill with ones."""
    return constant_(tensor, 1)
