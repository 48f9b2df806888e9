"""Tests of the engine core (tinyres/tensor.py): the basic ops' gradients, the backward pass, and
the Tensor API. Every test runs on NumPy and, when a GPU is present, on CuPy (`device` fixture)."""

from __future__ import annotations

import gc
import sys
import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import (
    arrays,
    broadcastable_shapes,
    distinct_arrays,
    leaf,
    matmul_shapes,
    nonzero_arrays,
    positive_arrays,
    reduction_args,
    shapes,
    with_fixtures,
)

import tinyres
from tinyres import Tensor, gradcheck, no_grad, tensor
from tinyres.tensor import Function

# ---- gradients of the basic ops (float64, random upstream gradient) --------------------------

BINARY = {
    "add": (lambda a, b: a + b, arrays),
    "sub": (lambda a, b: a - b, arrays),
    "mul": (lambda a, b: a * b, arrays),
    "div": (lambda a, b: a / b, lambda s: nonzero_arrays(s, margin=0.5)),  # b is the denominator
}


@pytest.mark.parametrize("op", sorted(BINARY))
@with_fixtures
@given(data=st.data(), shapes_=broadcastable_shapes(2))
def test_binary_op_gradients_with_broadcasting(device, op, data, shapes_):
    fn, b_arrays = BINARY[op]
    a = data.draw(arrays(shapes_[0]), label="a")
    b = data.draw(b_arrays(shapes_[1]), label="b")
    assert gradcheck(fn, [leaf(a, device), leaf(b, device)])


@pytest.mark.parametrize("op", sorted(BINARY))
@with_fixtures
@given(data=st.data(), shape=shapes(min_dims=0), scalar=st.sampled_from([2, -0.5, 3.0]))
def test_binary_op_gradients_with_python_scalars(device, op, data, shape, scalar):
    fn = BINARY[op][0]
    x = data.draw(nonzero_arrays(shape, margin=0.5), label="x")
    assert gradcheck(lambda t: fn(t, scalar), [leaf(x, device)])
    assert gradcheck(lambda t: fn(scalar, t), [leaf(x, device)])  # __radd__, __rsub__, ...


@with_fixtures
@given(x=shapes(min_dims=0).flatmap(arrays))
def test_neg_gradient(device, x):
    assert gradcheck(lambda t: -t, [leaf(x, device)])


@with_fixtures
@given(data=st.data(), shape=shapes(min_dims=0), exponent=st.sampled_from([2, 3, 0.5, -1, 1.5, -2.0, 0]))
def test_pow_gradient(device, data, shape, exponent):
    x = data.draw(positive_arrays(shape), label="x")
    assert gradcheck(lambda t: t ** exponent, [leaf(x, device)])


@with_fixtures
@given(x=shapes(min_dims=0).flatmap(arrays))
def test_exp_gradient(device, x):
    assert gradcheck(lambda t: t.exp(), [leaf(x, device)])


@with_fixtures
@given(x=shapes(min_dims=0).flatmap(positive_arrays))
def test_log_gradient(device, x):
    assert gradcheck(lambda t: tinyres.log(t), [leaf(x, device)])


@with_fixtures
@given(data=st.data(), case=matmul_shapes())
def test_matmul_gradient(device, data, case):
    a, b = data.draw(arrays(case.a), label="a"), data.draw(arrays(case.b), label="b")
    y = leaf(a, device) @ leaf(b, device)
    assert y.shape == np.matmul(a, b).shape
    assert np.allclose(y.numpy(), np.matmul(a, b))
    assert gradcheck(lambda s, t: s @ t, [leaf(a, device), leaf(b, device)])


@pytest.mark.parametrize("op", ["sum", "mean"])
@with_fixtures
@given(data=st.data(), shape=shapes(min_dims=0, max_dims=4, max_side=3), numpy_names=st.booleans())
def test_sum_mean_gradient(device, op, data, shape, numpy_names):
    dim, keepdim = data.draw(reduction_args(shape), label="dim, keepdim")
    x = data.draw(arrays(shape), label="x")
    kwargs = {"axis": dim, "keepdims": keepdim} if numpy_names else {"dim": dim, "keepdim": keepdim}
    expected = getattr(np, op)(x, axis=dim, keepdims=keepdim)
    y = getattr(leaf(x, device), op)(**kwargs)
    assert y.shape == expected.shape
    assert np.allclose(y.numpy(), expected)
    assert gradcheck(lambda t: getattr(t, op)(**kwargs), [leaf(x, device)])


