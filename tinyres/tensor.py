"""The autograd engine: `Tensor`, `Function`, the backward pass, and the basic ops.

A `Tensor` wraps an array (NumPy or CuPy) in `.data`. Each differentiable op is a
`Function` subclass with `forward` on arrays and `backward` from the output gradient `gy`
to the input gradients. Calling a Function records it on its output (`y._ctx`), which keeps
the inputs alive; `backward()` walks that graph once, in reverse topological order, and
cuts it as it goes, so saved arrays are freed as soon as their gradient has been used.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .backend import device_of, get_array_module, is_cupy, normalize_device, to_device


class _GradMode:
    enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Context manager (and decorator) in which ops record no graph, as `torch.no_grad()`."""
    prev = _GradMode.enabled
    _GradMode.enabled = False
    try:
        yield
    finally:
        _GradMode.enabled = prev


def is_grad_enabled() -> bool:
    """Whether ops currently record the graph."""
    return _GradMode.enabled


class Tensor:
    """An n-dimensional array with an optional gradient, as `torch.Tensor`."""

    __array_priority__ = 100  # so `ndarray * Tensor` defers to Tensor.__rmul__
    _freed = False  # set when backward() has freed the graph that computed this tensor

    def __init__(self, data: Any, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        if not (isinstance(data, np.ndarray) or is_cupy(data)):
            data = np.asarray(data)  # lists, Python and NumPy scalars become arrays
        if dtype is not None and data.dtype != np.dtype(dtype):
            data = data.astype(dtype)
        self.data = data
        self.grad: Tensor | None = None
        self._ctx: Function | None = None
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    # ---- properties --------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def device(self) -> str:
        return device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = "" if self.device == "cpu" else f", device='{self.device}'"
        return f"tensor({np.array2string(self.numpy(), prefix='tensor(')}, dtype={self.dtype}{dev}{grad})"

    # ---- conversion ----------------------------------------------------------------------
    def requires_grad_(self, flag: bool = True) -> Tensor:
        """Set `requires_grad` in place; only floating-point tensors can require a gradient."""
        if flag and self.data.dtype.kind not in "fc":
            raise TypeError(f"only floating-point tensors can require a gradient, "
                            f"got dtype {self.data.dtype} with shape {self.shape}")
        self.requires_grad = bool(flag)
        return self

    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU if needed)."""
        return to_device(self.data, "cpu")

    def item(self) -> float | int:
        """The value of a one-element tensor as a Python number."""
        if self.size != 1:
            raise ValueError(f"item(): tensor of shape {self.shape} has {self.size} elements, not 1")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """A tensor sharing this data, cut from the graph."""
        return Tensor(self.data)

    def to(self, device: str | None = None, dtype=None) -> Tensor:
        """A copy on `device` and/or of `dtype` (self when nothing changes); differentiable."""
        out = self
        if device is not None and normalize_device(device) != self.device:
            out = ToDevice(normalize_device(device))(out)
        if dtype is not None and np.dtype(dtype) != out.dtype:
            out = Cast(np.dtype(dtype))(out)
        return out

    def cpu(self) -> Tensor:
        return self.to("cpu")

    def cuda(self) -> Tensor:
        return self.to("cuda")

    def float(self) -> Tensor:
        return self.to(dtype=np.float32)

    def double(self) -> Tensor:
        return self.to(dtype=np.float64)

    def zero_(self) -> Tensor:
        self.data[...] = 0
        return self

    # ---- backward ------------------------------------------------------------------------
    def backward(self, grad: Any = None) -> None:
        """Accumulate d(self)/d(leaf) * grad into `.grad` of every leaf that requires it."""
        if not self.requires_grad:
            raise RuntimeError(f"backward(): tensor of shape {self.shape} does not require grad "
                               "and has no graph")
        xp = get_array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward(): grad can be implicit only for a scalar output; "
                                   f"this one has shape {self.shape}, so pass grad=")
            gy = xp.ones_like(self.data)
        else:
            gy = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if tuple(gy.shape) != self.shape:
                raise ValueError(f"backward(): grad shape {tuple(gy.shape)} does not match "
                                 f"output shape {self.shape}")
        _run_backward(self, gy)

    # ---- operators -----------------------------------------------------------------------
    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __rtruediv__(self, other): return div(other, self)
    def __neg__(self): return neg(self)
    def __pow__(self, exponent): return pow(self, exponent)
    def __matmul__(self, other): return matmul(self, other)
    def __rmatmul__(self, other): return matmul(other, self)
    def __getitem__(self, index): return getitem(self, index)

    # comparisons give plain (non-differentiable) boolean tensors
    def __lt__(self, other): return Tensor(self.data < _raw(other))
    def __le__(self, other): return Tensor(self.data <= _raw(other))
    def __gt__(self, other): return Tensor(self.data > _raw(other))
    def __ge__(self, other): return Tensor(self.data >= _raw(other))

    def exp(self): return exp(self)
    def log(self): return log(self)
    def relu(self):
        from .nn.functional import relu
        return relu(self)
    def sum(self, dim=None, keepdim=False, *, axis=None, keepdims=None): return sum(self, dim, keepdim, axis=axis, keepdims=keepdims)
    def mean(self, dim=None, keepdim=False, *, axis=None, keepdims=None): return mean(self, dim, keepdim, axis=axis, keepdims=keepdims)
    def max(self, dim=None, keepdim=False, *, axis=None, keepdims=None): return amax(self, dim, keepdim, axis=axis, keepdims=keepdims)
    def amax(self, dim=None, keepdim=False): return amax(self, dim, keepdim)
    def reshape(self, *shape): return reshape(self, *shape)
    def view(self, *shape): return reshape(self, *shape)
    def flatten(self, start_dim: int = 0, end_dim: int = -1): return flatten(self, start_dim, end_dim)
    def transpose(self, dim0: int, dim1: int): return transpose(self, dim0, dim1)
    def permute(self, *dims): return permute(self, *dims)
    def matmul(self, other): return matmul(self, other)

    @property
    def T(self) -> Tensor:
        return permute(self, *reversed(range(self.ndim)))


def _raw(x):
    return x.data if isinstance(x, Tensor) else x


def tensor(data: Any, requires_grad: bool = False, dtype=None, device: str = "cpu") -> Tensor:
    """A new leaf tensor from array-like `data` (floats default to float32), as `torch.tensor`."""
    if isinstance(data, Tensor):
        data = data.data
    if dtype is None and not hasattr(data, "dtype"):
        arr = np.asarray(data)
        dtype = np.float32 if arr.dtype.kind == "f" else None
        data = arr
    t = Tensor(to_device(data, device) if device_of(data) != normalize_device(device) else data, dtype=dtype)
    if t.data is data and hasattr(data, "copy"):
        t.data = data.copy(order="K")  # like torch.tensor: never alias the caller's array
    return t.requires_grad_(requires_grad)


def as_tensor(x: Any, like: Tensor | None = None) -> Tensor:
    """`x` as a Tensor; Python and NumPy scalars take the dtype and device of `like`."""
    if isinstance(x, Tensor):
        return x
    if like is not None and (np.isscalar(x) or (hasattr(x, "ndim") and x.ndim == 0 and not hasattr(x, "device"))):
        xp = get_array_module(like.data)
        return Tensor(xp.asarray(x, dtype=like.dtype))
    return Tensor(x)


# ---- the graph ---------------------------------------------------------------------------

class Function:
    """One differentiable op. Subclasses define `forward(*arrays)` and `backward(gy)`.

    `backward` returns one gradient (or None) per input, each of the input's shape.
    `self.needs_input_grad[i]` says whether input i wants a gradient, so costly
    gradients that nobody needs are skipped.
    """

    inputs: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]

    def __call__(self, *inputs: Any) -> Tensor:
        ref = next((x for x in inputs if isinstance(x, Tensor)), None)
        tensors = tuple(as_tensor(x, ref) for x in inputs)
        arrays = [t.data for t in tensors]
        self.xp = get_array_module(*arrays, op=type(self).__name__)
        floats = {a.dtype for a in arrays if a.dtype.kind == "f"}
        if len(floats) > 1:  # fail here, at the op that mixes them, not later in backward
            raise TypeError(f"{type(self).__name__}: inputs mix dtypes "
                            f"({', '.join(f'{a.dtype}{tuple(a.shape)}' for a in arrays)}); "
                            "convert with .float() or .double() first")
        y = self.forward(*arrays)
        out = Tensor(y)
        self.needs_input_grad = tuple(t.requires_grad for t in tensors)
        if _GradMode.enabled and any(self.needs_input_grad):
            out.requires_grad = True
            out._ctx = self
            self.inputs = tensors
        return out

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, gy):
        raise NotImplementedError


def _topological_order(root: Tensor) -> list[Tensor]:
    """Tensors of the graph under `root`, each after all tensors computed from it (iterative DFS)."""
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        t, children_done = stack.pop()
        if children_done:
            order.append(t)
            continue
        if id(t) in visited:
            continue
        if t._freed:
            raise RuntimeError(f"backward(): a tensor of shape {t.shape} in this graph was computed by a graph "
                               "that an earlier backward() freed; compute it again")
        visited.add(id(t))
        stack.append((t, True))
        if t._ctx is not None:
            for x in t._ctx.inputs:
                if x.requires_grad and id(x) not in visited:
                    stack.append((x, False))
    order.reverse()  # root first
    return order


def _run_backward(root: Tensor, gy) -> None:
    grads: dict[int, Any] = {id(root): gy}
    owned: set[int] = set()  # grads we allocated ourselves and may add into in place
    for t in _topological_order(root):
        g = grads.pop(id(t), None)
        if g is None:
            continue
        fn = t._ctx
        if fn is None:  # a leaf: accumulate into .grad
            if t.grad is None:
                t.grad = Tensor(g if id(t) in owned else g.copy())
            else:
                t.grad.data += g
            continue
        gxs = fn.backward(g)
        if not isinstance(gxs, tuple):
            gxs = (gxs,)
        del g
        for x, gx in zip(fn.inputs, gxs):
            if gx is None or not x.requires_grad:
                continue
            if gx.shape != x.data.shape:
                gx = _unbroadcast(gx, x.data.shape, fn)
            if gx.dtype != x.dtype:
                raise TypeError(f"{type(fn).__name__}.backward: gradient dtype {gx.dtype} "
                                f"differs from input dtype {x.dtype}")
            k = id(x)
            if k not in grads:
                grads[k] = gx
            elif k in owned:
                grads[k] += gx
            else:  # the first gradient may be a view of another array: never add into it
                grads[k] = grads[k] + gx
                owned.add(k)
        # free the graph as we go: saved arrays die with the Function
        t._ctx, t._freed = None, True
        fn.inputs = ()
        fn.__dict__.clear()


def _unbroadcast(g, shape: tuple[int, ...], fn: Function):
    """Sum `g` over the axes that broadcasting added or stretched, giving `shape`."""
    extra = g.ndim - len(shape)
    if extra < 0:
        raise ValueError(f"{type(fn).__name__}.backward: gradient of shape {tuple(g.shape)} "
                         f"cannot be reduced to input shape {shape}")
    axes = tuple(range(extra)) + tuple(i + extra for i, n in enumerate(shape) if n == 1 and g.shape[i + extra] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    g = g.reshape(shape)
    return g


# ---- elementwise arithmetic --------------------------------------------------------------

def _check_broadcast(op: str, a, b) -> None:
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {tuple(a.shape)} and {tuple(b.shape)} "
                         "cannot be broadcast together") from None


class Add(Function):
    def forward(self, a, b):
        _check_broadcast("add", a, b)
        return a + b

    def backward(self, gy):
        return gy, gy


class Sub(Function):
    def forward(self, a, b):
        _check_broadcast("sub", a, b)
        return a - b

    def backward(self, gy):
        return gy, (-gy if self.needs_input_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        _check_broadcast("mul", a, b)
        self.a, self.b = a, b
        return a * b

    def backward(self, gy):
        ga = gy * self.b if self.needs_input_grad[0] else None
        gb = gy * self.a if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        _check_broadcast("div", a, b)
        self.a, self.b = a, b
        return a / b

    def backward(self, gy):
        ga = gy / self.b if self.needs_input_grad[0] else None
        gb = -gy * self.a / (self.b * self.b) if self.needs_input_grad[1] else None
        return ga, gb


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, gy):
        return -gy


class Pow(Function):
    def __init__(self, exponent: float):
        self.c = exponent

    def forward(self, x):
        self.x = x
        return x ** self.c

    def backward(self, gy):
        c = self.c
        return gy * (c * self.x ** (c - 1)).astype(gy.dtype, copy=False)


class Exp(Function):
    def forward(self, x):
        self.y = self.xp.exp(x)
        return self.y

    def backward(self, gy):
        return gy * self.y


class Log(Function):
    def forward(self, x):
        self.x = x
        return self.xp.log(x)

    def backward(self, gy):
        return gy / self.x


def add(a, b) -> Tensor:
    """a + b with broadcasting."""
    return Add()(a, b)


def sub(a, b) -> Tensor:
    """a - b with broadcasting."""
    return Sub()(a, b)


def mul(a, b) -> Tensor:
    """a * b with broadcasting."""
    return Mul()(a, b)


def div(a, b) -> Tensor:
    """a / b with broadcasting."""
    return Div()(a, b)


def neg(x) -> Tensor:
    """-x."""
    return Neg()(x)


def pow(x, exponent: float) -> Tensor:
    """x ** exponent for a constant (Python number) exponent."""
    if isinstance(exponent, Tensor):
        raise TypeError("pow: only a constant (Python number) exponent is supported")
    if getattr(exponent, "ndim", None) == 0:  # a NumPy scalar would promote float32 to float64
        exponent = exponent.item()
    return Pow(exponent)(x)


def exp(x) -> Tensor:
    """e ** x."""
    return Exp()(x)


def log(x) -> Tensor:
    """Natural logarithm."""
    return Log()(x)


# ---- matmul ------------------------------------------------------------------------------

class MatMul(Function):
    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not match "
                             "(need (..., n, k) @ (..., k, m))")
        self.a, self.b = a, b
        return a @ b

    def backward(self, gy):
        xp = self.xp
        ga = gy @ xp.swapaxes(self.b, -1, -2) if self.needs_input_grad[0] else None
        gb = xp.swapaxes(self.a, -1, -2) @ gy if self.needs_input_grad[1] else None
        return ga, gb


def matmul(a, b) -> Tensor:
    """Matrix product with NumPy's rules (1-D operands are promoted, batch dims broadcast)."""
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: scalar operand (shapes {a.shape} and {b.shape})")
    squeeze = []
    if a.ndim == 1:
        a, squeeze = reshape(a, 1, a.shape[0]), squeeze + [-2]
    if b.ndim == 1:
        b, squeeze = reshape(b, b.shape[0], 1), squeeze + [-1]
    y = MatMul()(a, b)
    if squeeze:
        shape = list(y.shape)
        for ax in sorted(squeeze):  # -2 before -1 so indices stay valid
            shape.pop(ax if ax == -1 else len(shape) - 2)
        y = reshape(y, *shape)
    return y


