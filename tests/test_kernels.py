"""Tests of the kernels beneath the ops: threads, chunked im2col convolution, per-channel passes.

The ops' gradients are checked in test_functional.py; here: the same results whatever the
chunking and thread count (bitwise from run to run at a fixed count), layouts kept, settings."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from reference import conv2d_reference

import tinyres
from tinyres import kernels
from tinyres.nn import functional as F


def channels_last(a):
    return a.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)


def conv_step(x, W, gamma, beta, stride):
    """conv -> batch norm -> relu, forward and backward: every array a training step makes."""
    xt = tinyres.tensor(x, requires_grad=True)
    Wt, gt, bt = (tinyres.tensor(a, requires_grad=True) for a in (W, gamma, beta))
    rm, rv = np.zeros(W.shape[0], np.float32), np.ones(W.shape[0], np.float32)
    y = F.relu(F.batch_norm(F.conv2d(xt, Wt, stride=stride, padding=1), rm, rv, gt, bt, training=True))
    gy = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    y.backward(gy)
    return [y.numpy(), xt.grad.numpy(), Wt.grad.numpy(), gt.grad.numpy(), bt.grad.numpy(), rm, rv]


def make_inputs(n=20, c=8, oc=8, hw=12):
    rng = np.random.default_rng(0)
    x = channels_last(rng.standard_normal((n, c, hw, hw)).astype(np.float32))
    W = (rng.standard_normal((oc, c, 3, 3)) * 0.2).astype(np.float32)
    return x, W, rng.standard_normal(oc).astype(np.float32), rng.standard_normal(oc).astype(np.float32)


@pytest.mark.parametrize("stride", [1, 2])
def test_results_are_bitwise_identical_from_run_to_run(threads, stride, monkeypatch):
    monkeypatch.setattr(kernels.ConvGeometry, "CHUNK_ROWS", 64)  # many chunks per thread
    threads(2)
    first = conv_step(*make_inputs(), stride)
    kernels.free_scratch()
    again = conv_step(*make_inputs(), stride)
    for a, b in zip(first, again):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("stride", [1, 2])
def test_thread_counts_and_chunk_sizes_agree_within_float32_tolerance(threads, stride, monkeypatch):
    results = []
    for n_threads, chunk_rows in ((1, 10 ** 6), (2, 64), (3, 300)):
        threads(n_threads)
        monkeypatch.setattr(kernels.ConvGeometry, "CHUNK_ROWS", chunk_rows)
        results.append(conv_step(*make_inputs(), stride))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 1), (1, 0), (2, 0)])
def test_chunked_threaded_convolution_matches_direct_loops(threads, stride, pad, monkeypatch):
    monkeypatch.setattr(kernels.ConvGeometry, "CHUNK_ROWS", 50)  # chunks of one or two images
    threads(2)
    x, W = make_inputs(n=7, hw=9)[:2]
    y = kernels.conv2d_forward(x, W, (stride, stride), (pad, pad))
    np.testing.assert_allclose(y, conv2d_reference(x, W, None, (stride, stride), (pad, pad)), rtol=1e-4, atol=1e-4)
    assert y.transpose(0, 2, 3, 1).flags.c_contiguous  # an NCHW view of channels-last memory


def test_a_chunk_is_held_to_its_rows_and_to_the_bytes_of_its_columns():
    # ResNet's layers at batch 128: 2,048 rows of 144 columns (1.2 MB) on 16 channels, but wider
    # columns take fewer rows: 1,024 rows of 288 on 32 channels, 512 of 576 on 64
    def chunk(c, hw, dtype=np.float32):
        return kernels.ConvGeometry(np.empty((128, hw, hw, c), dtype), 3, 3, (1, 1), (1, 1)).chunk
    assert (chunk(16, 32), chunk(32, 16), chunk(64, 8)) == (2, 4, 8)
    assert chunk(64, 8, np.float64) == 4  # the bytes count: float64 halves the rows
    assert chunk(256, 32) == 1  # at least one image, however wide
    assert chunk(3, 2) == 128  # never more than the batch


def test_per_channel_passes_match_numpy(threads):
    threads(2)
    rng = np.random.default_rng(0)
    for a in (channels_last(rng.standard_normal((6, 16, 20, 20))), rng.standard_normal((6, 16, 5, 5)),
              rng.standard_normal((3000, 16))):
        b = rng.standard_normal(a.shape)
        axes = (0, 2, 3) if a.ndim == 4 else (0,)
        shape = (1, -1, 1, 1) if a.ndim == 4 else (1, -1)
        s, t, u = (rng.standard_normal(16) for _ in range(3))
        np.testing.assert_allclose(kernels.channel_sum(a), a.sum(axis=axes))
        d = a - t.reshape(shape)
        for got, want in zip(kernels.channel_sums(a, t), (d.sum(axis=axes), (d * d).sum(axis=axes))):
            np.testing.assert_allclose(got, want)
        for got, want in zip(kernels.channel_sums(a, t, b), (b.sum(axis=axes), (b * d).sum(axis=axes))):
            np.testing.assert_allclose(got, want)
        y = kernels.channel_affine(a, s, t, b, u)
        np.testing.assert_allclose(y, a * s.reshape(shape) + t.reshape(shape) + b * u.reshape(shape))
        assert y.strides == a.strides  # the layout is kept


def test_batch_norm_statistics_stay_accurate_in_float32_far_from_zero():
    """The variance of values with a large mean: E[x^2] - E[x]^2 would lose every digit in float32."""
    rng = np.random.default_rng(0)
    x = channels_last((1000 + rng.standard_normal((64, 4, 8, 8))).astype(np.float32))
    rm, rv = np.zeros(4, np.float32), np.zeros(4, np.float32)
    F.batch_norm(tinyres.tensor(x), rm, rv, training=True, momentum=1.0)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(rm, x64.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(rv, x64.var(axis=(0, 2, 3), ddof=1), rtol=1e-3)


def test_elementwise_kernels_keep_the_layout_and_match_numpy(threads):
    threads(2)
    rng = np.random.default_rng(0)
    for make, dense in ((channels_last, True), (np.ascontiguousarray, True), (lambda a: a[:, :, ::2], False)):
        a, b = (make(rng.standard_normal((9, 5, 40, 40)).astype(np.float32)) for _ in range(2))
        for got, want in ((kernels.add(a, b), a + b), (kernels.relu(a), np.maximum(a, 0)),
                          (kernels.relu_grad(b, a), b * (a > 0))):
            assert np.array_equal(got, want)
            assert got.strides == a.strides or not dense
    mixed = kernels.add(channels_last(np.ones((2, 3, 4, 4))), np.ones((2, 3, 4, 4)))  # layouts differ
    assert np.array_equal(mixed, np.full((2, 3, 4, 4), 2.0))
    into = a.copy(order="K")
    assert kernels.add(into, b, out=into) is into and np.array_equal(into, a + b)


def test_a_gradient_broadcast_from_a_reduction_does_not_spread_c_order(threads):
    # global average pooling's backward is a broadcast view; the ReLU before it, and the gradient
    # summed where a tensor feeds two ops, keep the channels-last layout of the activations
    threads(2)
    rng = np.random.default_rng(0)
    y = channels_last(rng.standard_normal((8, 6, 5, 5)).astype(np.float32))
    gy = np.broadcast_to(rng.standard_normal((8, 6, 1, 1)).astype(np.float32), y.shape)
    g = kernels.relu_grad(gy, y)
    assert g.strides == y.strides and np.array_equal(g, gy * (y > 0))
    assert kernels.add(gy, y).strides == y.strides

    x = tinyres.Tensor(y, requires_grad=True)
    z = F.relu(x)
    (F.global_avg_pool2d(z).sum() + (z * z).sum()).backward()  # z's gradient: broadcast + dense
    assert x.grad.data.strides == y.strides
    np.testing.assert_allclose(x.grad.numpy(), (1 / 25 + 2 * np.maximum(y, 0)) * (y > 0), rtol=1e-6)


def test_parallel_for_covers_the_range_in_order_and_waits_for_every_part(threads):
    threads(3)
    assert kernels.parallel_for(lambda lo, hi: (lo, hi), 10) == [(0, 3), (3, 6), (6, 10)]
    assert kernels.parallel_for(lambda lo, hi: (lo, hi), 2) == [(0, 1), (1, 2)]  # fewer items than threads
    # a nested call runs serially inside its part instead of waiting on a busy pool
    nested = kernels.parallel_for(lambda lo, hi: kernels.parallel_for(lambda a, b: (a, b), hi - lo), 6)
    assert nested == [[(0, 2)], [(0, 2)], [(0, 2)]]
    done = []

    def fail_first(lo, hi):
        if lo == 0:
            raise RuntimeError("the first part failed")
        done.append(lo)
    with pytest.raises(RuntimeError, match="the first part failed"):
        kernels.parallel_for(fail_first, 9)
    assert sorted(done) == [3, 6]


def test_set_num_threads_drops_the_scratch_buffers_of_the_threads_it_ends(threads):
    threads(2)
    x, W = np.ones((4, 3, 8, 8), np.float32), np.ones((5, 3, 3, 3), np.float32)
    kernels.conv2d_forward(x, W, (1, 1), (1, 1))
    assert len({thread for thread, *_ in kernels.threads._scratch}) >= 1
    threads(3)
    assert not kernels.threads._scratch
    kernels.conv2d_forward(x, W, (1, 1), (1, 1))  # and makes them again on demand
    assert kernels.threads._scratch


def test_set_num_threads_checks_its_argument(threads):
    threads(2)
    assert tinyres.get_num_threads() == 2
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="set_num_threads: n must be a positive integer"):
            tinyres.set_num_threads(bad)
    assert tinyres.get_num_threads() == 2


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_thread_count_from_the_environment_and_blas_held_to_one_thread():
    code = ("import numpy as np, tinyres, threadpoolctl\n"
            "from tinyres.nn import functional as F\n"
            "F.relu(F.conv2d(tinyres.randn(2, 3, 8, 8), tinyres.randn(4, 3, 3, 3), padding=1))\n"
            "blas = [i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']\n"
            "print(tinyres.get_num_threads(), blas)")
    out = run_python(code, TINYRES_NUM_THREADS="3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "3" and "[1]" in out.stdout
    bad = run_python("import tinyres", TINYRES_NUM_THREADS="two")
    assert bad.returncode != 0 and "TINYRES_NUM_THREADS must be a positive integer, got 'two'" in bad.stderr


def test_a_block_keeps_the_channels_last_layout_on_every_device(device, xp):
    """conv -> batch norm -> relu -> add -> relu: every output an NCHW view of channels-last memory,
    on NumPy and on CuPy (whose ufuncs would otherwise return C-contiguous arrays)."""
    rng = np.random.default_rng(0)
    x = tinyres.tensor(rng.standard_normal((4, 8, 6, 6)).astype(np.float32), device=device, requires_grad=True)
    W = tinyres.tensor((rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32), device=device)
    y = F.conv2d(x, W, padding=1)
    z = F.relu(F.batch_norm(y, None, None, training=True))
    out = F.relu(z + y)
    for t in (y, z, out):
        assert t.data.transpose(0, 2, 3, 1).flags.c_contiguous
    out.backward(xp.ones(out.shape, dtype=np.float32))
    assert x.grad.data.transpose(0, 2, 3, 1).flags.c_contiguous


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_freed_activations_are_reused_instead_of_faulted_in_again():
    """Three training steps of a small ResNet: page faults by the thousand unless freed memory is kept."""
    code = ("import resource, numpy as np, tinyres\n"
            "from tinyres.nn import functional as F\n"
            "m = tinyres.models.cifar_resnet(8)\n"
            "opt = tinyres.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)\n"
            "x, y = tinyres.randn(64, 3, 32, 32), tinyres.tensor(np.arange(64) % 10)\n"
            "for i in range(6):\n"
            "    if i == 3: before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    loss = F.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    faults = {}
    for keep in ("1", "0"):
        out = run_python(code, TINYRES_KEEP_MEMORY=keep)
        assert out.returncode == 0, out.stderr
        faults[keep] = int(out.stdout)
    assert faults["0"] > 1000 and faults["1"] < faults["0"] / 10, faults  # measured: ~36,800 against 9


def test_kernels_called_from_several_threads_at_once_agree_with_one_thread(threads):
    """Two threads running convolutions at once: each gets its own scratch buffers."""
    from concurrent.futures import ThreadPoolExecutor
    threads(2)
    inputs = [make_inputs(n=12, hw=10)[:2] for _ in range(2)]
    inputs[1] = (inputs[1][0] * 3, inputs[1][1])
    alone = [kernels.conv2d_forward(x, W, (1, 1), (1, 1)) for x, W in inputs]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(5):
            together = list(pool.map(lambda xW: kernels.conv2d_forward(*xW, (1, 1), (1, 1)), inputs))
            for a, b in zip(alone, together):
                assert np.array_equal(a, b)