@with_fixtures
@given(data=st.data(), shape=shapes(min_dims=0, max_dims=4, max_side=3))
def test_max_gradient(device, data, shape):
    dim, keepdim = data.draw(reduction_args(shape), label="dim, keepdim")
    x = data.draw(distinct_arrays(shape), label="x")  # no ties: max is differentiable there
    y = leaf(x, device).amax(dim, keepdim)
    assert np.array_equal(y.numpy(), np.max(x, axis=dim, keepdims=keepdim))
    assert gradcheck(lambda t: t.amax(dim=dim, keepdim=keepdim), [leaf(x, device)])
    assert gradcheck(lambda t: tinyres.amax(t, axis=dim, keepdims=keepdim), [leaf(x, device)])
    assert gradcheck(lambda t: tinyres.amin(t, dim, keepdim), [leaf(x, device)])
    if isinstance(dim, int):  # max over one dim gives (values, indices), as in PyTorch
        assert gradcheck(lambda t: t.max(dim, keepdim).values, [leaf(x, device)])
        assert gradcheck(lambda t: t.min(dim, keepdim)[0], [leaf(x, device)])


def test_max_ties_share_the_gradient(device):
    x = leaf(np.array([1.0, 3.0, 3.0, -2.0]), device)
    x.max().backward()
    assert np.array_equal(x.grad.numpy(), [0, 0.5, 0.5, 0])


@st.composite
def reshape_cases(draw):
    shape = draw(shapes(min_dims=1, max_dims=4, max_side=3))
    target = list(draw(st.permutations(shape)))
    if draw(st.booleans()):
        target = target + [1]
    if draw(st.booleans()):
        target[draw(st.integers(0, len(target) - 1))] = -1
    return shape, tuple(target)


@with_fixtures
@given(data=st.data(), case=reshape_cases())
def test_reshape_and_flatten_gradient(device, data, case):
    shape, target = case
    x = data.draw(arrays(shape), label="x")
    assert leaf(x, device).reshape(target).shape == x.reshape(target).shape
    assert gradcheck(lambda t: t.reshape(target), [leaf(x, device)])
    assert gradcheck(lambda t: t.view(*target), [leaf(x, device)])
    start = data.draw(st.integers(-len(shape), len(shape) - 1), label="start_dim")
    assert gradcheck(lambda t: t.flatten(start), [leaf(x, device)])


@with_fixtures
@given(data=st.data(), shape=shapes(min_dims=1, max_dims=4, max_side=3))
def test_permute_transpose_gradient(device, data, shape):
    x = data.draw(arrays(shape), label="x")
    dims = data.draw(st.permutations(range(len(shape))), label="dims")
    d0 = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim0")
    d1 = data.draw(st.integers(-len(shape), len(shape) - 1), label="dim1")
    assert np.array_equal(leaf(x, device).permute(*dims).numpy(), x.transpose(dims))
    assert np.array_equal(leaf(x, device).transpose(d0, d1).numpy(), np.swapaxes(x, d0, d1))
    assert gradcheck(lambda t: t.permute(*dims), [leaf(x, device)])
    assert gradcheck(lambda t: tinyres.transpose(t, d0, d1), [leaf(x, device)])
    assert gradcheck(lambda t: t.T, [leaf(x, device)])


# ---- indexing ----------------------------------------------------------------------------------

@with_fixtures
@given(data=st.data(), shape=shapes(min_dims=1, max_dims=4, max_side=4))
def test_basic_indexing_gradient(device, data, shape):
    """Ints, slices with (negative) steps, None and Ellipsis."""
    index = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True), label="index")
    x = data.draw(arrays(shape), label="x")
    assert np.array_equal(leaf(x, device)[index].numpy(), x[index])
    assert gradcheck(lambda t: t[index], [leaf(x, device)])


@with_fixtures
@given(data=st.data(), shape=shapes(min_dims=1, max_dims=3, max_side=4))
def test_integer_array_indexing_gradient(device, data, shape):
    """Integer arrays (repeated elements accumulate their gradients)."""
    index = data.draw(hnp.integer_array_indices(shape, result_shape=shapes(min_dims=1, max_dims=2)),
                      label="index")
    x = data.draw(arrays(shape), label="x")
    assert np.array_equal(leaf(x, device)[index].numpy(), x[index])
    assert gradcheck(lambda t: t[index], [leaf(x, device)])


@pytest.mark.parametrize("index", [
    np.s_[:, :, ::2, ::2], np.s_[::-1, :, ::-2], np.s_[1, :, -1], np.s_[..., 1:3, None],
    np.s_[-1::-2, 1], np.s_[:, [1, 1, 0]], np.s_[[0, 0, 1], :, [2, 2, 0]], np.s_[[1, 1, 1]],
], ids=["step2", "negstep", "ints", "ellipsis-none", "negstart", "array-repeat", "arrays-pair", "array-all-same"])
def test_indexing_examples_gradient(device, index):
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5))
    t = leaf(x, device)
    assert np.array_equal(t[index].numpy(), x[index])
    assert gradcheck(lambda s: s[index], [leaf(x, device)])


def test_indexing_with_repeats_accumulates(device):
    x = leaf(np.arange(4.0), device)
    x[[0, 2, 2, 2]].sum().backward()
    assert np.array_equal(x.grad.numpy(), [1, 0, 3, 0])


def test_boolean_mask_indexing_gradient(device, xp):
    x = np.linspace(-1, 1, 12).reshape(3, 4)
    mask = x > 0.1
    t = leaf(x, device)
    assert np.array_equal(t[xp.asarray(mask)].numpy(), x[mask])
    assert gradcheck(lambda s: s[xp.asarray(mask)], [leaf(x, device)])