# ---- reductions --------------------------------------------------------------------------

def _axes(dim, axis, keepdim, keepdims, ndim: int, op: str):
    """Resolve PyTorch-style (dim, keepdim) and NumPy-style (axis, keepdims) arguments."""
    if axis is not None:
        dim = axis
    if keepdims is not None:
        keepdim = keepdims
    if dim is None:
        return None, bool(keepdim)
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if not -ndim <= d < builtins.max(ndim, 1):
            raise ValueError(f"{op}: dim {d} out of range for a tensor with {ndim} dims")
        out.append(d % builtins.max(ndim, 1))
    return tuple(out), bool(keepdim)


def _expand_reduced(g, shape, axes, keepdim):
    """Reshape a reduced gradient so it broadcasts against the input `shape`."""
    if axes is None:
        return g.reshape((1,) * len(shape))
    if not keepdim:
        kept = [1 if i in axes else n for i, n in enumerate(shape)]
        g = g.reshape(kept)
    return g


class Sum(Function):
    def __init__(self, axes, keepdim):
        self.axes, self.keepdim = axes, keepdim

    def forward(self, x):
        self.shape = x.shape
        return self.xp.asarray(x.sum(axis=self.axes, keepdims=self.keepdim))

    def backward(self, gy):
        g = _expand_reduced(gy, self.shape, self.axes, self.keepdim)
        return self.xp.broadcast_to(g, self.shape)


