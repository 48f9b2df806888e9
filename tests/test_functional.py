"""Tests of tinyres.nn.functional: gradients (float64 gradcheck), forward values against plain
reference loops, batch-norm running statistics, numerical stability, dtypes, and error messages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reference import conv2d_reference, pool2d_reference
from strategies import (
    ConvCase,
    arrays,
    batch_norm_shapes,
    conv_geometries,
    distinct_arrays,
    leaf,
    nonzero_arrays,
    pool_geometries,
    positive_arrays,
    random_arrays,
    shapes,
    with_fixtures,
)

import tinyres
import tinyres.nn.functional as F
from tinyres import gradcheck, nn

# ---- reference implementations (float64) ---------------------------------------------------


def batch_stats_ref(x):
    """Per-channel mean and biased variance of (N, C) or (N, C, H, W), channel by channel."""
    c = x.shape[1]
    mean, var = np.zeros(c), np.zeros(c)
    for ch in range(c):
        v = x[:, ch].ravel()
        mean[ch] = sum(v) / len(v)
        var[ch] = sum((v - mean[ch]) ** 2) / len(v)
    return mean, var


def batch_norm_ref(x, mean, var, gamma, beta, eps=1e-5):
    y = np.empty_like(x)
    for ch in range(x.shape[1]):
        y[:, ch] = (x[:, ch] - mean[ch]) / np.sqrt(var[ch] + eps) * gamma[ch] + beta[ch]
    return y


def log_softmax_ref(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


# ---- relu ------------------------------------------------------------------------------------

@with_fixtures
@given(x=shapes(max_dims=4).flatmap(nonzero_arrays))  # |x| > 1e-3: away from the kink
def test_relu_gradient(device, x):
    assert np.array_equal(F.relu(leaf(x, device)).numpy(), np.maximum(x, 0))
    assert gradcheck(F.relu, [leaf(x, device)])
    assert gradcheck(lambda t: t.relu(), [leaf(x, device)])


# ---- conv2d ----------------------------------------------------------------------------------

@with_fixtures
@given(data=st.data(), g=conv_geometries(), bias=st.booleans())
def test_conv2d_forward_matches_reference_loops(device, data, g, bias):
    x = data.draw(random_arrays(g.input_shape), label="x")
    w = data.draw(random_arrays(g.weight_shape), label="w")
    b = data.draw(random_arrays((g.oc,)), label="b") if bias else None
    y = F.conv2d(leaf(x, device), leaf(w, device), None if b is None else leaf(b, device), g.stride, g.padding)
    expected = conv2d_reference(x, w, b, g.stride, g.padding)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-10, atol=1e-12)


@with_fixtures
@given(data=st.data(), g=conv_geometries(), bias=st.booleans())
def test_conv2d_gradient(device, data, g, bias):
    x = data.draw(random_arrays(g.input_shape), label="x")
    w = data.draw(random_arrays(g.weight_shape), label="w")
    inputs = [leaf(x, device), leaf(w, device)]
    if bias:
        inputs.append(leaf(data.draw(random_arrays((g.oc,)), label="b"), device))
    assert gradcheck(lambda *t: F.conv2d(*t, stride=g.stride, padding=g.padding), inputs)


RESNET_CONVS = {  # the convolutions of a CIFAR ResNet, shrunk; plus padding wider than the kernel
    "3x3-s1-p1": ConvCase(2, 3, 4, 6, 6, 3, 3, 1, 1, 1, 1),
    "3x3-s2-p1": ConvCase(2, 3, 4, 7, 6, 3, 3, 2, 2, 1, 1),
    "1x1-s2-p0": ConvCase(3, 4, 2, 5, 6, 1, 1, 2, 2, 0, 0),
    "1x1-s1-p2": ConvCase(1, 2, 3, 3, 4, 1, 1, 1, 1, 2, 2),
    "3x2-s1-p(0,2)": ConvCase(1, 2, 2, 4, 3, 3, 2, 1, 1, 0, 2),
}


@pytest.mark.parametrize("g", list(RESNET_CONVS.values()), ids=list(RESNET_CONVS))
def test_conv2d_resnet_geometries(device, g):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal(g.input_shape), rng.standard_normal(g.weight_shape), rng.standard_normal(g.oc)
    y = F.conv2d(leaf(x, device), leaf(w, device), leaf(b, device), g.stride, g.padding)
    np.testing.assert_allclose(y.numpy(), conv2d_reference(x, w, b, g.stride, g.padding), rtol=1e-10, atol=1e-12)
    assert gradcheck(lambda *t: F.conv2d(*t, stride=g.stride, padding=g.padding),
                     [leaf(x, device), leaf(w, device), leaf(b, device)])


def test_conv2d_int_stride_padding_and_partial_grads(device):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 3, 2)), rng.standard_normal(2)
    y = F.conv2d(leaf(x, device), leaf(w, device), leaf(b, device), stride=2, padding=1)
    np.testing.assert_allclose(y.numpy(), conv2d_reference(x, w, b, (2, 2), (1, 1)), rtol=1e-10, atol=1e-12)
    # only some inputs need a gradient: the others are constants
    frozen_w = leaf(w, device, requires_grad=False)
    assert gradcheck(lambda t: F.conv2d(t, frozen_w, stride=1, padding=2), [leaf(x, device)])
    frozen_x = leaf(x, device, requires_grad=False)
    assert gradcheck(lambda t, u: F.conv2d(frozen_x, t, u, stride=(1, 2)), [leaf(w, device), leaf(b, device)])


# ---- batch norm ------------------------------------------------------------------------------

def _bn_inputs(data, shape):
    """x with per-channel spread (values at least 0.05 apart), gamma and beta."""
    c = shape[1]
    x = data.draw(distinct_arrays(shape, min_gap=0.05, max_gap=0.3), label="x")
    gamma = data.draw(nonzero_arrays((c,), margin=0.2), label="gamma")
    beta = data.draw(arrays((c,)), label="beta")
    return x, gamma, beta


@with_fixtures
@given(data=st.data(), shape=batch_norm_shapes())
def test_batch_norm_training_forward_matches_reference(device, data, shape):
    x, gamma, beta = _bn_inputs(data, shape)
    y = F.batch_norm(leaf(x, device), None, None, leaf(gamma, device), leaf(beta, device), training=True)
    mean, var = batch_stats_ref(x)
    np.testing.assert_allclose(y.numpy(), batch_norm_ref(x, mean, var, gamma, beta), rtol=1e-9, atol=1e-10)


@with_fixtures
@given(data=st.data(), shape=batch_norm_shapes())
def test_batch_norm_eval_forward_matches_reference(device, data, shape, xp):
    c = shape[1]
    x = data.draw(arrays(shape), label="x")
    rm, rv = data.draw(arrays((c,)), label="running_mean"), data.draw(positive_arrays((c,)), label="running_var")
    gamma, beta = data.draw(arrays((c,)), label="gamma"), data.draw(arrays((c,)), label="beta")
    rm_, rv_ = xp.asarray(rm), xp.asarray(rv)
    y = F.batch_norm(leaf(x, device), rm_, rv_, leaf(gamma, device), leaf(beta, device), training=False, eps=1e-3)
    np.testing.assert_allclose(y.numpy(), batch_norm_ref(x, rm, rv, gamma, beta, eps=1e-3), rtol=1e-9, atol=1e-10)
    assert np.array_equal(tinyres.Tensor(rm_).numpy(), rm) and np.array_equal(tinyres.Tensor(rv_).numpy(), rv)


@with_fixtures
@given(data=st.data(), shape=batch_norm_shapes())
def test_batch_norm_training_gradient(device, data, shape):
    # gradcheck contracts with a random upstream gradient: sum(batch_norm(x)) would not depend on x
    x, gamma, beta = _bn_inputs(data, shape)
    assert gradcheck(lambda t, g, b: F.batch_norm(t, None, None, g, b, training=True),
                     [leaf(x, device), leaf(gamma, device), leaf(beta, device)])
    assert gradcheck(lambda t: F.batch_norm(t, None, None, training=True, eps=1e-3), [leaf(x, device)])


@with_fixtures
@given(data=st.data(), shape=batch_norm_shapes())
def test_batch_norm_eval_gradient(device, data, shape, xp):
    c = shape[1]
    x, gamma, beta = _bn_inputs(data, shape)
    rm, rv = xp.asarray(data.draw(arrays((c,)))), xp.asarray(data.draw(positive_arrays((c,))))
    assert gradcheck(lambda t, g, b: F.batch_norm(t, rm, rv, g, b, training=False),
                     [leaf(x, device), leaf(gamma, device), leaf(beta, device)])


@with_fixtures
@given(data=st.data(), shape=batch_norm_shapes(max_size=60), momentum=st.sampled_from([0.1, 0.5, 1.0]))
def test_batch_norm_running_stats_stay_outside_the_gradient(device, data, shape, momentum, xp):
    """gradcheck passes with running buffers, each forward call updates them exactly once, backward never."""
    c = shape[1]
    x, gamma, beta = _bn_inputs(data, shape)
    rm0, rv0 = data.draw(arrays((c,))), data.draw(positive_arrays((c,)))
    rm, rv = xp.array(rm0), xp.array(rv0)  # copies: updated in place
    seen = []

    def bn(t, g, b):
        seen.append(t.numpy().copy())
        return F.batch_norm(t, rm, rv, g, b, training=True, momentum=momentum)

    assert gradcheck(bn, [leaf(x, device), leaf(gamma, device), leaf(beta, device)])
    expected_m, expected_v = rm0.copy(), rv0.copy()
    for xs in seen:  # the forward calls, with the (perturbed) inputs that gradcheck gave them
        mean, var = batch_stats_ref(xs)
        m = xs.size // c
        expected_m = (1 - momentum) * expected_m + momentum * mean
        expected_v = (1 - momentum) * expected_v + momentum * var * m / (m - 1)
    np.testing.assert_allclose(tinyres.Tensor(rm).numpy(), expected_m, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(tinyres.Tensor(rv).numpy(), expected_v, rtol=1e-9, atol=1e-12)

    y = bn(leaf(x, device), leaf(gamma, device), leaf(beta, device))
    before = tinyres.Tensor(rm).numpy().copy(), tinyres.Tensor(rv).numpy().copy()
    y.backward(np.random.default_rng(0).standard_normal(y.shape))
    assert np.array_equal(tinyres.Tensor(rm).numpy(), before[0])
    assert np.array_equal(tinyres.Tensor(rv).numpy(), before[1])


@pytest.mark.parametrize("shape", [(8, 16, 8, 8), (6, 16, 5, 5), (7, 3, 5, 5), (64, 32)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_float32_matches_float64_closed_form(device, shape, channels_last):
    # network-sized float32 inputs, in both memory layouts: batch norm lays several rows of
    # (N*H*W, C) side by side for its per-channel passes when their number allows
    rng = np.random.default_rng(0)
    c = shape[1]
    x64, g64 = 1.5 + 2 * rng.standard_normal(shape), rng.standard_normal(shape)
    gamma64, beta64 = rng.uniform(0.5, 2, c), rng.standard_normal(c)

    def as32(a):
        a = a.astype(np.float32)
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) if channels_last and a.ndim == 4 else a

    t, gamma, beta = leaf(as32(x64), device), leaf(gamma64.astype(np.float32), device), leaf(beta64.astype(np.float32), device)
    y = F.batch_norm(t, None, None, gamma, beta, training=True)
    y.backward(tinyres.tensor(as32(g64), device=device))
    assert y.dtype == t.grad.dtype == gamma.grad.dtype == np.float32
    axes = (0,) if len(shape) == 2 else (0, 2, 3)
    bshape = (1, c) + (1,) * (len(shape) - 2)
    mean, var = batch_stats_ref(x64)
    xhat = (x64 - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-5)
    np.testing.assert_allclose(y.numpy(), batch_norm_ref(x64, mean, var, gamma64, beta64), rtol=1e-4, atol=1e-4)
    gbeta, ggamma = g64.sum(axes), (g64 * xhat).sum(axes)
    m = x64.size // c
    gx = (gamma64 / np.sqrt(var + 1e-5)).reshape(bshape) * (
        g64 - gbeta.reshape(bshape) / m - xhat * ggamma.reshape(bshape) / m)
    np.testing.assert_allclose(beta.grad.numpy(), gbeta, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gamma.grad.numpy(), ggamma, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(t.grad.numpy(), gx, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 3)])
@pytest.mark.parametrize("buffers", ["arrays", "tensors"])
def test_batch_norm_running_stats_update_like_pytorch(device, xp, shape, buffers):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
    rm0, rv0 = rng.standard_normal(3).astype(np.float32), rng.uniform(0.5, 2, 3).astype(np.float32)
    wrap = (lambda a: leaf(a, device, requires_grad=False)) if buffers == "tensors" else xp.asarray
    rm, rv = wrap(rm0.copy()), wrap(rv0.copy())
    t = leaf(x, device)
    F.batch_norm(t, rm, rv, training=True, momentum=0.1)
    mean, var = batch_stats_ref(x.astype(np.float64))
    m = x.size // 3
    get = (lambda a: a.numpy()) if buffers == "tensors" else (lambda a: tinyres.Tensor(a).numpy())
    np.testing.assert_allclose(get(rm), 0.9 * rm0 + 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(get(rv), 0.9 * rv0 + 0.1 * var * m / (m - 1), rtol=1e-5)  # unbiased
    assert get(rm).dtype == np.float32 and get(rv).dtype == np.float32
    if buffers == "tensors":
        assert rm.grad_fn is None and rv.grad_fn is None and not rm.requires_grad
    # eval uses the running statistics and leaves them alone
    before = get(rm).copy(), get(rv).copy()
    y = F.batch_norm(t, rm, rv, training=False)
    np.testing.assert_allclose(y.numpy(), batch_norm_ref(x, before[0], before[1], np.ones(3), np.zeros(3)),
                               rtol=1e-4, atol=1e-5)
    assert np.array_equal(get(rm), before[0]) and np.array_equal(get(rv), before[1])


# ---- pooling ---------------------------------------------------------------------------------

@with_fixtures
@given(data=st.data(), g=pool_geometries())
def test_max_pool2d_forward_and_gradient(device, data, g):
    x = data.draw(distinct_arrays(g.input_shape), label="x")  # window values differ by > 1e-3: no ties
    y = F.max_pool2d(leaf(x, device), g.kernel, g.stride, g.padding)
    np.testing.assert_array_equal(y.numpy(), pool2d_reference(x, g.kernel, g.stride, g.padding, np.max))
    assert gradcheck(lambda t: F.max_pool2d(t, g.kernel, g.stride, g.padding), [leaf(x, device)])


@with_fixtures
@given(data=st.data(), g=pool_geometries())
def test_avg_pool2d_forward_and_gradient(device, data, g):
    x = data.draw(arrays(g.input_shape), label="x")
    y = F.avg_pool2d(leaf(x, device), g.kernel, g.stride, g.padding)
    np.testing.assert_allclose(y.numpy(), pool2d_reference(x, g.kernel, g.stride, g.padding, np.mean),
                               rtol=1e-12, atol=1e-14)
    assert gradcheck(lambda t: F.avg_pool2d(t, g.kernel, g.stride, g.padding), [leaf(x, device)])


def test_pool2d_int_arguments(device):
    x = np.random.default_rng(2).permutation(36).reshape(1, 1, 6, 6) / 10.0
    y = F.max_pool2d(leaf(x, device), 2)
    np.testing.assert_array_equal(y.numpy(), pool2d_reference(x, (2, 2), None, (0, 0), np.max))
    y = F.avg_pool2d(leaf(x, device), 3, stride=2, padding=1)
    np.testing.assert_allclose(y.numpy(), pool2d_reference(x, (3, 3), (2, 2), (1, 1), np.mean), rtol=1e-12)


@with_fixtures
@given(x=shapes(min_dims=4, max_dims=4, max_side=4).flatmap(arrays))
def test_global_avg_pool_gradient(device, x):
    assert np.allclose(F.global_avg_pool2d(leaf(x, device)).numpy(), x.mean(axis=(2, 3)))
    assert F.adaptive_avg_pool2d(leaf(x, device), 1).shape == x.shape[:2] + (1, 1)
    assert gradcheck(F.global_avg_pool2d, [leaf(x, device)])
    assert gradcheck(lambda t: F.adaptive_avg_pool2d(t, (1, 1)), [leaf(x, device)])


# ---- linear, softmax, losses -----------------------------------------------------------------

@with_fixtures
@given(data=st.data(), n=st.integers(1, 4), fin=st.integers(1, 5), fout=st.integers(1, 4), bias=st.booleans())
def test_linear_gradient(device, data, n, fin, fout, bias):
    x, w = data.draw(arrays((n, fin)), label="x"), data.draw(arrays((fout, fin)), label="w")
    inputs = [leaf(x, device), leaf(w, device)]
    expected = x @ w.T
    if bias:
        b = data.draw(arrays((fout,)), label="b")
        inputs.append(leaf(b, device))
        expected = expected + b
    np.testing.assert_allclose(F.linear(*inputs).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert gradcheck(F.linear, inputs)


@with_fixtures
@given(data=st.data(), shape=shapes(min_dims=1, max_dims=3, max_side=5))
def test_log_softmax_and_softmax_gradient(device, data, shape):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim")
    x = data.draw(arrays(shape, -5, 5), label="x")
    np.testing.assert_allclose(F.log_softmax(leaf(x, device), dim).numpy(), log_softmax_ref(x, dim), atol=1e-12)
    np.testing.assert_allclose(F.softmax(leaf(x, device), dim).numpy().sum(axis=dim), 1.0)
    assert gradcheck(lambda t: F.log_softmax(t, dim), [leaf(x, device)])
    assert gradcheck(lambda t: F.softmax(t, dim=dim), [leaf(x, device)])


@with_fixtures
@given(data=st.data(), n=st.integers(1, 5), k=st.integers(1, 6))
def test_cross_entropy_value_and_gradient(device, data, n, k, xp):
    x = data.draw(arrays((n, k), -5, 5), label="logits")
    target = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n), label="target"))
    expected = -np.mean(log_softmax_ref(x, 1)[np.arange(n), target])
    assert F.cross_entropy(leaf(x, device), xp.asarray(target)).item() == pytest.approx(expected, rel=1e-12)
    assert F.cross_entropy(leaf(x, device), target.tolist()).item() == pytest.approx(expected, rel=1e-12)
    assert gradcheck(lambda t: F.cross_entropy(t, xp.asarray(target)), [leaf(x, device)])
    assert gradcheck(lambda t: F.cross_entropy(t, leaf(target, device, requires_grad=False)), [leaf(x, device)])


@with_fixtures
@given(data=st.data(), n=st.integers(1, 5), k=st.integers(2, 6), eps=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_label_smoothing_and_reduction(device, data, n, k, eps, reduction, xp):
    x = data.draw(arrays((n, k), -5, 5), label="logits")
    target = np.array(data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n), label="target"))
    q = (1 - eps) * np.eye(k)[target] + eps / k  # PyTorch's smoothed target distribution
    per_sample = -(q * log_softmax_ref(x, 1)).sum(axis=1)
    expected = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    loss = F.cross_entropy(leaf(x, device), xp.asarray(target), reduction=reduction, label_smoothing=eps)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda t: F.cross_entropy(t, xp.asarray(target), reduction, eps), [leaf(x, device)])
    module = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=eps)
    np.testing.assert_allclose(module(leaf(x, device), xp.asarray(target)).numpy(), expected, rtol=1e-12)


def test_cross_entropy_settings_are_checked(device):
    x, t = tinyres.zeros(2, 3, device=device), np.array([0, 1])
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        F.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\], got 1.5"):
        F.cross_entropy(x, t, label_smoothing=1.5)


def test_integer_input_to_a_layer_is_a_sentence(device):
    images = tinyres.tensor(np.zeros((2, 3, 8, 8), np.uint8), device=device)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2)).to(device)
    with pytest.raises(TypeError, match=r"conv2d: input must be float32 or float64, got uint8 with shape "
                                        r"\(2, 3, 8, 8\); convert it with \.float\(\) \(images: x\.float\(\) / 255"):
        model(images)
    with pytest.raises(TypeError, match=r"linear: input must be float32 or float64, got int64 with shape \(2, 4\)"):
        F.linear(tinyres.tensor(np.ones((2, 4), np.int64), device=device), tinyres.ones(3, 4, device=device))
    assert model(images.float() / 255).shape == (2, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_and_log_softmax_are_stable_for_huge_logits(device, xp, dtype):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    target = np.array([0, 1, 1])
    t = leaf(x, device)
    loss = F.cross_entropy(t, xp.asarray(target))
    # row 0: log(1 + e^-1e4 + e^-2e4) ~ 0; row 1: 2e4; row 2: log 2 (two tied maxima)
    assert np.isfinite(loss.item())
    assert loss.item() == pytest.approx((0 + 2e4 + np.log(2)) / 3, rel=1e-6)
    loss.backward()
    g = t.grad.numpy()
    assert np.all(np.isfinite(g)) and g.dtype == dtype
    expected = np.array([[0, 0, 0], [0, -1, 1], [0.5, -0.5, 0]]) / 3  # (softmax - onehot) / N
    np.testing.assert_allclose(g, expected, atol=1e-6)

    t = leaf(x, device)
    lp = F.log_softmax(t, dim=1)
    assert np.all(np.isfinite(lp.numpy()))
    np.testing.assert_allclose(lp.numpy(), log_softmax_ref(x.astype(np.float64), 1), rtol=1e-6, atol=1e-6)
    lp.backward(np.ones(x.shape, dtype=dtype))
    assert np.all(np.isfinite(t.grad.numpy()))
    sm = F.softmax(leaf(x, device), dim=1).numpy()
    assert np.all(np.isfinite(sm)) and np.allclose(sm.sum(1), 1)


def test_log_softmax_gradient_at_large_offsets(device, xp):
    x = np.array([[1e4, 1e4 + 1.0, 1e4 - 2.0], [-1e4, -1e4 + 0.5, -1e4 - 0.5]])
    assert gradcheck(lambda t: F.log_softmax(t, 1), [leaf(x, device)])
    assert gradcheck(lambda t: F.cross_entropy(t, xp.asarray(np.array([2, 0]))), [leaf(x, device)])


# ---- memory layouts: NCHW, NCHW views of channels-last memory, strided views -----------------

def _with_layout(a, layout: str, xp) -> tinyres.Tensor:
    d = xp.asarray(a)
    if layout == "channels_last":  # NCHW view of NHWC memory, as conv and pooling return
        d = xp.ascontiguousarray(d.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif layout == "strided":
        d = xp.repeat(d, 2, axis=3)[..., ::2]
    return tinyres.Tensor(d, requires_grad=True)  # no copy: the layout reaches the op


def _small_net(x, w1, w2, fc, labels):
    h = F.conv2d(x, w1, None, stride=1, padding=1)
    h = F.relu(F.batch_norm(h, None, None, training=True) + 0.25)  # pre-ReLU values stay > 0.01 from 0
    h = F.max_pool2d(h, 2, stride=1)
    h = F.conv2d(h, w2, None, stride=2, padding=1)
    h = F.avg_pool2d(h, 3, stride=1, padding=1)
    return F.cross_entropy(F.linear(F.global_avg_pool2d(h), fc), labels)


LAYOUT_OPS = {  # op(x, xp); x is (2, 3, 5, 4)
    "relu": lambda x, xp: F.relu(x + 0.5),
    "conv2d-s1": lambda x, xp: F.conv2d(x, x[:2, :, :3, :2] * 0.5, None, stride=1, padding=1),
    "conv2d-s2": lambda x, xp: F.conv2d(x, x[:, :, :3, :3].permute(0, 1, 3, 2), x[0, :2, 0, 0], stride=2,
                                        padding=(1, 0)),
    "batch_norm-train": lambda x, xp: F.batch_norm(x, None, None, x[0, :, 0, 0], x[1, :, 1, 1], training=True),
    "batch_norm-eval": lambda x, xp: F.batch_norm(x, xp.full(3, 0.5), xp.full(3, 2.0), x[0, :, 0, 0], None),
    "max_pool2d": lambda x, xp: F.max_pool2d(x, 3, stride=2, padding=1),
    "avg_pool2d": lambda x, xp: F.avg_pool2d(x, (2, 3), stride=1, padding=(1, 0)),
    "global_avg_pool2d": lambda x, xp: F.global_avg_pool2d(x),
    "log_softmax": lambda x, xp: F.log_softmax(x, dim=1),
    "pad": lambda x, xp: F.pad(x, (1, 2, 0, 1)),
    "slice": lambda x, xp: x[:, 1:, ::2, ::-1],
}


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("op", sorted(LAYOUT_OPS))
def test_ops_on_other_memory_layouts(device, xp, op, layout):
    """Inputs in other memory layouts give the same values, and right gradients."""
    # distinct values (no ties in a max), none within 0.025 of ReLU's kink at -0.5
    a = np.random.default_rng(5).permutation(2 * 3 * 5 * 4).reshape(2, 3, 5, 4) / 20.0 - 2.925
    x = _with_layout(a, layout, xp)
    assert not x.data.flags.c_contiguous
    y = LAYOUT_OPS[op](x, xp)
    np.testing.assert_allclose(y.numpy(), LAYOUT_OPS[op](leaf(a, device), xp).numpy(), rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda t: LAYOUT_OPS[op](t, xp), [x])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_small_net_gradient_in_every_layout(device, xp, layout):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((2, 3, 5, 5))
    x = leaf(a, device) if layout == "contiguous" else _with_layout(a, layout, xp)
    w1, w2, fc = (leaf(0.5 * rng.standard_normal(s), device) for s in [(4, 3, 3, 3), (3, 4, 3, 3), (2, 3)])
    labels = xp.asarray(np.array([1, 0]))
    assert gradcheck(lambda *t: _small_net(*t, labels), [x, w1, w2, fc])


# ---- dtype: float32 stays float32, float64 stays float64 --------------------------------------

def _functional_ops(xp):
    labels = xp.asarray(np.array([0, 2]))  # int64 class indices
    return {
        "relu": (lambda x, w, b: F.relu(x - 0.1) * 2.0),
        "conv2d": (lambda x, w, b: F.conv2d(x, w, b, stride=1, padding=1)),
        "conv2d-strided": (lambda x, w, b: F.conv2d(x, w, None, stride=2, padding=(0, 1)) / 3),
        "batch_norm-train": (lambda x, w, b: F.batch_norm(x, xp.zeros(3, np.float32), xp.ones(3, np.float32),
                                                          b, b * 0.5, training=True)),
        "batch_norm-train-2d": (lambda x, w, b: F.batch_norm(x[:, :, 0, 0], None, None, b, b, training=True)),
        "batch_norm-eval": (lambda x, w, b: F.batch_norm(x, xp.zeros(3), xp.ones(3), b, b, training=False)),
        "max_pool2d": (lambda x, w, b: F.max_pool2d(x, 2)),
        "max_pool2d-padded": (lambda x, w, b: F.max_pool2d(x, 3, stride=2, padding=1)),
        "avg_pool2d": (lambda x, w, b: F.avg_pool2d(x, 3, stride=2, padding=1)),
        "global_avg_pool2d": (lambda x, w, b: F.global_avg_pool2d(x) * b),
        "adaptive_avg_pool2d": (lambda x, w, b: F.adaptive_avg_pool2d(x)),
        "linear": (lambda x, w, b: F.linear(x.reshape(2, -1)[:, :27], w.reshape(2, -1), b[:2])),
        "log_softmax": (lambda x, w, b: F.log_softmax(x, dim=1)),
        "softmax": (lambda x, w, b: F.softmax(x, dim=1)),
        "cross_entropy": (lambda x, w, b: F.cross_entropy(F.global_avg_pool2d(x) * b, labels)),
        "cross_entropy-list-labels": (lambda x, w, b: F.cross_entropy(x.mean((2, 3)) + b, [1, 2])),
        "cross_entropy-int32-labels": (lambda x, w, b: F.cross_entropy(x.mean((2, 3)) + b,
                                                                       labels.astype(np.int32))),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", sorted(_functional_ops(np)))
def test_dtype_is_kept_forward_and_backward(device, xp, op, dtype):
    rng = np.random.default_rng(0)
    x = leaf(rng.standard_normal((2, 3, 4, 4)).astype(dtype), device)
    w = leaf(rng.standard_normal((2, 3, 3, 3)).astype(dtype), device)
    b = leaf(rng.standard_normal(3).astype(dtype), device)
    fn = _functional_ops(xp)[op]
    y = fn(x, w, b[:2] if op.startswith("conv2d") else b)
    assert y.dtype == dtype
    y.backward(np.ones(y.shape, dtype=dtype))
    uses_w = op in ("conv2d", "conv2d-strided", "linear")
    uses_b = op.startswith(("batch_norm", "cross_entropy")) or op in ("conv2d", "global_avg_pool2d", "linear")
    for t, used in ((x, True), (w, uses_w), (b, uses_b)):
        assert (t.grad is not None) == used
        assert not used or t.grad.dtype == dtype


def test_train_step_of_a_small_net_keeps_float32(device, xp):
    """conv-BN-ReLU-pool-linear with leaf parameters: every gradient is float32 and SGD lowers the loss."""
    rng = np.random.default_rng(0)

    def param(*shape, scale=0.3):
        return leaf((scale * rng.standard_normal(shape)).astype(np.float32), device)

    params = {"conv_w": param(4, 3, 3, 3), "conv_b": param(4), "bn_w": leaf(np.ones(4, np.float32), device),
              "bn_b": leaf(np.zeros(4, np.float32), device), "fc_w": param(5, 4), "fc_b": param(5)}
    running_mean, running_var = xp.zeros(4, np.float32), xp.ones(4, np.float32)
    x = leaf(rng.standard_normal((6, 3, 8, 8)).astype(np.float32), device, requires_grad=False)
    labels = xp.asarray(rng.integers(0, 5, 6))

    def loss_fn(p):
        h = F.conv2d(x, p["conv_w"], p["conv_b"], stride=1, padding=1)
        h = F.batch_norm(h, running_mean, running_var, p["bn_w"], p["bn_b"], training=True)
        h = F.max_pool2d(F.relu(h), 2)
        h = F.global_avg_pool2d(h)
        return F.cross_entropy(F.linear(h, p["fc_w"], p["fc_b"]), labels)

    losses = []
    for _ in range(5):
        loss = loss_fn(params)
        assert loss.dtype == np.float32
        losses.append(loss.item())
        loss.backward()
        for name, p in params.items():
            assert p.grad is not None and p.grad.dtype == np.float32 and p.grad.shape == p.shape, name
            p.data -= 0.5 * p.grad.data
            p.grad = None
            assert p.dtype == np.float32
    assert running_mean.dtype == np.float32 and running_var.dtype == np.float32
    assert losses[-1] < losses[0]


# ---- clear errors ----------------------------------------------------------------------------

def test_conv2d_errors_name_the_op_and_shapes(device):
    x = leaf(np.ones((1, 3, 4, 4)), device)
    with pytest.raises(ValueError, match=r"conv2d: weight \(2, 2, 3, 3\) expects 2 input channels, "
                                         r"input \(1, 3, 4, 4\) has 3"):
        F.conv2d(x, leaf(np.ones((2, 2, 3, 3)), device))
    with pytest.raises(ValueError, match=r"conv2d: kernel 5x5 is larger than the padded input 4x4 .*\(1, 3, 4, 4\)"):
        F.conv2d(x, leaf(np.ones((2, 3, 5, 5)), device))
    with pytest.raises(ValueError, match=r"conv2d: kernel 7x1 is larger than the padded input 6x6"):
        F.conv2d(x, leaf(np.ones((2, 3, 7, 1)), device), padding=1)
    with pytest.raises(ValueError, match=r"conv2d: expected input \(N, C, H, W\).*\(3, 4, 4\)"):
        F.conv2d(leaf(np.ones((3, 4, 4)), device), leaf(np.ones((2, 3, 3, 3)), device))
    with pytest.raises(ValueError, match=r"conv2d: bias shape \(3,\) should be \(2,\)"):
        F.conv2d(x, leaf(np.ones((2, 3, 3, 3)), device), leaf(np.ones(3), device))
    with pytest.raises(ValueError, match=r"conv2d: stride must be >= 1, got 0"):
        F.conv2d(x, leaf(np.ones((2, 3, 3, 3)), device), stride=0)
    with pytest.raises(ValueError, match=r"conv2d: padding must be >= 0, got -1$"):
        F.conv2d(x, leaf(np.ones((2, 3, 3, 3)), device), padding=-1)
    with pytest.raises(ValueError, match=r"conv2d: padding must be an int or a pair of ints, got 1.5"):
        F.conv2d(x, leaf(np.ones((2, 3, 3, 3)), device), padding=1.5)


def test_pool_errors_name_the_op_and_shapes(device):
    x = leaf(np.ones((1, 2, 3, 3)), device)
    with pytest.raises(ValueError, match=r"max_pool2d: kernel 4x4 is larger than the padded input 3x3 .*\(1, 2, 3, 3\)"):
        F.max_pool2d(x, 4)
    with pytest.raises(ValueError, match=r"avg_pool2d: padding \(2, 2\) must be at most half the kernel \(3, 3\)"):
        F.avg_pool2d(x, 3, padding=2)
    with pytest.raises(ValueError, match=r"max_pool2d: expected input \(N, C, H, W\), got \(2, 3, 3\)"):
        F.max_pool2d(leaf(np.ones((2, 3, 3)), device), 2)
    with pytest.raises(ValueError, match=r"max_pool2d: kernel_size must be >= 1, got 0"):
        F.max_pool2d(x, kernel_size=0)
    with pytest.raises(ValueError, match=r"avg_pool2d: stride must be >= 1, got \(1, 0\)"):
        F.avg_pool2d(x, 2, stride=(1, 0))


def test_linear_and_loss_errors_name_the_op_and_shapes(device, xp):
    with pytest.raises(ValueError, match=r"linear: input \(2, 3\) and weight \(4, 5\) do not match"):
        F.linear(leaf(np.ones((2, 3)), device), leaf(np.ones((4, 5)), device))
    logits = leaf(np.ones((2, 3)), device)
    with pytest.raises(ValueError, match=r"cross_entropy: target shape \(3,\) does not match logits \(2, 3\)"):
        F.cross_entropy(logits, xp.asarray(np.array([0, 1, 2])))
    with pytest.raises(TypeError, match=r"cross_entropy: target must hold integer class indices, got float"):
        F.cross_entropy(logits, xp.asarray(np.array([0.0, 1.0])))
    if device == "cpu":  # on a GPU the check would stall the device every step
        with pytest.raises(ValueError, match=r"cross_entropy: target values must lie in \[0, 3\)"):
            F.cross_entropy(logits, xp.asarray(np.array([0, 3])))
    with pytest.raises(ValueError, match=r"cross_entropy: empty batch \(logits \(0, 3\)\)"):
        F.cross_entropy(leaf(np.ones((0, 3)), device), xp.asarray(np.array([], np.int64)))


def test_operands_on_another_device_are_a_clear_error(device, xp):
    if device == "cpu":
        pytest.skip("needs a second device")
    logits = leaf(np.ones((2, 3)), device)
    with pytest.raises(RuntimeError, match=r"cross_entropy: target is on cpu, logits on cuda"):
        F.cross_entropy(logits, np.array([0, 1]))
    x = leaf(np.ones((2, 3, 4, 4)), device)
    with pytest.raises(ValueError, match=r"batch_norm: running_mean must be \(3,\) on cuda .* on cpu"):
        F.batch_norm(x, np.zeros(3), xp.ones(3), training=True)


def test_batch_norm_errors_name_the_op_and_shapes(device):
    with pytest.raises(ValueError, match=r"batch_norm: .*\(2, 3, 4, 4\), \(4,\), \(4,\)"):
        F.batch_norm(leaf(np.ones((2, 3, 4, 4)), device), None, None, leaf(np.ones(4), device),
                     leaf(np.ones(4), device), training=True)
    with pytest.raises(ValueError, match=r"batch_norm: training needs more than one value per channel.*\(1, 3\)"):
        F.batch_norm(leaf(np.ones((1, 3)), device), None, None, training=True)
    with pytest.raises(ValueError, match=r"batch_norm: eval mode needs running_mean and running_var"):
        F.batch_norm(leaf(np.ones((2, 3)), device), None, None, training=False)