# ---- pad and cat -----------------------------------------------------------------------------

@with_fixtures
@given(data=st.data(), shape=shapes(min_dims=1, max_dims=4, max_side=3),
       value=st.sampled_from([0.0, -1.5]))
def test_pad_gradient(device, data, shape, value):
    k = data.draw(st.integers(1, len(shape)), label="dims padded")
    widths = data.draw(st.lists(st.integers(0, 2), min_size=2 * k, max_size=2 * k), label="pad")
    x = data.draw(arrays(shape), label="x")
    expected = np.pad(x, [(0, 0)] * (len(shape) - k) + [tuple(widths[2 * i:2 * i + 2]) for i in reversed(range(k))],
                      constant_values=value)
    assert np.array_equal(tinyres.nn.functional.pad(leaf(x, device), widths, value=value).numpy(), expected)
    assert gradcheck(lambda t: tinyres.nn.functional.pad(t, widths, value=value), [leaf(x, device)])


@st.composite
def cat_cases(draw):
    shape = list(draw(shapes(min_dims=1, max_dims=3, max_side=3)))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    out = []
    for s in sizes:
        shape[dim] = s
        out.append(tuple(shape))
    return out, dim


@with_fixtures
@given(data=st.data(), case=cat_cases())
def test_cat_gradient(device, data, case):
    shapes_, dim = case
    xs = [data.draw(arrays(s), label=f"x{i}") for i, s in enumerate(shapes_)]
    assert np.array_equal(tinyres.cat([leaf(x, device) for x in xs], dim).numpy(), np.concatenate(xs, dim))
    assert gradcheck(lambda *ts: tinyres.cat(ts, dim=dim), [leaf(x, device) for x in xs])
    assert gradcheck(lambda *ts: tinyres.concatenate(list(ts), dim), [leaf(x, device) for x in xs])


def test_cat_with_a_constant_and_stack(device):
    a = leaf(np.arange(6.0).reshape(2, 3), device)
    c = leaf(np.ones((1, 3)), device, requires_grad=False)
    assert gradcheck(lambda t: tinyres.cat([t, c], 0), [a])
    assert gradcheck(lambda s, t: tinyres.stack([s, t], dim=1), [leaf(np.ones(3), device), leaf(np.zeros(3), device)])


# ---- the backward pass -------------------------------------------------------------------------

def test_gradient_accumulates_over_every_use(device):
    x = leaf(np.array([0.5, -1.0, 2.0]), device)
    y = x.exp() + x  # x is used twice: by exp and by add
    y.sum().backward()
    assert np.allclose(x.grad.numpy(), np.exp(x.numpy()) + 1)
    assert gradcheck(lambda t: t * t + t.exp() * t - t, [leaf(x.numpy(), device)])


def test_diamond_graph(device):
    x = leaf(np.array([0.3, -0.7]), device)
    a = x * 2
    b = a * a  # a feeds b and c; b feeds c
    c = (a + b) * a
    c.sum().backward()
    xv = x.numpy()  # c = 2x*(2x + 4x^2) = 4x^2 + 8x^3
    assert np.allclose(x.grad.numpy(), 8 * xv + 24 * xv ** 2)


def test_backward_twice_accumulates_into_grad(device):
    x = leaf(np.array([1.0, 2.0, 3.0]), device)
    (x * x).sum().backward()
    (x * x).sum().backward()
    assert np.allclose(x.grad.numpy(), 4 * x.numpy())
    x.grad = None
    (x * 3).sum().backward()
    assert np.allclose(x.grad.numpy(), 3)


def test_backward_through_a_freed_graph_raises(device):
    # the graph is freed by backward(): a second backward cannot silently do nothing
    x = leaf(np.array([1.0, 2.0]), device)
    y = x * x
    loss = y.sum()
    loss.backward()
    with pytest.raises(RuntimeError, match=r"backward\(\).*freed"):
        loss.backward()
    with pytest.raises(RuntimeError, match=r"backward\(\).*freed"):
        (y * 3).sum().backward()  # y's graph is gone too: its gradient could not reach x
    assert np.allclose(x.grad.numpy(), [2, 4])


def test_backward_with_explicit_gradient(device, xp):
    x = leaf(np.array([[1.0, 2.0], [3.0, 4.0]]), device)
    y = x * 3
    y.backward(xp.asarray([[1.0, 0.0], [0.5, 2.0]]))
    assert np.allclose(x.grad.numpy(), [[3, 0], [1.5, 6]])
    x2 = leaf(np.ones(2, dtype=np.float32), device)
    (x2 * 2).backward(tensor([1.0, 2.0], device=device))
    assert x2.grad.dtype == np.float32 and np.allclose(x2.grad.numpy(), [2, 4])


def test_backward_on_a_leaf(device):
    x = leaf(np.array(2.0), device)
    x.backward()
    assert x.grad.item() == 1.0


