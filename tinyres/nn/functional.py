"""The ops of a convolutional network, as `torch.nn.functional` names them.

conv2d, batch_norm, max/avg pooling, linear and cross_entropy are each a `Function` here whose
forward and backward state the math; the global poolings are means, and relu, softmax, flatten,
cat, ... are re-exported from `tinyres.ops`. The array work beneath (im2col in chunks, the
channels-last layout, threads over the batch) is in `tinyres.kernels`. Image tensors are NCHW,
as in PyTorch. The names are Chainer's: x, W, b the inputs, y the output, gy = dL/dy, and gx,
gW, gb the gradients.
"""

from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..backend import device_of, get_array_module
from ..leftout import module_getattr
from ..ops import (
    cat,
    concatenate,
    flatten,
    getitem,
    log_softmax,
    mean,
    pad,
    permute,
    relu,
    reshape,
    softmax,
    transpose,
)
from ..tensor import Function, Tensor, as_tensor

__all__ = [
    "adaptive_avg_pool2d", "avg_pool2d", "batch_norm", "cat", "concatenate", "conv2d", "cross_entropy", "flatten",
    "getitem", "global_avg_pool2d", "linear", "log_softmax", "max_pool2d", "mean", "nll_loss", "pad", "permute", "relu",
    "reshape", "softmax", "transpose",
]


def int_pair(v, name: str, op: str, low: int = 0) -> tuple[int, int]:
    """(v, v) for an int, v for a pair of ints; each at least `low`, else an error naming `op`."""
    t = (v, v) if isinstance(v, (int, np.integer)) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(t) != 2 or any(not isinstance(a, (int, np.integer)) for a in t):
        raise ValueError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")
    if min(t) < low:
        raise ValueError(f"{op}: {name} must be >= {low}, got {v!r}")
    return int(t[0]), int(t[1])


def _check_floats(op: str, **tensors: Tensor) -> None:
    """A TypeError naming `op` unless every tensor holds floats (integer images reach a model all too easily)."""
    for name, t in tensors.items():
        if t.dtype.kind != "f":
            hint = (" (images: x.float() / 255, or tinyres.data.to_float with the per-pixel mean)"
                    if t.dtype == np.uint8 else "")
            raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype} with shape {t.shape}; "
                            f"convert it with .float(){hint}")


def _check_image(op: str, x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"{op}: expected input (N, C, H, W), got {x.shape}")


# ---- conv2d ------------------------------------------------------------------------------

class Conv2d(Function):
    """y[n, o, i, j] = b[o] + sum_{c, p, q} x[n, c, s*i + p - pad, s*j + q - pad] * W[o, c, p, q]"""

    def __init__(self, stride, padding):
        self.stride, self.padding = stride, padding

    def forward(self, x, W, b=None):
        self.x, self.W = x, W
        y = kernels.conv2d_forward(x, W, self.stride, self.padding)
        if b is not None:
            y += b.reshape(1, -1, 1, 1)
        return y

    def backward(self, gy):
        # gW[o, c, p, q] = sum_{n, i, j} gy[n, o, i, j] * x[n, c, s*i + p - pad, s*j + q - pad]
        # gx = the transposed convolution of gy with W: each gy[n, o, i, j] * W[o] added back
        #      over the window of x it came from
        # gb[o] = sum_{n, i, j} gy[n, o, i, j]
        need_gx, need_gW, *need_gb = self.needs_input_grad
        gx, gW = kernels.conv2d_backward(gy, self.x, self.W, self.stride, self.padding, need_gx, need_gW)
        gb = kernels.channel_sum(gy) if need_gb and need_gb[0] else None
        return gx, gW, gb


def conv2d(input, weight, bias=None, stride=1, padding=0) -> Tensor:
    """2-D convolution (cross-correlation): (N, C, H, W) * (OC, C, KH, KW) -> (N, OC, OH, OW)."""
    stride, padding = int_pair(stride, "stride", "conv2d", low=1), int_pair(padding, "padding", "conv2d")
    x, W = as_tensor(input), as_tensor(weight)
    _check_floats("conv2d", input=x, weight=W)
    if x.ndim != 4 or W.ndim != 4:
        raise ValueError(f"conv2d: expected input (N, C, H, W) and weight (OC, C, KH, KW), got {x.shape} and {W.shape}")
    if W.shape[1] != x.shape[1]:
        raise ValueError(f"conv2d: weight {W.shape} expects {W.shape[1]} input channels, input {x.shape} has "
                         f"{x.shape[1]}")
    if bias is not None and as_tensor(bias).shape != (W.shape[0],):
        raise ValueError(f"conv2d: bias shape {as_tensor(bias).shape} should be ({W.shape[0]},)")
    (kh, kw), (h, w) = W.shape[2:], x.shape[2:]
    if kh > h + 2 * padding[0] or kw > w + 2 * padding[1]:
        raise ValueError(f"conv2d: kernel {kh}x{kw} is larger than the padded input "
                         f"{h + 2 * padding[0]}x{w + 2 * padding[1]} (input {x.shape}, padding {padding})")
    fn = Conv2d(stride, padding)
    return fn(x, W) if bias is None else fn(x, W, bias)


