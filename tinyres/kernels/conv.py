"""Convolution by im2col in chunks of the batch: channels-last windows, GEMMs, col2im."""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .threads import parallel_for, scratch, sum_in_order

# ---- im2col / col2im ---------------------------------------------------------------------

def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """The output length, along one axis, of a convolution or pooling: how many windows of `kernel`
    values, `stride` apart, fit in `size` values padded by `padding` on each side."""
    return (size + 2 * padding - kernel) // stride + 1


def windows(xpad, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int):
    """The (n, oh, ow, kh, kw, C) sliding windows of a padded NHWC array, as a view (read-only on NumPy)."""
    xp = get_array_module(xpad)
    s0, s1, s2, s3 = xpad.strides
    shape, strides = (xpad.shape[0], oh, ow, kh, kw, xpad.shape[3]), (s0, s1 * sh, s2 * sw, s1, s2, s3)
    read_only = {"writeable": False} if xp is np else {}  # CuPy's as_strided has no such flag
    return xp.lib.stride_tricks.as_strided(xpad, shape, strides, **read_only)


def col2im(dcol, out, sh: int, sw: int) -> None:
    """Add window gradients dcol (n, oh, ow, kh, kw, C) back into the padded NHWC `out`, in place:
    one strided add per kernel offset, so no scatter (np.add.at) is needed."""
    _, oh, ow, kh, kw, _ = dcol.shape
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += dcol[:, :, :, i, j, :]