def test_branch_without_grad_gets_none(device):
    x = leaf(np.array([1.0, 2.0]), device)
    c = leaf(np.array([3.0, 4.0]), device, requires_grad=False)
    (x * c).sum().backward()
    assert c.grad is None and np.allclose(x.grad.numpy(), [3, 4])


def test_long_chain_has_no_recursion_limit(device):
    n = 20_000
    assert sys.getrecursionlimit() < n  # a recursive walk of this graph would fail
    x = leaf(np.array([1.0, -2.0]), device)
    y = x
    for _ in range(n):
        y = y * 1.0001
    y.sum().backward()
    assert np.allclose(x.grad.numpy(), 1.0001 ** n)
    # freeing an unused deep graph must not overflow the C stack either, and must free it all
    y = first = x + 0.0
    for _ in range(n):
        y = y + 0.0
    first_alive = weakref.ref(first)
    del y, first
    gc.collect()
    assert first_alive() is None


def test_resnet1202_deep_graph_stand_in(device):
    """A residual graph as deep as ResNet-1202 (600 two-layer blocks with shortcuts), gradient-checked."""
    rng = np.random.default_rng(0)
    blocks = 600
    w1 = [leaf(0.2 * rng.standard_normal((3, 3)), device, requires_grad=False) for _ in range(blocks)]
    w2 = [leaf(0.2 * rng.standard_normal((3, 3)), device, requires_grad=False) for _ in range(blocks)]

    def net(h, scale):
        for a, b in zip(w1, w2):
            h = h + ((h @ a) * scale).exp() @ b * 0.01  # shortcut + two "layers"
        return h.sum(1)

    assert sys.getrecursionlimit() < 5 * blocks
    assert gradcheck(net, [leaf(rng.standard_normal((1, 3)), device), leaf(np.array(0.3), device)])


def test_graph_is_freed_after_backward(device):
    x = leaf(np.ones((4, 4)), device)
    mid = x.exp()
    ref_t, ref_fn = weakref.ref(mid), weakref.ref(mid.grad_fn)
    out = (mid * 2).sum()
    kept = x * 3  # a second intermediate we keep: its grad_fn must be cleared
    out2 = (kept + out).sum()
    del mid, out
    assert ref_t() is not None  # kept alive by the graph until backward
    out2.backward()
    assert ref_t() is None and ref_fn() is None  # freed without a gc.collect(): no cycles
    assert kept.grad_fn is None and out2.grad_fn is None


def test_saved_arrays_are_released_by_backward(device):
    x = leaf(np.ones(3), device)
    y = x * x
    fn = y.grad_fn
    y.sum().backward()
    assert not fn.__dict__  # inputs and saved arrays dropped


def test_no_grad_records_no_graph(device):
    x = leaf(np.ones(3), device)
    with no_grad():
        assert not tinyres.is_grad_enabled()
        y = (x * 2).exp().sum()
    assert tinyres.is_grad_enabled()
    assert y.grad_fn is None and not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()

    @no_grad()
    def f(t):
        return t * 2

    assert f(x).grad_fn is None and tinyres.is_grad_enabled()
    with no_grad():
        with no_grad():
            pass
        assert not tinyres.is_grad_enabled()  # the inner block restores the outer state
    with pytest.raises(ZeroDivisionError), no_grad():
        raise ZeroDivisionError  # an exception inside no_grad() still restores grad mode
    assert tinyres.is_grad_enabled()


def test_detach(device):
    x = leaf(np.array([1.0, 2.0]), device)
    d = x.detach()
    assert not d.requires_grad and d.grad_fn is None
    assert d.data is x.data  # shares memory, like torch
    (d * x).sum().backward()
    assert np.allclose(x.grad.numpy(), [1, 2])  # no gradient flows through the detached factor


def test_only_float_tensors_require_grad(device):
    with pytest.raises(TypeError, match=r"floating-point.*int64.*\(3,\)"):
        tensor([1, 2, 3], requires_grad=True, device=device)
    with pytest.raises(TypeError, match=r"floating-point.*bool"):
        tensor([True], device=device).requires_grad_()
    assert tensor([1.0], device=device).requires_grad_().requires_grad


