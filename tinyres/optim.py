"""Optimizers and learning-rate schedules, as `torch.optim`.

`SGD` follows PyTorch's formulation exactly. The schedules are stepped once per training
iteration (not per epoch), as the paper counts: ResNet training divides the learning rate by
10 at 32k and 48k iterations, and ResNet-110 warms up at 0.01 until the training error falls
below 80%.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

import numpy as np

from .backend import device_of, get_array_module, is_cupy, to_device
from .tensor import Tensor

__all__ = ["SGD", "LRScheduler", "MultiStepLR", "Optimizer", "WarmupLR"]


def _array(v: Any):
    return v.data if isinstance(v, Tensor) else v if (isinstance(v, np.ndarray) or is_cupy(v)) else np.asarray(v)


class Optimizer:
    """Base class: one group of parameters with its hyperparameters, and per-parameter state."""

    def __init__(self, params: Iterable[Tensor], defaults: dict[str, Any]):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        if any(isinstance(p, dict) for p in self.params):
            raise TypeError("parameter groups (dicts) are not supported: pass one list of parameters")
        # one group, in PyTorch's layout, so that `opt.param_groups[0]["lr"] = ...` works
        self.param_groups = [{"params": self.params, **defaults}]
        self.state: dict[int, dict[str, Any]] = {}  # parameter index -> arrays such as "momentum_buffer"

    @property
    def lr(self) -> float:
        """The learning rate (of the one parameter group)."""
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = float(value)  # a Python float: a NumPy float64 would upcast float32 updates

    def zero_grad(self) -> None:
        """Drop the gradients of all parameters (sets `.grad` to None)."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update the parameters from their gradients."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """{"state": {index: {name: NumPy array}}, "param_groups": [hyperparameters, "params": indices]}."""
        state = {i: {k: (v.get() if is_cupy(v) else v.copy()) for k, v in s.items()} for i, s in self.state.items()}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        return {"state": state, "param_groups": [group]}

    def state_dict_errors(self, state_dict: dict[str, Any]) -> list[str]:
        """The reasons `load_state_dict` would refuse `state_dict` (empty when it fits)."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1 or "state" not in state_dict:
            return ["optimizer state must have 'state' and exactly one entry in 'param_groups'"]
        errors = []
        own_keys = set(self.param_groups[0]) - {"params"}
        if set(groups[0]) - {"params"} != own_keys:
            errors.append(f"optimizer hyperparameters {sorted(set(groups[0]) - {'params'})} "
                          f"differ from {type(self).__name__}'s {sorted(own_keys)}")
        if len(groups[0].get("params", [])) != len(self.params):
            errors.append(f"optimizer state is for {len(groups[0].get('params', []))} parameters, "
                          f"this optimizer has {len(self.params)}")
        for i, s in state_dict["state"].items():
            i = int(i)
            if not 0 <= i < len(self.params):
                errors.append(f"optimizer state for parameter {i}, which does not exist")
                continue
            for k, v in s.items():
                shape = tuple(_array(v).shape)
                if shape != self.params[i].shape:
                    errors.append(f"optimizer state {i}/{k}: expected shape {self.params[i].shape}, got {shape}")
        return errors

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters and state (e.g. momentum buffers) from `state_dict`, checked first."""
        errors = self.state_dict_errors(state_dict)
        if errors:
            raise ValueError(f"Error(s) in loading state_dict for {type(self).__name__}:\n  " + "\n  ".join(errors))
        group = self.param_groups[0]
        for k, v in state_dict["param_groups"][0].items():
            if k != "params":
                group[k] = type(group[k])(v)  # keep Python floats and bools
        self.state = {}
        for i, s in state_dict["state"].items():
            p = self.params[int(i)]
            self.state[int(i)] = {k: to_device(_array(v), device_of(p.data)).astype(p.dtype) for k, v in s.items()}


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
                state = self.state.setdefault(i, {})
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


# ---- learning-rate schedules -------------------------------------------------------------