# ---- batch norm --------------------------------------------------------------------------

def values_per_channel(shape: tuple[int, ...]) -> int:
    """How many values batch norm averages per channel of an (N, C, ...) shape: N * H * W."""
    return math.prod(shape) // max(shape[1], 1)


class BatchNorm(Function):
    """y = gamma * x_hat + beta, x_hat = (x - mean) * invstd, invstd = 1 / sqrt(var + eps), per channel over
    N (and H, W). mean and var are the batch's (training; kept as `self.mean`, `self.var` for the
    running statistics) or the running statistics given (eval)."""

    def __init__(self, eps, running=None, all_sum=None):
        self.eps, self.running = eps, running  # running: (mean, var) to normalize with in eval mode
        self.all_sum = all_sum  # sums a per-channel array over the ranks of a job (SyncBatchNorm), or None

    def forward(self, x, gamma, beta):
        self.m = m = x.dtype.type(values_per_channel(x.shape))
        if self.running is None:
            # x at the first pixel of the first image, per channel: a shift near the mean keeps float32 sums accurate
            shift = x[(0, slice(None)) + (0,) * (x.ndim - 2)]
            s1, s2 = kernels.channel_sums(x, shift)  # sums of x - shift and of its square
            mean, var = shift + s1 / m, self.xp.maximum(s2 / m - (s1 / m) ** 2, 0)
            if self.all_sum is not None:  # the batch is every rank's batch together
                self.m, mean, var = pooled_moments(m, mean, var, self.all_sum)
        else:
            mean, var = (s.astype(x.dtype, copy=False) for s in self.running)
        self.x, self.mean, self.var, self.gamma = x, mean, var, gamma
        self.invstd = 1 / self.xp.sqrt(var + x.dtype.type(self.eps))
        scale = gamma * self.invstd
        return kernels.channel_affine(x, scale, beta - mean * scale)  # = gamma * x_hat + beta

    def backward(self, gy):
        x, mean, invstd, m = self.x, self.mean, self.invstd, self.m
        gbeta, gy_xc = kernels.channel_sums(x, mean, gy)  # sum(gy) and sum(gy * (x - mean)), in one pass
        ggamma = gy_xc * invstd  # sum(gy * x_hat)
        gx = None
        if self.needs_input_grad[0]:
            scale = self.gamma * invstd
            if self.running is None:
                # mean and var are functions of x too, which gives the textbook
                #   gx = scale * (gy - mean(gy) - x_hat * mean(gy * x_hat)).
                # Written out with x_hat = (x - mean) * invstd it is gx = scale * gy + c * x + c0,
                # one pass over gy and x that makes no x_hat:
                sum_gy, sum_gy_xhat = gbeta, ggamma
                if self.all_sum is not None:  # ... of every rank's x: the means are over all ranks' batches
                    sum_gy, sum_gy_xhat = self.xp.split(self.all_sum(self.xp.concatenate([gbeta, ggamma])), 2)
                mean_gy, mean_gy_xhat = sum_gy / m, sum_gy_xhat / m
                c = -scale * invstd * mean_gy_xhat
                c0 = -scale * mean_gy - c * mean
                gx = kernels.channel_affine(gy, scale, c0, x, c)
            else:  # running statistics are constants: gx = scale * gy
                gx = kernels.channel_affine(gy, scale, self.xp.zeros_like(scale))
        return gx, ggamma, gbeta  # this rank's share: data-parallel training averages them