def test_backward_of_non_scalar_needs_a_gradient(device):
    y = leaf(np.ones((2, 3)), device) * 2
    with pytest.raises(RuntimeError, match=r"backward\(\).*scalar.*\(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"backward\(\).*\(3, 2\).*\(2, 3\)"):
        y.backward(np.ones((3, 2)))


# ---- Tensor API --------------------------------------------------------------------------------

def test_tensor_copies_its_data(device):
    a = np.array([1.0, 2.0, 3.0])
    t = tensor(a, device=device)
    a[0] = 99
    assert t.numpy()[0] == 1.0
    u = tensor(t)
    t.data[1] = 42
    assert u.numpy()[1] == 2.0


def test_tensor_dtypes_and_properties(device):
    assert tensor([1.0, 2.0], device=device).dtype == np.float32  # Python floats: float32, as torch
    assert tensor(1.5, device=device).dtype == np.float32
    assert tensor([1, 2], device=device).dtype == np.int64
    assert tensor(np.ones(2), device=device).dtype == np.float64  # arrays keep their dtype
    assert tensor([1, 2], dtype=np.float64, device=device).dtype == np.float64
    t = tensor(np.arange(6.0).reshape(2, 3), device=device)
    assert t.shape == (2, 3) and isinstance(t.shape, tuple) and t.ndim == 2 and t.size() == (2, 3) and t.size(1) == 3 and t.numel() == 6 and len(t) == 2
    assert t.device == device
    assert isinstance(t.numpy(), np.ndarray) and np.array_equal(t.numpy(), np.arange(6.0).reshape(2, 3))
    assert t[1, 2].item() == 5.0 and isinstance(t[1, 2].item(), float)
    assert tensor([7], device=device).item() == 7
    with pytest.raises(ValueError, match=r"item\(\).*\(2, 3\)"):
        t.item()
    assert t.is_leaf and not t.requires_grad and t.grad is None
    assert "tensor(" in repr(t) and "float64" in repr(t)
    assert tinyres.zeros(2, 3, device=device).shape == (2, 3) and tinyres.ones((4,), device=device).dtype == np.float32


def test_comparisons_give_boolean_tensors(device):
    t = tensor([1.0, 2.0, 3.0], requires_grad=True, device=device)
    m = t > 1.5
    assert m.dtype == bool and not m.requires_grad and m.numpy().tolist() == [False, True, True]


def test_cast_is_differentiable(device):
    x = leaf(np.array([1.0, 2.0], dtype=np.float32), device)
    y = x.double()
    assert y.dtype == np.float64
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32 and np.allclose(x.grad.numpy(), [2, 4])


# ---- dtype: float32 stays float32, float64 stays float64 ------------------------------------

TENSOR_OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b * b + 1),
    "neg": lambda a, b: -a + b,
    "pow2": lambda a, b: (a * a + 1) ** 2 + b,
    "pow-half": lambda a, b: (a * a + 1) ** 0.5 + b,
    "exp": lambda a, b: a.exp() + b,
    "log": lambda a, b: (a * a + 1).log() + b,
    "add-scalar": lambda a, b: 1 + a + 2.5 + b,
    "sub-scalar": lambda a, b: 1 - a - 2.5 + b,
    "mul-scalar": lambda a, b: 2.0 * a * 2 + b,
    "div-scalar": lambda a, b: 1 / (a * a + 1) + a / 3 + b,
    "numpy-scalars": lambda a, b: np.float64(2.0) * a / np.int64(3) + b - np.float64(0.5),
    "matmul": lambda a, b: a @ b.T,
    "matmul-1d": lambda a, b: a[0] @ b.T,
    "sum": lambda a, b: a.sum(0) + b.sum(),
    "mean": lambda a, b: a.mean(1, keepdim=True) + b.mean(),
    "max": lambda a, b: a.max(0).values + b.max() + a.amin(1, keepdim=True),
    "reshape": lambda a, b: a.reshape(-1) + b.reshape(6),
    "permute": lambda a, b: a.permute(1, 0) + b.T,
    "getitem": lambda a, b: a[:, ::-2] + b[[0, 0], 1:],
    "pad": lambda a, b: tinyres.nn.functional.pad(a, (1, 0)) + tinyres.nn.functional.pad(b, (0, 1)),
    "cat": lambda a, b: tinyres.cat([a, b], 1),
    "stack": lambda a, b: tinyres.stack([a, b]),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", sorted(TENSOR_OPS))
def test_dtype_is_kept_forward_and_backward(device, op, dtype):
    rng = np.random.default_rng(0)
    a, b = (leaf(rng.standard_normal((2, 3)).astype(dtype), device) for _ in range(2))
    y = TENSOR_OPS[op](a, b)
    assert y.dtype == dtype
    y.backward(np.ones(y.shape, dtype=dtype))
    assert a.grad.dtype == dtype and b.grad.dtype == dtype


def test_pow_with_numpy_scalar_exponent_keeps_float32(device):
    x = leaf(np.array([1.0, 2.0], dtype=np.float32), device)
    y = x ** np.float64(2.0)
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32 and np.allclose(x.grad.numpy(), [2, 4])


def test_only_constant_exponents(device):
    x = leaf(np.ones(2), device)
    with pytest.raises(TypeError):
        2 ** x
    with pytest.raises(TypeError, match="pow: only a constant"):
        x ** x


# ---- clear errors ----------------------------------------------------------------------------

def test_add_shape_mismatch_error(device):
    a, b = leaf(np.ones((2, 3)), device), leaf(np.ones(4), device)
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\) cannot be broadcast"):
        a + b
    with pytest.raises(ValueError, match=r"mul: shapes \(2, 3\) and \(4,\)"):
        a * b


def test_matmul_shape_mismatch_error(device):
    with pytest.raises(ValueError, match=r"matmul: shapes \(2, 3\) and \(4, 5\) do not match"):
        leaf(np.ones((2, 3)), device) @ leaf(np.ones((4, 5)), device)
    with pytest.raises(ValueError, match=r"matmul: .*\(4, 5\)"):
        leaf(np.ones(3), device) @ leaf(np.ones((4, 5)), device)
    with pytest.raises(ValueError, match=r"matmul: scalar operand"):
        tinyres.matmul(leaf(np.ones(()), device), leaf(np.ones(3), device))


