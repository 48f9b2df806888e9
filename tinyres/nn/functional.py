"""The ops of a convolutional network, as `torch.nn.functional` names them.

Image tensors are NCHW, as in PyTorch. Convolution and pooling work internally on a
channels-last (NHWC) view, and the arrays they return are NCHW views of NHWC memory
(PyTorch's "channels_last" format): im2col then copies rows of `kernel_width * C`
contiguous floats, the GEMM output needs no transpose, and batch norm reduces a plain
(N*H*W, C) matrix. Elementwise ops keep that memory layout, so no transposes are copied
between layers.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..tensor import (
    Function,
    Tensor,
    as_tensor,
    cat,
    concatenate,
    flatten,
    getitem,
    mean,
    pad,
    permute,
    reshape,
    transpose,
)

__all__ = [
    "adaptive_avg_pool2d",
    "avg_pool2d",
    "batch_norm",
    "cat",
    "col2im",
    "concatenate",
    "conv2d",
    "cross_entropy",
    "flatten",
    "getitem",
    "global_avg_pool2d",
    "im2col",
    "linear",
    "log_softmax",
    "max_pool2d",
    "mean",
    "pad",
    "permute",
    "relu",
    "reshape",
    "softmax",
    "transpose",
]


def _pair(v, name: str, op: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v)
    if len(t) != 2 or any(int(a) != a for a in t):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    return int(t[0]), int(t[1])


def _rows(x):
    """An (N*H*W, C) matrix of an NCHW array; a view when its memory is channels-last."""
    if x.ndim == 2:
        return x
    n, c, h, w = x.shape
    return x.transpose(0, 2, 3, 1).reshape(n * h * w, c)


def _from_rows(r, shape):
    """Undo `_rows`: an NCHW view of the (N*H*W, C) matrix `r`."""
    if len(shape) == 2:
        return r
    n, c, h, w = shape
    return r.reshape(n, h, w, c).transpose(0, 3, 1, 2)


# ---- relu --------------------------------------------------------------------------------

class ReLU(Function):
    def forward(self, x):
        self.y = self.xp.maximum(x, 0)
        return self.y

    def backward(self, gy):
        return gy * (self.y > 0)


def relu(x) -> Tensor:
    """max(x, 0), elementwise."""
    return ReLU()(x)


# ---- im2col / col2im ---------------------------------------------------------------------

def _as_strided(xp, a, shape, strides):
    if xp is np:
        return np.lib.stride_tricks.as_strided(a, shape, strides, writeable=False)
    return xp.lib.stride_tricks.as_strided(a, shape, strides)


def im2col(xpad, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int, xp=np):
    """Windows of a padded NHWC array (n, Hp, Wp, C) as a strided view (n, oh, ow, kh, kw, C)."""
    n, _, _, c = xpad.shape
    s0, s1, s2, s3 = xpad.strides
    return _as_strided(xp, xpad, (n, oh, ow, kh, kw, c), (s0, s1 * sh, s2 * sw, s1, s2, s3))


def col2im(dcol, out, sh: int, sw: int) -> None:
    """Add windows dcol (n, oh, ow, kh, kw, C) back into the padded NHWC array `out`, in place."""
    _, oh, ow, kh, kw, _ = dcol.shape
    # one strided add per kernel offset: vectorized, and no scatter (np.add.at) needed
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :] += dcol[:, :, :, i, j, :]


def _chunk(xp, rows_per_sample: int, row_bytes: int, n: int) -> int:
    """Samples per im2col chunk on the CPU: about 2 MB of columns, so they stay in cache,
    but at least ~2048 rows, below which the GEMMs lose efficiency (measured on OpenBLAS)."""
    if xp is not np:
        return n
    rows = max(2048, (2 << 20) // max(row_bytes, 1))
    return max(1, min(n, rows // max(rows_per_sample, 1)))


def _padded(xp, xh, ph: int, pw: int, buf=None):
    """NHWC `xh` zero-padded by (ph, pw), written into `buf` when given."""
    n, h, w, c = xh.shape
    if buf is None:
        buf = xp.empty((n, h + 2 * ph, w + 2 * pw, c), dtype=xh.dtype)
    buf = buf[:n]
    if ph or pw:  # only the border needs zeroing; the interior is overwritten
        buf[:, :ph] = 0
        buf[:, h + ph:] = 0
        buf[:, :, :pw] = 0
        buf[:, :, w + pw:] = 0
    buf[:, ph:ph + h, pw:pw + w] = xh
    return buf


def _columns(xp, x, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, oh: int, ow: int):
    """Yield (first sample, im2col rows) of NCHW `x` in cache-sized chunks of the batch."""
    n, c = x.shape[:2]
    xh = x.transpose(0, 2, 3, 1)
    step = _chunk(xp, oh * ow, kh * kw * c * x.itemsize, n)
    buf = None
    for n0 in range(0, n, step):
        buf = _padded(xp, xh[n0:n0 + step], ph, pw, buf)
        yield n0, im2col(buf, kh, kw, sh, sw, oh, ow, xp).reshape(-1, kh * kw * c)


# ---- conv2d ------------------------------------------------------------------------------

class Conv2d(Function):
    def __init__(self, stride, padding):
        self.stride, self.padding = stride, padding

    def forward(self, x, w, b=None):
        xp = self.xp
        if x.ndim != 4 or w.ndim != 4:
            raise ValueError(f"conv2d: expected input (N, C, H, W) and weight (OC, C, KH, KW), "
                             f"got {tuple(x.shape)} and {tuple(w.shape)}")
        n, c, h, wd = x.shape
        oc, wc, kh, kw = w.shape
        (sh, sw), (ph, pw) = self.stride, self.padding
        if wc != c:
            raise ValueError(f"conv2d: weight {tuple(w.shape)} expects {wc} input channels, "
                             f"input {tuple(x.shape)} has {c}")
        if b is not None and tuple(b.shape) != (oc,):
            raise ValueError(f"conv2d: bias shape {tuple(b.shape)} should be ({oc},)")
        if kh > h + 2 * ph or kw > wd + 2 * pw:
            raise ValueError(f"conv2d: kernel {kh}x{kw} is larger than the padded input "
                             f"{h + 2 * ph}x{wd + 2 * pw} (input {tuple(x.shape)}, padding {self.padding})")
        oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
        self.x, self.w = x, w
        self.geom = (kh, kw, sh, sw, ph, pw, oh, ow)
        wmat = w.transpose(2, 3, 1, 0).reshape(kh * kw * c, oc)  # rows ordered (i, j, c) like the columns
        y = xp.empty((n, oh, ow, oc), dtype=x.dtype)
        yrows = y.reshape(n * oh * ow, oc)
        for n0, col in _columns(xp, x, *self.geom):
            xp.matmul(col, wmat, out=yrows[n0 * oh * ow:n0 * oh * ow + len(col)])
        if b is not None:
            y += b
        return y.transpose(0, 3, 1, 2)

    def backward(self, gy):
        xp, x, w = self.xp, self.x, self.w
        kh, kw, sh, sw, ph, pw, oh, ow = self.geom
        n, c, h, wd = x.shape
        oc = w.shape[0]
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        need_b = len(self.needs_input_grad) > 2 and self.needs_input_grad[2]
        gyh = xp.ascontiguousarray(gy.transpose(0, 2, 3, 1))  # (n, oh, ow, oc)
        gyrows = gyh.reshape(n * oh * ow, oc)
        gx = gw = None
        full = (sh, sw) == (1, 1) and ph <= kh - 1 and pw <= kw - 1
        if need_x and full:
            # stride 1: dL/dx is the "full" convolution of dL/dy with the flipped kernel, an
            # im2col of dL/dy + GEMM. The same columns give dL/dW = x^T @ columns (flipped back),
            # so x's columns need not be rebuilt.
            xrows = xp.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(n * h * wd, c)
            wflip = w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1).reshape(kh * kw * oc, c)
            gx = xp.empty((n, h, wd, c), dtype=x.dtype)
            gxrows = gx.reshape(n * h * wd, c)
            gwflip = xp.zeros((c, kh * kw * oc), dtype=w.dtype) if need_w else None
            for n0, col in _columns(xp, gy, kh, kw, 1, 1, kh - 1 - ph, kw - 1 - pw, h, wd):
                rows = slice(n0 * h * wd, n0 * h * wd + len(col))
                xp.matmul(col, wflip, out=gxrows[rows])
                if need_w:
                    gwflip += xrows[rows].T @ col
            if need_w:  # gwflip[c, (i', j', oc)] holds dL/dW[oc, c, kh-1-i', kw-1-j']
                gw = gwflip.reshape(c, kh, kw, oc)[:, ::-1, ::-1].transpose(3, 0, 1, 2).copy()
        elif need_w:
            # dL/dW = columns^T @ dL/dy; the columns are rebuilt in cache-sized chunks
            # rather than kept from forward, where they would take 9x the input's memory
            gwmat = xp.zeros((kh * kw * c, oc), dtype=w.dtype)
            for n0, col in _columns(xp, x, *self.geom):
                gwmat += col.T @ gyrows[n0 * oh * ow:n0 * oh * ow + len(col)]
            gw = gwmat.reshape(kh, kw, c, oc).transpose(3, 2, 0, 1).copy()
        if need_x and not full:
            # strided: scatter the column gradients back with col2im
            wmat = w.transpose(2, 3, 1, 0).reshape(kh * kw * c, oc)
            gx = xp.empty((n, h, wd, c), dtype=x.dtype)
            step = _chunk(xp, oh * ow, kh * kw * c * x.itemsize, n)
            gbuf = xp.empty((min(step, n), h + 2 * ph + sh, wd + 2 * pw + sw, c), dtype=x.dtype)
            for n0 in range(0, n, step):
                g = gyrows[n0 * oh * ow:min(n, n0 + step) * oh * ow]
                m = len(g) // (oh * ow)
                dcol = (g @ wmat.T).reshape(m, oh, ow, kh, kw, c)
                gb_ = gbuf[:m]
                gb_[...] = 0
                col2im(dcol, gb_, sh, sw)
                gx[n0:n0 + m] = gb_[:, ph:ph + h, pw:pw + wd]
        gxo = gx.transpose(0, 3, 1, 2) if need_x else None
        gbo = gyrows.sum(axis=0) if need_b else None
        return gxo, gw, gbo


def conv2d(input, weight, bias=None, stride=1, padding=0) -> Tensor:
    """2-D convolution (cross-correlation): (N, C, H, W) * (OC, C, KH, KW) -> (N, OC, OH, OW)."""
    fn = Conv2d(_pair(stride, "stride", "conv2d"), _pair(padding, "padding", "conv2d"))
    if min(fn.stride) < 1 or min(fn.padding) < 0:
        raise ValueError(f"conv2d: stride {stride} must be >= 1 and padding {padding} >= 0")
    return fn(input, weight) if bias is None else fn(input, weight, bias)


# ---- batch norm --------------------------------------------------------------------------

def _colsum(xp, r):
    """Column sums of a 2-D array as a matrix-vector product: BLAS beats a row-wise reduction."""
    return xp.ones(r.shape[0], dtype=r.dtype) @ r


def _widen(r, width: int = 512) -> int:
    """How many rows of the contiguous (rows, C) matrix `r` to lay side by side, as one row of
    about `width` values, for the per-channel passes of batch norm. NumPy broadcasts a (C,)
    vector over (rows, C) in inner loops of only C elements; on wide rows the same passes run
    about twice as fast for C = 16 (benchmarks/ops.py). Returns 1 where no widening applies."""
    rows, c = r.shape
    k = 1
    if r.flags.c_contiguous:
        while k * 2 * c <= width and rows % (k * 2) == 0:
            k *= 2
    return k


def _tile(xp, v, k: int):
    """A per-channel vector (C,) repeated for `k` side-by-side rows."""
    return xp.tile(v, k) if k > 1 else v


def _fold(v, k: int):
    """Sum the `k` per-channel parts of a wide-row reduction (k * C,) into (C,)."""
    return v.reshape(k, -1).sum(axis=0) if k > 1 else v


class BatchNorm(Function):
    def __init__(self, eps, stats=None):
        self.eps, self.stats = eps, stats  # stats: (mean, var) to use in eval mode

    def forward(self, x, gamma, beta):
        xp = self.xp
        c = x.shape[1] if x.ndim > 1 else -1
        if x.ndim not in (2, 4) or gamma.shape != (c,) or beta.shape != (c,):
            raise ValueError(f"batch_norm: expected input (N, C) or (N, C, H, W) with weight and bias "
                             f"of shape (C,), got {tuple(x.shape)}, {tuple(gamma.shape)}, {tuple(beta.shape)}")
        self.shape = x.shape
        r = _rows(x)
        self.k = k = _widen(r)
        rw = r.reshape(-1, k * c) if k > 1 else r  # per-channel passes run on wide rows
        if self.stats is None:
            if r.shape[0] < 2:
                raise ValueError(f"batch_norm: training needs more than one value per channel, "
                                 f"got input {tuple(x.shape)}")
            m = x.dtype.type(r.shape[0])
            mu = _fold(_colsum(xp, rw), k) / m
            xc = rw - _tile(xp, mu, k)
            var = _fold(xp.einsum("ij,ij->j", xc, xc), k) / m
            self.batch_stats = (mu, var)
        else:
            mu, var = self.stats
            xc = rw - _tile(xp, mu.astype(x.dtype, copy=False), k)
            var = var.astype(x.dtype, copy=False)
        self.invstd = 1 / xp.sqrt(var + x.dtype.type(self.eps))
        # keep x - mean rather than x-hat = (x - mean) * invstd: backward folds invstd into
        # per-channel factors, which saves a full pass over the activations here
        self.xc, self.gamma = xc, gamma
        y = xc * _tile(xp, gamma * self.invstd, k)
        y += _tile(xp, beta, k)
        return _from_rows(y.reshape(r.shape), x.shape)

    def backward(self, gy):
        xp, k = self.xp, self.k
        g = _rows(gy)
        if not g.flags.c_contiguous:
            g = xp.ascontiguousarray(g)
        rows = g.shape
        g = g.reshape(self.xc.shape)
        xc, invstd = self.xc, self.invstd
        gbeta = _fold(_colsum(xp, g), k)
        ggamma = _fold(xp.einsum("ij,ij->j", g, xc), k) * invstd  # sum of g * x-hat
        gx = None
        if self.needs_input_grad[0]:
            scale = self.gamma * invstd
            gx = g * _tile(xp, scale, k)
            if self.stats is None:  # batch statistics depend on x too:
                # gx = scale * (g - mean(g) - x-hat * mean(g * x-hat))
                m = g.dtype.type(rows[0])
                gx += xc * _tile(xp, -scale * invstd * ggamma / m, k)
                gx -= _tile(xp, scale * gbeta / m, k)
            gx = _from_rows(gx.reshape(rows), self.shape)
        return gx, ggamma, gbeta


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch normalization over N (and H, W) per channel of (N, C) or (N, C, H, W).

    In training, normalizes with the batch statistics and then updates `running_mean` and
    `running_var` (arrays or Tensors, or None) in place, outside the graph:
    running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance,
    as PyTorch does. In eval, normalizes with the running statistics.
    """
    x = as_tensor(input)
    c = x.shape[1] if x.ndim > 1 else 0
    xp = get_array_module(x.data)
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    weight = Tensor(xp.ones((c,), dtype=x.dtype)) if weight is None else weight
    bias = Tensor(xp.zeros((c,), dtype=x.dtype)) if bias is None else bias
    if not training:
        if rm is None or rv is None:
            raise ValueError("batch_norm: eval mode needs running_mean and running_var")
        return BatchNorm(eps, (rm, rv))(x, weight, bias)
    fn = BatchNorm(eps)
    y = fn(x, weight, bias)
    if rm is not None or rv is not None:
        mu, var = fn.batch_stats
        m = x.size // c
        if rm is not None:
            rm *= 1 - momentum
            rm += (momentum * mu).astype(rm.dtype, copy=False)
        if rv is not None:
            rv *= 1 - momentum
            rv += (momentum * m / max(m - 1, 1) * var).astype(rv.dtype, copy=False)
    fn.__dict__.pop("batch_stats", None)
    return y


