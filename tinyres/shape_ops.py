"""The differentiable shape ops: reshape, permute, indexing, padding, concatenation.

Each op is a `Function` directly followed by the function users call; `tinyres.ops` attaches
them to Tensor as methods (`.reshape()`, `.permute()`, `t[i]`, ...).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import numpy as np

from .tensor import Function, Tensor, as_tensor

# ---- shape ops ---------------------------------------------------------------------------

class Reshape(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.in_shape = x.shape
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape shape {tuple(x.shape)} "
                             f"({x.size} elements) into {self.shape}") from None

    def backward(self, gy):
        return gy.reshape(self.in_shape)


def reshape(x, *shape) -> Tensor:
    """The same elements in a new shape (one dim may be -1)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape(tuple(int(s) for s in shape))(x)


def flatten(x, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """Merge dims start_dim..end_dim into one."""
    x = as_tensor(x)
    s, e = start_dim % x.ndim, end_dim % x.ndim
    return reshape(x, x.shape[:s] + (-1,) + x.shape[e + 1:])


def unsqueeze(x, dim: int) -> Tensor:
    """A new dim of length 1 at `dim` (-1 appends one), as `torch.unsqueeze`."""
    x = as_tensor(x)
    if not -x.ndim - 1 <= dim <= x.ndim:
        raise ValueError(f"unsqueeze: dim {dim} out of range for a tensor of shape {x.shape}")
    d = dim % (x.ndim + 1)
    return reshape(x, x.shape[:d] + (1,) + x.shape[d:])


def squeeze(x, dim: int | None = None) -> Tensor:
    """Drop the dims of length 1 (or only `dim`, if it has length 1), as `torch.squeeze`."""
    x = as_tensor(x)
    if dim is None:
        return reshape(x, tuple(n for n in x.shape if n != 1))
    if not -builtins.max(x.ndim, 1) <= dim < builtins.max(x.ndim, 1):
        raise ValueError(f"squeeze: dim {dim} out of range for a tensor of shape {x.shape}")
    d = dim % builtins.max(x.ndim, 1)
    return reshape(x, x.shape[:d] + x.shape[d + 1:]) if x.ndim and x.shape[d] == 1 else x


class Clone(Function):
    def forward(self, x):
        return x.copy(order="K")

    def backward(self, gy):
        return gy


def clone(x) -> Tensor:
    """A copy of `x` in new memory that stays in the graph (gradients flow back to `x`)."""
    return Clone()(x)


class Permute(Function):
    def __init__(self, dims):
        self.dims = dims

    def forward(self, x):
        if sorted(d % builtins.max(x.ndim, 1) for d in self.dims) != list(range(x.ndim)):
            raise ValueError(f"permute: dims {self.dims} are not a permutation for shape {tuple(x.shape)}")
        return x.transpose(self.dims)

    def backward(self, gy):
        return gy.transpose(np.argsort([d % gy.ndim for d in self.dims]))


def permute(x, *dims) -> Tensor:
    """Reorder the dims (as `torch.permute`)."""
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return Permute(tuple(dims))(x)


def transpose(x, dim0: int, dim1: int) -> Tensor:
    """Swap two dims (as `torch.transpose`)."""
    x = as_tensor(x)
    dims = list(range(x.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return permute(x, dims)


def t(x) -> Tensor:
    """The transpose of a matrix (a tensor of at most 2 dims is returned with its dims swapped), as `torch.t`."""
    x = as_tensor(x)
    if x.ndim > 2:
        raise ValueError(f"t: expects a tensor of at most 2 dims, got shape {x.shape}; use transpose(dim0, dim1)")
    return transpose(x, 0, 1) if x.ndim == 2 else x


class Expand(Function):
    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        try:
            return self.xp.broadcast_to(x, self.shape)
        except ValueError:
            raise ValueError(f"expand: shape {tuple(x.shape)} cannot be broadcast to {self.shape}") from None

    def backward(self, gy):
        return gy  # summed back to x's shape where broadcasting stretched it (tensor.unbroadcast)


def expand(x, *shape) -> Tensor:
    """`x` broadcast to `shape` (-1 keeps a dim), as `torch.Tensor.expand`: a view, no copy."""
    x = as_tensor(x)
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    lead = len(shape) - x.ndim
    return Expand(tuple(x.shape[i - lead] if n == -1 and i >= lead else int(n) for i, n in enumerate(shape)))(x)


class GetItem(Function):
    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.x = x  # kept for its shape and memory layout: the gradient is laid out like x
        return x[self.index]

    def backward(self, gy):
        gx = self.xp.zeros_like(self.x)
        if _is_basic_index(self.index):
            gx[self.index] = gy
        else:  # integer-array indexing may repeat elements: accumulate
            self.xp.add.at(gx, self.index, gy)
        return gx


def _is_basic_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, slice, type(None), type(Ellipsis))) or np.isscalar(i) for i in items)