class LRScheduler:
    """Base class: sets `optimizer.lr` from the iteration count; `step()` once per iteration."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.iteration = 0  # steps taken so far (PyTorch's last_epoch)
        self.last_lr = self.base_lr

    def get_lr(self) -> float:
        """The learning rate for the current `iteration`."""
        raise NotImplementedError

    def step(self) -> None:
        """Count one iteration and set the optimizer's learning rate for the next."""
        self.iteration += 1
        self._set_lr(self.get_lr())

    def _set_lr(self, lr: float) -> None:
        self.last_lr = float(lr)
        self.optimizer.lr = self.last_lr

    def get_last_lr(self) -> list[float]:
        """The learning rate set by the last step, as a one-element list (as PyTorch)."""
        return [self.last_lr]

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer, as ints, floats, bools and lists (JSON-friendly)."""
        return {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in self.__dict__.items() if k != "optimizer"}

    def state_dict_errors(self, state_dict: dict[str, Any]) -> list[str]:
        """The reasons `load_state_dict` would refuse `state_dict` (empty when it fits)."""
        own, given = set(self.state_dict()), set(state_dict)
        if own != given:
            return [f"{type(self).__name__} state: missing {sorted(own - given)}, unexpected {sorted(given - own)}"]
        return []

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule (iteration, learning rates, settings); sets the optimizer's lr."""
        errors = self.state_dict_errors(state_dict)
        if errors:
            raise ValueError("\n".join(errors))
        self.__dict__.update(state_dict)
        self.optimizer.lr = self.last_lr


class MultiStepLR(LRScheduler):
    """lr = base_lr * gamma ** (number of milestones reached); the paper: /10 at 32k and 48k iterations."""

    def __init__(self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1):
        super().__init__(optimizer)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self._set_lr(self.get_lr())

    def get_lr(self) -> float:
        # from the base each time, not by repeated multiplication, so no rounding builds up
        return self.base_lr * self.gamma ** bisect.bisect_right(self.milestones, self.iteration)


class WarmupLR(LRScheduler):
    """`warmup_lr` until iteration `until_iter` or a training error below `until_error`, then `scheduler`'s lr.

    The paper's ResNet-110 uses 0.01 until the training error is below 80% (about 400
    iterations), then goes back to 0.1. The wrapped schedule counts iterations from the
    start, warm-up included, so its milestones keep their meaning.
    """

    def __init__(self, optimizer: Optimizer, scheduler: LRScheduler, warmup_lr: float = 0.01,
                 until_iter: int | None = None, until_error: float | None = 0.8):
        if until_iter is None and until_error is None:
            raise ValueError("WarmupLR: give until_iter, until_error or both, or the warm-up never ends")
        super().__init__(optimizer)
        self.scheduler = scheduler
        self.warmup_lr = float(warmup_lr)
        self.until_iter = until_iter
        self.until_error = until_error
        self.warming_up = True
        self._set_lr(self.warmup_lr)

    def step(self, train_error: float | None = None) -> None:
        """Count one iteration; `train_error` (a fraction, e.g. 0.75) of the last iteration may end the warm-up."""
        self.iteration += 1
        self.scheduler.step()
        if self.warming_up:
            reached_iter = self.until_iter is not None and self.iteration >= self.until_iter
            reached_error = self.until_error is not None and train_error is not None and train_error < self.until_error
            self.warming_up = not (reached_iter or reached_error)
        self._set_lr(self.get_lr())

    def get_lr(self) -> float:
        return self.warmup_lr if self.warming_up else self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["scheduler"] = self.scheduler.state_dict()
        return state

    def state_dict_errors(self, state_dict: dict[str, Any]) -> list[str]:
        errors = super().state_dict_errors(state_dict)
        if not errors:
            errors = self.scheduler.state_dict_errors(state_dict["scheduler"])
        return errors

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        errors = self.state_dict_errors(state_dict)
        if errors:
            raise ValueError("\n".join(errors))
        state = dict(state_dict)
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self.__dict__.update(state)
        self.optimizer.lr = self.last_lr
