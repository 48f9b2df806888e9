"""Array kernels beneath the ops: layouts, im2col, chunking and threads. Arrays in, arrays out.

A first reading of tinyres can skip this module: `tinyres.ops` and `tinyres.nn.functional`
say what is computed; this module says how to compute it fast on NumPy (and plainly on CuPy).

- Layout. Images are NCHW, as in PyTorch, but convolution outputs are NCHW *views* of
  channels-last (NHWC) memory, and the elementwise kernels here keep the layout of their
  input. im2col then copies runs of `kernel_width * C` contiguous floats, a GEMM writes its
  output with no transpose, and batch norm reduces a plain (N*H*W, C) matrix.
- Chunks. A convolution builds its im2col columns a few images at a time, into scratch buffers
  allocated once, and runs the chunk's GEMM while the columns are still in cache; the columns of
  the whole batch (9x the input) are never held.
- Threads. `parallel_for` splits the batch (or the rows of a matrix) into one contiguous part per
  thread. NumPy releases the GIL in copies, ufuncs and BLAS calls, so the memory-bound passes run
  on every core, not only the GEMMs; BLAS itself is held to one thread so the two don't fight.
  Each part's partial sums are combined in a fixed order, so results are bitwise identical from
  run to run for a given thread count. On CuPy every kernel is a single call on the whole batch.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .backend import get_array_module

# ---- threads -----------------------------------------------------------------------------


def _default_threads() -> int:
    env = os.environ.get("TINYRES_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"TINYRES_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"TINYRES_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_num_threads = _default_threads()
_pool: ThreadPoolExecutor | None = None
_inside = threading.local()  # set in a part of parallel_for: nested calls run serially
_configured = False


def set_num_threads(n: int) -> None:
    """Use `n` threads for the CPU kernels (default: the cores this process may run on, or
    $TINYRES_NUM_THREADS), as `torch.set_num_threads`."""
    global _num_threads, _pool
    if int(n) != n or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive integer, got {n!r}")
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
    _num_threads = int(n)


def get_num_threads() -> int:
    """The number of threads the CPU kernels use."""
    return _num_threads


def _configure_process() -> None:
    """Once, before the first kernel runs: hold BLAS to one thread, and keep freed memory for reuse.

    BLAS: the kernels parallelize over the batch themselves, and an OpenBLAS worker left spinning
    beside them can halve the speed of a whole process. Memory: glibc returns every freed array
    above 128 KB to the system, so each training step's fresh activations cost ~36,000 page faults
    (about 15 % of a ResNet-20 step, benchmarks/README.md); raising its thresholds keeps them in
    the heap for the next step, as PyTorch's caching allocator does. TINYRES_KEEP_MEMORY=0 opts out."""
    global _configured
    if _configured:
        return
    _configured = True
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")
    if os.environ.get("TINYRES_KEEP_MEMORY", "1") != "0" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: arrays up to 32 MB come from the heap
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # and stay there when freed (up to 1 GB)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def parallel_for(fn: Callable[[int, int, int], Any], n: int, xp=np) -> list[Any]:
    """Run fn(lo, hi, part) over [0, n) split into contiguous parts, one per thread, and return
    the results in part order. Part 0 runs in the calling thread."""
    _configure_process()
    parts = min(_num_threads, n)
    if xp is not np or parts <= 1 or getattr(_inside, "active", False):
        return [fn(0, n, 0)]
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_num_threads - 1, thread_name_prefix="tinyres")
    bounds = [n * p // parts for p in range(parts + 1)]
    futures = [_pool.submit(_part, fn, bounds[p], bounds[p + 1], p) for p in range(1, parts)]
    try:
        first = _part(fn, bounds[0], bounds[1], 0)
    finally:
        results = [f.result() for f in futures]  # wait for every part, even when part 0 failed
    return [first] + results


def _part(fn, lo: int, hi: int, part: int):
    _inside.active = True
    try:
        return fn(lo, hi, part)
    finally:
        _inside.active = False


# ---- scratch buffers ---------------------------------------------------------------------

_scratch: dict[tuple, Any] = {}


def scratch(xp, part: int, name: str, shape: tuple[int, ...], dtype) -> Any:
    """A buffer for thread `part`, allocated (and zero-filled) on first use, reused after.

    Callers that rely on zeros keep them: the padded copies below only ever write the interior.
    """
    key = (xp.__name__, part, name, shape, np.dtype(dtype).str)
    buf = _scratch.get(key)
    if buf is None:
        buf = _scratch[key] = xp.zeros(shape, dtype=dtype)
    return buf


def free_scratch() -> None:
    """Release every scratch buffer (they are rebuilt on demand)."""
    _scratch.clear()


# ---- blocks of memory over the threads ---------------------------------------------------

_BLOCK_BYTES = 1 << 20  # 1 MB per array: large enough that the per-block calls cost little


def _dense(a):
    """A 1-D view of all of `a`'s memory when `a` is dense in some axis order (C-contiguous, or
    channels-last, ...), else None. Arrays with the same strides have matching dense views."""
    t = a.transpose(sorted(range(a.ndim), key=lambda i: -a.strides[i]))
    return t.reshape(-1) if t.flags.c_contiguous else None


def blockwise(fn: Callable, *arrays) -> list[Any]:
    """fn(*blocks) over blocks of rows (axis 0) of `arrays`, each about _BLOCK_BYTES, spread over
    the threads; the results in block order. On CuPy, one call on the whole arrays."""
    xp = get_array_module(arrays[0])
    if xp is not np:
        return [fn(*arrays)]
    a = arrays[0]
    row_bytes = a.itemsize * (a.size // max(len(a), 1))
    size = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    if a.ndim == 2:  # whole groups of wide rows (see _wide), so each block widens alike
        size = max(512, size - size % 512)
    starts = range(0, len(a), size)

    def work(lo, hi, part):
        return [fn(*(x[s:s + size] for x in arrays)) for s in starts[lo:hi]]
    return [r for part in parallel_for(work, len(starts), xp) for r in part]


def _sum_in_order(values: list):
    total = values[0]
    for v in values[1:]:  # a fixed order: the same bits on every run for a given thread count
        total = total + v
    return total


# ---- elementwise, keeping the layout -----------------------------------------------------

def empty_like(a):
    """An uninitialized array with `a`'s shape, dtype and memory layout (CuPy's ufuncs would
    otherwise return C-contiguous outputs and lose the channels-last layout)."""
    return get_array_module(a).empty_like(a)


def _elementwise(ufunc, out, *arrays) -> bool:
    """ufunc(*arrays, out=out) block by block over the threads, when all share one dense layout."""
    if any(x.shape != out.shape or x.strides != out.strides for x in arrays):
        return False
    flat = [_dense(x) for x in (*arrays, out)]
    if any(f is None for f in flat):
        return False
    blockwise(lambda *blocks: ufunc(*blocks[:-1], out=blocks[-1]), *flat)
    return True


def add(a, b):
    """a + b; the output keeps a's memory layout when no broadcasting is involved."""
    if a.shape != b.shape:
        return a + b
    out = empty_like(a)
    if not _elementwise(get_array_module(a).add, out, a, b):
        get_array_module(a).add(a, b, out=out)
    return out


def _relu(x, out):
    return np.maximum(x, 0, out=out)


def _masked(gy, y, out):
    return np.multiply(gy, y > 0, out=out)


def relu(x):
    """max(x, 0), in x's memory layout."""
    out = empty_like(x)
    if not _elementwise(_relu, out, x):
        get_array_module(x).maximum(x, 0, out=out)
    return out


def relu_grad(gy, y):
    """gy where y > 0, else 0."""
    out = empty_like(gy)
    if not _elementwise(_masked, out, gy, y):
        get_array_module(gy).multiply(gy, y > 0, out=out)
    return out


def log_softmax(x, axis: int):
    """log(softmax(x)) along `axis`, shifted by the maximum so that exp cannot overflow."""
    xp = get_array_module(x)
    z = x - x.max(axis=axis, keepdims=True)
    z -= xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
    return z


# ---- per-channel passes (batch norm) -----------------------------------------------------

def _channel_rows(a):
    """The (N*H*W, C) matrix of NCHW `a` (or `a` itself for (N, C)) when that is a
    C-contiguous view, i.e. when `a`'s memory is channels-last; else None."""
    if a.ndim == 2:
        return a if a.flags.c_contiguous else None
    r = a.transpose(0, 2, 3, 1)
    return r.reshape(-1, a.shape[1]) if r.flags.c_contiguous else None


def _wide(r, width: int = 512):
    """`r` (rows, C) with k rows laid side by side as rows of about `width` values, and k.

    NumPy broadcasts a (C,) vector over (rows, C) in inner loops of only C elements; on wide
    rows the same passes run about twice as fast for C = 16 (benchmarks/ops.py)."""
    rows, c = r.shape
    k = 1
    while k * 2 * c <= width and rows % (k * 2) == 0:
        k *= 2
    return r.reshape(rows // k, k * c), k


def _tile(v, k: int):
    return get_array_module(v).tile(v, k) if k > 1 else v


def _fold(v, k: int):
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
        w, k = _wide(b)
        return _fold(_colsum(w), k)
    return _sum_in_order(blockwise(block, r))


def channel_moments(x, shift):
    """(sum of d, sum of d * d) over every axis but the channels, with d = x - shift[channel].

    A shift close to the mean keeps float32 sums of squares accurate (no E[x^2] - E[x]^2)."""
    r = _channel_rows(x)
    if r is None:
        d = x - shift.reshape((1, -1) + (1,) * (x.ndim - 2))
        return d.sum(axis=_other_axes(x)), (d * d).sum(axis=_other_axes(x))

    def block(b):
        w, k = _wide(b)
        d = w - _tile(shift, k)  # in cache: the block was just read
        return _fold(_colsum(d), k), _fold(get_array_module(w).einsum("ij,ij->j", d, d), k)
    sums = blockwise(block, r)
    return _sum_in_order([s for s, _ in sums]), _sum_in_order([q for _, q in sums])


def channel_sums(g, x, shift):
    """(sum of g, sum of g * (x - shift[channel])) over every axis but the channels, in one pass."""
    rg, rx = _channel_rows(g), _channel_rows(x)
    if rg is None or rx is None:
        d = x - shift.reshape((1, -1) + (1,) * (x.ndim - 2))
        return g.sum(axis=_other_axes(g)), (g * d).sum(axis=_other_axes(g))

    def block(bg, bx):
        (wg, k), (wx, _) = _wide(bg), _wide(bx)
        d = wx - _tile(shift, k)
        return _fold(_colsum(wg), k), _fold(get_array_module(wg).einsum("ij,ij->j", wg, d), k)
    sums = blockwise(block, rg, rx)
    return _sum_in_order([s for s, _ in sums]), _sum_in_order([q for _, q in sums])


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
        (wa, k), wo = _wide(ba), _wide(bo)[0]
        xp.multiply(wa, _tile(scale, k), out=wo)
        wo += _tile(shift, k)
        if b is not None:
            wo += _wide(bb)[0] * _tile(b_scale, k)
    blockwise(block, ra, ro, rb)
    return out


# ---- im2col / col2im ---------------------------------------------------------------------

def windows(xpad, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int):
    """The (n, oh, ow, kh, kw, C) sliding windows of a padded NHWC array, as a read-only view."""
    xp = get_array_module(xpad)
    s0, s1, s2, s3 = xpad.strides
    shape, strides = (xpad.shape[0], oh, ow, kh, kw, xpad.shape[3]), (s0, s1 * sh, s2 * sw, s1, s2, s3)
    if xp is np:
        return np.lib.stride_tricks.as_strided(xpad, shape, strides, writeable=False)
    return xp.lib.stride_tricks.as_strided(xpad, shape, strides)


def col2im(dcol, out, sh: int, sw: int) -> None:
    """Add window gradients dcol (n, oh, ow, kh, kw, C) back into the padded NHWC `out`, in place:
    one strided add per kernel offset, so no scatter (np.add.at) is needed."""
    _, oh, ow, kh, kw, _ = dcol.shape
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += dcol[:, :, :, i, j, :]


class ConvGeometry:
    """Sizes of a convolution of NHWC `x` (n, h, w, c) with a (kh, kw) kernel."""

    CHUNK_ROWS = 2048  # output pixels per im2col chunk: its columns stay in cache, its GEMM is large enough

    def __init__(self, x_nhwc, kh: int, kw: int, stride: tuple[int, int], padding: tuple[int, int]):
        self.n, self.h, self.w, self.c = x_nhwc.shape
        self.kh, self.kw = kh, kw
        (self.sh, self.sw), (self.ph, self.pw) = stride, padding
        self.oh = (self.h + 2 * self.ph - kh) // self.sh + 1
        self.ow = (self.w + 2 * self.pw - kw) // self.sw + 1
        self.pixels = self.oh * self.ow  # output rows per image
        self.k = kh * kw * self.c  # columns per row
        xp = get_array_module(x_nhwc)
        self.chunk = self.n if xp is not np else max(1, min(self.n, self.CHUNK_ROWS // self.pixels))


def im2col_chunks(x_nhwc, g: ConvGeometry, lo: int, hi: int, part: int):
    """Yield (n0, n1, columns) for images lo..hi of NHWC `x`, a chunk of images at a time.

    columns is ((n1-n0) * oh * ow, kh * kw * C), rows ordered (image, oh, ow) and columns
    (i, j, c). Each chunk is one copy into a zero-bordered buffer, then one strided copy whose
    inner runs are kw * C contiguous values."""
    xp = get_array_module(x_nhwc)
    dt = x_nhwc.dtype
    pad = scratch(xp, part, f"pad{g.ph},{g.pw}", (g.chunk, g.h + 2 * g.ph, g.w + 2 * g.pw, g.c), dt)
    cols = scratch(xp, part, "cols", (g.chunk * g.pixels, g.k), dt)
    for n0 in range(lo, hi, g.chunk):
        n1 = min(n0 + g.chunk, hi)
        m = n1 - n0
        xpad = pad[:m]
        xpad[:, g.ph:g.ph + g.h, g.pw:g.pw + g.w] = x_nhwc[n0:n1]  # the border stays zero
        win = windows(xpad, g.kh, g.kw, g.sh, g.sw, g.oh, g.ow).reshape(m, g.oh, g.ow, g.kh, g.kw * g.c)
        c = cols[:m * g.pixels]
        c.reshape(win.shape)[...] = win
        yield n0, n1, c


def _nhwc(a):
    """The NHWC view of NCHW `a`, made contiguous (a copy only when a is not channels-last)."""
    return get_array_module(a).ascontiguousarray(a.transpose(0, 2, 3, 1))


def conv2d_forward(x, W, stride: tuple[int, int], padding: tuple[int, int]):
    """y = x (N, C, H, W) cross-correlated with W (OC, C, KH, KW): the NCHW view of NHWC memory."""
    xp = get_array_module(x)
    oc, _, kh, kw = W.shape
    xh = x.transpose(0, 2, 3, 1)
    g = ConvGeometry(xh, kh, kw, stride, padding)
    Wmat = W.transpose(2, 3, 1, 0).reshape(g.k, oc)  # rows ordered (i, j, c) like the columns
    y = xp.empty((g.n, g.oh, g.ow, oc), dtype=x.dtype)
    yrows = y.reshape(-1, oc)

    def work(lo, hi, part):
        for n0, n1, cols in im2col_chunks(xh, g, lo, hi, part):
            xp.matmul(cols, Wmat, out=yrows[n0 * g.pixels:n1 * g.pixels])
    parallel_for(work, g.n, xp)
    return y.transpose(0, 3, 1, 2)


def conv2d_backward(gy, x, W, stride, padding, need_gx: bool, need_gW: bool):
    """(gx, gW) of a convolution, each None when not needed.

    With stride 1, gx is itself a convolution: of gy, padded by (k - 1 - p), with the flipped,
    transposed kernel. Its im2col columns also give gW, so x's columns need not be rebuilt.
    Otherwise gW is columns(x)^T @ gy and gx scatters gy @ W back with col2im."""
    if need_gx and tuple(stride) == (1, 1) and padding[0] < W.shape[2] and padding[1] < W.shape[3]:
        return _conv2d_backward_full(gy, x, W, padding, need_gW)
    gW = _conv2d_grad_weight(gy, x, W, stride, padding) if need_gW else None
    gx = _conv2d_grad_input_col2im(gy, x, W, stride, padding) if need_gx else None
    return gx, gW


def _conv2d_backward_full(gy, x, W, padding, need_gW: bool):
    xp = get_array_module(gy)
    oc, c, kh, kw = W.shape
    gyh = gy.transpose(0, 2, 3, 1)
    g = ConvGeometry(gyh, kh, kw, (1, 1), (kh - 1 - padding[0], kw - 1 - padding[1]))
    Wflip = W[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(g.k, c)
    xrows = _nhwc(x).reshape(-1, c)
    gx = xp.empty((g.n, g.oh, g.ow, c), dtype=x.dtype)
    gxrows = gx.reshape(-1, c)

    def work(lo, hi, part):
        gWflip = scratch(xp, part, "gW", (c, g.k), W.dtype) if need_gW else None
        tmp = scratch(xp, part, "gWtmp", (c, g.k), W.dtype) if need_gW else None
        for n0, n1, cols in im2col_chunks(gyh, g, lo, hi, part):
            rows = slice(n0 * g.pixels, n1 * g.pixels)
            xp.matmul(cols, Wflip, out=gxrows[rows])
            if need_gW:
                xp.matmul(xrows[rows].T, cols, out=gWflip if n0 == lo else tmp)
                if n0 != lo:
                    gWflip += tmp
        return gWflip.copy() if need_gW else None
    parts = parallel_for(work, g.n, xp)
    gW = None
    if need_gW:  # gWflip[c, (i', j', oc)] holds dL/dW[oc, c, kh-1-i', kw-1-j']
        gW = _sum_in_order(parts).reshape(c, kh, kw, oc)[:, ::-1, ::-1].transpose(3, 0, 1, 2).copy()
    return gx.transpose(0, 3, 1, 2), gW


def _conv2d_grad_weight(gy, x, W, stride, padding):
    xp = get_array_module(gy)
    oc, c, kh, kw = W.shape
    xh = x.transpose(0, 2, 3, 1)
    g = ConvGeometry(xh, kh, kw, stride, padding)
    gyrows = _nhwc(gy).reshape(-1, oc)

    def work(lo, hi, part):
        gWmat = scratch(xp, part, "gW", (g.k, oc), W.dtype)
        tmp = scratch(xp, part, "gWtmp", (g.k, oc), W.dtype)
        for n0, n1, cols in im2col_chunks(xh, g, lo, hi, part):
            xp.matmul(cols.T, gyrows[n0 * g.pixels:n1 * g.pixels], out=gWmat if n0 == lo else tmp)
            if n0 != lo:
                gWmat += tmp
        return gWmat.copy()
    gWmat = _sum_in_order(parallel_for(work, g.n, xp))
    return gWmat.reshape(kh, kw, c, oc).transpose(3, 2, 0, 1).copy()


def _conv2d_grad_input_col2im(gy, x, W, stride, padding):
    xp = get_array_module(gy)
    oc, c, kh, kw = W.shape
    g = ConvGeometry(x.transpose(0, 2, 3, 1), kh, kw, stride, padding)
    WmatT = W.transpose(0, 2, 3, 1).reshape(oc, g.k)  # (Wmat of the forward pass).T
    gyrows = _nhwc(gy).reshape(-1, oc)
    gx = xp.empty((g.n, g.h, g.w, c), dtype=x.dtype)

    def work(lo, hi, part):
        dcols = scratch(xp, part, "cols", (g.chunk * g.pixels, g.k), x.dtype)
        gpad = scratch(xp, part, "gpad", (g.chunk, g.h + 2 * g.ph + g.sh, g.w + 2 * g.pw + g.sw, c), x.dtype)
        for n0 in range(lo, hi, g.chunk):
            m = min(g.chunk, hi - n0)
            d = dcols[:m * g.pixels]
            xp.matmul(gyrows[n0 * g.pixels:(n0 + m) * g.pixels], WmatT, out=d)
            gp = gpad[:m]
            gp[...] = 0
            col2im(d.reshape(m, g.oh, g.ow, kh, kw, c), gp, g.sh, g.sw)
            gx[n0:n0 + m] = gp[:, g.ph:g.ph + g.h, g.pw:g.pw + g.w]
    parallel_for(work, g.n, xp)
    return gx.transpose(0, 3, 1, 2)