# ---- pooling -----------------------------------------------------------------------------

class _Pool2d(Function):
    """Shared geometry of max and average pooling on the NHWC view."""

    op = "pool2d"

    def __init__(self, kernel_size, stride, padding):
        self.k = _pair(kernel_size, "kernel_size", self.op)
        self.s = _pair(stride if stride is not None else kernel_size, "stride", self.op)
        self.p = _pair(padding, "padding", self.op)

    def _windows(self, x, fill):
        xp = self.xp
        if x.ndim != 4:
            raise ValueError(f"{self.op}: expected input (N, C, H, W), got {tuple(x.shape)}")
        (kh, kw), (sh, sw), (ph, pw) = self.k, self.s, self.p
        n, c, h, w = x.shape
        if ph > kh // 2 or pw > kw // 2:
            raise ValueError(f"{self.op}: padding {self.p} must be at most half the kernel {self.k}")
        if kh > h + 2 * ph or kw > w + 2 * pw:
            raise ValueError(f"{self.op}: kernel {kh}x{kw} is larger than the padded input "
                             f"{h + 2 * ph}x{w + 2 * pw} (input {tuple(x.shape)})")
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        buf = xp.full((n, h + 2 * ph, w + 2 * pw, c), fill, dtype=x.dtype)
        buf[:, ph:ph + h, pw:pw + w] = x.transpose(0, 2, 3, 1)
        self.geom = (n, c, h, w, oh, ow)
        return im2col(buf, kh, kw, sh, sw, oh, ow, xp).reshape(n, oh, ow, kh * kw, c)

    def _scatter(self, dcol):
        """Sum window gradients dcol (n, oh, ow, kh*kw, C) back to an NCHW input gradient."""
        xp = self.xp
        (kh, kw), (sh, sw), (ph, pw) = self.k, self.s, self.p
        n, c, h, w, oh, ow = self.geom
        gbuf = xp.zeros((n, h + 2 * ph + sh, w + 2 * pw + sw, c), dtype=dcol.dtype)
        col2im(dcol.reshape(n, oh, ow, kh, kw, c), gbuf, sh, sw)
        return gbuf[:, ph:ph + h, pw:pw + w].transpose(0, 3, 1, 2)


