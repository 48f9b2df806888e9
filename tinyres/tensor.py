"""The engine: `Tensor`, `Function` and the backward pass.

A `Tensor` wraps an array (NumPy or CuPy) in `.data`. Each differentiable op is a `Function`
with `forward` on arrays and `backward` from the output gradient `gy` to the input gradients.
Calling a Function records it on its output as `y.grad_fn`, which keeps the inputs alive;
`Tensor.backward()` walks that graph once, in reverse topological order, and cuts it as it goes,
so saved arrays are freed as soon as their gradient has been used.

The ops themselves (arithmetic, matmul, reductions, shape ops, casts) live in `tinyres.ops`,
which also attaches them to Tensor as operators and methods (`+`, `@`, `.sum()`, `.to()`, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import kernels
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


@contextlib.contextmanager
def set_grad_enabled(mode: bool) -> Iterator[None]:
    """Context manager in which ops record the graph if `mode`, as `torch.set_grad_enabled(mode)`."""
    prev = _GradMode.enabled
    _GradMode.enabled = bool(mode)
    try:
        yield
    finally:
        _GradMode.enabled = prev


def enable_grad():
    """Context manager (and decorator) that records the graph again inside `no_grad`, as `torch.enable_grad()`."""
    return set_grad_enabled(True)


def inference_mode(mode: bool = True):
    """As `torch.inference_mode()`: here the same as `no_grad()` (there are no version counters to skip)."""
    return set_grad_enabled(not mode)


def is_grad_enabled() -> bool:
    """Whether ops currently record the graph."""
    return _GradMode.enabled


class Tensor:
    """An n-dimensional array with an optional gradient, as `torch.Tensor`."""

    # An array on the left of `array * tensor` hands the operation to Tensor.__rmul__: NumPy
    # because __array_ufunc__ is None, CuPy because our priority is higher than its 100.
    __array_ufunc__ = None
    __array_priority__ = 1000
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
        self.grad_fn: Function | None = None  # the op that computed this tensor, while the graph lives
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

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
    def device(self) -> str:
        return device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self.grad_fn is None

    def size(self, dim: int | None = None):
        """The shape, or the length of dimension `dim`, as `torch.Tensor.size`."""
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        """The number of elements."""
        return int(self.data.size)

    def dim(self) -> int:
        return self.data.ndim

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        grad_fn = f", grad_fn=<{type(self.grad_fn).__name__}>" if self.grad_fn is not None else ""
        dev = "" if self.device == "cpu" else f", device='{self.device}'"
        body = np.array2string(self.numpy(), prefix="tensor(")
        return f"tensor({body}, dtype={self.dtype}{dev}{grad_fn or grad})"

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
        if self.numel() != 1:
            raise ValueError(f"item(): tensor of shape {self.shape} has {self.numel()} elements, not 1")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> Tensor:
        """A tensor sharing this data, cut from the graph."""
        return Tensor(self.data)

    def zero_(self) -> Tensor:
        self.data[...] = 0
        return self

    def backward(self, grad: Any = None) -> None:
        """Accumulate d(self)/d(leaf) * grad into `.grad` of every leaf that requires it."""
        if not self.requires_grad:
            raise RuntimeError(f"backward(): tensor of shape {self.shape} does not require grad "
                               "and has no graph")
        xp = get_array_module(self.data)
        if grad is None:
            if self.numel() != 1:
                raise RuntimeError(f"backward(): grad can be implicit only for a scalar output; "
                                   f"this one has shape {self.shape}, so pass grad=")
            gy = xp.ones_like(self.data)
        else:
            gy = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if tuple(gy.shape) != self.shape:
                raise ValueError(f"backward(): grad shape {tuple(gy.shape)} does not match "
                                 f"output shape {self.shape}")
        run_backward(self, gy)


# ---- making tensors ----------------------------------------------------------------------

# dtypes under PyTorch's names: `x.to(tinyres.float64)`, `tinyres.zeros(3, dtype=tinyres.int64)`
float32, float64, int64, int32, uint8 = (np.dtype(t) for t in ("float32", "float64", "int64", "int32", "uint8"))

def tensor(data: Any, requires_grad: bool = False, dtype=None, device: str | None = None) -> Tensor:
    """A new leaf tensor holding a copy of `data` (floats default to float32), as `torch.tensor`.

    The data stays on the device it is on (a CuPy array gives a CUDA tensor) unless `device` is given.
    """
    if isinstance(data, Tensor):
        data = data.data
    if dtype is None and not hasattr(data, "dtype"):
        data = np.asarray(data)
        dtype = np.float32 if data.dtype.kind == "f" else None
    if device is not None and device_of(data) != normalize_device(device):
        data = to_device(data, device)
    t = Tensor(data, dtype=dtype)
    if t.data is data and hasattr(data, "copy"):
        t.data = data.copy(order="K")  # never alias the caller's array
    return t.requires_grad_(requires_grad)


def from_numpy(array: np.ndarray) -> Tensor:
    """A tensor sharing the memory of NumPy `array` (no copy, dtype kept), as `torch.from_numpy`."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"from_numpy: expected a numpy.ndarray, got {type(array).__name__}")
    return Tensor(array)