def pooled_moments(m, mean, var, all_sum):
    """(count, mean, variance) over every rank's values, from each rank's own count m, mean and variance (C,).

    The ranks add up m, m * mean and m * (var + mean^2), the sums of 1, x and x^2, in float64, so
    that E[x^2] - E[x]^2 keeps the digits that float32 would lose when the mean is large beside the spread.
    """
    xp, dtype = get_array_module(mean), mean.dtype
    mean64, var64 = mean.astype(xp.float64), var.astype(xp.float64)
    sums = all_sum(xp.concatenate([xp.full(1, m, dtype=xp.float64), m * mean64, m * (var64 + mean64 ** 2)]))
    count, sum_x, sum_x2 = sums[0], sums[1:len(mean) + 1], sums[len(mean) + 1:]
    mean64 = sum_x / count
    return count.astype(dtype), mean64.astype(dtype), xp.maximum(sum_x2 / count - mean64 ** 2, 0).astype(dtype)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, all_sum=None) -> Tensor:
    """Batch normalization over N (and H, W) per channel of (N, C) or (N, C, H, W).

    In training, normalizes with the batch statistics and then updates `running_mean` and
    `running_var` (arrays or Tensors, or None) in place, outside the graph:
    running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance,
    as PyTorch does. In eval, normalizes with the running statistics.
    `all_sum(array)`, given, sums an array over the ranks of a data-parallel job: the batch
    statistics and their gradients are then those of all the ranks' batches together (SyncBatchNorm).
    """
    x = as_tensor(input)
    c = x.shape[1] if x.ndim > 1 else 0
    rm = running_mean.data if isinstance(running_mean, Tensor) else running_mean
    rv = running_var.data if isinstance(running_var, Tensor) else running_var
    weight = Tensor(get_array_module(x.data).ones(c, dtype=x.dtype)) if weight is None else as_tensor(weight)
    bias = Tensor(get_array_module(x.data).zeros(c, dtype=x.dtype)) if bias is None else as_tensor(bias)
    if x.ndim not in (2, 4) or weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"batch_norm: expected input (N, C) or (N, C, H, W) with weight and bias of shape (C,), "
                         f"got {x.shape}, {weight.shape}, {bias.shape}")
    for name, s in (("running_mean", rm), ("running_var", rv)):
        if s is not None and (tuple(s.shape) != (c,) or device_of(s) != x.device):
            raise ValueError(f"batch_norm: {name} must be ({c},) on {x.device} like the input {x.shape}, "
                             f"got {tuple(s.shape)} on {device_of(s)}")
    if not training:
        if rm is None or rv is None:
            raise ValueError("batch_norm: eval mode needs running_mean and running_var")
        return BatchNorm(eps, (rm, rv))(x, weight, bias)
    m = values_per_channel(x.shape)
    if m < 2:
        raise ValueError(f"batch_norm: training needs more than one value per channel, got input {x.shape}")
    fn = BatchNorm(eps, all_sum=all_sum)
    y = fn(x, weight, bias)
    m = float(fn.m)  # values per channel in the whole batch, over all ranks
    if rm is not None:
        rm *= 1 - momentum
        rm += (momentum * fn.mean).astype(rm.dtype, copy=False)
    if rv is not None:
        rv *= 1 - momentum
        rv += (momentum * m / (m - 1) * fn.var).astype(rv.dtype, copy=False)
    return y


# ---- pooling -----------------------------------------------------------------------------

class Pool2d(Function):
    """y[n, c, i, j] = max or mean over p < KH, q < KW of x[n, c, s*i + p - pad, s*j + q - pad]

    Worked on the channels-last view, whose (N, OH, OW, KH*KW, C) windows are one strided view.
    Max: the first maximum of a window takes its gradient (PyTorch's rule for max pooling;
    `amax`, a reduction, splits a tie's gradient as `torch.amax` does)."""

    def __init__(self, mode: str, kernel_size, stride, padding):
        self.mode, self.kernel_size, self.stride, self.padding = mode, kernel_size, stride, padding

    def forward(self, x):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, c, h, w = x.shape
        oh, ow = kernels.output_size(h, kh, sh, ph), kernels.output_size(w, kw, sw, pw)
        xpad = self.xp.full((n, h + 2 * ph, w + 2 * pw, c), -np.inf if self.mode == "max" else 0, dtype=x.dtype)
        xpad[:, ph:ph + h, pw:pw + w] = x.transpose(0, 2, 3, 1)
        self.shape, self.out = x.shape, (oh, ow)
        win = kernels.windows(xpad, kh, kw, sh, sw, oh, ow).reshape(n, oh, ow, kh * kw, c)
        if self.mode == "avg":
            return win.mean(axis=3).transpose(0, 3, 1, 2)
        self.argmax = win.argmax(axis=3)[:, :, :, None, :]  # (N, OH, OW, 1, C): where in its window each max is
        return self.xp.take_along_axis(win, self.argmax, axis=3)[:, :, :, 0, :].transpose(0, 3, 1, 2)

    def backward(self, gy):
        # max: gy to the argmax of each window; avg: gy / (kh * kw) to every element of it
        xp, (kh, kw), (sh, sw), (ph, pw) = self.xp, self.kernel_size, self.stride, self.padding
        (n, c, h, w), (oh, ow) = self.shape, self.out
        g = gy.transpose(0, 2, 3, 1)[:, :, :, None, :]
        if self.mode == "max":  # window position q gets gy where q is the argmax: a one-hot mask along axis 3
            gwin = (xp.arange(kh * kw).reshape(1, 1, 1, -1, 1) == self.argmax) * g
        else:
            gwin = xp.broadcast_to(g / gy.dtype.type(kh * kw), (n, oh, ow, kh * kw, c))
        gpad = xp.zeros((n, h + 2 * ph, w + 2 * pw, c), dtype=gy.dtype)
        kernels.col2im(gwin.reshape(n, oh, ow, kh, kw, c), gpad, sh, sw)  # overlapping windows add up
        return gpad[:, ph:ph + h, pw:pw + w].transpose(0, 3, 1, 2)