def test_mixing_float_dtypes_is_a_clear_error(device):
    a = leaf(np.ones(2, dtype=np.float32), device)
    b = leaf(np.ones(2, dtype=np.float64), device)
    with pytest.raises(TypeError, match=r"Add: inputs mix dtypes \(float32\(2,\), float64\(2,\)\)"):
        a + b
    with pytest.raises(TypeError, match=r"Concatenate: inputs mix dtypes"):
        tinyres.cat([a, b])


def test_non_contiguous_operands(device, xp):
    rng = np.random.default_rng(4)
    a = tinyres.Tensor(xp.asarray(rng.standard_normal((4, 3))).T, requires_grad=True)  # transposed
    b = tinyres.Tensor(xp.asarray(rng.standard_normal((3, 8)))[:, ::2], requires_grad=True)  # strided
    assert not a.data.flags.c_contiguous and not b.data.flags.c_contiguous
    assert gradcheck(lambda s, t: (s * t).exp() / (t * t + 1) - s, [a, b])
    assert gradcheck(lambda s, t: (s @ t.T).sum(0) + s.amax(1), [a, b])
    assert gradcheck(lambda s, t: tinyres.cat([s, t], 1)[:, ::-1].reshape(-1), [a, b])


def test_reshape_and_permute_errors(device):
    x = leaf(np.ones((2, 3)), device)
    with pytest.raises(ValueError, match=r"reshape: .*\(2, 3\).*\(4, 2\)"):
        x.reshape(4, 2)
    with pytest.raises(ValueError, match=r"permute: .*\(2, 3\)"):
        x.permute(0, 0)
    with pytest.raises(ValueError, match=r"sum: dim 2 out of range"):
        x.sum(2)
    with pytest.raises(ValueError, match=r"cat: shapes \[\(2, 3\), \(2, 4\)\] differ outside dim 0"):
        tinyres.cat([x, leaf(np.ones((2, 4)), device)], 0)


@pytest.mark.gpu
def test_mixing_devices_is_a_clear_error(gpu):
    a = leaf(np.ones((2, 3)), "cpu")
    b = leaf(np.ones((2, 3)), "cuda")
    with pytest.raises(RuntimeError, match=r"Add: inputs are on different devices \(cpu\(2, 3\), cuda\(2, 3\)\)"):
        a + b
    with pytest.raises(RuntimeError, match=r"MatMul: .*different devices"):
        a @ b.T
    # moving is differentiable: the gradient comes back to the CPU leaf
    y = (a.to("cuda") * b).sum()
    y.backward()
    assert a.grad.device == "cpu" and np.allclose(a.grad.numpy(), 1)


class _Identity(Function):
    def forward(self, x):
        return x

    def backward(self, gy):
        return gy


def test_user_function_subclass(device):
    x = leaf(np.array([1.0, 2.0]), device)
    y = _Identity()(x)
    assert isinstance(y, Tensor) and y.requires_grad and not y.is_leaf
    assert gradcheck(lambda t: _Identity()(t) * t, [x])


# ---- the gradient shape check, operands from NumPy, PyTorch's names -------------------------

def test_a_backward_returning_a_wrongly_shaped_gradient_names_the_op_and_shapes(device):
    class Transposed(Function):  # returns a (3, 2) gradient for a (2, 3) input
        def forward(self, x):
            return x * 2

        def backward(self, gy):
            return gy.T

    x = leaf(np.ones((2, 3)), device)
    y = Transposed()(x)
    with pytest.raises(ValueError, match=r"Transposed\.backward: gradient of shape \(3, 2\) for an input of "
                                         r"shape \(2, 3\)"):
        y.backward(np.ones((2, 3)))


def test_broadcast_gradients_are_still_reduced_to_the_input_shape(device):
    class Widen(Function):  # backward returns the broadcast (4, 2, 3) gradient for a (1, 3) input
        def forward(self, x):
            return self.xp.broadcast_to(x, (4, 2, 3)).copy()

        def backward(self, gy):
            return gy

    x = leaf(np.ones((1, 3)), device)
    Widen()(x).backward(np.ones((4, 2, 3)))
    assert x.grad.shape == (1, 3) and np.all(x.grad.numpy() == 8)


def test_an_array_on_the_left_hands_the_op_to_the_tensor(device, xp):
    t = tensor([1.0, 2.0, 3.0], requires_grad=True, device=device)
    a = xp.asarray(np.array([2.0, 2.0, 2.0], np.float32))
    for y, expected in ((a * t, [2, 4, 6]), (a + t, [3, 4, 5]), (a - t, [1, 0, -1]), (a / t, [2, 1, 2 / 3])):
        assert isinstance(y, Tensor) and y.dtype == np.float32
        assert np.allclose(y.numpy(), expected)
    w = tensor(np.ones((3, 1), np.float32), requires_grad=True, device=device)
    (xp.asarray(np.ones((2, 3), np.float32)) @ w).sum().backward()
    assert np.array_equal(w.grad.numpy(), [[2], [2], [2]])


