"""A training run over the ranks of an MPI job: what differs from one process (`tinyres.run.Run`).

Every rank holds the whole model and optimizer and takes the same steps: it trains on its part
of every batch, in the order one process would see them, and evaluates its part of the
evaluation images. Rank 0 alone writes the run's files and prints; to resume, every rank reads
the same checkpoint, so the out dir must be on a file system that all ranks see.

Whatever ends in communication happens on all ranks or on none, else one rank would wait for
the others forever: a stop request (Ctrl-C, SIGTERM) or a checkpoint falling due by the clock
on one rank is shared with all of them every iteration, in one small all-reduce.
"""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

import numpy as np

from . import distributed as dist
from .data import CIFAR10
from .nn import Module
from .nn.parallel import DistributedDataParallel
from .run import Run, StopRequest, TrainConfig, evaluate
from .rundir import RunDir

__all__ = ["DistributedRun"]


class _Unwritten(RunDir):
    """The run's files as the ranks other than 0 see them: read, never written."""

    def start(self, config: dict[str, Any], mean: np.ndarray) -> None:
        pass

    def append(self, path: Any, row: dict[str, Any]) -> None:
        pass

    def write_config(self, config: dict[str, Any]) -> None:
        pass

    def roll_back(self, iteration: int, evaluated: bool = True) -> None:
        pass

    def save_checkpoint(self, save: Any) -> None:
        pass


class DistributedRun(Run):
    """One training run shared by the ranks of the job, each with its part of every batch."""

    def __init__(self, config: TrainConfig, model: DistributedDataParallel, name: str):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if config.batch_size % self.world_size:
            raise ValueError(f"a batch of {config.batch_size} cannot be split evenly over {self.world_size} "
                             "processes: choose a batch size that is a multiple of the number of processes")
        if self.rank != 0:
            config = dataclasses.replace(config, progress=False)
        super().__init__(config, model, name)
        if self.rank != 0:
            self.dir = _Unwritten(config.out)
        self.checkpoint_due = False

    def prepare(self, data: CIFAR10 | None) -> None:
        """As one process; then this rank's part of every batch, and a check that all ranks start alike."""
        super().prepare(data)
        self.loader.split(self.world_size, self.rank)
        its = np.array([self.it, -self.it], dtype=np.int64)
        dist.all_reduce(its, dist.ReduceOp.MAX)
        if its[0] != -its[1]:
            raise RuntimeError(f"the ranks would start at different iterations ({-its[1]} to {its[0]}): "
                               f"{self.dir.out} must be on a file system that every rank sees")

    def log_save_or_stop(self, stop: StopRequest) -> None:
        """As one process, on what the ranks agree: a stop request or a checkpoint due on any rank."""
        flags = np.array([stop.signum if stop.signal_name else 0, super()._checkpoint_due()], dtype=np.int64)
        dist.all_reduce(flags, dist.ReduceOp.MAX)
        agreed = StopRequest()  # not `stop`: a signal may set it now, after the ranks agreed
        if flags[0]:
            agreed.signum = int(flags[0])
            agreed.signal_name = stop.signal_name or f"{signal.Signals(agreed.signum).name} to another rank"
        self.checkpoint_due = bool(flags[1])
        super().log_save_or_stop(agreed)

    def _checkpoint_due(self) -> bool:
        return self.checkpoint_due

    def pending_values(self) -> np.ndarray:
        """The pending losses and errors, averaged over the ranks: those of the whole batches."""
        values = super().pending_values()
        if self.world_size > 1:
            dist.all_reduce(values, dist.ReduceOp.SUM)
            values /= self.world_size
        return values

    def evaluate(self, should_stop: Any = None) -> tuple[float, float]:
        """Loss and error on the evaluation images, each rank evaluating a part of them.

        A stop request waits for the end of it (`should_stop` is not asked): the ranks would have
        to agree on it after every batch."""
        model: Module = self.model
        if isinstance(model, DistributedDataParallel):
            model.sync_buffers()  # with per-rank batch norm, every rank evaluates with rank 0's statistics
        n = len(self.eval_x)
        part = slice(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)
        m = part.stop - part.start
        loss, err = (evaluate(model, self.eval_x[part], self.eval_y[part], self.mean, self.cfg.eval_batch_size,
                              self.cfg.device) if m else (0.0, 0.0))
        sums = dist.all_reduce(np.array([loss * m, err * m]), dist.ReduceOp.SUM)
        return float(sums[0] / n), float(sums[1] / n)

    def save(self) -> None:
        """Rank 0 saves the checkpoint; no rank goes on (or stops) before it is on disk."""
        super().save()
        dist.barrier()