class Mean(Function):
    def __init__(self, axes, keepdim):
        self.axes, self.keepdim = axes, keepdim

    def forward(self, x):
        self.shape = x.shape
        return self.xp.asarray(x.mean(axis=self.axes, keepdims=self.keepdim))

    def backward(self, gy):
        n = int(np.prod(self.shape)) if self.axes is None else int(np.prod([self.shape[a] for a in self.axes]))
        g = _expand_reduced(gy, self.shape, self.axes, self.keepdim) / gy.dtype.type(n)
        return self.xp.broadcast_to(g, self.shape)


class Max(Function):
    def __init__(self, axes, keepdim):
        self.axes, self.keepdim = axes, keepdim

    def forward(self, x):
        self.x = x
        self.y = self.xp.asarray(x.max(axis=self.axes, keepdims=True))
        return self.y if self.keepdim else self.y.reshape(
            () if self.axes is None else [n for i, n in enumerate(x.shape) if i not in self.axes])

    def backward(self, gy):
        # ties share the gradient equally, so the gradient of max is well defined
        mask = (self.x == self.y)
        count = mask.sum(axis=self.axes, keepdims=True).astype(gy.dtype)
        g = _expand_reduced(gy, self.x.shape, self.axes, self.keepdim)
        return mask * (g / count)


