"""Forward and backward time of each op at the ResNet-20 layer shapes (batch 128, float32),
with the achieved GFLOP/s of the convolutions, to show where a training step's time goes; on
the CPU, also the convolutions' GEMMs alone, the floor of an im2col convolution on this BLAS.

    python benchmarks/ops.py [--device cpu|cuda] [--batch-size 128] [--threads N]

Ops run at the thread count training uses (all cores, or `--threads`); the GEMM table times the
GEMMs alone on one thread, as each of the kernels' threads runs them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import blas_kernel

import tinyres
from tinyres.nn import functional as F

# the convolutions of ResNet-20: (in channels, out channels, input size, stride, how many)
LAYERS = ((3, 16, 32, 1, 1), (16, 16, 32, 1, 6), (16, 32, 32, 2, 1),
          (32, 32, 16, 1, 5), (32, 64, 16, 2, 1), (64, 64, 8, 1, 5))


def _sync(device):
    if device == "cuda":
        import cupy
        cupy.cuda.Device().synchronize()


def timeit(fn, device, repeat=7, setup=None):
    """Median seconds of fn() after one warm-up call; with `setup`, of fn(setup()), setup untimed."""
    def call():
        arg = setup() if setup else None
        _sync(device)
        t = time.perf_counter()
        fn(arg) if setup else fn()
        _sync(device)
        return time.perf_counter() - t

    call()
    return statistics.median(call() for _ in range(repeat))


def bench(name, make_inputs, op, flops, device, per_step):
    """Time op's forward, then its backward alone (each on a freshly built graph), on leaf tensors."""
    inputs = make_inputs()

    def fwd():
        with tinyres.no_grad():
            op(*inputs)

    def graph():
        for t in inputs:
            t.grad = None
        return op(*inputs)

    def bwd(y):
        y.backward(gy if y.shape == gy_shape[0] else None)

    y0 = op(*inputs)
    gy_shape = [y0.shape]
    xp = tinyres.get_array_module(y0.data)
    gy = tinyres.Tensor(xp.asarray(np.random.default_rng(1).standard_normal(y0.shape, dtype=np.float32))) \
        if y0.numel() > 1 else None
    if gy is not None:  # channels-last like the gradients that reach these ops in a network
        gy = tinyres.Tensor(gy.data.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)) if gy.ndim == 4 else gy
    tf = timeit(fwd, device)
    tb = timeit(bwd, device, setup=graph)
    gf = f"{flops / tf / 1e9:.3g} / {2 * flops / tb / 1e9:.3g}" if flops else ""
    print(f"| {name} | {tf * 1e3:.2f} | {tb * 1e3:.2f} | {gf} | {per_step} | {(tf + tb) * per_step * 1e3:.0f} |")
    return (tf + tb) * per_step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores, as in training)")
    args = ap.parse_args()
    dev, n = args.device, args.batch_size
    if args.threads:
        tinyres.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    def t(*shape, grad=True, channels_last=True):
        a = rng.standard_normal(shape, dtype=np.float32)
        if channels_last and a.ndim == 4:  # the memory layout activations have inside a network
            a = a.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)
        return tinyres.tensor(a, requires_grad=grad, device=dev)

    print(f"# {datetime.date.today()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cores | "
          f"NumPy {np.__version__} ({blas_kernel()}) | device {dev} | batch {n} | {tinyres.get_num_threads()} threads")
    print("| op (ResNet-20 shape) | forward ms | backward ms | GFLOP/s fwd / bwd | per step | ms per step |")
    print("|---|---|---|---|---|---|")
    total = 0.0
    for c_in, c, hw, stride, count in LAYERS:
        oh = hw // stride
        flops = 2 * n * oh * oh * c * c_in * 9
        total += bench(f"conv2d {c_in}->{c} 3x3/{stride} on {hw}x{hw}",
                       lambda c_in=c_in, c=c, hw=hw: (t(n, c_in, hw, hw, grad=c_in != 3), t(c, c_in, 3, 3)),
                       lambda x, w, stride=stride: F.conv2d(x, w, stride=stride, padding=1), flops, dev, count)
    for c, hw, count in ((16, 32, 7), (32, 16, 6), (64, 8, 6)):
        total += bench(f"batch_norm {c}x{hw}x{hw}", lambda c=c, hw=hw: (t(n, c, hw, hw), t(c), t(c)),
                       lambda x, g, b: F.batch_norm(x, None, None, g, b, training=True), 0, dev, count)
    for c, hw, count in ((16, 32, 7), (32, 16, 6), (64, 8, 6)):
        total += bench(f"relu {c}x{hw}x{hw}", lambda c=c, hw=hw: (t(n, c, hw, hw),), F.relu, 0, dev, count)
    for c, hw, count in ((16, 32, 3), (32, 16, 3), (64, 8, 3)):
        total += bench(f"add (shortcut) {c}x{hw}x{hw}", lambda c=c, hw=hw: (t(n, c, hw, hw), t(n, c, hw, hw)),
                       lambda a, b: a + b, 0, dev, count)
    total += bench("shortcut A 16->32", lambda: (t(n, 16, 32, 32),),
                   lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)), 0, dev, 1)
    total += bench("global_avg_pool2d 64x8x8", lambda: (t(n, 64, 8, 8),), F.global_avg_pool2d, 0, dev, 1)
    total += bench("max_pool2d 3x3/2 16x32x32", lambda: (t(n, 16, 32, 32),), lambda x: F.max_pool2d(x, 3, 2, 1),
                   0, dev, 0)
    total += bench("avg_pool2d 2x2 16x32x32", lambda: (t(n, 16, 32, 32),), lambda x: F.avg_pool2d(x, 2), 0, dev, 0)
    total += bench("linear 64->10", lambda: (t(n, 64), t(10, 64), t(10)), F.linear, 2 * n * 64 * 10, dev, 1)
    labels = tinyres.tensor(rng.integers(0, 10, n), device=dev)
    total += bench("cross_entropy", lambda: (t(n, 10),), lambda x: F.cross_entropy(x, labels), 0, dev, 1)
    print(f"| **sum over one ResNet-20 step** | | | | | {total * 1e3:.0f} |")
    if dev == "cpu":
        gemm_floor(n)


