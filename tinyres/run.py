"""The training loop behind `tinyres.train.train`: a run's config, its state between iterations, and its steps.

The loss and error of each iteration stay on the device; they are read in one transfer per
log window (every `log_every` iterations, and before an evaluation or a checkpoint), so a GPU
never waits for the host. Only the warm-up of deep nets reads the training error every
iteration, because it ends on it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import nn, optim
from .backend import get_array_module, to_device
from .checkpoint import load_checkpoint, required, save_checkpoint
from .data import CIFAR10, DataLoader, load_cifar10, per_pixel_mean, to_float, train_val_split
from .kernels import get_num_threads
from .models import count_parameters
from .nn import functional as F
from .progress import Progress, hms
from .rundir import RunDir, read_jsonl
from .tensor import Tensor, no_grad, tensor

__all__ = ["DivergenceError", "Interrupted", "ResumeError", "Run", "TrainConfig", "default_eval_every", "evaluate",
           "train_step"]

@dataclass
class TrainConfig:
    """Everything that defines a training run; the defaults are the paper's CIFAR-10 recipe."""

    depth: int = 20                 # 6n + 2 layers: 20, 32, 44, 56, 110, 1202
    plain: bool = False             # a plain net (no shortcuts) instead of a ResNet
    shortcut: str = "A"             # A: zero-padding identity, B: projections when shapes change, C: all projections
    iters: int = 64_000
    lr_schedule: str = "multistep"  # multistep: /lr_gamma at each milestone; onecycle: OneCycleLR up to lr; cosine
    milestones: tuple[int, ...] = (32_000, 48_000)
    lr: float = 0.1                 # the start (multistep, cosine) or the peak (onecycle)
    lr_gamma: float = 0.1
    pct_start: float = 0.3          # onecycle, cosine: the part of the run over which the lr rises
    anneal_strategy: str = "cos"    # onecycle: "cos" or "linear"
    div_factor: float = 25.0        # onecycle, cosine: the lr starts at lr / div_factor
    final_div_factor: float = 1e4   # onecycle: the lr ends at lr / div_factor / final_div_factor
    cycle_momentum: bool = True     # onecycle: momentum from `momentum` down to `base_momentum` and back
    base_momentum: float = 0.85
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    batch_size: int = 128
    warmup: bool | None = None      # None: warm up when depth >= 110, as the paper did for ResNet-110
    warmup_lr: float = 0.01
    warmup_iters: int = 400
    warmup_error: float = 0.8
    augment: bool = True
    val_split: bool = False         # train on 45k, evaluate on 5k held out from the training set
    val_size: int = 5000
    eval_every: int | None = None   # None: default_eval_every(iters)
    checkpoint_every: int | None = None   # iterations; None: every checkpoint_minutes of wall time
    checkpoint_minutes: float = 10.0
    log_every: int = 50             # iterations per row of the dense training curve (train_log.jsonl)
    eval_batch_size: int = 1000
    device: str = "cpu"
    data_path: str | None = None    # the CIFAR-10 archive; None: $TINYRES_DATA, else download
    seed: int = 0
    out: str = "runs/run"
    resume: bool = False
    prefetch: int = 0               # batches prepared ahead in a background thread
    sync_bn: bool = True            # under mpiexec: batch statistics over all ranks' images (else each rank's own)
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values."""
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


LR_SCHEDULES = ("multistep", "onecycle", "cosine")


def make_scheduler(optimizer: optim.Optimizer, cfg: TrainConfig, schedules: Any = optim.lr_scheduler) -> Any:
    """The learning-rate schedule `cfg` names, stepped once per iteration over `cfg.iters` iterations.

    multistep: the paper's, lr divided by `lr_gamma` at each milestone (with the warm-up of deep
    nets); onecycle: OneCycleLR peaking at `lr`; cosine: a linear rise from lr / div_factor over
    `pct_start` of the run, then half a cosine down to 0. The classes come from `schedules`:
    tinyres's, or `torch.optim.lr_scheduler`, whose names and arguments they share (the paper's
    warm-up, WarmupLR, is tinyres's alone).
    """
    if cfg.lr_schedule == "onecycle":
        return schedules.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.iters, pct_start=cfg.pct_start,
                                    anneal_strategy=cfg.anneal_strategy, cycle_momentum=cfg.cycle_momentum,
                                    base_momentum=cfg.base_momentum, max_momentum=cfg.momentum,
                                    div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor)
    if cfg.lr_schedule == "cosine":
        rise = round(cfg.pct_start * cfg.iters)
        cosine = schedules.CosineAnnealingLR(optimizer, T_max=cfg.iters - rise)
        if rise == 0:
            return cosine
        warmup = schedules.LinearLR(optimizer, 1 / cfg.div_factor, total_iters=rise)
        return schedules.SequentialLR(optimizer, [warmup, cosine], milestones=[rise])
    if cfg.lr_schedule != "multistep":
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    scheduler = schedules.MultiStepLR(optimizer, list(cfg.milestones), gamma=cfg.lr_gamma)
    if cfg.warmup if cfg.warmup is not None else cfg.depth >= 110:
        scheduler = optim.WarmupLR(optimizer, scheduler, warmup_lr=cfg.warmup_lr, until_iter=cfg.warmup_iters,
                                   until_error=cfg.warmup_error)
    return scheduler


# Table 6 of the paper: CIFAR-10 test error of the ResNets with option-A shortcuts
PAPER_TEST_ERROR = {20: 0.0875, 32: 0.0751, 44: 0.0717, 56: 0.0697, 110: 0.0643, 1202: 0.0793}


def error_targets(cfg: TrainConfig) -> list[float]:
    """The test errors whose first crossing a run reports: 10%, and the paper's figure for its net if it has one."""
    paper = PAPER_TEST_ERROR.get(cfg.depth) if not cfg.plain and cfg.shortcut == "A" else None
    return [0.10] + ([paper] if paper is not None else [])