def _pool2d(mode: str, input, kernel_size, stride, padding) -> Tensor:
    op = f"{mode}_pool2d"
    x = as_tensor(input)
    _check_image(op, x)
    k = int_pair(kernel_size, "kernel_size", op, low=1)
    s = int_pair(stride if stride is not None else kernel_size, "stride", op, low=1)
    p = int_pair(padding, "padding", op)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"{op}: padding {p} must be at most half the kernel {k}")
    if k[0] > x.shape[2] + 2 * p[0] or k[1] > x.shape[3] + 2 * p[1]:
        raise ValueError(f"{op}: kernel {k[0]}x{k[1]} is larger than the padded input "
                         f"{x.shape[2] + 2 * p[0]}x{x.shape[3] + 2 * p[1]} (input {x.shape})")
    return Pool2d(mode, k, s, p)(x)


def max_pool2d(input, kernel_size, stride=None, padding=0) -> Tensor:
    """Max over kernel_size windows (stride defaults to kernel_size; padding counts as -inf)."""
    return _pool2d("max", input, kernel_size, stride, padding)


def avg_pool2d(input, kernel_size, stride=None, padding=0) -> Tensor:
    """Mean over kernel_size windows (zero padding is counted, as PyTorch's default)."""
    return _pool2d("avg", input, kernel_size, stride, padding)


def global_avg_pool2d(input) -> Tensor:
    """Mean over H and W: (N, C, H, W) -> (N, C)."""
    x = as_tensor(input)
    _check_image("global_avg_pool2d", x)
    return mean(x, (2, 3))


def adaptive_avg_pool2d(input, output_size=1) -> Tensor:
    """Adaptive average pooling; only output_size 1 (global pooling): -> (N, C, 1, 1)."""
    if int_pair(output_size, "output_size", "adaptive_avg_pool2d") != (1, 1):
        raise ValueError(f"adaptive_avg_pool2d: only output_size=1 is supported, got {output_size!r}")
    return mean(as_tensor(input), (2, 3), keepdim=True)


# ---- linear and losses -------------------------------------------------------------------

class Linear(Function):
    """y = x @ W.T + b"""

    def forward(self, x, W, b=None):
        self.x, self.W = x, W
        y = x @ W.T
        if b is not None:
            y += b
        return y

    def backward(self, gy):
        need_gx, need_gW, *need_gb = self.needs_input_grad
        gx = gy @ self.W if need_gx else None
        gW = gy.T @ self.x if need_gW else None
        gb = gy.sum(axis=0) if need_gb and need_gb[0] else None
        return gx, gW, gb


def linear(input, weight, bias=None) -> Tensor:
    """x @ weight.T + bias: (N, in) -> (N, out)."""
    x, W = as_tensor(input), as_tensor(weight)
    _check_floats("linear", input=x, weight=W)
    if x.ndim != 2 or W.ndim != 2 or x.shape[1] != W.shape[1]:
        raise ValueError(f"linear: input {x.shape} and weight {W.shape} do not match (need (N, in) and (out, in))")
    if bias is not None and as_tensor(bias).shape != (W.shape[0],):
        raise ValueError(f"linear: bias shape {as_tensor(bias).shape} should be ({W.shape[0]},)")
    return Linear()(x, W) if bias is None else Linear()(x, W, bias)