def _layer_gemms(n, c_in, c, hw, stride):
    """Seconds of the forward and of the backward GEMMs of one conv2d layer, chunk by chunk."""
    from tinyres.kernels import ConvGeometry

    rng = np.random.default_rng(0)
    g = ConvGeometry(np.empty((n, hw, hw, c_in), np.float32), 3, 3, (stride, stride), (1, 1))
    oh, k, step = g.oh, g.k, g.chunk  # the chunks conv2d uses
    cols, wmat = rng.standard_normal((step * oh * oh, k), dtype=np.float32), rng.standard_normal((k, c), dtype=np.float32)
    y = np.empty((step * oh * oh, c), np.float32)
    tf = timeit(lambda: np.matmul(cols, wmat, out=y), "cpu") * -(-n // step)
    if c_in == 3:  # the first layer: dW only, its input is the image
        return tf, timeit(lambda: cols.T @ y, "cpu") * -(-n // step)
    if stride > 1:  # dW from x's columns, dx through col2im
        return tf, timeit(lambda: (cols.T @ y, y @ wmat.T), "cpu") * -(-n // step)
    # stride 1: dx from the columns of dy and the flipped kernel, dW from the same columns
    gcols = rng.standard_normal((step * hw * hw, 9 * c), dtype=np.float32)
    wflip = rng.standard_normal((9 * c, c_in), dtype=np.float32)
    xrows = rng.standard_normal((step * hw * hw, c_in), dtype=np.float32)
    return tf, timeit(lambda: (gcols @ wflip, xrows.T @ gcols), "cpu") * -(-n // step)


def gemm_floor(n):
    """The GEMMs alone of every conv in a ResNet-20 step, in the chunks conv2d uses: the time
    an im2col convolution cannot go below on this BLAS, whatever the rest costs."""
    print()
    print("| conv GEMMs alone, one thread (ResNet-20 shape) | forward ms | backward ms | GFLOP/s fwd / bwd | per step "
          "| ms per step |")
    print("|---|---|---|---|---|---|")
    total = 0.0
    for c_in, c, hw, stride, count in LAYERS:
        tf, tb = _layer_gemms(n, c_in, c, hw, stride)
        flops = 2 * n * (hw // stride) ** 2 * c * c_in * 9
        bwd_flops = flops * (2 if c_in != 3 else 1)
        print(f"| conv2d {c_in}->{c} 3x3/{stride} on {hw}x{hw} | {tf * 1e3:.2f} | {tb * 1e3:.2f} | "
              f"{flops / tf / 1e9:.3g} / {bwd_flops / tb / 1e9:.3g} | {count} | {(tf + tb) * count * 1e3:.0f} |")
        total += (tf + tb) * count
    print(f"| **GEMMs of one ResNet-20 step** | | | | | {total * 1e3:.0f} |")


if __name__ == "__main__":
    main()
