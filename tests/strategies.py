"""Hypothesis strategies shared by the tests: shapes, conv/pool geometries, and float64 arrays
drawn away from the kinks of the ops they feed (ReLU at 0, ties in a max, log at 0, x / 0).

Inputs are kept away from kinks by how they are drawn (a redraw), never by a looser tolerance.
Sizes stay small: `gradcheck` runs two forward passes per input element.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinyres

# The `device`/`xp` fixtures are function-scoped but stateless (a string and a module), so they are
# safe to share between the examples of one @given test; this keeps the loaded profile otherwise.
with_fixtures = settings(suppress_health_check=[*settings.default.suppress_health_check,
                                                HealthCheck.function_scoped_fixture,
                                                HealthCheck.differing_executors])

KINK_MARGIN = 1e-3  # |x| > this for ReLU; window values differ by more than this for max
MAX_GRADCHECK_SIZE = 300  # elements per gradcheck input, at most


def leaf(a, device: str = "cpu", requires_grad: bool = True) -> tinyres.Tensor:
    """A leaf tensor holding a copy of array `a` (its dtype kept) on `device`."""
    return tinyres.tensor(np.asarray(a), requires_grad=requires_grad, device=device)


# ---- shapes ----------------------------------------------------------------------------------

def shapes(min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 4) -> st.SearchStrategy:
    """Array shapes, e.g. (), (3,), (2, 1, 4)."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def broadcastable_shapes(num_shapes: int = 2, min_dims: int = 0, max_dims: int = 3,
                         max_side: int = 4) -> st.SearchStrategy:
    """A tuple of `num_shapes` shapes that broadcast together (sides of 1 and missing dims included)."""
    return hnp.mutually_broadcastable_shapes(num_shapes=num_shapes, min_dims=min_dims, max_dims=max_dims,
                                             max_side=max_side).map(lambda b: b.input_shapes)


@st.composite
def reduction_args(draw, shape: tuple[int, ...]):
    """(dim, keepdim) for a reduction over `shape`: None (all), an int, or a tuple of distinct dims."""
    nd = len(shape)
    keepdim = draw(st.booleans())
    if nd == 0:
        return None, keepdim
    kind = draw(st.sampled_from(["all", "int", "tuple"]))
    if kind == "all":
        return None, keepdim
    if kind == "int":
        return draw(st.integers(-nd, nd - 1)), keepdim
    dims = draw(st.lists(st.integers(-nd, nd - 1), min_size=1, max_size=nd, unique_by=lambda d: d % nd))
    return tuple(dims), keepdim


@dataclass(frozen=True)
class MatmulCase:
    a: tuple[int, ...]
    b: tuple[int, ...]


@st.composite
def matmul_shapes(draw) -> MatmulCase:
    """Operand shapes for matmul: 2-D, batched with broadcast batch dims, and 1-D on either side."""
    n, k, m = (draw(st.integers(1, 4)) for _ in range(3))
    ba, bb = draw(broadcastable_shapes(2, min_dims=0, max_dims=2, max_side=3))
    kind = draw(st.sampled_from(["2d", "batched", "vec@mat", "mat@vec", "vec@vec", "vec@batch", "batch@vec"]))
    if kind == "2d":
        return MatmulCase((n, k), (k, m))
    if kind == "batched":
        return MatmulCase(ba + (n, k), bb + (k, m))
    if kind == "vec@mat":
        return MatmulCase((k,), (k, m))
    if kind == "mat@vec":
        return MatmulCase((n, k), (k,))
    if kind == "vec@vec":
        return MatmulCase((k,), (k,))
    if kind == "vec@batch":
        return MatmulCase((k,), bb + (k, m))
    return MatmulCase(ba + (n, k), (k,))


# ---- geometries ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvCase:
    """The sizes of one conv2d test: input (n, c, h, w), kernel (oc, c, kh, kw), stride, padding."""

    n: int
    c: int
    oc: int
    h: int
    w: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.oc, self.c, self.kh, self.kw)

    @property
    def stride(self) -> tuple[int, int]:
        return (self.sh, self.sw)

    @property
    def padding(self) -> tuple[int, int]:
        return (self.ph, self.pw)