def test_a_zero_dim_array_operand_acts_like_a_scalar(device):
    t = tensor(np.ones(3, np.float32), device=device)
    for y in (t * np.array(2.0), np.array(2.0) * t, t + np.float64(1.0), t / np.array(2, np.int64)):
        assert y.dtype == np.float32 and y.shape == (3,)


def test_pytorch_names_on_tensors(device):
    t = tensor([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]], requires_grad=True, device=device)
    assert t.size() == (2, 3) and t.size(0) == 2 and t.size(-1) == 3 and t.numel() == 6 and t.dim() == 2
    assert t.argmax().item() == 3 and t.argmax(dim=1).tolist() == [1, 0]
    assert t.argmax(1, keepdim=True).shape == (2, 1)
    s = t.softmax(dim=1)
    assert np.allclose(s.numpy().sum(axis=1), 1) and s.dtype == np.float32
    assert t.grad_fn is None and t.is_leaf
    y = (t * 2).sum()
    assert type(y.grad_fn).__name__ == "Sum" and not y.is_leaf and "grad_fn=<Sum>" in repr(y)
    y.backward()
    assert y.grad_fn is None  # the graph is freed by backward
    assert t.to(np.float64).dtype == np.float64


def test_factories(device):
    assert tinyres.zeros(2, 3, device=device).shape == (2, 3)
    assert tinyres.ones((2,), device=device).numpy().tolist() == [1, 1]
    tinyres.manual_seed(5)
    a = tinyres.randn(3, 4, device=device)
    tinyres.manual_seed(5)
    b = tinyres.randn(3, 4, device=device)
    assert a.dtype == np.float32 and a.device == device and np.array_equal(a.numpy(), b.numpy())
    z = tinyres.zeros_like(a, requires_grad=True)
    assert z.shape == (3, 4) and z.device == device and z.requires_grad
    assert tinyres.ones_like(a).numpy().sum() == 12


def test_from_numpy_shares_memory():
    a = np.arange(3.0)
    t = tinyres.from_numpy(a)
    a[0] = 7
    assert t.dtype == np.float64 and t.numpy()[0] == 7
    with pytest.raises(TypeError, match="from_numpy: expected a numpy.ndarray, got list"):
        tinyres.from_numpy([1, 2])


def test_tensor_keeps_the_data_on_its_device(device, xp):
    a = xp.asarray(np.ones(3, np.float32))
    assert tensor(a).device == device
    assert tensor(a, device="cpu").device == "cpu"


# ---- the PyTorch names a training script types ---------------------------------------------

def test_max_and_min_over_a_dim_give_values_and_indices(device):
    out = tensor([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]], device=device)
    _, pred = out.max(1)  # the accuracy line of PyTorch scripts
    assert pred.tolist() == [1, 0] and pred.dtype == np.int64
    values, indices = tinyres.max(out, dim=0)
    assert values.tolist() == [7, 5, 3] and indices.tolist() == [1, 0, 1]
    low = out.min(dim=1, keepdim=True)
    assert low.values.shape == (2, 1) and low.indices.tolist() == [[0], [1]]
    assert out.max().item() == 7 and out.min().item() == 0  # without dim: one tensor
    assert out.argmin(1).tolist() == [0, 1]
    with pytest.raises(TypeError, match="amax"):
        out.max((0, 1))
    with pytest.raises(TypeError, match="elementwise max"):
        tinyres.max(out, out)


def test_a_batch_of_two_unpacks_into_values_and_indices_not_rows(device):
    out = tensor([[0.0, 9.0], [3.0, 1.0]], device=device)
    first, second = out.max(1)
    assert first.tolist() == [9, 3] and second.tolist() == [1, 0]


def test_equality_gives_boolean_tensors_that_count(device):
    pred, y = tensor([1, 2, 3], device=device), tensor([1, 0, 3], device=device)
    assert (pred == y).tolist() == [True, False, True] and (pred != y).sum().item() == 1
    assert pred.eq(y).sum().item() == 2 and (pred == 3).tolist() == [False, False, True]
    assert len({pred, y}) == 2  # hashed by identity
    with pytest.raises(RuntimeError, match=r"ambiguous: use \(\.\.\.\)\.all\(\)"):
        bool(pred == y)
    assert bool(tensor([2.0]) > 1) and (pred == y).any().item() and not (pred == y).all().item()


