"""The definitions the tests hold convolution and pooling to: loops over output positions, in float64,
independent of im2col and of the channels-last layout."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np


def _output(x, kernel, stride, padding, channels: int) -> np.ndarray:
    """Zeros of the output's shape: (N, channels, OH, OW)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, _, h, w = x.shape
    return np.zeros((n, channels, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1))


def _windows(x, y, kernel, stride, padding, fill: float = 0.0) -> Iterator[tuple[int, int, np.ndarray]]:
    """(i, j, window) for each output pixel (i, j) of `y`: window[n, c] is the (KH, KW) patch of NCHW
    `x`, padded with `fill`, that the pixel reads."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    xpad = np.full((n, c, h + 2 * ph, w + 2 * pw), fill)
    xpad[:, :, ph:ph + h, pw:pw + w] = x
    for i in range(y.shape[2]):
        for j in range(y.shape[3]):
            yield i, j, xpad[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]


def conv2d_reference(x, W, b=None, stride=(1, 1), padding=(0, 0)) -> np.ndarray:
    """y[n, o, i, j] = b[o] + sum_{c, p, q} xpad[n, c, s*i + p, s*j + q] * W[o, c, p, q]."""
    x, W = np.asarray(x, dtype=np.float64), np.asarray(W, dtype=np.float64)
    y = _output(x, W.shape[2:], stride, padding, W.shape[0])
    for i, j, window in _windows(x, y, W.shape[2:], stride, padding):
        y[:, :, i, j] = np.einsum("ncpq,ocpq->no", window, W) + (0.0 if b is None else b)
    return y


def pool2d_reference(x, kernel, stride, padding, reduce: Callable) -> np.ndarray:
    """reduce (np.max or np.mean) over each window; stride None is the kernel size. Max pads with
    -inf; average pooling counts the zero padding, as PyTorch's default."""
    x = np.asarray(x, dtype=np.float64)
    stride = stride if stride is not None else kernel
    y = _output(x, kernel, stride, padding, x.shape[1])
    for i, j, window in _windows(x, y, kernel, stride, padding, -np.inf if reduce is np.max else 0.0):
        y[:, :, i, j] = reduce(window, axis=(2, 3))
    return y