def first_below(history: list[dict[str, Any]], error: float) -> dict[str, Any] | None:
    """The first evaluation row of `history` (metrics.jsonl) whose test error is below `error`, or None."""
    return next((row for row in history if row["test_err"] < error), None)


# resuming with a different network would load mismatched weights: these keys must agree
ARCH_KEYS = ("depth", "plain", "shortcut")
# the settings that define the learning-rate schedule (and a onecycle run's momentum): a change on resume rebuilds it
SCHEDULE_KEYS = ("lr_schedule", "iters", "milestones", "lr", "lr_gamma", "pct_start", "anneal_strategy", "div_factor",
                 "final_div_factor", "cycle_momentum", "base_momentum", "momentum", "warmup", "warmup_lr",
                 "warmup_iters", "warmup_error")
# a window's mean training loss this many times the first iteration's is worth a warning
LOSS_GROWTH = 10.0
# what a checkpoint's `extra` must hold to resume a run exactly
RESUME_KEYS = ("iteration", "config", "loader", "window", "smooth_err", "elapsed")


class DivergenceError(RuntimeError):
    """The training loss or the weights became NaN or infinite."""


class ResumeError(ValueError):
    """A run that cannot be resumed with the config given (another network)."""


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, mean: np.ndarray,
             batch_size: int = 1000, device: str = "cpu", std: np.ndarray | None = None,
             should_stop: Callable[[], bool] | None = None) -> tuple[float, float] | None:
    """Mean cross-entropy and error rate of `model` on uint8 NHWC `images`, in eval mode; None if
    `should_stop()` turned true between two batches."""
    n = len(images)
    if n == 0 or len(labels) != n:
        raise ValueError(f"evaluate: needs at least one image and a label for each, "
                         f"got {n} images and {len(labels)} labels")
    was_training = model.training
    model.eval()
    loss_sum, wrong = 0.0, 0
    try:
        with no_grad():
            for i in range(0, n, batch_size):
                if should_stop is not None and should_stop():
                    return None
                x = tensor(to_float(images[i:i + batch_size], mean, std), device=device)
                y = tensor(np.asarray(labels[i:i + batch_size], dtype=np.int64), device=device)
                logits = model(x)
                loss_sum += F.cross_entropy(logits, y).item() * len(y.data)
                wrong += int((logits.data.argmax(axis=1) != y.data).sum())
    finally:
        model.train(was_training)
    return loss_sum / n, wrong / n