def test_unsqueeze_squeeze_t_clone_view_as(device):
    x = leaf(np.arange(6.0).reshape(2, 3), device)
    assert x.unsqueeze(0).shape == (1, 2, 3) and x.unsqueeze(-1).shape == (2, 3, 1)
    assert x.unsqueeze(1).squeeze().shape == (2, 3) and x.unsqueeze(1).squeeze(1).shape == (2, 3)
    assert x.squeeze(0).shape == (2, 3) and x.t().shape == (3, 2) and tinyres.unsqueeze(x, 2).shape == (2, 3, 1)
    assert x.view_as(tensor(np.zeros((3, 2)))).shape == (3, 2) and x.contiguous() is x
    with pytest.raises(ValueError, match=r"unsqueeze: dim 3 out of range for a tensor of shape \(2, 3\)"):
        x.unsqueeze(3)
    with pytest.raises(ValueError, match="t: expects a tensor of at most 2 dims"):
        x.unsqueeze(0).t()
    c = x.clone()
    assert c.data is not x.data and np.array_equal(c.numpy(), x.numpy())
    assert gradcheck(lambda a: a.clone().unsqueeze(1).squeeze(1).t() * a.t(), [x])


def test_dtypes_arange_and_grad_modes(device):
    x = tensor([1.0, 2.0], device=device)
    assert x.to(tinyres.float64).dtype == np.float64 and x.dtype == tinyres.float32 == tinyres.float
    assert x.long().dtype == tinyres.int64 == tinyres.long and x.double().dtype == tinyres.double
    assert tinyres.zeros(2, dtype=tinyres.float64).dtype == np.float64
    assert tinyres.arange(4).tolist() == [0, 1, 2, 3] and tinyres.arange(4).dtype == np.int64
    assert tinyres.arange(1, 2, 0.5, device=device).tolist() == [1.0, 1.5]
    assert tinyres.arange(3).dtype == tinyres.long and tinyres.device("cuda:0") == "cuda"
    assert isinstance(tinyres.cuda.is_available(), bool) and x.is_cuda == (device == "cuda")
    w = tensor([1.0], requires_grad=True)
    with tinyres.no_grad():
        assert not (w * 2).requires_grad
        with tinyres.enable_grad():
            assert (w * 2).requires_grad
    with tinyres.inference_mode():
        assert not (w * 2).requires_grad
    with tinyres.set_grad_enabled(False):
        assert not tinyres.is_grad_enabled()

    @tinyres.no_grad()
    def f(t):
        return t * 2
    assert not f(w).requires_grad and tinyres.is_grad_enabled()


def test_left_out_methods_say_what_to_use_instead(device):
    x = tensor([1.0, 2.0], device=device)
    with pytest.raises(AttributeError, match="in-place ops are left out.*x = x \\+ y"):
        x.add_(1)
    with pytest.raises(AttributeError, match="hooks on tensors are left out"):
        x.register_hook(print)
    with pytest.raises(AttributeError, match="'Tensor' object has no attribute 'sqrt': not an op of tinyres"):
        x.sqrt()
    with pytest.raises(AttributeError, match="^'Tensor' object has no attribute 'nonsense'$"):
        x.nonsense  # noqa: B018
    assert not hasattr(x, "nonsense")


def test_topk_expand_and_more_factories(device):
    x = leaf(np.array([[1.0, 5.0, 2.0, 7.0], [7.0, 0.0, 3.0, 1.0]]), device)
    values, indices = x.topk(2, dim=1)
    assert values.tolist() == [[7, 5], [7, 3]] and indices.tolist() == [[3, 1], [0, 2]]
    assert tinyres.topk(x, 1, dim=0, largest=False).indices.tolist() == [[0, 1, 0, 1]]
    assert gradcheck(lambda t: t.topk(3, 1).values, [x])
    with pytest.raises(ValueError, match=r"topk: k=5 out of range for dim 1 of a tensor of shape \(2, 4\)"):
        x.topk(5, 1)
    row = leaf(np.array([1.0, 2.0]), device)
    assert row.expand(3, -1).shape == (3, 2) and row.unsqueeze(1).expand_as(x[:, :3]).shape == (2, 3)
    assert gradcheck(lambda t: t.expand(3, 2) * 2, [row])
    with pytest.raises(ValueError, match=r"expand: shape \(2,\) cannot be broadcast to \(3,\)"):
        row.expand(3)
    tinyres.manual_seed(1)
    assert tinyres.randint(0, 10, (5,), device=device).dtype == np.int64
    assert 0 <= tinyres.randint(3, size=(4,)).numpy().min() and tinyres.randint(3, size=(4,)).numpy().max() < 3
    r = tinyres.rand(2, 3, device=device)
    assert r.shape == (2, 3) and r.dtype == np.float32 and 0 <= r.numpy().min() and r.numpy().max() < 1
    assert tinyres.full((2,), 0.5).tolist() == [0.5, 0.5] and tinyres.full((1,), 3).dtype == np.int64
    assert tinyres.empty(2, 3).shape == (2, 3)


def test_left_out_top_level_names_say_what_to_use_instead():
    with pytest.raises(AttributeError, match="tinyres has no backends: there is no cuDNN to configure"):
        tinyres.backends  # noqa: B018
    with pytest.raises(AttributeError, match=r"tinyres has no utils: .*tinyres.data.DataLoader"):
        tinyres.utils  # noqa: B018
    with pytest.raises(AttributeError, match="module 'tinyres' has no attribute 'nonsense'"):
        tinyres.nonsense  # noqa: B018
