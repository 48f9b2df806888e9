"""The files of a training run's out dir, and how they are read, appended and rolled back on resume.

    config.json           the TrainConfig, written once
    mean.npy              the per-pixel mean, needed to classify new images
    metrics.jsonl         one row per evaluation (train and test loss and error, the thread count)
    train_log.jsonl       one row per `log_every` iterations: the dense training curve
    checkpoint.npz        the newest checkpoint ...
    checkpoint-prev.npz   ... and the one before it, in case the newest is damaged
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_bytes, write_text
from .checkpoint import CheckpointError

__all__ = ["RunDir", "read_jsonl"]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file, in order (empty if there is no file)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill: the checkpoint predates it anyway
            break
    return rows


class RunDir:
    """Paths of one run's files, and the operations on them."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.config = self.out / "config.json"
        self.mean = self.out / "mean.npy"
        self.metrics = self.out / "metrics.jsonl"
        self.train_log = self.out / "train_log.jsonl"
        self.checkpoint = self.out / "checkpoint.npz"
        self.previous = self.out / "checkpoint-prev.npz"

    def checkpoints(self) -> list[Path]:
        """The checkpoints on disk, newest first."""
        return [p for p in (self.checkpoint, self.previous) if p.exists()]

    def start(self, config: dict[str, Any], mean: np.ndarray) -> None:
        """Write a fresh run's config and mean; drop logs of an earlier run that left no checkpoint."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics.unlink(missing_ok=True)
        self.train_log.unlink(missing_ok=True)
        self.write_config(config)
        buf = io.BytesIO()
        np.save(buf, mean)
        write_bytes(self.mean, buf.getvalue())

    def write_config(self, config: dict[str, Any]) -> None:
        """Replace config.json (a resumed run whose settings changed)."""
        write_text(self.config, json.dumps(config, indent=2) + "\n")

    def append(self, path: Path, row: dict[str, Any]) -> None:
        """Add one row to a JSON-lines log."""
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def roll_back(self, iteration: int, evaluated: bool = True) -> None:
        """Drop logged rows after `iteration` (and its evaluation unless `evaluated`): the resumed run logs them
        again."""
        for path in (self.metrics, self.train_log):
            if path.exists():
                last = iteration if evaluated or path != self.metrics else iteration - 1
                rows = [r for r in read_jsonl(path) if r["iter"] <= last]
                write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

    def save_checkpoint(self, save: Callable[[Path], None]) -> None:
        """Keep the newest checkpoint as the previous one, then `save(path)` the new one over it."""
        if self.checkpoint.exists():
            self._keep_as_previous()
        save(self.checkpoint)

    def _keep_as_previous(self) -> None:
        # A hard link, renamed into place, makes checkpoint-prev.npz a second name of the newest
        # checkpoint without copying it, and checkpoint.npz stays whole at every moment.
        link = self.out / f".{self.previous.name}.link"
        try:
            link.unlink(missing_ok=True)  # left by a kill at just this point
            os.link(self.checkpoint, link)
            os.replace(link, self.previous)
        except OSError:  # no hard links here (or the name is taken): copy instead
            write_bytes(self.previous, self.checkpoint.read_bytes())

    def load_checkpoint(self, load: Callable[[Path], dict[str, Any]], say: Callable[[str], None]) -> dict[str, Any]:
        """`load(path)` the newest checkpoint that loads, falling back to the previous one; say which."""
        errors = []
        for path in self.checkpoints():
            try:
                extra = load(path)
            except CheckpointError as e:
                errors.append(str(e).splitlines()[0])
                continue
            fallback = f"{errors[0]}; " if errors else ""
            say(f"{fallback}resuming {path} at iteration {extra['iteration']}")
            return extra
        raise CheckpointError(f"no checkpoint in {self.out} loads:\n  " + "\n  ".join(errors))