def train_step(model: nn.Module, optimizer: optim.Optimizer, x: Tensor, y: Tensor) -> tuple[Any, Any]:
    """One optimizer step on the batch x (N, 3, H, W), y (N,); returns its loss and error rate as 0-d
    arrays that stay on the device (`float()` reads them).

    A NaN or infinite loss raises DivergenceError before the update, so the weights stay as they
    were. Checking it reads one number per step (on a GPU, a wait for the backward pass).
    """
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    checked = loss.data
    if isinstance(model, nn.parallel.DistributedDataParallel):  # the mean gradient of the ranks' parts of the batch,
        checked = model.reduce_gradients(loss.data)  # and of their losses: every rank takes the same step, or none
    if not bool(get_array_module(checked).isfinite(checked)):
        raise DivergenceError(f"the loss is {float(checked)}; this step's update was not made")
    optimizer.step()
    return loss.data, (logits.data.argmax(axis=1) != y.data).mean()


@dataclass
class Window:
    """Training loss and error summed over the iterations since a row was last logged."""

    loss: float = 0.0
    err: float = 0.0
    n: int = 0

    def add(self, loss: float, err: float) -> None:
        """Count one iteration."""
        self.loss, self.err, self.n = self.loss + loss, self.err + err, self.n + 1

    def means(self) -> tuple[float, float]:
        """(mean loss, mean error) of the window."""
        n = max(self.n, 1)
        return self.loss / n, self.err / n


