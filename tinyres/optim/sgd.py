"""Stochastic gradient descent with momentum, as `torch.optim.SGD`."""

from __future__ import annotations

from collections.abc import Iterable

from ..backend import get_array_module
from ..tensor import Tensor
from .optimizer import Optimizer

__all__ = ["SGD"]


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, weight decay and Nesterov, as `torch.optim.SGD`.

    With g = grad + weight_decay * p:  buf = g on the first step, then
    buf = momentum * buf + (1 - dampening) * g;  g = g + momentum * buf if nesterov else buf;
    p -= lr * g.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, dampening: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr {lr}, momentum {momentum} and weight_decay {weight_decay} must be >= 0")
        if momentum >= 1 or not 0 <= dampening <= 1:
            # momentum 1 or more lets every past gradient count forever, growing without bound
            raise ValueError(f"SGD: momentum must be below 1 and dampening between 0 and 1, got momentum {momentum} "
                             f"and dampening {dampening}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening 0")
        super().__init__(params, {"lr": float(lr), "momentum": float(momentum), "dampening": float(dampening),
                                  "weight_decay": float(weight_decay), "nesterov": bool(nesterov)})

    def step(self) -> None:
        """Update every parameter that has a gradient, in place."""
        group = self.param_groups[0]
        # Python floats keep float32 arrays float32 (NumPy float64 scalars would upcast them)
        lr, momentum, dampening = float(group["lr"]), float(group["momentum"]), float(group["dampening"])
        weight_decay, nesterov = float(group["weight_decay"]), bool(group["nesterov"])
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            xp = get_array_module(p.data, p.grad.data, op="SGD.step")
            # d is the one scratch array of this step; p.grad itself is left as backward made it
            d = xp.multiply(p.data, weight_decay) if weight_decay else p.grad.data.copy()
            if weight_decay:
                d += p.grad.data  # d = g
            if momentum:
                state = self.param_state(i)
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.copy()
                else:
                    buf *= momentum
                    if dampening:
                        d *= 1.0 - dampening  # not needed unscaled below: nesterov excludes dampening
                    buf += d
                if nesterov:  # p -= lr * (g + momentum * buf), as two scaled updates through d
                    d *= lr
                    p.data -= d
                    xp.multiply(buf, lr * momentum, out=d)
                else:
                    xp.multiply(buf, lr, out=d)
            else:
                d *= lr
            p.data -= d
