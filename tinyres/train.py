"""Train a CIFAR-10 ResNet the way He et al. (2015) did, with resumable checkpoints.

`train(TrainConfig())` follows the paper's recipe (section 4.2): ResNet-20 with option-A
shortcuts, batch 128, SGD with momentum 0.9 and weight decay 1e-4, learning rate 0.1 divided
by 10 at 32k and 48k iterations, 64k iterations in all, He initialization, per-pixel mean
subtraction, 4-pixel pad / random 32x32 crop / horizontal flip, trained on the 50k training
images and tested on the 10k test images. Nets of 110 layers or more warm up at lr 0.01 until
the training error is below 80% (at most 400 iterations).

The out dir (see `tinyres.rundir`) holds the config, the per-pixel mean, the evaluations, a
dense training curve and the two newest checkpoints, so `TrainConfig(resume=True)` continues
a run exactly where it stopped. Checkpoints are written every 10 minutes (or every
`checkpoint_every` iterations), at the end, and on Ctrl-C or SIGTERM.

After `tinyres.distributed.init_process_group()` (under mpiexec), `train` shares each batch
among the ranks (`tinyres.distributed_run`); its files are the same as one process's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import distributed, models, nn
from .backend import cuda_available, gpu_status
from .data import CIFAR10
from .distributed_run import DistributedRun
from .models import count_parameters
from .nn import init
from .progress import Progress
from .run import DivergenceError, Run, TrainConfig, default_eval_every, error_targets, evaluate, first_below, train_step
from .rundir import RunDir, read_jsonl

__all__ = [
    "DivergenceError",
    "Progress",
    "TrainConfig",
    "build_model",
    "count_parameters",
    "default_eval_every",
    "error_targets",
    "evaluate",
    "first_below",
    "load_run_config",
    "model_name",
    "read_metrics",
    "read_train_log",
    "schedule_preset",
    "train",
    "train_step",
]


# ---- building blocks ---------------------------------------------------------------------

def build_model(depth: int, plain: bool = False, shortcut: str = "A") -> nn.Module:
    """The CIFAR-10 net of the paper: a ResNet (shortcut A/B/C) or a plain net of `depth` layers."""
    return models.cifar_plain(depth) if plain else models.cifar_resnet(depth, shortcut=shortcut)


def model_name(depth: int, plain: bool = False, shortcut: str = "A") -> str:
    """A figure label: 'plain-20', 'ResNet-56', 'ResNet-56 (B)'."""
    if plain:
        return f"plain-{depth}"
    return f"ResNet-{depth}" + ("" if shortcut.upper() == "A" else f" ({shortcut.upper()})")


# ---- the run -------------------------------------------------------------------------------

def train(config: TrainConfig, data: CIFAR10 | None = None,
          on_iteration: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the run `config` describes and return its final metrics.

    `data` is an in-memory data set with `train_images`/`train_labels`/`test_images`/`test_labels`
    (uint8 NHWC images, int labels); when None, CIFAR-10 is loaded from `config.data_path`.
    `on_iteration(iteration, loss)` is called after every iteration's update (reading the loss
    waits for the device). Raises `DivergenceError` on a NaN/inf loss or weights, and
    `KeyboardInterrupt` after saving a checkpoint on Ctrl-C or SIGTERM.
    """
    if config.device.startswith("cuda") and not cuda_available():
        raise RuntimeError(f"device {config.device!r} requested, but CuPy with a usable GPU is not available: "
                           f"{gpu_status().reason} (or use device 'cpu')")
    init.manual_seed(config.seed)  # the initial weights depend on the seed alone
    model = build_model(config.depth, config.plain, config.shortcut).to(config.device)
    name = model_name(config.depth, config.plain, config.shortcut)
    if distributed.is_initialized():  # under mpiexec: each rank trains on its part of every batch
        if config.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        run: Run = DistributedRun(config, nn.parallel.DistributedDataParallel(model), name)
    else:
        run = Run(config, model, name)
    run.prepare(data)  # data, optimizer, schedule, loader: fresh, or restored from the newest checkpoint
    if run.it < config.iters or run.eval_pending:
        run.loop(on_iteration)
    history = read_metrics(config.out)
    return {**(history[-1] if history else {}), "name": run.name, "iterations": run.it,
            "params": count_parameters(run.model), "out": str(config.out),
            "checkpoint": str(RunDir(config.out).checkpoint), "history": history}


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The evaluations logged in `out`/metrics.jsonl, in order (empty if none)."""
    return read_jsonl(RunDir(out).metrics)


def read_train_log(out: str | Path) -> list[dict[str, Any]]:
    """The dense training curve in `out`/train_log.jsonl: iter, lr, train_loss, train_err per `log_every` window."""
    return read_jsonl(RunDir(out).train_log)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig saved in `run_dir`/config.json (unknown keys are ignored)."""
    d = json.loads((Path(run_dir) / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    d = {k: v for k, v in d.items() if k in names}
    if "milestones" in d:
        d["milestones"] = tuple(d["milestones"])
    return TrainConfig(**d)


# The named schedules: the TrainConfig fields each sets; the rest keep the paper's values.
# paper: section 4.2 of the paper. short: the same shape in 2k iterations, a first look.
# fast: one cycle of the learning rate (Smith & Topin, 2017) in a quarter of the paper's iterations, with
# the paper's network, data, augmentation, batch and SGD with momentum; its peak lr, rise, momenta, Nesterov
# and weight decay are measured on a held-out 5k split, trial by trial (examples/results/fast/README.md).
SCHEDULES: dict[str, dict[str, Any]] = {
    "paper": {"iters": 64_000, "lr_schedule": "multistep", "milestones": (32_000, 48_000)},
    "short": {"iters": 2_000, "lr_schedule": "multistep", "milestones": (1_500, 1_900)},
    "fast": {"iters": 15_000, "lr_schedule": "onecycle", "milestones": (), "lr": 0.2, "pct_start": 0.25,
             "anneal_strategy": "cos", "momentum": 0.95, "base_momentum": 0.85, "nesterov": True,
             "weight_decay": 5e-4},
}


def schedule_preset(name: str) -> dict[str, Any]:
    """The TrainConfig fields that the named schedule ('paper', 'short' or 'fast') sets."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    return dict(SCHEDULES[name])