class ConvGeometry:
    """Sizes of a convolution of NHWC `x` (n, h, w, c) with a (kh, kw) kernel."""

    # A chunk of images has at most CHUNK_ROWS output pixels and CHUNK_BYTES of im2col columns: its
    # columns stay in cache between the copy and the GEMM(s) that read them, its GEMMs are large
    # enough. Measured on whole training steps (benchmarks/README.md): 2,048 rows on the 16-channel
    # layers (1.2 MB of columns), 1,024 and 512 on the 32- and 64-channel ones.
    CHUNK_ROWS = 2048
    CHUNK_BYTES = 1_200_000

    def __init__(self, x_nhwc, kh: int, kw: int, stride: tuple[int, int], padding: tuple[int, int]):
        self.n, self.h, self.w, self.c = x_nhwc.shape
        self.kh, self.kw = kh, kw
        (self.sh, self.sw), (self.ph, self.pw) = stride, padding
        self.oh, self.ow = output_size(self.h, kh, self.sh, self.ph), output_size(self.w, kw, self.sw, self.pw)
        self.pixels = self.oh * self.ow  # output rows per image
        self.k = kh * kw * self.c  # columns per row
        xp = get_array_module(x_nhwc)
        rows = min(self.CHUNK_ROWS, self.CHUNK_BYTES // (self.k * x_nhwc.dtype.itemsize))
        self.chunk = self.n if xp is not np else max(1, min(self.n, rows // self.pixels))


def im2col_chunks(x_nhwc, g: ConvGeometry, lo: int, hi: int):
    """Yield (n0, n1, columns) for images lo..hi of NHWC `x`, a chunk of images at a time.

    columns is ((n1-n0) * oh * ow, kh * kw * C), rows ordered (image, oh, ow) and columns
    (i, j, c). Each chunk is one copy into a zero-bordered buffer, then one strided copy whose
    inner runs are kw * C contiguous values."""
    xp = get_array_module(x_nhwc)
    dt = x_nhwc.dtype
    pad = scratch(xp, f"pad{g.ph},{g.pw}", (g.chunk, g.h + 2 * g.ph, g.w + 2 * g.pw, g.c), dt)
    cols = scratch(xp, "cols", (g.chunk * g.pixels, g.k), dt)
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


def _matmul_add(a, b, acc, tmp, first: bool) -> None:
    """acc = a @ b on the first chunk, acc += a @ b after (through `tmp`, with no allocation)."""
    xp = get_array_module(a)
    xp.matmul(a, b, out=acc if first else tmp)
    if not first:
        acc += tmp


def conv2d_forward(x, W, stride: tuple[int, int], padding: tuple[int, int]):
    """y = x (N, C, H, W) cross-correlated with W (OC, C, KH, KW): the NCHW view of NHWC memory."""
    xp = get_array_module(x)
    oc, _, kh, kw = W.shape
    xh = x.transpose(0, 2, 3, 1)
    g = ConvGeometry(xh, kh, kw, stride, padding)
    Wmat = W.transpose(2, 3, 1, 0).reshape(g.k, oc)  # rows ordered (i, j, c) like the columns
    y = xp.empty((g.n, g.oh, g.ow, oc), dtype=x.dtype)
    yrows = y.reshape(-1, oc)

    def work(lo, hi):
        for n0, n1, cols in im2col_chunks(xh, g, lo, hi):
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
    """gx and gW of a stride-1 convolution, both from one im2col of gy.

    The forward is y[n, o, i, j] = sum_{c, p, q} x[n, c, i + p - P, j + q - Q] * W[o, c, p, q].
    Name each x position a = i + p - P, count the kernel rows backwards, p' = KH-1 - p, and pad gy
    by P' = KH-1 - P (>= 0 as P < KH); then i = a + p' - P', and with the same for the columns:

      gx[n, c, a, b] = sum_{o, p', q'} gy[n, o, a + p' - P', b + q' - Q'] * W[o, c, KH-1 - p', KW-1 - q']
      gW[o, c, KH-1 - p', KW-1 - q'] = sum_{n, a, b} x[n, c, a, b] * gy[n, o, a + p' - P', b + q' - Q']

    Both sums run over the im2col columns of gy padded by (P', Q'), cols[(n, a, b), (p', q', o)]:
    gx = cols @ Wflip is the convolution of gy with the kernel flipped in space and its channels
    swapped, Wflip[(p', q', o), c]; and gWflip = x_rows.T @ cols, with x_rows[(n, a, b), c], is gW
    with its kernel flipped: gWflip[c, (p', q', o)] = gW[o, c, KH-1 - p', KW-1 - q'].
    """
    xp = get_array_module(gy)
    oc, c, kh, kw = W.shape
    gy_nhwc = gy.transpose(0, 2, 3, 1)
    g = ConvGeometry(gy_nhwc, kh, kw, (1, 1), (kh - 1 - padding[0], kw - 1 - padding[1]))  # g.oh, g.ow = H, W
    Wflip = W[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(g.k, c)  # rows (p', q', o), like the columns
    x_rows = _nhwc(x).reshape(-1, c)
    gx = xp.empty((g.n, g.oh, g.ow, c), dtype=x.dtype)
    gx_rows = gx.reshape(-1, c)

    def work(lo, hi):
        gWflip = scratch(xp, "gWflip", (c, g.k), W.dtype) if need_gW else None
        tmp = scratch(xp, "gWflip_tmp", (c, g.k), W.dtype) if need_gW else None
        for n0, n1, cols in im2col_chunks(gy_nhwc, g, lo, hi):
            rows = slice(n0 * g.pixels, n1 * g.pixels)
            xp.matmul(cols, Wflip, out=gx_rows[rows])
            if need_gW:
                _matmul_add(x_rows[rows].T, cols, gWflip, tmp, first=n0 == lo)
        return gWflip.copy() if need_gW else None
    parts = parallel_for(work, g.n, xp)
    gW = None
    if need_gW:
        gWflip = sum_in_order(parts).reshape(c, kh, kw, oc)  # [c, p', q', o]
        gW = gWflip[:, ::-1, ::-1].transpose(3, 0, 1, 2).copy()  # [o, c, p, q], p = KH-1 - p', q = KW-1 - q'
    return gx.transpose(0, 3, 1, 2), gW


def _conv2d_grad_weight(gy, x, W, stride, padding):
    xp = get_array_module(gy)
    oc, c, kh, kw = W.shape
    xh = x.transpose(0, 2, 3, 1)
    g = ConvGeometry(xh, kh, kw, stride, padding)
    gyrows = _nhwc(gy).reshape(-1, oc)

    def work(lo, hi):
        gWmat = scratch(xp, "gW", (g.k, oc), W.dtype)
        tmp = scratch(xp, "gWtmp", (g.k, oc), W.dtype)
        for n0, n1, cols in im2col_chunks(xh, g, lo, hi):
            _matmul_add(cols.T, gyrows[n0 * g.pixels:n1 * g.pixels], gWmat, tmp, first=n0 == lo)
        return gWmat.copy()
    gWmat = sum_in_order(parallel_for(work, g.n, xp))
    return gWmat.reshape(kh, kw, c, oc).transpose(3, 2, 0, 1).copy()


def _conv2d_grad_input_col2im(gy, x, W, stride, padding):
    xp = get_array_module(gy)
    oc, c, kh, kw = W.shape
    g = ConvGeometry(x.transpose(0, 2, 3, 1), kh, kw, stride, padding)
    WmatT = W.transpose(0, 2, 3, 1).reshape(oc, g.k)  # (Wmat of the forward pass).T
    gyrows = _nhwc(gy).reshape(-1, oc)
    gx = xp.empty((g.n, g.h, g.w, c), dtype=x.dtype)

    def work(lo, hi):
        dcols = scratch(xp, "dcols", (g.chunk * g.pixels, g.k), x.dtype)
        gpad = scratch(xp, "gpad", (g.chunk, g.h + 2 * g.ph, g.w + 2 * g.pw, c), x.dtype)
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