def getitem(x, index) -> Tensor:
    """x[index]: ints, slices with steps, None, Ellipsis, integer or boolean arrays."""
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return GetItem(index)(x)


class Pad(Function):
    def __init__(self, widths, value):
        self.widths, self.value = widths, value

    def forward(self, x):
        if len(self.widths) != x.ndim:
            raise ValueError(f"pad: padding for {len(self.widths)} dims given for shape {tuple(x.shape)}")
        shape = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape, self.widths))
        y = self.xp.full_like(x, self.value, shape=shape)  # keeps x's memory layout (channels-last)
        self.inner = tuple(slice(lo, lo + n) for n, (lo, _) in zip(x.shape, self.widths))
        y[self.inner] = x
        return y

    def backward(self, gy):
        return gy[self.inner]


def pad(x, pad: Sequence[int], mode: str = "constant", value: float = 0.0) -> Tensor:
    """Constant padding, as `torch.nn.functional.pad`: `pad` pairs start from the last dim."""
    x = as_tensor(x)
    if mode != "constant":
        raise ValueError(f"pad: only mode='constant' is supported, got {mode!r}")
    if len(pad) % 2 or len(pad) // 2 > x.ndim:
        raise ValueError(f"pad: {tuple(pad)} must hold (before, after) pairs for at most "
                         f"{x.ndim} dims of shape {x.shape}")
    if any(p < 0 for p in pad):
        raise ValueError(f"pad: negative padding {tuple(pad)} is not supported")
    widths = [(0, 0)] * x.ndim
    for k in range(len(pad) // 2):
        widths[x.ndim - 1 - k] = (int(pad[2 * k]), int(pad[2 * k + 1]))
    return Pad(tuple(widths), value)(x)


class Concatenate(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        ref = xs[0].shape
        for x in xs:
            if x.ndim != len(ref) or any(a != b for i, (a, b) in enumerate(zip(x.shape, ref)) if i != self.axis):
                raise ValueError(f"cat: shapes {[tuple(x.shape) for x in xs]} differ outside dim {self.axis}")
        self.sizes = [x.shape[self.axis] for x in xs]
        return self.xp.concatenate(xs, axis=self.axis)

    def backward(self, gy):
        return tuple(self.xp.split(gy, np.cumsum(self.sizes)[:-1], axis=self.axis))


def cat(tensors: Sequence[Any], dim: int = 0) -> Tensor:
    """Join tensors along an existing dim (as `torch.cat`)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: expected a non-empty sequence of tensors")
    return Concatenate(dim % as_tensor(tensors[0]).ndim)(*tensors)


concatenate = cat


def stack(tensors: Sequence[Any], dim: int = 0) -> Tensor:
    """Join tensors along a new dim."""
    ts = [as_tensor(t) for t in tensors]
    d = dim % (ts[0].ndim + 1)
    return cat([reshape(t, t.shape[:d] + (1,) + t.shape[d:]) for t in ts], d)