class MaxPool2d(_Pool2d):
    op = "max_pool2d"

    def forward(self, x):
        col = self._windows(x, -np.inf)
        self.arg = col.argmax(axis=3)[:, :, :, None, :]  # the first maximum takes the gradient
        return self.xp.take_along_axis(col, self.arg, axis=3)[:, :, :, 0, :].transpose(0, 3, 1, 2)

    def backward(self, gy):
        xp = self.xp
        kk = self.k[0] * self.k[1]
        onehot = xp.arange(kk).reshape(1, 1, 1, kk, 1) == self.arg  # where each window's max was
        dcol = onehot * gy.transpose(0, 2, 3, 1)[:, :, :, None, :]
        return self._scatter(dcol)


class AvgPool2d(_Pool2d):
    op = "avg_pool2d"

    def forward(self, x):
        col = self._windows(x, 0)
        return col.mean(axis=3).transpose(0, 3, 1, 2)

    def backward(self, gy):
        n, c, _, _, oh, ow = self.geom
        kk = self.k[0] * self.k[1]
        g = (gy.transpose(0, 2, 3, 1) / gy.dtype.type(kk))[:, :, :, None, :]
        dcol = self.xp.broadcast_to(g, (n, oh, ow, kk, c))
        return self._scatter(dcol)