def as_tensor(x: Any, like: Tensor | None = None) -> Tensor:
    """`x` as a Tensor; scalars and 0-d arrays take the dtype and device of `like`, as in PyTorch."""
    if isinstance(x, Tensor):
        return x
    # a 0-d array counts as a scalar when it can go to like's device (a NumPy one always can)
    if like is not None and (np.isscalar(x) or getattr(x, "ndim", None) == 0 and device_of(x) in ("cpu", like.device)):
        xp = get_array_module(like.data)
        return Tensor(xp.asarray(x, dtype=like.dtype))
    return Tensor(x)


def arange(start, end=None, step=1, dtype=None, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    """start, start + step, ... below end (0 ... start - 1 with one argument), as `torch.arange`: int64 for
    integer arguments, float32 otherwise."""
    if end is None:
        start, end = 0, start
    values = np.arange(start, end, step)
    if dtype is None:
        dtype = np.int64 if values.dtype.kind in "iu" else np.float32
    return tensor(values.astype(dtype), requires_grad=requires_grad, device=device)


def _shape_arg(shape: tuple) -> tuple[int, ...]:
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)


def zeros(*shape, dtype=np.float32, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    """A tensor of zeros."""
    return tensor(np.zeros(_shape_arg(shape), dtype=dtype), requires_grad=requires_grad, device=device)


def ones(*shape, dtype=np.float32, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    """A tensor of ones."""
    return tensor(np.ones(_shape_arg(shape), dtype=dtype), requires_grad=requires_grad, device=device)


_generator = np.random.default_rng(0)  # a fixed seed, as PyTorch's: a fresh process builds the same model


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the generator that `randn` and the initializers in `nn.init` use by default; return it."""
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator


def default_generator() -> np.random.Generator:
    """The generator used when none is passed."""
    return _generator


def randn(*shape, dtype=np.float32, device: str = "cpu", requires_grad: bool = False,
          generator: np.random.Generator | None = None) -> Tensor:
    """Standard normal samples, from `generator` or the one `tinyres.manual_seed` seeds."""
    values = (generator or _generator).standard_normal(_shape_arg(shape)).astype(dtype)
    return tensor(values, requires_grad=requires_grad, device=device)


def rand(*shape, dtype=np.float32, device: str = "cpu", requires_grad: bool = False,
         generator: np.random.Generator | None = None) -> Tensor:
    """Uniform samples from [0, 1), from `generator` or the one `tinyres.manual_seed` seeds."""
    values = (generator or _generator).random(_shape_arg(shape)).astype(dtype)
    return tensor(values, requires_grad=requires_grad, device=device)


def randint(low: int, high: int | None = None, size: tuple[int, ...] = (), dtype=np.int64, device: str = "cpu",
            generator: np.random.Generator | None = None) -> Tensor:
    """Integers from [low, high) (from [0, low) without `high`) of shape `size`, as `torch.randint`."""
    if high is None:
        low, high = 0, low
    return tensor((generator or _generator).integers(low, high, size).astype(dtype), device=device)


def full(shape, fill_value, dtype=None, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    """A tensor of `fill_value` (float32 for a float, int64 for an int)."""
    if dtype is None:
        dtype = np.int64 if isinstance(fill_value, (int, np.integer)) and not isinstance(fill_value, bool) else \
            np.bool_ if isinstance(fill_value, bool) else np.float32
    return tensor(np.full(_shape_arg((shape,)), fill_value, dtype=dtype), requires_grad=requires_grad, device=device)


def empty(*shape, dtype=np.float32, device: str = "cpu", requires_grad: bool = False) -> Tensor:
    """A tensor to be filled (here zeros: NumPy's uninitialized memory buys nothing at these sizes)."""
    return zeros(*shape, dtype=dtype, device=device, requires_grad=requires_grad)


def zeros_like(t: Tensor, requires_grad: bool = False) -> Tensor:
    """Zeros of the shape, dtype and device of `t`."""
    xp = get_array_module(t.data)
    return Tensor(xp.zeros(t.shape, dtype=t.dtype), requires_grad=requires_grad)


def ones_like(t: Tensor, requires_grad: bool = False) -> Tensor:
    """Ones of the shape, dtype and device of `t`."""
    xp = get_array_module(t.data)
    return Tensor(xp.ones(t.shape, dtype=t.dtype), requires_grad=requires_grad)


# ---- the graph ---------------------------------------------------------------------------

class Function:
    """One differentiable op. Subclasses define `forward(*arrays)` and `backward(gy)`.

    `backward` returns one gradient (or None) per input, each of the input's shape (or
    broadcastable to it: broadcasting is undone here, once, for every op).
    `self.needs_input_grad[i]` says whether input i wants a gradient, so costly gradients
    that nobody needs are skipped. `self.xp` is the array module (numpy or cupy) of the inputs.
    """

    inputs: tuple[Tensor, ...]
    needs_input_grad: tuple[bool, ...]

    def __call__(self, *inputs: Any) -> Tensor:
        ref = next((x for x in inputs if isinstance(x, Tensor)), None)
        tensors = tuple(as_tensor(x, ref) for x in inputs)
        arrays = [t.data for t in tensors]
        self.xp = get_array_module(*arrays, op=self.name)
        floats = {a.dtype for a in arrays if a.dtype.kind == "f"}
        if len(floats) > 1:  # fail here, at the op that mixes them, not later in backward
            raise TypeError(f"{self.name}: inputs mix dtypes "
                            f"({', '.join(f'{a.dtype}{tuple(a.shape)}' for a in arrays)}); "
                            "convert with .float() or .double() first")
        self.needs_input_grad = tuple(t.requires_grad for t in tensors)
        return self._output(self.forward(*arrays), tensors)

    def _output(self, y, inputs: tuple[Tensor, ...]) -> Tensor:
        """`y` as a Tensor; recorded as computed by this op from `inputs` when a gradient is to flow back."""
        out = Tensor(y)
        if _GradMode.enabled and any(self.needs_input_grad):
            out.requires_grad = True
            out.grad_fn = self
            self.inputs = inputs
        return out

    @property
    def name(self) -> str:
        return type(self).__name__

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, gy):
        raise NotImplementedError


def topological_order(root: Tensor) -> list[Tensor]:
    """Tensors of the graph under `root`, each before the tensors it was computed from.

    An iterative depth-first search: a recursive one hits Python's recursion limit on ResNet-110.
    """
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        t, inputs_done = stack.pop()
        if inputs_done:
            order.append(t)
            continue
        if id(t) in visited:
            continue
        if t._freed:
            raise RuntimeError(f"backward(): a tensor of shape {t.shape} in this graph was computed by a graph "
                               "that an earlier backward() freed; compute it again")
        visited.add(id(t))
        stack.append((t, True))
        if t.grad_fn is not None:
            stack.extend((x, False) for x in t.grad_fn.inputs if x.requires_grad and id(x) not in visited)
    order.reverse()  # root first
    return order


def run_backward(root: Tensor, gy) -> None:
    """Propagate `gy` = dL/d(root) to every leaf under `root`, freeing the graph as it goes."""
    grads: dict[int, Any] = {id(root): gy}
    owned: set[int] = set()  # gradients we allocated ourselves and may add into in place
    for t in topological_order(root):
        g = grads.pop(id(t), None)
        if g is None:
            continue
        fn = t.grad_fn
        if fn is None:  # a leaf: accumulate into .grad
            if t.grad is None:
                t.grad = Tensor(g if id(t) in owned else g.copy(order="K"))  # K: keep its memory layout
            else:
                t.grad.data += g
            continue
        gxs = fn.backward(g)
        del g
        for x, gx in zip(fn.inputs, gxs if isinstance(gxs, tuple) else (gxs,)):
            if gx is None or not x.requires_grad:
                continue
            gx = unbroadcast(gx, x, fn)
            k = id(x)
            if k not in grads:
                grads[k] = gx
            elif k in owned:
                kernels.add(grads[k], gx, out=grads[k])
            else:  # the first gradient may be a view of another array: never add into it
                grads[k] = kernels.add(gx, grads[k])
                owned.add(k)
        # free the graph as we go: saved arrays die with the Function
        t.grad_fn, t._freed = None, True
        fn.__dict__.clear()


def unbroadcast(gx, x: Tensor, fn: Function):
    """The gradient `gx` summed over the axes that broadcasting added or stretched to form `x`;
    an error naming `fn` when the result does not have exactly x's shape and dtype."""
    shape = x.data.shape
    if gx.shape != shape:
        extra = gx.ndim - len(shape)
        if extra > 0:
            gx = gx.sum(axis=tuple(range(extra)))
        stretched = tuple(i for i, n in enumerate(shape) if n == 1 and extra >= 0 and gx.shape[i] != 1)
        if stretched:
            gx = gx.sum(axis=stretched, keepdims=True)
        if gx.shape != shape:
            raise ValueError(f"{fn.name}.backward: gradient of shape {tuple(gx.shape)} for an input "
                             f"of shape {tuple(shape)}")
    if gx.dtype != x.dtype:
        raise TypeError(f"{fn.name}.backward: gradient dtype {gx.dtype} differs from input dtype {x.dtype}")
    return gx
