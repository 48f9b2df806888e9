"""Train a CIFAR-10 ResNet the way He et al. (2015) did, with resumable checkpoints.

`train(TrainConfig())` follows the paper's recipe (section 4.2): ResNet-20 with option-A
shortcuts, batch 128, SGD with momentum 0.9 and weight decay 1e-4, learning rate 0.1 divided
by 10 at 32k and 48k iterations, 64k iterations in all, He initialization, per-pixel mean
subtraction, 4-pixel pad / random 32x32 crop / horizontal flip, trained on the 50k training
images and tested on the 10k test images. Nets of 110 layers or more warm up at lr 0.01 until
the training error is below 80% (at most 400 iterations).

The out dir holds `config.json` (written once), `mean.npy` (the per-pixel mean, needed to
classify new images), `metrics.jsonl` (one line per evaluation) and `checkpoint.npz` (model,
optimizer, scheduler, iteration, data-loader position and RNG states, written atomically), so
`TrainConfig(resume=True)` continues a run exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import checkpoint as ckpt
from . import models, nn, optim
from .backend import cuda_available
from .data import CIFAR10, DataLoader, load_cifar10, per_pixel_mean, to_float, train_val_split
from .nn import functional as F
from .nn import init
from .tensor import Tensor, no_grad, tensor

__all__ = [
    "DivergenceError",
    "Progress",
    "TrainConfig",
    "build_model",
    "count_parameters",
    "evaluate",
    "load_run_config",
    "model_name",
    "paper_schedule",
    "read_metrics",
    "train",
    "train_step",
]

# resuming with a different network would load mismatched weights: these keys must agree
ARCH_KEYS = ("depth", "plain", "shortcut")


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; the defaults are the paper's CIFAR-10 recipe."""

    depth: int = 20                 # 6n + 2 layers: 20, 32, 44, 56, 110, 1202
    plain: bool = False             # a plain net (no shortcuts) instead of a ResNet
    shortcut: str = "A"             # A: zero-padding identity, B: projections when shapes change, C: all projections
    iters: int = 64_000
    milestones: tuple[int, ...] = (32_000, 48_000)
    lr: float = 0.1
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    warmup: bool | None = None      # None: warm up when depth >= 110, as the paper did for ResNet-110
    warmup_lr: float = 0.01
    warmup_iters: int = 400
    warmup_error: float = 0.8
    augment: bool = True
    val_split: bool = False         # train on 45k, evaluate on 5k held out from the training set
    val_size: int = 5000
    eval_every: int = 1000
    checkpoint_every: int = 1000
    eval_batch_size: int = 1000
    device: str = "cpu"
    data_path: str | None = None    # the CIFAR-10 archive; None: $TINYRES_DATA, else download
    seed: int = 0
    out: str = "runs/run"
    resume: bool = False
    prefetch: int = 0               # batches prepared ahead in a background thread
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values."""
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


# ---- evaluation --------------------------------------------------------------------------

def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, mean: np.ndarray,
             batch_size: int = 1000, device: str = "cpu", std: np.ndarray | None = None) -> tuple[float, float]:
    """Mean cross-entropy and error rate of `model` on uint8 NHWC `images`, in eval mode."""
    was_training = model.training
    model.eval()
    n, loss_sum, wrong = len(images), 0.0, 0
    try:
        with no_grad():
            for i in range(0, n, batch_size):
                x = tensor(to_float(images[i:i + batch_size], mean, std), device=device)
                y = tensor(np.asarray(labels[i:i + batch_size], dtype=np.int64), device=device)
                logits = model(x)
                loss_sum += F.cross_entropy(logits, y).item() * len(y.data)
                wrong += int((logits.data.argmax(axis=1) != y.data).sum())
    finally:
        if was_training:
            model.train()
    return loss_sum / max(n, 1), wrong / max(n, 1)


# ---- building blocks of a run ------------------------------------------------------------

def build_model(depth: int, plain: bool = False, shortcut: str = "A") -> nn.Module:
    """The CIFAR-10 net of the paper: a ResNet (shortcut A/B/C) or a plain net of `depth` layers."""
    return models.cifar_plain(depth) if plain else models.cifar_resnet(depth, shortcut=shortcut)


def model_name(depth: int, plain: bool = False, shortcut: str = "A") -> str:
    """A figure label: 'plain-20', 'ResNet-56', 'ResNet-56 (B)'."""
    if plain:
        return f"plain-{depth}"
    return f"ResNet-{depth}" + ("" if shortcut.upper() == "A" else f" ({shortcut.upper()})")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in `model`."""
    return int(sum(p.data.size for p in model.parameters()))