@st.composite
def conv_geometries(draw, max_batch: int = 3, max_channels: int = 4, max_side: int = 7, max_kernel: int = 3,
                    max_stride: int = 3, max_padding: int = 2, max_input_size: int = MAX_GRADCHECK_SIZE):
    """conv2d geometries (square and not) whose kernel fits the padded input."""
    n = draw(st.integers(1, max_batch))
    c, oc = draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    h = draw(st.integers(1, max(1, min(max_side, max_input_size // (n * c)))))
    w = draw(st.integers(1, max(1, min(max_side, max_input_size // (n * c * h)))))
    ph, pw = draw(st.integers(0, max_padding)), draw(st.integers(0, max_padding))
    kh = draw(st.integers(1, min(max_kernel, h + 2 * ph)))
    kw = draw(st.integers(1, min(max_kernel, w + 2 * pw)))
    stride = st.just(1) | st.integers(1, max_stride)  # stride 1 half the time: the most common, own code path
    sh, sw = draw(stride), draw(stride)
    return ConvCase(n, c, oc, h, w, kh, kw, sh, sw, ph, pw)


@dataclass(frozen=True)
class PoolCase:
    """The sizes of one pooling test: input (n, c, h, w), kernel, stride, padding."""

    n: int
    c: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int] | None  # None: the kernel size, as PyTorch's default
    padding: tuple[int, int]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)


@st.composite
def pool_geometries(draw, max_batch: int = 3, max_channels: int = 3, max_side: int = 7, max_kernel: int = 3,
                    max_stride: int = 3):
    """max/avg pooling geometries: padding at most half the kernel, kernel fitting the padded input."""
    n, c = draw(st.integers(1, max_batch)), draw(st.integers(1, max_channels))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    if kh > h + 2 * ph or kw > w + 2 * pw:  # shrink the kernel to fit rather than filter
        kh, kw = min(kh, h + 2 * ph), min(kw, w + 2 * pw)
        ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    stride = draw(st.none() | st.tuples(st.integers(1, max_stride), st.integers(1, max_stride)))
    return PoolCase(n, c, h, w, (kh, kw), stride, (ph, pw))


@st.composite
def batch_norm_shapes(draw, max_size: int = 120):
    """(N, C) or (N, C, H, W) with at least two values per channel."""
    c = draw(st.integers(1, 4))
    if draw(st.booleans()):
        return (draw(st.integers(2, 8)), c)
    n = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    if n * h * w < 2:
        h = 2
    if n * c * h * w > max_size:
        n, h, w = 1, 2, 2
    return (n, c, h, w)


# ---- arrays ----------------------------------------------------------------------------------

def _floats(low: float, high: float) -> st.SearchStrategy:
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def arrays(shape, low: float = -2.0, high: float = 2.0) -> st.SearchStrategy:
    """float64 arrays of `shape` with values in [low, high]."""
    return hnp.arrays(np.float64, shape, elements=_floats(low, high))


def nonzero_arrays(shape, margin: float = KINK_MARGIN, high: float = 2.0) -> st.SearchStrategy:
    """float64 arrays with margin < |x| <= high: away from ReLU's kink (and safe as denominators)."""
    magnitude = st.floats(margin, high, exclude_min=True, allow_nan=False, allow_infinity=False)
    return hnp.arrays(np.float64, shape, elements=st.builds(lambda s, m: s * m, st.sampled_from([-1.0, 1.0]),
                                                            magnitude))


def positive_arrays(shape, low: float = 0.1, high: float = 3.0) -> st.SearchStrategy:
    """float64 arrays in [low, high], low > 0: inputs for log and non-integer powers."""
    return arrays(shape, low, high)


@st.composite
def distinct_arrays(draw, shape, min_gap: float = 2 * KINK_MARGIN, max_gap: float = 0.05):
    """float64 arrays whose values all differ by at least `min_gap`: no ties in any max.

    The values are a random permutation of evenly spaced ones, so any window holds distinct values.
    """
    size = int(np.prod(shape, dtype=np.int64))
    perm = np.array(draw(st.permutations(range(size))), dtype=np.float64)
    gap = draw(_floats(min_gap, max_gap))
    offset = draw(_floats(-1.0, 1.0))
    return (offset + gap * (perm - size / 2)).reshape(shape)


def random_arrays(shape, scale: float = 1.0) -> st.SearchStrategy:
    """float64 standard-normal arrays from a drawn seed: spread-out values, cheap for larger sizes."""
    return st.integers(0, 2**32 - 1).map(lambda s: scale * np.random.default_rng(s).standard_normal(shape))
