"""The basic differentiable ops: elementwise arithmetic, matmul, reductions, shape ops, casts.

Each op is a `Function` (forward on arrays, backward from `gy`) directly followed by the
function users call. Broadcasting is undone centrally (`tensor.unbroadcast`), so an op's
backward may return a gradient of the broadcast shape. At the end of the module the ops are
attached to `Tensor` as its operators and methods.
"""

from __future__ import annotations

import builtins

import numpy as np

from . import kernels
from .backend import normalize_device, to_device
from .shape_ops import cat, concatenate, flatten, getitem, pad, permute, reshape, stack, transpose
from .tensor import Function, Tensor, as_tensor

# ---- elementwise -------------------------------------------------------------------------


def _check_broadcast(op: str, a, b) -> None:
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {tuple(a.shape)} and {tuple(b.shape)} "
                         "cannot be broadcast together") from None


class Add(Function):
    def forward(self, a, b):
        _check_broadcast("add", a, b)
        return kernels.add(a, b)

    def backward(self, gy):
        return gy, gy


def add(a, b) -> Tensor:
    """a + b with broadcasting."""
    return Add()(a, b)


class Sub(Function):
    def forward(self, a, b):
        _check_broadcast("sub", a, b)
        return a - b

    def backward(self, gy):
        return gy, (-gy if self.needs_input_grad[1] else None)


def sub(a, b) -> Tensor:
    """a - b with broadcasting."""
    return Sub()(a, b)


class Mul(Function):
    def forward(self, a, b):
        _check_broadcast("mul", a, b)
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        ga = gy * self.b if self.needs_input_grad[0] else None
        gb = gy * self.a if self.needs_input_grad[1] else None
        return ga, gb


def mul(a, b) -> Tensor:
    """a * b with broadcasting."""
    return Mul()(a, b)


class Div(Function):
    def forward(self, a, b):
        _check_broadcast("div", a, b)
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        ga = gy / self.b if self.needs_input_grad[0] else None
        gb = -gy * self.a / (self.b * self.b) if self.needs_input_grad[1] else None
        return ga, gb


def div(a, b) -> Tensor:
    """a / b with broadcasting."""
    return Div()(a, b)


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy


def neg(x) -> Tensor:
    """-x."""
    return Neg()(x)


class Pow(Function):
    def __init__(self, c: float):
        self.c = c

    def forward(self, x):
        self.x = x
        return x ** self.c

    def backward(self, gy):
        c = self.c
        return gy * (c * self.x ** (c - 1)).astype(gy.dtype, copy=False)


def pow(x, exponent: float) -> Tensor:
    """x ** exponent for a constant (Python number) exponent."""
    if isinstance(exponent, Tensor):
        raise TypeError("pow: only a constant (Python number) exponent is supported")
    if getattr(exponent, "ndim", None) == 0:  # a NumPy scalar would promote float32 to float64
        exponent = exponent.item()
    return Pow(exponent)(x)


class Exp(Function):
    def forward(self, x):
        self.y = self.xp.exp(x)
        return self.y

    def backward(self, gy):
        return gy * self.y


def exp(x) -> Tensor:
    """e ** x."""
    return Exp()(x)


class Log(Function):
    def forward(self, x):
        self.x = x
        return self.xp.log(x)

    def backward(self, gy):
        return gy / self.x


def log(x) -> Tensor:
    """Natural logarithm."""
    return Log()(x)


class ReLU(Function):
    def forward(self, x):
        self.y = kernels.relu(x)
        return self.y

    def backward(self, gy):
        return kernels.relu_grad(gy, self.y)  # gy where y > 0, else 0


def relu(x) -> Tensor:
    """max(x, 0), elementwise."""
    return ReLU()(x)


# ---- matmul ------------------------------------------------------------------------------

class MatMul(Function):
    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not match "
                             "(need (..., n, k) @ (..., k, m))")
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        T = self.xp.swapaxes
        ga = gy @ T(self.b, -1, -2) if self.needs_input_grad[0] else None
        gb = T(self.a, -1, -2) @ gy if self.needs_input_grad[1] else None
        return ga, gb


