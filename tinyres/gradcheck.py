"""Numerical gradient checking, in the manner of `torch.autograd.gradcheck`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .backend import get_array_module, to_device
from .tensor import Tensor, no_grad


def _value(fn, inputs) -> Tensor:
    with no_grad():
        return fn(*inputs)


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence[Tensor], *, eps: float = 1e-6,
              atol: float = 1e-5, rtol: float = 1e-3, seed: int = 0,
              raise_exception: bool = True) -> bool:
    """Compare analytic and central-difference gradients of `fn` at float64 `inputs`.

    The output is contracted with a random upstream gradient `v` (not summed: the sum of a
    batch-norm output does not depend on its input, so a plain sum would prove nothing),
    and d(v . fn)/d(input) from `backward()` is checked element by element against
    (v . fn(x + eps) - v . fn(x - eps)) / (2 eps) for every input with `requires_grad`.
    """
    checked = [(k, t) for k, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    for _, t in checked:
        if t.dtype != np.float64:
            raise TypeError(f"gradcheck: inputs must be float64 for a meaningful check, got {t.dtype} "
                            f"with shape {t.shape}")
    if not checked:
        raise ValueError("gradcheck: no input requires grad")
    y = fn(*inputs)
    xp = get_array_module(y.data)
    rng = np.random.default_rng(seed)
    v = xp.asarray(rng.standard_normal(y.shape))
    for _, t in checked:
        t.grad = None
    y.backward(v)

    for k, t in checked:
        analytic = np.zeros(t.shape) if t.grad is None else to_device(t.grad.data, "cpu")
        numeric = np.zeros(t.shape)
        for i in np.ndindex(*t.shape):  # perturb in place, whatever the memory layout, and restore
            old = t.data[i].item()
            t.data[i] = old + eps
            fp = float((_value(fn, inputs).data * v).sum())
            t.data[i] = old - eps
            fm = float((_value(fn, inputs).data * v).sum())
            t.data[i] = old
            numeric[i] = (fp - fm) / (2 * eps)
        bad = ~np.isclose(analytic, numeric, atol=atol, rtol=rtol)
        if bad.any():
            if not raise_exception:
                return False
            diff = np.abs(analytic - numeric)
            worst = np.unravel_index(np.argmax(np.where(bad, diff, -1)), t.shape)
            raise AssertionError(
                f"gradcheck: input {k} (shape {t.shape}): {int(bad.sum())} of {bad.size} gradient "
                f"entries differ; worst at index {tuple(int(i) for i in worst)}: analytic "
                f"{analytic[worst]:.8g} vs numerical {numeric[worst]:.8g} (|diff| {diff[worst]:.3g}, "
                f"atol {atol}, rtol {rtol})")
    return True