def _rng_states() -> dict[str, Any]:
    """Python's, NumPy's and the initializers' RNG states as JSON values.

    Training itself draws from none of them (the loader derives its shuffles and crops from its
    position), but saving them keeps a resumed process identical to an uninterrupted one.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pstate, pgauss = random.getstate()
    return {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(pstate), pgauss],
            "init": _jsonable(init.default_generator().bit_generator.state)}


def _set_rng_states(states: dict[str, Any]) -> None:
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, pstate, pgauss = states["python"]
    random.setstate((version, tuple(pstate), pgauss))
    init.default_generator().bit_generator.state = states["init"]


def _jsonable(obj: Any) -> Any:
    """`obj` with NumPy scalars and arrays turned into Python numbers and lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The evaluations logged in `out`/metrics.jsonl, in order (empty if none)."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: the checkpoint predates it anyway
            break
    return rows


def _truncate_metrics(out: Path, iteration: int) -> None:
    """Drop logged evaluations after `iteration`: the resumed run will redo them."""
    rows = [r for r in read_metrics(out) if r["iter"] <= iteration]
    _write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())


def _check_same_arch(saved: dict[str, Any], config: TrainConfig, where: Path) -> None:
    diff = [f"{k}: saved {saved.get(k)!r}, requested {getattr(config, k)!r}"
            for k in ARCH_KEYS if saved.get(k) != getattr(config, k)]
    if diff:
        raise ValueError(f"cannot resume {where}: it holds a different network ({'; '.join(diff)}); "
                         "use the same --depth/--plain/--shortcut or another --out")


class Progress:
    """A status line on stderr: redrawn in place on a terminal, printed once per evaluation otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_draw = 0.0
        self.line = ""

    def update(self, it: int, lr: float, loss: float, err: float, ips: float, eta: float) -> None:
        """Record the latest training statistics (redrawn at most 5 times a second on a terminal)."""
        self.line = (f"iter {it}/{self.total}  lr {lr:.4g}  loss {loss:.4f}  train err {100 * err:5.2f}%  "
                     f"{ips:,.0f} img/s  ETA {_hms(eta)}")
        now = time.monotonic()
        if self.tty and (now - self.last_draw > 0.2 or it == self.total):
            self.stream.write("\r" + self.line + "\x1b[K")
            self.stream.flush()
            self.last_draw = now

    def log(self, text: str) -> None:
        """Print a line that stays (an evaluation), keeping the status line below it on a terminal."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[K" + text + "\n" + self.line)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the status line on a terminal."""
        if self.tty and self.line:
            self.stream.write("\n")
            self.stream.flush()
        self.line = ""


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


# ---- the training loop -------------------------------------------------------------------

def train_step(model: nn.Module, optimizer: optim.Optimizer, x: Tensor, y: Tensor) -> tuple[float, float]:
    """One SGD step on the batch x (N, 3, H, W), y (N,); returns its loss and error rate.

    A NaN or infinite loss is returned without updating the weights, so that the caller can
    stop with the last good weights intact.
    """
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss_value = loss.item()
    if math.isfinite(loss_value):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss_value, float((logits.data.argmax(axis=1) != y.data).mean())


def _split(data: CIFAR10, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(train images, train labels, eval images, eval labels, "test" or "val") of a run."""
    train_x, train_y = data.train_images, np.asarray(data.train_labels, dtype=np.int64)
    if not config.val_split:
        return train_x, train_y, data.test_images, np.asarray(data.test_labels, dtype=np.int64), "test"
    # a fixed split (seed 0), so that runs with different seeds are compared on the same images
    tr, va = train_val_split(len(train_x), val_size=config.val_size, seed=0)
    return train_x[tr], train_y[tr], train_x[va], train_y[va], "val"