def matmul(a, b) -> Tensor:
    """Matrix product with NumPy's rules (1-D operands are promoted, batch dims broadcast)."""
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: scalar operand (shapes {a.shape} and {b.shape})")
    y = MatMul()(a.reshape(1, -1) if a.ndim == 1 else a, b.reshape(-1, 1) if b.ndim == 1 else b)
    if a.ndim == 1 or b.ndim == 1:  # drop the promoted dims again
        y = y.reshape(y.shape[:-2] + ((y.shape[-2],) if a.ndim > 1 else ()) + ((y.shape[-1],) if b.ndim > 1 else ()))
    return y


# ---- reductions --------------------------------------------------------------------------

def _reduce_axes(x: Tensor, dim, axis, keepdim, keepdims, op: str) -> tuple[tuple[int, ...] | None, bool]:
    """Resolve PyTorch-style (dim, keepdim) and NumPy-style (axis, keepdims) arguments."""
    dim = axis if axis is not None else dim
    keepdim = bool(keepdims if keepdims is not None else keepdim)
    if dim is None:
        return None, keepdim
    n = builtins.max(x.ndim, 1)
    dims = (dim,) if isinstance(dim, (int, np.integer)) else tuple(dim)
    for d in dims:
        if not -n <= d < n:
            raise ValueError(f"{op}: dim {d} out of range for a tensor of shape {x.shape}")
    return tuple(int(d) % n for d in dims), keepdim


def _keepdim_shape(shape, axes) -> tuple[int, ...]:
    """`shape` with the reduced `axes` (all when None) set to 1: a reduction's gradient broadcasts from it."""
    return tuple(1 if axes is None or i in axes else n for i, n in enumerate(shape))


class Sum(Function):
    def __init__(self, axes, keepdim):
        self.axes, self.keepdim = axes, keepdim

    def forward(self, x):
        self.shape = x.shape
        return self.xp.asarray(x.sum(axis=self.axes, keepdims=self.keepdim))

    def backward(self, gy):
        return self.xp.broadcast_to(gy.reshape(_keepdim_shape(self.shape, self.axes)), self.shape)


