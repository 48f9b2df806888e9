"""The basic differentiable ops: elementwise arithmetic, matmul, reductions, shape ops, casts.

Each op is a `Function` (forward on arrays, backward from `gy`) directly followed by the
function users call. Broadcasting is undone centrally (`tensor.unbroadcast`), so an op's
backward may return a gradient of the broadcast shape. At the end of the module the ops are
attached to `Tensor` as its operators and methods.
"""

from __future__ import annotations

import builtins
from typing import NamedTuple

import numpy as np

from . import kernels
from .backend import get_array_module, normalize_device, to_device
from .shape_ops import (
    cat,
    clone,
    concatenate,
    expand,
    flatten,
    getitem,
    pad,
    permute,
    reshape,
    squeeze,
    stack,
    t,
    transpose,
    unsqueeze,
)
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


def amin(x, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """Minimum values over `dim` (as `torch.amin`): the maximum of -x, negated."""
    return neg(amax(neg(x), dim, keepdim, axis=axis, keepdims=keepdims))


class ValuesIndices(NamedTuple):
    """What `max(x, dim)` and `min(x, dim)` return, as PyTorch's `torch.return_types.max`."""

    values: Tensor
    indices: Tensor


def _max_or_min(op: str, x, dim, keepdim: bool) -> Tensor | ValuesIndices:
    x = as_tensor(x)
    if isinstance(dim, Tensor):
        raise TypeError(f"{op}(input, other), the elementwise {op}imum of two tensors, is not an op of tinyres; "
                        f"for the {op} over a dim pass an int: {op}(x, dim)")
    if dim is None:
        return amax(x) if op == "max" else amin(x)
    if not isinstance(dim, (int, np.integer)):
        raise TypeError(f"{op}: dim must be an int, got {dim!r}; use a{op}(x, dim) for the {op} over several dims")
    values = amax(x, dim, keepdim) if op == "max" else amin(x, dim, keepdim)
    return ValuesIndices(values, argmax(x, dim, keepdim) if op == "max" else argmin(x, dim, keepdim))


def max(x, dim=None, keepdim: bool = False) -> Tensor | ValuesIndices:
    """The largest value (no `dim`), or, as PyTorch, `(values, indices)` of the largest along the int `dim`."""
    return _max_or_min("max", x, dim, keepdim)


def min(x, dim=None, keepdim: bool = False) -> Tensor | ValuesIndices:
    """The smallest value (no `dim`), or, as PyTorch, `(values, indices)` of the smallest along the int `dim`."""
    return _max_or_min("min", x, dim, keepdim)


def _arg_reduce(op: str, x, dim, keepdim: bool) -> Tensor:
    x = as_tensor(x)
    find = x.data.argmax if op == "argmax" else x.data.argmin
    if dim is None:
        return Tensor(find())
    axes, _ = _reduce_axes(x, dim, None, keepdim, None, op)
    i = find(axis=axes[0])
    return Tensor(i.reshape(_keepdim_shape(x.shape, axes)) if keepdim else i)


def argmax(x, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Indices of the maximum values over `dim` (of the flattened tensor by default); not differentiable."""
    return _arg_reduce("argmax", x, dim, keepdim)


def argmin(x, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Indices of the minimum values over `dim` (of the flattened tensor by default); not differentiable."""
    return _arg_reduce("argmin", x, dim, keepdim)


def topk(x, k: int, dim: int = -1, largest: bool = True, sorted: bool = True) -> ValuesIndices:
    """The `k` largest (or smallest) values along `dim` and their indices, as `torch.topk`: always in order
    (largest first), ties in index order; the values are differentiable."""
    x = as_tensor(x)
    (d,), _ = _reduce_axes(x, dim, None, False, None, "topk")
    if not 0 <= k <= x.shape[d]:
        raise ValueError(f"topk: k={k} out of range for dim {dim} of a tensor of shape {x.shape}")
    xp = get_array_module(x.data)
    stable = {"kind": "stable"} if xp is np else {}  # CuPy's sort is always stable and takes no other kind
    order = xp.argsort(-x.data if largest else x.data, axis=d, **stable)
    indices = xp.take(order, xp.arange(k), axis=d)
    # index arrays that pick indices[..., j, ...] along d and keep every other position
    grid = [xp.arange(n).reshape([-1 if i == a else 1 for i in range(x.ndim)]) for a, n in enumerate(indices.shape)]
    grid[d] = indices
    return ValuesIndices(getitem(x, tuple(grid)), Tensor(indices))


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


def _truth(self: Tensor) -> bool:
    # as PyTorch: `if a == b:` on many elements is a mistake, not a question with an answer
    if self.numel() != 1:
        raise RuntimeError(f"the truth value of a tensor of shape {self.shape} is ambiguous: "
                           "use (...).all() or (...).any(), or .item() on a one-element tensor")
    return bool(self.item())


# PyTorch methods a training script may reach for that tinyres leaves out, and what to use instead
_IN_PLACE = ("in-place ops are left out (they would need PyTorch's version counters): write x = x {} y, "
             "or change x.data, the array, where no gradient is involved")
LEFT_OUT_METHODS = {
    **{f"{name}_": _IN_PLACE.format(sign) for name, sign in
       (("add", "+"), ("sub", "-"), ("mul", "*"), ("div", "/"), ("pow", "**"))},
    **dict.fromkeys(("clamp_", "copy_", "fill_", "normal_", "uniform_", "relu_", "exp_", "log_", "sqrt_"),
                    "in-place ops are left out: on a parameter, use tinyres.nn.init (e.g. init.normal_) or "
                    "assign to .data, the array"),
    "register_hook": "hooks on tensors are left out: use Module.register_forward_hook, or read .grad after "
                     "backward()",
    "retain_grad": "only leaves get a .grad: make the tensor a leaf (x = x.detach().requires_grad_())",
    "type": "use .to(dtype), .float(), .double() or .long()",
    "repeat": "use tinyres.cat([x] * n, dim)",
    "data_ptr": "use .data, the NumPy or CuPy array, and its own attributes",
    "storage": "use .data, the NumPy or CuPy array",
    "pin_memory": "there is nothing to pin: a tensor moves to the GPU with .to('cuda')",
    "share_memory_": "multi-process training is left out",
}
_LEFT_OUT_FUNCTIONS = ("abs", "sqrt", "sigmoid", "tanh", "clamp", "clip", "sin", "cos", "std", "var", "norm",
                       "prod", "cumsum", "sort", "gather", "scatter", "where", "masked_fill", "split",
                       "chunk", "roll", "flip")
LEFT_OUT_METHODS.update(dict.fromkeys(
    _LEFT_OUT_FUNCTIONS, "not an op of tinyres, which has the ops the paper's networks need (see tinyres.ops); "
                         "compute it on .numpy() where no gradient is needed"))


def _missing_attribute(self: Tensor, name: str):
    # only called when normal lookup fails
    if name in LEFT_OUT_METHODS:
        raise AttributeError(f"'Tensor' object has no attribute {name!r}: {LEFT_OUT_METHODS[name]}")
    raise AttributeError(f"'Tensor' object has no attribute {name!r}")


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
    T.__eq__, T.__ne__ = _comparison(np.equal), _comparison(np.not_equal)
    T.__hash__ = object.__hash__  # tensors are hashed by identity, as in PyTorch
    T.__bool__ = _truth
    T.eq, T.ne, T.lt, T.le, T.gt, T.ge = T.__eq__, T.__ne__, T.__lt__, T.__le__, T.__gt__, T.__ge__
    T.__getattr__ = _missing_attribute
    for f in (exp, log, relu, softmax, log_softmax, sum, mean, amax, amin, argmax, argmin, max, min, reshape,
              flatten, transpose, permute, unsqueeze, squeeze, clone, t, expand, topk, matmul, to):
        setattr(T, f.__name__, f)
    T.view = reshape
    T.view_as = lambda self, other: reshape(self, other.shape)
    T.expand_as = lambda self, other: expand(self, other.shape)
    T.contiguous = lambda self: self  # every op accepts any memory layout
    T.T = property(lambda self: permute(self, *reversed(range(self.ndim))))
    T.is_cuda = property(lambda self: self.device == "cuda")
    T.cpu = lambda self: to(self, "cpu")
    T.cuda = lambda self: to(self, "cuda")
    T.float = lambda self: to(self, dtype=np.float32)
    T.double = lambda self: to(self, dtype=np.float64)
    T.long = lambda self: to(self, dtype=np.int64)
    T.int = lambda self: to(self, dtype=np.int32)
    T.bool = lambda self: to(self, dtype=np.bool_)
    T.all = lambda self: Tensor(self.data.all())
    T.any = lambda self: Tensor(self.data.any())


_install_tensor_methods()

__all__ = ["Add", "Cast", "Div", "Exp", "Log", "LogSoftmax", "MatMul", "Max", "Mul", "Neg", "Pow", "ReLU", "Sub",
           "Sum", "ToDevice", "ValuesIndices", "add", "amax", "amin", "argmax", "argmin", "cat", "clone",
           "concatenate", "div", "exp", "expand", "flatten", "getitem", "log", "log_softmax", "matmul", "max", "mean",
           "min", "mul", "neg", "pad", "permute", "pow", "relu", "reshape", "softmax", "squeeze", "stack", "sub",
           "sum", "t", "to", "topk", "transpose", "unsqueeze"]