def max_pool2d(input, kernel_size, stride=None, padding=0) -> Tensor:
    """Max over kernel_size windows (stride defaults to kernel_size; padding counts as -inf)."""
    return MaxPool2d(kernel_size, stride, padding)(input)


def avg_pool2d(input, kernel_size, stride=None, padding=0) -> Tensor:
    """Mean over kernel_size windows (zero padding is counted, as PyTorch's default)."""
    return AvgPool2d(kernel_size, stride, padding)(input)


def global_avg_pool2d(input) -> Tensor:
    """Mean over H and W: (N, C, H, W) -> (N, C)."""
    x = as_tensor(input)
    if x.ndim != 4:
        raise ValueError(f"global_avg_pool2d: expected input (N, C, H, W), got {x.shape}")
    return mean(x, (2, 3))


def adaptive_avg_pool2d(input, output_size=1) -> Tensor:
    """Adaptive average pooling; only output_size 1 (global pooling): -> (N, C, 1, 1)."""
    if _pair(output_size, "output_size", "adaptive_avg_pool2d") != (1, 1):
        raise ValueError(f"adaptive_avg_pool2d: only output_size=1 is supported, got {output_size!r}")
    return mean(as_tensor(input), (2, 3), keepdim=True)


# ---- linear and losses -------------------------------------------------------------------

