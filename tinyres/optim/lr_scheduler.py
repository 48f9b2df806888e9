"""Learning-rate schedules, as `torch.optim.lr_scheduler`, stepped once per training iteration."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

from ..statedict import refuse_if_errors
from .optimizer import Optimizer

__all__ = ["LRScheduler", "MultiStepLR", "WarmupLR"]

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
        refuse_if_errors(self, self.state_dict_errors(state_dict))
        self._restore(dict(state_dict))
        self.optimizer.lr = self.last_lr

    def _restore(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


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

    def _restore(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state.pop("scheduler"))
        super()._restore(state)