def sum(x, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """Sum over `dim` (all by default); `axis`/`keepdims` are accepted as NumPy spells them."""
    x = as_tensor(x)
    axes, keepdim = _axes(dim, axis, keepdim, keepdims, x.ndim, "sum")
    return Sum(axes, keepdim)(x)


def mean(x, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """Mean over `dim` (all by default)."""
    x = as_tensor(x)
    axes, keepdim = _axes(dim, axis, keepdim, keepdims, x.ndim, "mean")
    return Mean(axes, keepdim)(x)


def amax(x, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """Maximum values over `dim` (as `torch.amax`: values only, ties share the gradient)."""
    x = as_tensor(x)
    axes, keepdim = _axes(dim, axis, keepdim, keepdims, x.ndim, "max")
    return Max(axes, keepdim)(x)


max = amax


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


class Permute(Function):
    def __init__(self, dims):
        self.dims = dims

    def forward(self, x):
        if sorted(d % builtins.max(x.ndim, 1) for d in self.dims) != list(range(x.ndim)):
            raise ValueError(f"permute: dims {self.dims} are not a permutation for shape {tuple(x.shape)}")
        return x.transpose(self.dims)

    def backward(self, gy):
        return gy.transpose(np.argsort([d % gy.ndim for d in self.dims]))


def reshape(x, *shape) -> Tensor:
    """The same elements in a new shape (one dim may be -1)."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape(tuple(int(s) for s in shape))(x)


def flatten(x, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """Merge dims start_dim..end_dim into one."""
    x = as_tensor(x)
    s, e = start_dim % x.ndim, end_dim % x.ndim
    shape = x.shape[:s] + (-1,) + x.shape[e + 1:]
    return reshape(x, shape)


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


class GetItem(Function):
    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.x = x  # kept for its memory layout only: the gradient is laid out like x
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
        if any(lo < 0 or hi < 0 for lo, hi in self.widths):
            raise ValueError(f"pad: negative padding {self.widths} is not supported")
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
        bounds = np.cumsum(self.sizes)[:-1]
        return tuple(self.xp.split(gy, bounds, axis=self.axis))


def cat(tensors: Sequence[Any], dim: int = 0) -> Tensor:
    """Join tensors along an existing dim (as `torch.cat`)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: expected a non-empty sequence of tensors")
    ndim = as_tensor(tensors[0]).ndim
    return Concatenate(dim % ndim)(*tensors)


concatenate = cat


def stack(tensors: Sequence[Any], dim: int = 0) -> Tensor:
    """Join tensors along a new dim."""
    ts = [as_tensor(t) for t in tensors]
    d = dim % (ts[0].ndim + 1)
    return cat([reshape(t, t.shape[:d] + (1,) + t.shape[d:]) for t in ts], d)


# ---- device and dtype --------------------------------------------------------------------

class ToDevice(Function):
    def __init__(self, device):
        self.device = device

    def __call__(self, x):
        # forward crosses devices, so the usual same-device check does not apply
        self.src = x.device
        out = Tensor(to_device(x.data, self.device))
        self.needs_input_grad = (x.requires_grad,)
        if _GradMode.enabled and x.requires_grad:
            out.requires_grad, out._ctx, self.inputs = True, self, (x,)
        return out

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


def zeros(*shape, dtype=np.float32, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    """A tensor of zeros."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tensor(np.zeros(shape, dtype=dtype), requires_grad=requires_grad, device=device)


def ones(*shape, dtype=np.float32, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    """A tensor of ones."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tensor(np.ones(shape, dtype=dtype), requires_grad=requires_grad, device=device)