class Linear(Function):
    def forward(self, x, w, b=None):
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"linear: input {tuple(x.shape)} and weight {tuple(w.shape)} do not match "
                             "(need (N, in) and (out, in))")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"linear: bias shape {tuple(b.shape)} should be ({w.shape[0]},)")
        self.x, self.w = x, w
        y = x @ w.T
        if b is not None:
            y += b
        return y

    def backward(self, gy):
        gx = gy @ self.w if self.needs_input_grad[0] else None
        gw = gy.T @ self.x if self.needs_input_grad[1] else None
        gb = gy.sum(axis=0) if len(self.needs_input_grad) > 2 and self.needs_input_grad[2] else None
        return gx, gw, gb


def linear(input, weight, bias=None) -> Tensor:
    """x @ weight.T + bias: (N, in) -> (N, out)."""
    return Linear()(input, weight) if bias is None else Linear()(input, weight, bias)


def _log_softmax(xp, x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    z -= xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
    return z


class LogSoftmax(Function):
    def __init__(self, dim):
        self.dim = dim

    def forward(self, x):
        self.y = _log_softmax(self.xp, x, self.dim)
        return self.y

    def backward(self, gy):
        return gy - self.xp.exp(self.y) * gy.sum(axis=self.dim, keepdims=True)


def log_softmax(input, dim: int = -1) -> Tensor:
    """log(softmax(x)) along `dim`, computed stably (no overflow for large logits)."""
    return LogSoftmax(dim)(input)


def softmax(input, dim: int = -1) -> Tensor:
    """exp(x) / sum(exp(x)) along `dim`."""
    from ..tensor import exp
    return exp(log_softmax(input, dim))


class CrossEntropy(Function):
    def __init__(self, target):
        self.t = target

    def forward(self, x):
        xp = self.xp
        t = self.t
        if x.ndim != 2:
            raise ValueError(f"cross_entropy: expected logits (N, classes), got {tuple(x.shape)}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"cross_entropy: target shape {tuple(t.shape)} does not match logits "
                             f"{tuple(x.shape)} (need ({x.shape[0]},))")
        if t.dtype.kind not in "iu":
            raise TypeError(f"cross_entropy: target must hold integer class indices, got {t.dtype}")
        if t.size and (int(t.min()) < 0 or int(t.max()) >= x.shape[1]):
            raise ValueError(f"cross_entropy: target values must lie in [0, {x.shape[1]}), "
                             f"got min {int(t.min())}, max {int(t.max())}")
        self.logp = _log_softmax(xp, x, 1)
        n = x.shape[0]
        picked = self.logp[xp.arange(n), t]
        return xp.asarray(-picked.sum() / x.dtype.type(n), dtype=x.dtype)

    def backward(self, gy):
        xp = self.xp
        n = self.logp.shape[0]
        g = xp.exp(self.logp)  # softmax
        g[xp.arange(n), self.t] -= 1
        g *= gy / gy.dtype.type(n)
        return g


def cross_entropy(input, target) -> Tensor:
    """Mean negative log-likelihood of integer `target` (N,) under softmax(`input` (N, classes))."""
    t = target.data if isinstance(target, Tensor) else target
    x = as_tensor(input)
    if not hasattr(t, "dtype"):
        t = np.asarray(t)
    return CrossEntropy(t)(x)