def sum(x, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """Sum over `dim` (all by default); `axis`/`keepdims` are accepted as NumPy spells them."""
    x = as_tensor(x)
    return Sum(*_reduce_axes(x, dim, axis, keepdim, keepdims, "sum"))(x)


def mean(x, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """Mean over `dim` (all by default): the sum divided by the number of values summed."""
    x = as_tensor(x)
    axes, keepdim = _reduce_axes(x, dim, axis, keepdim, keepdims, "mean")
    count = int(np.prod([x.shape[a] for a in axes] if axes is not None else x.shape))
    return Sum(axes, keepdim)(x) / count


class Max(Function):
    def __init__(self, axes, keepdim):
        self.axes, self.keepdim = axes, keepdim

    def forward(self, x):
        self.x = x
        self.y = self.xp.asarray(x.max(axis=self.axes, keepdims=True))
        return self.y if self.keepdim else self.y.reshape(
            [n for i, n in enumerate(x.shape) if self.axes is not None and i not in self.axes])

    def backward(self, gy):
        # ties share the gradient equally, so the gradient of max is well defined
        mask = self.x == self.y
        count = mask.sum(axis=self.axes, keepdims=True).astype(gy.dtype)
        return mask * (gy.reshape(_keepdim_shape(self.x.shape, self.axes)) / count)


def amax(x, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """Maximum values over `dim` (as `torch.amax`: values only, ties share the gradient)."""
    x = as_tensor(x)
    return Max(*_reduce_axes(x, dim, axis, keepdim, keepdims, "max"))(x)


max = amax


def argmax(x, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Indices of the maximum values over `dim` (of the flattened tensor by default); not differentiable."""
    x = as_tensor(x)
    if dim is None:
        return Tensor(x.data.argmax())
    axes, _ = _reduce_axes(x, dim, None, keepdim, None, "argmax")
    i = x.data.argmax(axis=axes[0])
    return Tensor(i.reshape(_keepdim_shape(x.shape, axes)) if keepdim else i)


# ---- device and dtype --------------------------------------------------------------------

class ToDevice(Function):
    def __init__(self, device):
        self.device = device

    def __call__(self, x):
        # forward crosses devices, so Function's same-device check does not apply
        self.src, self.needs_input_grad = x.device, (x.requires_grad,)
        return self._output(to_device(x.data, self.device), (x,))

    def backward(self, gy):
        return to_device(gy, self.src)


class Cast(Function):
    def __init__(self, dtype):
        self.dtype = dtype

    def forward(self, x):
        self.src = x.dtype
        return x.astype(self.dtype)

    def backward(self, gy):
        return gy.astype(self.src)


def to(x: Tensor, device: str | None = None, dtype=None) -> Tensor:
    """`x` on `device` and/or as `dtype` (x itself when nothing changes); differentiable."""
    if isinstance(device, (type, np.dtype)):  # t.to(np.float64), as torch's t.to(torch.float64)
        device, dtype = None, device
    if device is not None and normalize_device(device) != x.device:
        x = ToDevice(normalize_device(device))(x)
    if dtype is not None and np.dtype(dtype) != x.dtype:
        x = Cast(np.dtype(dtype))(x)
    return x


# ---- softmax ------------------------------------------------------------------------------

class LogSoftmax(Function):
    def __init__(self, dim):
        self.dim = dim

    def forward(self, x):
        self.y = kernels.log_softmax(x, self.dim)
        return self.y

    def backward(self, gy):
        return gy - self.xp.exp(self.y) * gy.sum(axis=self.dim, keepdims=True)


def log_softmax(x, dim: int = -1) -> Tensor:
    """log(softmax(x)) along `dim`, computed stably (no overflow for large logits)."""
    return LogSoftmax(dim)(x)


def softmax(x, dim: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along `dim`."""
    return exp(log_softmax(x, dim))


# ---- Tensor's operators and methods ------------------------------------------------------

def _comparison(op):
    return lambda self, other: Tensor(op(self.data, other.data if isinstance(other, Tensor) else other))


def _install_tensor_methods() -> None:
    """Give Tensor its arithmetic operators and op methods, now that the ops exist."""
    T = Tensor
    T.__add__, T.__sub__, T.__mul__, T.__truediv__, T.__matmul__ = add, sub, mul, div, matmul
    T.__radd__ = lambda self, other: add(other, self)
    T.__rsub__ = lambda self, other: sub(other, self)
    T.__rmul__ = lambda self, other: mul(other, self)
    T.__rtruediv__ = lambda self, other: div(other, self)
    T.__rmatmul__ = lambda self, other: matmul(other, self)
    T.__neg__, T.__pow__, T.__getitem__ = neg, pow, getitem
    # comparisons give plain (non-differentiable) boolean tensors
    T.__lt__, T.__le__ = _comparison(np.less), _comparison(np.less_equal)
    T.__gt__, T.__ge__ = _comparison(np.greater), _comparison(np.greater_equal)
    for f in (exp, log, relu, softmax, log_softmax, sum, mean, amax, argmax, reshape, flatten, transpose, permute,
              matmul, to):
        setattr(T, f.__name__, f)
    T.max = amax
    T.view = reshape
    T.T = property(lambda self: permute(self, *reversed(range(self.ndim))))
    T.cpu = lambda self: to(self, "cpu")
    T.cuda = lambda self: to(self, "cuda")
    T.float = lambda self: to(self, dtype=np.float32)
    T.double = lambda self: to(self, dtype=np.float64)


_install_tensor_methods()

__all__ = ["Add", "Cast", "Div", "Exp", "Log", "LogSoftmax", "MatMul", "Max", "Mul", "Neg", "Pow", "ReLU", "Sub",
           "Sum", "ToDevice", "add", "amax", "argmax", "cat", "concatenate", "div", "exp", "flatten", "getitem", "log",
           "log_softmax", "matmul", "max", "mean", "mul", "neg", "pad", "permute", "pow", "relu", "reshape",
           "softmax", "stack", "sub", "sum", "to", "transpose"]