class CrossEntropy(Function):
    """L[n] = -sum_k q[n, k] log softmax(x)[n, k], with q = (1 - eps) onehot(t[n]) + eps / K;
    L = mean_n L[n] (or the sum, or each L[n])"""

    def __init__(self, target, label_smoothing: float, reduction: str):
        self.t, self.eps, self.reduction = target, label_smoothing, reduction

    def forward(self, x):
        xp, (n, k) = self.xp, x.shape
        self.logp = kernels.log_softmax(x, 1)
        loss = -self.logp[xp.arange(n), self.t]
        if self.eps:
            loss = (1 - self.eps) * loss - (self.eps / k) * self.logp.sum(axis=1)
        if self.reduction == "none":
            return loss
        total = loss.sum()
        return xp.asarray(total / x.dtype.type(n) if self.reduction == "mean" else total, dtype=x.dtype)

    def backward(self, gy):
        # gx[n] = (softmax(x)[n] - q[n]) * w[n], where w = gy / N (mean), gy (sum) or gy[n] (none)
        xp, (n, k) = self.xp, self.logp.shape
        gx = xp.exp(self.logp)
        gx[xp.arange(n), self.t] -= 1 - self.eps
        if self.eps:
            gx -= self.eps / k
        if self.reduction == "none":
            gx *= gy[:, None]
        else:
            gx *= gy / gy.dtype.type(n) if self.reduction == "mean" else gy
        return gx


def cross_entropy(input, target, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Negative log-likelihood of integer `target` (N,) under softmax(`input` (N, classes)), as PyTorch's:
    averaged over the batch (reduction "mean"), summed ("sum") or per sample ("none"); with
    `label_smoothing` eps the target is (1 - eps) on the class and eps / classes on every class.

    Target values are checked on the CPU; on a GPU that check would stall the device every step,
    so there an out-of-range target gives a meaningless loss instead.
    """
    x = as_tensor(input)
    t = target.data if isinstance(target, Tensor) else target
    if not hasattr(t, "dtype"):
        t = np.asarray(t)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must lie in [0, 1], got {label_smoothing}")
    if x.ndim != 2:
        raise ValueError(f"cross_entropy: expected logits (N, classes), got {x.shape}")
    _check_floats("cross_entropy", input=x)
    if x.shape[0] == 0:
        raise ValueError(f"cross_entropy: empty batch (logits {x.shape}): the mean over no samples is undefined")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"cross_entropy: target shape {tuple(t.shape)} does not match logits {x.shape} "
                         f"(need ({x.shape[0]},))")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer class indices, got {t.dtype}")
    if device_of(t) != x.device:
        raise RuntimeError(f"cross_entropy: target is on {device_of(t)}, logits on {x.device}; "
                           "move them with .to() first")
    if x.device == "cpu" and (t.min() < 0 or t.max() >= x.shape[1]):
        raise ValueError(f"cross_entropy: target values must lie in [0, {x.shape[1]}), "
                         f"got min {int(t.min())}, max {int(t.max())}")
    return CrossEntropy(t, float(label_smoothing), reduction)(x)


def nll_loss(input, target, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer `target` (N,) given log-probabilities `input` (N, classes), as PyTorch's:
    `nll_loss(log_softmax(x, 1), t)` is `cross_entropy(x, t)`."""
    x = as_tensor(input)
    t = target.data if isinstance(target, Tensor) else np.asarray(target)
    if x.ndim != 2 or t.ndim != 1 or t.shape[0] != x.shape[0] or t.dtype.kind not in "iu":
        raise ValueError(f"nll_loss: expected log-probabilities (N, classes) and integer targets (N,), got "
                         f"{x.shape} and {t.dtype}{tuple(t.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"nll_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    picked = -getitem(x, (get_array_module(x.data).arange(x.shape[0]), t))
    return picked if reduction == "none" else picked.sum() if reduction == "sum" else picked.mean()


# functions a PyTorch script may call that tinyres leaves out, and what to use instead
LEFT_OUT_FUNCTIONS = {
    **dict.fromkeys(("dropout", "dropout2d", "sigmoid", "tanh", "leaky_relu", "gelu", "silu", "elu", "layer_norm",
                     "group_norm", "interpolate", "conv1d", "conv3d", "conv_transpose2d", "embedding"),
                    "the networks of He et al. (2015) do not use it, and tinyres has the ops they need"),
    "mse_loss": "write ((input - target) ** 2).mean()",
    "one_hot": "index an identity matrix: tinyres.tensor(numpy.eye(classes)[labels])",
}


__getattr__ = module_getattr("tinyres.nn.functional", LEFT_OUT_FUNCTIONS)