def train(config: TrainConfig, data: CIFAR10 | None = None,
          on_iteration: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the run `config` describes and return its final metrics.

    `data` is an in-memory data set with `train_images`/`train_labels`/`test_images`/`test_labels`
    (uint8 NHWC images, int labels); when None, CIFAR-10 is loaded from `config.data_path`.
    `on_iteration(iteration, loss)` is called after every iteration's update.
    Raises `DivergenceError` on a NaN/inf loss and `KeyboardInterrupt` after saving a
    checkpoint on Ctrl-C.
    """
    cfg = config
    device = cfg.device
    if device.startswith("cuda") and not cuda_available():
        raise RuntimeError(f"device {device!r} requested, but CuPy with a usable GPU is not available "
                           "(pip install 'tinyres[cuda]', or use device 'cpu')")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.npz"
    resuming = cfg.resume and ckpt_path.exists()
    if ckpt_path.exists() and not cfg.resume:
        raise FileExistsError(f"{ckpt_path} already exists: resume it (resume=True, --resume) "
                              "or choose another out dir")
    if resuming and (out / "config.json").exists():
        _check_same_arch(json.loads((out / "config.json").read_text()), cfg, out)

    # ---- data: 50k train / 10k test, or 45k / 5k held out ----
    train_x, train_y, eval_x, eval_y, split = _split(data if data is not None else load_cifar10(cfg.data_path), cfg)
    mean_path = out / "mean.npy"
    if resuming and mean_path.exists():
        mean = np.load(mean_path)
    else:
        mean = per_pixel_mean(train_x).astype(np.float32)

    # ---- model, optimizer, schedule, loader ----
    init.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg.depth, cfg.plain, cfg.shortcut).to(device)
    optimizer = optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    scheduler = optim.MultiStepLR(optimizer, list(cfg.milestones), gamma=cfg.lr_gamma)
    warmup = cfg.warmup if cfg.warmup is not None else cfg.depth >= 110
    if warmup:
        scheduler = optim.WarmupLR(optimizer, scheduler, warmup_lr=cfg.warmup_lr,
                                   until_iter=cfg.warmup_iters, until_error=cfg.warmup_error)
    loader = DataLoader(train_x, train_y, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        augment=cfg.augment, mean=mean, seed=cfg.seed, prefetch=cfg.prefetch)

    # ---- fresh start or resume ----
    it, elapsed_before, last_ckpt = 0, 0.0, None
    window = {"loss": 0.0, "err": 0.0, "n": 0}  # training loss/error summed since the last evaluation
    smooth_err = 1.0                            # running training error that ends the warm-up
    if resuming:
        extra = ckpt.load_checkpoint(ckpt_path, model, optimizer, scheduler)
        _check_same_arch(extra["config"], cfg, ckpt_path)
        it, elapsed_before = int(extra["iteration"]), float(extra["elapsed"])
        window, smooth_err = extra["window"], float(extra["smooth_err"])
        loader.load_state_dict(extra["loader"])
        _set_rng_states(extra["rng"])
        last_ckpt = it
        _truncate_metrics(out, it)
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
        _write_atomic(out / "config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        buf = io.BytesIO()
        np.save(buf, mean)
        _write_atomic(mean_path, buf.getvalue())

    n_params = count_parameters(model)
    name = model_name(cfg.depth, cfg.plain, cfg.shortcut)
    progress = Progress(cfg.iters, enabled=cfg.progress)

    def save() -> None:
        nonlocal last_ckpt
        extra = {"iteration": it, "config": cfg.to_dict(), "loader": _jsonable(loader.state_dict()),
                 "rng": _rng_states(), "window": window, "smooth_err": smooth_err,
                 "elapsed": elapsed_before + time.perf_counter() - t_start, "finished": it >= cfg.iters}
        ckpt.save_checkpoint(ckpt_path, model, optimizer, scheduler, extra=extra)
        last_ckpt = it

    def log_eval() -> dict[str, Any]:
        nonlocal window
        test_loss, test_err = evaluate(model, eval_x, eval_y, mean, cfg.eval_batch_size, device)
        n = max(window["n"], 1)
        row = {"iter": it, "lr": lr_used, "train_loss": window["loss"] / n, "train_err": window["err"] / n,
               "test_loss": test_loss, "test_err": test_err, "split": split,
               "elapsed": round(elapsed_before + time.perf_counter() - t_start, 3)}
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        progress.log(f"[{name}] iter {it}: lr {row['lr']:.4g}  train loss {row['train_loss']:.4f}  "
                     f"train err {100 * row['train_err']:.2f}%  {split} loss {test_loss:.4f}  "
                     f"{split} err {100 * test_err:.2f}%  ({_hms(row['elapsed'])} elapsed)")
        window = {"loss": 0.0, "err": 0.0, "n": 0}
        return row

    t_start = time.perf_counter()
    lr_used = optimizer.lr
    if it >= cfg.iters:  # already finished: nothing to do
        return _summary(out, ckpt_path, n_params, it, name)
    if not resuming:
        progress.log(f"[{name}] {n_params:,} parameters, {len(train_x):,} training images, "
                     f"{len(eval_x):,} {split} images, {cfg.iters:,} iterations on {device}; out: {out}")
    else:
        progress.log(f"[{name}] resuming {ckpt_path} at iteration {it}")
    if cfg.resume and not resuming:
        progress.log(f"[{name}] no checkpoint in {out} to resume: starting from scratch")

    # Ctrl-C sets a flag; the loop saves a checkpoint at the end of the iteration and stops.
    # A second Ctrl-C stops at once (the checkpoint on disk is whole: writes are atomic).
    interrupted = threading.Event()

    def on_sigint(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        print("\nCtrl-C: saving a checkpoint after this iteration (press again to quit at once)", file=sys.stderr)

    in_main = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    images_seen, t_loop = 0, time.perf_counter()
    batches = loader.stream()  # endless, from the saved position on
    try:
        model.train()
        while it < cfg.iters:
            xb, yb = next(batches)
            lr_used = optimizer.lr
            loss_value, err = train_step(model, optimizer, tensor(xb, device=device), tensor(yb, device=device))
            if not math.isfinite(loss_value):
                where = (f"the last good checkpoint is {ckpt_path} (iteration {last_ckpt})"
                         if last_ckpt is not None else "no checkpoint was saved")
                raise DivergenceError(f"training diverged: loss is {loss_value} at iteration {it + 1}; "
                                      f"{where}. Try a lower learning rate or a warm-up.")
            it += 1
            window = {"loss": window["loss"] + loss_value, "err": window["err"] + err, "n": window["n"] + 1}
            smooth_err = err if it == 1 else 0.9 * smooth_err + 0.1 * err
            if warmup:
                scheduler.step(train_error=smooth_err)
            else:
                scheduler.step()

            images_seen += len(yb)
            dt = time.perf_counter() - t_loop
            ips = images_seen / dt if dt > 0 else 0.0
            n = max(window["n"], 1)
            progress.update(it, lr_used, window["loss"] / n, window["err"] / n, ips,
                            (cfg.iters - it) * cfg.batch_size / ips if ips > 0 else math.inf)
            if on_iteration is not None:
                on_iteration(it, loss_value)
            if it % cfg.eval_every == 0 or it == cfg.iters:
                log_eval()
                model.train()
            if it % cfg.checkpoint_every == 0 or it == cfg.iters or interrupted.is_set():
                save()
            if interrupted.is_set():
                raise KeyboardInterrupt(f"interrupted at iteration {it}; checkpoint saved to {ckpt_path} "
                                        "(resume with resume=True / --resume)")
    finally:
        progress.close()
        if in_main:
            signal.signal(signal.SIGINT, previous_handler)
        batches.close()  # stops the prefetch thread, if any
    return _summary(out, ckpt_path, n_params, it, name)


def _summary(out: Path, ckpt_path: Path, n_params: int, it: int, name: str) -> dict[str, Any]:
    history = read_metrics(out)
    last = history[-1] if history else {}
    return {**last, "name": name, "iterations": it, "params": n_params, "out": str(out),
            "checkpoint": str(ckpt_path), "history": history}


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig saved in `run_dir`/config.json (unknown keys are ignored)."""
    d = json.loads((Path(run_dir) / "config.json").read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    d = {k: v for k, v in d.items() if k in names}
    if "milestones" in d:
        d["milestones"] = tuple(d["milestones"])
    return TrainConfig(**d)


def paper_schedule(name: str) -> tuple[int, tuple[int, ...]]:
    """(iterations, lr milestones) of a named schedule: 'paper' (64k; 32k, 48k) or 'short' (2k; 1.5k, 1.9k)."""
    schedules = {"paper": (64_000, (32_000, 48_000)), "short": (2_000, (1_500, 1_900))}
    if name not in schedules:
        raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(schedules)}")
    return schedules[name]

