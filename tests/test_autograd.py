"""Tests of `tinyres.gradcheck` itself: it passes right gradients, catches wrong ones and says where."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from strategies import arrays, leaf, shapes, with_fixtures

import tinyres
from tinyres import gradcheck
from tinyres.tensor import Function


class Double(Function):
    """y = 2 x, with a backward that is off by `bump` at flat index `at`."""

    def __init__(self, bump: float = 0.0, at: int = 0):
        self.bump, self.at = bump, at

    def forward(self, x):
        return 2 * x

    def backward(self, gy):
        gx = 2 * gy
        gx.reshape(-1)[self.at] += self.bump
        return gx


class CenterNoGrad(Function):
    """y = x - mean(x), with a backward that forgets the mean: right for sum(y), wrong for v . y."""

    def forward(self, x):
        return x - x.mean()

    def backward(self, gy):
        return gy.copy()


def _message_values(msg: str) -> tuple[float, float]:
    m = re.search(r"analytic (\S+) vs numerical (\S+) ", msg)
    assert m, msg
    return float(m.group(1)), float(m.group(2))


@with_fixtures
@given(x=shapes(max_dims=3).flatmap(arrays))
def test_gradcheck_passes_a_right_gradient(device, x):
    assert gradcheck(lambda t: Double()(t) * t, [leaf(x, device)])


def test_gradcheck_catches_a_wrong_gradient_and_names_input_index_and_values(device):
    w = leaf(np.arange(6.0).reshape(2, 3) / 7, device)
    x = leaf(np.ones((2, 3)), device, requires_grad=False)  # input 0 is not checked; input 1 is the bad one
    with pytest.raises(AssertionError, match=r"gradcheck: input 1 \(shape \(2, 3\)\).*index \(1, 2\)") as e:
        gradcheck(lambda a, b: a * Double(bump=1.0, at=5)(b), [x, w])
    analytic, numeric = _message_values(str(e.value))
    assert analytic - numeric == pytest.approx(1.0, abs=1e-4)


def test_gradcheck_counts_inputs_as_passed(device):
    # both inputs require grad; only the second is wrong
    a, b = leaf(np.full(3, 0.5), device), leaf(np.linspace(-1, 1, 4), device)
    with pytest.raises(AssertionError, match=r"input 1 \(shape \(4,\)\).*index \(2,\)"):
        gradcheck(lambda s, t: s.sum() * Double(bump=-0.5, at=2)(t), [a, b])


def test_gradcheck_uses_a_random_upstream_gradient(device):
    # sum(x - mean(x)) == 0 for every x, so a check against the summed output could not see this bug
    x = leaf(np.array([0.3, -1.2, 2.0, 0.7]), device)
    y = CenterNoGrad()(x)
    y.sum().backward()
    assert np.allclose(x.grad.numpy(), 1.0)  # the wrong gradient ...
    with pytest.raises(AssertionError, match="gradcheck"):  # ... is caught
        gradcheck(lambda t: CenterNoGrad()(t), [leaf(x.numpy(), device)])


def test_gradcheck_without_raise_returns_false(device):
    x = leaf(np.ones(3), device)
    assert gradcheck(lambda t: Double(bump=1.0)(t), [x], raise_exception=False) is False
    assert gradcheck(lambda t: Double()(t), [x], raise_exception=False) is True


def test_gradcheck_refuses_float32(device):
    x = leaf(np.ones(3, dtype=np.float32), device)
    with pytest.raises(TypeError, match=r"float64.*float32.*\(3,\)"):
        gradcheck(lambda t: t * t, [x])


def test_gradcheck_needs_an_input_that_requires_grad(device):
    with pytest.raises(ValueError, match="no input requires grad"):
        gradcheck(lambda t: t * t, [leaf(np.ones(3), device, requires_grad=False)])


def test_gradcheck_restores_inputs(device):
    a = np.linspace(-1, 1, 6).reshape(2, 3)
    x = leaf(a, device)
    gradcheck(lambda t: (t * t).sum(1), [x])
    assert np.array_equal(x.numpy(), a)


def test_gradcheck_non_contiguous_input(device, xp):
    # a transposed leaf: perturbing a reshaped copy of it would give numerical gradients of 0
    x = tinyres.Tensor(xp.asarray(np.arange(12.0).reshape(4, 3) / 5).T, requires_grad=True)
    assert not x.data.flags.c_contiguous
    assert gradcheck(lambda t: t * t, [x])
    assert not x.data.flags.c_contiguous  # the layout under test is kept
    with pytest.raises(AssertionError, match=r"index \(1, 0\)"):  # index in the tensor's shape, not memory
        gradcheck(lambda t: Double(bump=1.0, at=4)(t), [x])


def test_gradcheck_scalar_output(device):
    assert gradcheck(lambda t: (t * t).sum(), [leaf(np.array([1.0, -2.0, 0.5]), device)])
