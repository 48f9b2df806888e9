"""Elementwise and per-channel passes: ReLU, the shortcut add, batch norm's sums and affine maps.

On NumPy, when their arrays share one dense memory layout (as a network's activations do), the
passes run over cache-sized blocks on every thread and their outputs keep that layout; otherwise
(a broadcast, a strided view) one plain NumPy call does the work, as it always does on CuPy.
log_softmax, here for cross-entropy, is one plain call.
"""

from __future__ import annotations

from ..backend import get_array_module
from .threads import blockwise, sum_in_order

# ---- elementwise, keeping the layout -----------------------------------------------------

def _dense(a):
    """A 1-D view of all of `a`'s memory when `a` is dense in some axis order (C-contiguous, or
    channels-last, ...), else None. Arrays with the same strides have matching dense views."""
    t = a.transpose(sorted(range(a.ndim), key=lambda i: -a.strides[i]))
    return t.reshape(-1) if t.flags.c_contiguous else None


def empty_like(a):
    """An uninitialized array with `a`'s shape, dtype and memory layout (CuPy's ufuncs would
    otherwise return C-contiguous outputs and lose the channels-last layout)."""
    return get_array_module(a).empty_like(a)


def _elementwise(fn, *arrays, out=None):
    """fn(*arrays, out) into `out`, or a new array in the layout of the first dense one of
    `arrays` (a gradient broadcast from a reduction is not dense; what follows it should not
    inherit its C order): block by block over the threads when all the arrays and `out` share
    one dense layout, else in one call."""
    if out is None:
        out = empty_like(next((x for x in arrays if _dense(x) is not None), arrays[0]))
    flat = [_dense(x) for x in (*arrays, out)] if all(x.strides == out.strides for x in arrays) else [None]
    if any(f is None for f in flat):
        fn(*arrays, out)
    else:
        blockwise(fn, *flat)
    return out


def _add(a, b, out):
    get_array_module(a).add(a, b, out=out)


def _relu(x, out):
    get_array_module(x).maximum(x, 0, out=out)


def _masked(gy, y, out):
    get_array_module(gy).multiply(gy, y > 0, out=out)


def add(a, b, out=None):
    """a + b (into `out`, which may be `a`); without broadcasting, the output keeps the memory
    layout of a (or of b when a is not dense)."""
    if a.shape != b.shape:
        return get_array_module(a).add(a, b, out=out)
    return _elementwise(_add, a, b, out=out)


def relu(x):
    """max(x, 0), in x's memory layout."""
    return _elementwise(_relu, x)


def relu_grad(gy, y):
    """gy where y > 0, else 0."""
    return _elementwise(_masked, gy, y)


def log_softmax(x, axis: int):
    """log(softmax(x)) along `axis`, shifted by the maximum so that exp cannot overflow."""
    xp = get_array_module(x)
    z = x - x.max(axis=axis, keepdims=True)
    z -= xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
    return z


# ---- per-channel passes (batch norm) -----------------------------------------------------
#
# One NumPy trick serves every pass below: wide rows. Broadcasting a (C,) vector over the rows of
# an (R, C) matrix runs NumPy's inner loop over only C values (16 on ResNet's first stage), so
# the loop's overhead dominates. Laid side by side, k rows make one row of k * C values: the
# vector tiled k times broadcasts over inner loops of up to WIDE values, and a column sum of the
# wide matrix folds back to (C,) by adding its k pieces. On wide rows the passes run about twice
# as fast for C = 16 (benchmarks/ops.py). `blockwise` cuts the rows into blocks of whole multiples
# of WIDE rows, so that every block widens alike (k * C <= WIDE and C >= 1, so k divides WIDE).

WIDE = 512  # values in a wide row, at most


def _channel_rows(a):
    """The (N*H*W, C) matrix of NCHW `a` (or `a` itself for (N, C)) when that is a
    C-contiguous view, i.e. when `a`'s memory is channels-last; else None."""
    if a.ndim == 2:
        return a if a.flags.c_contiguous else None
    r = a.transpose(0, 2, 3, 1)
    return r.reshape(-1, a.shape[1]) if r.flags.c_contiguous else None


def _widen(r):
    """`r` (rows, C) as wide rows (rows / k, k * C), and k: the largest power of 2 that fits."""
    rows, c = r.shape
    k = 1
    while k * 2 * c <= WIDE and rows % (k * 2) == 0:
        k *= 2
    return r.reshape(rows // k, k * c), k


def _tile(v, k: int):
    """A (C,) vector repeated for the k rows side by side in a wide row."""
    return get_array_module(v).tile(v, k) if k > 1 else v


def _fold(v, k: int):
    """A wide row's (k * C,) sums folded back to (C,)."""
    return v.reshape(k, -1).sum(axis=0) if k > 1 else v


def _other_axes(a) -> tuple[int, ...]:
    return tuple(i for i in range(a.ndim) if i != 1)


def _colsum(w):
    """Column sums of a 2-D block as a matrix-vector product: BLAS beats a row-wise reduction."""
    return get_array_module(w).ones(w.shape[0], dtype=w.dtype) @ w


def channel_sum(a):
    """Sum over every axis but the channels (axis 1): (C,)."""
    r = _channel_rows(a)
    if r is None:
        return a.sum(axis=_other_axes(a))

    def block(b):
        w, k = _widen(b)
        return _fold(_colsum(w), k)
    return sum_in_order(blockwise(block, r, rows_multiple=WIDE))


def channel_sums(x, shift, g=None):
    """(sum of u, sum of u * (x - shift[channel])) over every axis but the channels, in one pass,
    where u is `g`, or x - shift itself when `g` is None (then: the shifted sum and sum of squares).

    A shift close to the mean keeps float32 sums of squares accurate (no E[x^2] - E[x]^2)."""
    rx, rg = _channel_rows(x), _channel_rows(g) if g is not None else None
    if rx is None or (g is not None and rg is None):
        d = x - shift.reshape((1, -1) + (1,) * (x.ndim - 2))
        u = d if g is None else g
        return u.sum(axis=_other_axes(x)), (u * d).sum(axis=_other_axes(x))

    def block(bx, bg=None):
        wx, k = _widen(bx)
        d = wx - _tile(shift, k)  # in cache: the block was just read
        u = d if bg is None else _widen(bg)[0]
        return _fold(_colsum(u), k), _fold(get_array_module(u).einsum("ij,ij->j", u, d), k)
    sums = blockwise(block, *((rx,) if g is None else (rx, rg)), rows_multiple=WIDE)
    return sum_in_order([s for s, _ in sums]), sum_in_order([q for _, q in sums])


def channel_affine(a, scale, shift, b=None, b_scale=None):
    """a * scale + shift (+ b * b_scale), with per-channel (C,) vectors broadcast over every
    axis but 1. The output has a's memory layout."""
    xp = get_array_module(a)
    out = empty_like(a)
    ra, ro = _channel_rows(a), _channel_rows(out)
    rb = _channel_rows(b) if b is not None else ra
    if ra is None or rb is None or ro is None:
        shape = (1, -1) + (1,) * (a.ndim - 2)
        xp.multiply(a, scale.reshape(shape), out=out)
        if b is not None:
            out += b * b_scale.reshape(shape)
        out += shift.reshape(shape)
        return out

    def block(ba, bo, bb):
        (wa, k), wo = _widen(ba), _widen(bo)[0]
        xp.multiply(wa, _tile(scale, k), out=wo)
        wo += _tile(shift, k)
        if b is not None:
            wo += _widen(bb)[0] * _tile(b_scale, k)
    blockwise(block, ra, ro, rb, rows_multiple=WIDE)
    return out