def default_eval_every(iters: int) -> int:
    """Iterations between evaluations when not given: 1000 for the paper's 64k, 500 for shorter runs, at most `iters`.

    An evaluation of the 10k test images costs about as much as 25 training iterations, so
    500 keeps it near 5% of a run while a short run still gets a few test points.
    """
    return max(1, min(iters, max(500, iters // 64)))


class StopRequest:
    """Set by the first Ctrl-C or SIGTERM: the loop saves a checkpoint after this iteration and stops."""

    signal_name: str | None = None
    signum: int = signal.SIGINT


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after saving a checkpoint; `signum` says which (exit status 128 + signum)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Turn Ctrl-C and SIGTERM into a StopRequest while the block runs; a second signal stops at once."""
    stop = StopRequest()

    def handler(signum: int, frame: Any) -> None:
        if stop.signal_name is not None:
            raise KeyboardInterrupt
        stop.signal_name, stop.signum = signal.Signals(signum).name, signum
        print(f"\n{stop.signal_name}: saving a checkpoint after this iteration (Ctrl-C again to quit at once)",
              file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield stop
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def split_data(data: CIFAR10, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(train images, train labels, eval images, eval labels, "test" or "val") of a run."""
    train_x, train_y = data.train_images, np.asarray(data.train_labels, dtype=np.int64)
    if not config.val_split:
        return train_x, train_y, data.test_images, np.asarray(data.test_labels, dtype=np.int64), "test"
    # a fixed split (seed 0), so that runs with different seeds are compared on the same images
    tr, va = train_val_split(len(train_x), val_size=config.val_size, seed=0)
    return train_x[tr], train_y[tr], train_x[va], train_y[va], "val"


def check_same_arch(saved: dict[str, Any], config: TrainConfig, where: Any) -> None:
    """Refuse to resume a run of another network."""
    diff = [f"{k}: saved {saved.get(k)!r}, requested {getattr(config, k)!r}"
            for k in ARCH_KEYS if saved.get(k) != getattr(config, k)]
    if diff:
        raise ResumeError(f"cannot resume {where}: it holds a different network ({'; '.join(diff)}); "
                         "use the same --depth/--plain/--shortcut or another --out")


class Run:
    """One training run. Its state is made in `__init__` (what needs no data) and `prepare` (the
    data, and the counters of a resumed run); `loop` then calls, per iteration, `step` and
    `log_save_or_stop`. The methods below follow that order."""

    def __init__(self, config: TrainConfig, model: nn.Module, name: str):
        cfg = self.cfg = config
        self.model, self.name = model, name
        self.dir = RunDir(cfg.out)
        self.eval_every = cfg.eval_every or default_eval_every(cfg.iters)
        self.optimizer = optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   nesterov=cfg.nesterov)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        # the data, set by prepare()
        self.loader: DataLoader | None = None
        self.mean: np.ndarray | None = None            # the per-pixel mean subtracted from every image
        self.eval_x: np.ndarray | None = None
        self.eval_y: np.ndarray | None = None
        self.split = "test"                            # or "val": what eval_x holds
        # where the run stands: saved in every checkpoint, set again by _restore()
        self.it, self.elapsed_before, self.smooth_err = 0, 0.0, 1.0
        self.eval_window, self.log_window = Window(), Window()
        # this process's bookkeeping
        self.pending: list[tuple[float, Any, Any]] = []  # (lr, loss, err) of iterations not yet read
        self.lr_used = 0.0                               # the lr of the newest iteration read
        self.start_loss: float | None = None             # the first iteration's loss: the yardstick of watch_loss
        self.warned_growth = False
        self.last_saved: tuple[int, Any] | None = None   # (iteration, path) of the newest good checkpoint
        self.eval_pending = False  # an evaluation due at this iteration that a stop request left undone
        self.last_save_time = time.monotonic()
        self.t_start = time.perf_counter()               # elapsed() counts from here; loop() restarts it
        self.progress = Progress(cfg.iters, enabled=False)  # silent until loop() shows a live one

    # ---- building and restoring ----------------------------------------------------------
    def prepare(self, data: CIFAR10 | None) -> None:
        """Data, per-pixel mean and loader; then a fresh start, or the newest checkpoint that loads."""
        cfg = self.cfg
        resuming = self._check_out_dir()
        train_x, train_y, self.eval_x, self.eval_y, self.split = split_data(
            data if data is not None else load_cifar10(cfg.data_path), cfg)
        if resuming and self.dir.mean.exists():
            self.mean = np.load(self.dir.mean)
        else:
            self.mean = per_pixel_mean(train_x).astype(np.float32)
        self.loader = DataLoader(train_x, train_y, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                 augment=cfg.augment, mean=self.mean, seed=cfg.seed, prefetch=cfg.prefetch)
        if resuming:
            self._restore()
            return
        self.dir.start(cfg.to_dict(), self.mean)
        if cfg.resume:
            self.say(f"no checkpoint in {self.dir.out} to resume: starting from scratch")
        self.say(f"{count_parameters(self.model):,} parameters, {len(train_x):,} training images, {len(self.eval_x):,} {self.split} "
                 f"images, {cfg.iters:,} iterations on {cfg.device}; out: {self.dir.out}")

    def _check_out_dir(self) -> bool:
        """Whether this run resumes; refuse to overwrite a run, or to resume another network."""
        found = self.dir.checkpoints()
        if found and not self.cfg.resume:
            raise FileExistsError(f"{found[0]} already exists: resume it (resume=True, --resume) "
                                  "or choose another out dir")
        if found and self.dir.config.exists():
            check_same_arch(json.loads(self.dir.config.read_text()), self.cfg, self.dir.out)
        return bool(found)

    def _load(self, path: Any) -> dict[str, Any]:
        extra = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        for key in RESUME_KEYS:
            required(extra, key, path)
        return extra

    def _restore(self) -> None:
        extra = self.dir.load_checkpoint(self._load, self.say)
        check_same_arch(extra["config"], self.cfg, self.dir.checkpoint)
        self.it, self.elapsed_before = int(extra["iteration"]), float(extra["elapsed"])
        self.eval_window, self.smooth_err = Window(**extra["window"]), float(extra["smooth_err"])
        self.log_window = Window(**extra.get("log_window", {}))  # older checkpoints have no dense log
        self.start_loss = extra.get("start_loss")
        self.loader.load_state_dict(extra["loader"])
        self.last_saved = (self.it, self.dir.checkpoint)
        self.eval_pending = bool(extra.get("eval_pending", False))
        self.lr_used = float(extra.get("lr_used", 0.0))  # the lr of the last iteration, which a pending row shows
        self.dir.roll_back(self.it, evaluated=not self.eval_pending)
        self._apply_changed_config(extra["config"])

    def _apply_changed_config(self, saved: dict[str, Any]) -> None:
        """Give the restored optimizer and schedule this config's settings, and record them in config.json.

        Restoring set them as they were saved; a config given on resume may change the schedule
        (its kind, lr, milestones, length, ...), momentum and weight decay from here on. A changed
        schedule is built anew and stepped to this iteration, as if the run had used it from the
        start; an unchanged one is left exactly as it was restored.
        """
        cfg, now = self.cfg, self.cfg.to_dict()
        # a setting the checkpoint's config lacks came in later: the run was made with its default
        saved = {**TrainConfig().to_dict(), **saved}
        group = self.optimizer.param_groups[0]
        group["momentum"], group["weight_decay"] = float(cfg.momentum), float(cfg.weight_decay)
        group["nesterov"] = bool(cfg.nesterov)
        if any(saved.get(k) != now[k] for k in SCHEDULE_KEYS):
            restored = self.scheduler
            self.optimizer.initial_lr, self.optimizer.lr = None, float(cfg.lr)  # as a fresh optimizer has them
            self.scheduler = make_scheduler(self.optimizer, cfg)
            for _ in range(min(self.it, cfg.iters)):
                self.scheduler.step()
            if isinstance(self.scheduler, optim.WarmupLR):  # the warm-up ends on the training error it saw
                self.scheduler.warming_up = bool(getattr(restored, "warming_up", False))
                self.scheduler._set_lr(self.scheduler.get_lr())
        else:  # set the lr again, and the momentum a onecycle schedule cycles: exactly as restored
            self.scheduler._set_lr(self.scheduler.last_lr)
        changed = [k for k in now if k not in ("resume", "progress") and saved.get(k) != now[k]]
        if changed:
            self.say("changed on resume: " + ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed))
            self.dir.write_config(now)

    def say(self, text: str) -> None:
        """A line about the run on stderr (unless progress output is off)."""
        if self.cfg.progress:
            print(f"[{self.name}] {text}", file=sys.stderr, flush=True)

    # ---- the loop --------------------------------------------------------------------------
    def loop(self, on_iteration: Callable[[int, float], None] | None = None) -> None:
        """Train from the current iteration to the end, or until Ctrl-C/SIGTERM (then save and raise)."""
        cfg = self.cfg
        self.progress = Progress(cfg.iters, cfg.progress, initial=self.it, batch_size=cfg.batch_size)
        self.t_start = time.perf_counter()
        batches = self.loader.stream()  # endless, from the saved position on
        try:
            with stop_requests() as stop:
                if self.eval_pending:  # left undone by the stop request that ended the last process
                    self.eval_pending = not self.log_evaluation()
                    if self.it >= cfg.iters:
                        self.save()
                self.model.train()
                while self.it < cfg.iters:
                    xb, yb = next(batches)
                    loss = self.step(tensor(xb, device=cfg.device), tensor(yb, device=cfg.device))
                    self.progress.update(self.it)
                    if on_iteration is not None:
                        on_iteration(self.it, float(loss))
                    self.log_save_or_stop(stop)
        finally:
            self.progress.close()
            batches.close()  # stops the prefetch thread, if any

    def step(self, x: Tensor, y: Tensor) -> Any:
        """One iteration: an optimizer step and the schedule's step; returns the loss (on the device)."""
        lr = self.optimizer.lr
        try:
            loss, err = train_step(self.model, self.optimizer, x, y)
        except DivergenceError as e:
            self.read_pending()
            self.diverged(f"{e} at iteration {self.it + 1}")
        self.pending.append((lr, loss, err))
        self.it += 1
        if getattr(self.scheduler, "warming_up", False):
            self.read_pending()  # the warm-up ends on the training error: it is read every iteration
            self.scheduler.step(train_error=self.smooth_err)
        else:
            self.scheduler.step()
        return loss

    def log_save_or_stop(self, stop: StopRequest) -> None:
        """Log, evaluate and checkpoint when due; after a stop request, save and raise `Interrupted`.

        A stop request saves first: an evaluation that is due (or that the request cut short) is
        left to the resumed run, which makes it before its first iteration, so that the process
        ends within a scheduler's grace period and the logs come out as in an unbroken run.
        """
        it, end = self.it, self.it == self.cfg.iters
        if it % self.cfg.log_every == 0 or end:
            self.log_training()
        if it % self.eval_every == 0 or end:
            self.eval_pending = bool(stop.signal_name) or not self.log_evaluation(lambda: stop.signal_name is not None)
        if end or stop.signal_name or self._checkpoint_due():
            self.save()
        if stop.signal_name:
            raise Interrupted(f"{stop.signal_name}: interrupted at iteration {it}; checkpoint saved to "
                              f"{self.dir.checkpoint} (resume with resume=True / --resume)", stop.signum)

    def _checkpoint_due(self) -> bool:
        if self.cfg.checkpoint_every:
            return self.it % self.cfg.checkpoint_every == 0
        return time.monotonic() - self.last_save_time >= 60 * self.cfg.checkpoint_minutes

    def read_pending(self) -> None:
        """Read the losses and errors of the pending iterations from the device, in one transfer.

        They are finite: `train_step` stops the run at a non-finite loss before its update."""
        if not self.pending:
            return
        values = self.pending_values()
        first = self.it - len(self.pending) + 1
        for k, ((lr, _, _), (loss, err)) in enumerate(zip(self.pending, values.tolist())):
            if self.start_loss is None:
                self.start_loss = loss
            self.eval_window.add(loss, err)
            self.log_window.add(loss, err)
            self.smooth_err = err if first + k == 1 else 0.9 * self.smooth_err + 0.1 * err
            self.lr_used = lr
        self.pending.clear()

    def pending_values(self) -> np.ndarray:
        """(loss, error) of each pending iteration, as a float64 (n, 2) array on the host."""
        xp = get_array_module(self.pending[0][1])
        values = xp.stack([xp.asarray(v, dtype=xp.float64) for _, *pair in self.pending for v in pair])
        return to_device(values, "cpu").reshape(-1, 2)

    def diverged(self, what: str) -> None:
        """Stop with a DivergenceError that names the newest checkpoint holding finite weights."""
        where = (f"the last good checkpoint is {self.last_saved[1]} (iteration {self.last_saved[0]})"
                 if self.last_saved is not None else "no checkpoint was saved")
        raise DivergenceError(f"training diverged: {what}; {where}. Try a lower learning rate (resume with --lr) "
                              "or a warm-up.")

    def watch_loss(self, loss: float) -> None:
        """Say once when a window's mean training loss has grown to LOSS_GROWTH times the first iteration's."""
        if self.start_loss is None or self.warned_growth or not loss > LOSS_GROWTH * self.start_loss:
            return
        self.warned_growth = True
        text = (f"[{self.name}] warning: the training loss is {loss:.4g} at iteration {self.it}, "
                f"{loss / self.start_loss:.3g} times its start ({self.start_loss:.4g}): training is diverging; "
                "a lower learning rate (--lr) may help")
        if self.cfg.progress:
            self.progress.log(text)
        else:  # a warning is not progress output: it is shown even then
            print(text, file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        """Wall time of the whole run so far, across resumes."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    # ---- logging and saving ------------------------------------------------------------------
    def log_training(self) -> None:
        """One row of the dense training curve (train_log.jsonl): the window since the last row."""
        self.read_pending()
        loss, err = self.log_window.means()
        self.dir.append(self.dir.train_log, {"iter": self.it, "lr": self.lr_used, "train_loss": loss,
                                             "train_err": err, "elapsed": round(self.elapsed(), 3)})
        self.progress.set_stats(self.lr_used, loss, err)
        self.log_window = Window()
        self.watch_loss(loss)

    def log_evaluation(self, should_stop: Callable[[], bool] | None = None) -> bool:
        """Evaluate, and log one row of metrics.jsonl with the training averages since the last one;
        False (and nothing logged) if `should_stop()` cut the evaluation short."""
        self.read_pending()
        result = self.evaluate(should_stop)
        if result is None:
            return False
        test_loss, test_err = result
        train_loss, train_err = self.eval_window.means()
        row = {"iter": self.it, "lr": self.lr_used, "train_loss": train_loss, "train_err": train_err,
               "test_loss": test_loss, "test_err": test_err, "split": self.split,
               "elapsed": round(self.elapsed(), 3), "threads": get_num_threads()}
        history = read_jsonl(self.dir.metrics)  # the evaluations before this one, across resumes
        crossed = [e for e in error_targets(self.cfg) if test_err < e and first_below(history, e) is None]
        if crossed:
            row["first_below"] = crossed  # time to accuracy: the first evaluation under each target error
        self.dir.append(self.dir.metrics, row)
        s = self.split
        self.progress.log(f"[{self.name}] iter {self.it}: lr {self.lr_used:.4g}  train loss {train_loss:.4f}  "
                          f"train err {100 * train_err:.2f}%  {s} loss {test_loss:.4f}  {s} err {100 * test_err:.2f}%"
                          f"  ({hms(row['elapsed'])} elapsed)")
        for e in crossed:
            self.progress.log(f"[{self.name}] {s} error below {100 * e:.2f}% for the first time: iteration {self.it:,}, "
                              f"{hms(row['elapsed'])} into the run")
        self.eval_window = Window()
        self.progress.pause()
        return True

    def evaluate(self, should_stop: Callable[[], bool] | None = None) -> tuple[float, float] | None:
        """Loss and error on the evaluation images; None if `should_stop()` cut the evaluation short."""
        return evaluate(self.model, self.eval_x, self.eval_y, self.mean, self.cfg.eval_batch_size, self.cfg.device,
                        should_stop=should_stop)

    def save(self) -> None:
        """Checkpoint the run, keeping the previous checkpoint; never one with NaN or infinite weights."""
        self.read_pending()
        arrays = [p.data for p in self.model.parameters()] + list(self.model.buffers())
        if not all(bool(get_array_module(a).isfinite(a).all()) for a in arrays):
            self.diverged(f"the weights are NaN or infinite at iteration {self.it}")
        # the config and the mean image make the checkpoint enough to classify images (examples/predict.py)
        extra = {"iteration": self.it, "config": self.cfg.to_dict(), "mean": self.mean,
                 "loader": self.loader.state_dict(),
                 "window": asdict(self.eval_window), "log_window": asdict(self.log_window),
                 "smooth_err": self.smooth_err, "start_loss": self.start_loss, "elapsed": self.elapsed(),
                 "eval_pending": self.eval_pending, "lr_used": self.lr_used, "finished": self.it >= self.cfg.iters}
        self.dir.save_checkpoint(lambda path: save_checkpoint(path, self.model, self.optimizer, self.scheduler,
                                                              extra=extra))
        self.last_saved, self.last_save_time = (self.it, self.dir.checkpoint), time.monotonic()
        self.progress.pause()
