"""Learning-rate schedules, as `torch.optim.lr_scheduler`, stepped once per training iteration.

Each gives PyTorch's learning rate at every step for the same arguments, from the formulas of
PyTorch's documentation (the closed forms, so no rounding builds up over 64k steps):

- `MultiStepLR`: the paper's schedule, lr / 10 at 32k and 48k iterations;
- `CosineAnnealingLR`: half a cosine from the base lr down to `eta_min` over `T_max` steps;
- `OneCycleLR`: one cycle up to `max_lr` and down far below the start (Smith & Topin, 2017),
  with momentum cycling the other way;
- `LinearLR` and `SequentialLR`: a linear warm-up, and one schedule after another;
- `WarmupLR`: the paper's warm-up of ResNet-110, which ends on the training error.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from typing import Any

from ..statedict import refuse_if_errors
from .optimizer import Optimizer

__all__ = ["CosineAnnealingLR", "LRScheduler", "LinearLR", "MultiStepLR", "OneCycleLR", "SequentialLR", "WarmupLR"]


class LRScheduler:
    """Base class: sets `optimizer.lr` from the iteration count; `step()` once per iteration."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        # the lr the optimizer was made with, as PyTorch's "initial_lr": a second schedule on the same
        # optimizer (the parts of a SequentialLR) starts from it, not from what the first one set
        if optimizer.initial_lr is None:
            optimizer.initial_lr = float(optimizer.lr)
        self.base_lr = float(optimizer.initial_lr)
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


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2 at step t, as PyTorch's closed form.

    Half a cosine from the base lr at step 0 down to `eta_min` at step `T_max` (and, past it, back
    up again, as in PyTorch).
    """

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):
        if int(T_max) != T_max or T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be a positive integer, got {T_max!r}")
        super().__init__(optimizer)
        self.T_max, self.eta_min = int(T_max), float(eta_min)
        self._set_lr(self.get_lr())

    def get_lr(self) -> float:
        cosine = (1 + math.cos(math.pi * self.iteration / self.T_max)) / 2
        return self.eta_min + (self.base_lr - self.eta_min) * cosine


def anneal(start: float, end: float, pct: float, strategy: str) -> float:
    """From `start` at pct 0 to `end` at pct 1: along half a cosine ('cos') or a straight line ('linear')."""
    if strategy == "cos":
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)
    return start + (end - start) * pct


class OneCycleLR(LRScheduler):
    """The one-cycle policy of Smith & Topin (2017), with PyTorch's arguments and formulas.

    The lr starts at max_lr / div_factor, rises to `max_lr` over the first `pct_start` of
    `total_steps`, then falls to max_lr / div_factor / final_div_factor at the last step, each
    phase along half a cosine (or a line, `anneal_strategy='linear'`). With `three_phase`, it
    falls back to the start over a second phase as long as the first, and then to the minimum.
    With `cycle_momentum` (the default), the optimizer's momentum moves the other way, from
    `max_momentum` down to `base_momentum` while the lr rises, and back up. The optimizer's own
    lr is not used: `max_lr` sets the scale.
    """

    def __init__(self, optimizer: Optimizer, max_lr: float, total_steps: int, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True, base_momentum: float = 0.85,
                 max_momentum: float = 0.95, div_factor: float = 25.0, final_div_factor: float = 1e4,
                 three_phase: bool = False):
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"OneCycleLR: total_steps must be a positive integer, got {total_steps!r}")
        if not 0 <= pct_start <= 1:
            raise ValueError(f"OneCycleLR: pct_start must be between 0 and 1, got {pct_start!r}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"OneCycleLR: anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        if cycle_momentum and "momentum" not in optimizer.param_groups[0]:
            raise ValueError(f"OneCycleLR: cycle_momentum needs an optimizer with momentum, "
                             f"{type(optimizer).__name__} has none (pass cycle_momentum=False)")
        super().__init__(optimizer)
        self.max_lr, self.total_steps, self.pct_start = float(max_lr), int(total_steps), float(pct_start)
        self.anneal_strategy, self.three_phase = anneal_strategy, bool(three_phase)
        self.div_factor, self.final_div_factor = float(div_factor), float(final_div_factor)
        self.cycle_momentum = bool(cycle_momentum)
        self.base_momentum, self.max_momentum = float(base_momentum), float(max_momentum)
        self.initial_lr = self.max_lr / self.div_factor
        self.min_lr = self.initial_lr / self.final_div_factor
        self._set_lr(self.get_lr())

    def phases(self) -> list[tuple[float, float, float, float, float]]:
        """(end step, lr from, lr to, momentum from, momentum to) of each phase, as PyTorch lays them out."""
        up = self.pct_start * self.total_steps - 1
        low, peak, m_low, m_high = self.initial_lr, self.max_lr, self.base_momentum, self.max_momentum
        if self.three_phase:
            return [(up, low, peak, m_high, m_low), (2 * self.pct_start * self.total_steps - 2, peak, low, m_low, m_high),
                    (self.total_steps - 1, low, self.min_lr, m_high, m_high)]
        return [(up, low, peak, m_high, m_low), (self.total_steps - 1, peak, self.min_lr, m_low, m_high)]

    def lr_and_momentum(self) -> tuple[float, float]:
        """The lr and momentum at the current step: the phase it falls in, and how far into it."""
        if self.iteration > self.total_steps:
            raise ValueError(f"OneCycleLR: stepped {self.iteration} times, but total_steps is {self.total_steps}")
        start, phases = 0.0, self.phases()
        for i, (end, lr_from, lr_to, m_from, m_to) in enumerate(phases):
            if self.iteration <= end or i == len(phases) - 1:
                pct = (self.iteration - start) / (end - start)
                return (anneal(lr_from, lr_to, pct, self.anneal_strategy),
                        anneal(m_from, m_to, pct, self.anneal_strategy))
            start = end
        raise AssertionError("unreachable: the last phase always matches")

    def get_lr(self) -> float:
        return self.lr_and_momentum()[0]

    def _set_lr(self, lr: float) -> None:
        super()._set_lr(lr)
        if self.cycle_momentum:
            self.optimizer.param_groups[0]["momentum"] = self.lr_and_momentum()[1]

    def get_last_momentum(self) -> float:
        """The optimizer's momentum after the last step."""
        return float(self.optimizer.param_groups[0]["momentum"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._set_lr(self.last_lr)  # the momentum too


class LinearLR(LRScheduler):
    """lr = base_lr * factor, the factor going linearly from `start_factor` to `end_factor` over `total_iters` steps."""

    def __init__(self, optimizer: Optimizer, start_factor: float = 1 / 3, end_factor: float = 1.0,
                 total_iters: int = 5):
        if not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
            raise ValueError(f"LinearLR: start_factor must be in (0, 1] and end_factor in [0, 1], "
                             f"got {start_factor!r} and {end_factor!r}")
        if int(total_iters) != total_iters or total_iters < 1:
            raise ValueError(f"LinearLR: total_iters must be a positive integer, got {total_iters!r}")
        super().__init__(optimizer)
        self.start_factor, self.end_factor, self.total_iters = float(start_factor), float(end_factor), int(total_iters)
        self._set_lr(self.get_lr())

    def get_lr(self) -> float:
        done = min(self.iteration, self.total_iters) / self.total_iters
        return self.base_lr * (self.start_factor + (self.end_factor - self.start_factor) * done)


class SequentialLR(LRScheduler):
    """`schedulers[0]` until `milestones[0]`, then `schedulers[1]`, ...; each counts its steps from its milestone.

    E.g. a warm-up then a cosine: `SequentialLR(opt, [LinearLR(opt, 0.1, total_iters=500),
    CosineAnnealingLR(opt, T_max=9_500)], milestones=[500])`.
    """

    def __init__(self, optimizer: Optimizer, schedulers: list[LRScheduler], milestones: list[int]):
        if len(schedulers) < 1 or len(milestones) != len(schedulers) - 1:
            raise ValueError(f"SequentialLR: needs one milestone fewer than schedulers, got {len(schedulers)} "
                             f"schedulers and {len(milestones)} milestones")
        if any(s.optimizer is not optimizer for s in schedulers):
            raise ValueError("SequentialLR: every scheduler must drive the optimizer given to SequentialLR")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"SequentialLR: milestones must be increasing, got {list(milestones)}")
        super().__init__(optimizer)
        self.schedulers = list(schedulers)
        self.milestones = [int(m) for m in milestones]
        for s in self.schedulers:  # each starts at its own step 0 when its turn comes
            s.iteration = 0
        self._set_lr(self.current().get_lr())

    def current(self) -> LRScheduler:
        """The scheduler in charge at the current step."""
        return self.schedulers[bisect.bisect_right(self.milestones, self.iteration)]

    def step(self) -> None:
        self.iteration += 1
        k = bisect.bisect_right(self.milestones, self.iteration)
        if k > 0 and self.milestones[k - 1] == self.iteration:
            self.schedulers[k].iteration = 0  # its turn starts: from its own beginning
        else:
            self.schedulers[k].iteration += 1
        self._set_lr(self.schedulers[k].get_lr())

    def get_lr(self) -> float:
        return self.current().get_lr()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["schedulers"] = [s.state_dict() for s in self.schedulers]
        return state

    def state_dict_errors(self, state_dict: dict[str, Any]) -> list[str]:
        errors = super().state_dict_errors(state_dict)
        if not errors and len(state_dict["schedulers"]) != len(self.schedulers):
            n = len(state_dict["schedulers"])
            errors = [f"SequentialLR state holds {n} schedulers, this one has {len(self.schedulers)}"]
        for s, d in zip(self.schedulers, state_dict.get("schedulers", []) if not errors else []):
            errors += s.state_dict_errors(d)
        return errors

    def _restore(self, state: dict[str, Any]) -> None:
        for s, d in zip(self.schedulers, state.pop("schedulers")):
            s.load_state_dict(d)
        super()._restore(state)
