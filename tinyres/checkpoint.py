"""Save and restore a training run: model, optimizer, schedule and any JSON-able extras, in one .npz.

The file holds only plain arrays (loaded with `allow_pickle=False`, so opening a checkpoint
cannot run code): `model/<name>` for each parameter and buffer, `optim/<index>/<name>` for
optimizer state such as momentum buffers, and `meta`, the UTF-8 bytes of a JSON document with
the optimizer's hyperparameters, the scheduler's state and the caller's `extra` (iteration,
data-loader position, RNG states: JSON keeps the 128-bit integers of NumPy's generators).

Saving writes a temporary file beside the target, flushes it to disk and renames it over
the target, so a crash at any moment leaves the old checkpoint or the new one, never a
half-written file. Loading checks every name and shape before changing anything.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .nn.modules import Module
from .optim import LRScheduler, Optimizer

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "tinyres-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that does not fit the model, optimizer or scheduler."""


def save_checkpoint(path: str | os.PathLike, model: Module, optimizer: Optimizer | None = None,
                    scheduler: LRScheduler | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write model, optimizer and scheduler state and `extra` (JSON-able) to the .npz `path`, atomically."""
    arrays = {f"model/{name}": a for name, a in model.state_dict().items()}
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "extra": extra if extra is not None else {}}
    if optimizer is not None:
        state = optimizer.state_dict()
        for i, per_param in state["state"].items():
            for name, a in per_param.items():
                arrays[f"optim/{i}/{name}"] = a
        meta["optimizer"] = {"type": type(optimizer).__name__, "param_groups": state["param_groups"]}
    if scheduler is not None:
        meta["scheduler"] = {"type": type(scheduler).__name__, "state": scheduler.state_dict()}
    try:
        text = json.dumps(meta)  # before the file is touched, so a bad `extra` costs nothing
    except TypeError as e:
        raise TypeError(f"save_checkpoint: `extra` and the scheduler state must be JSON-serializable "
                        f"(ints, floats, strings, lists, dicts): {e}") from None
    arrays["meta"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    _write_atomically(Path(path), arrays)


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself survive a power cut
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: str | os.PathLike, model: Module, optimizer: Optimizer | None = None,
                    scheduler: LRScheduler | None = None) -> dict[str, Any]:
    """Restore model (and optimizer, scheduler) from `path`, all checked first; return the saved `extra`.

    Raises CheckpointError, naming the file and every mismatch, if the file is truncated or
    corrupt or does not fit; then nothing has been changed.
    """
    arrays, meta = _read(Path(path))
    problems = []
    model_state = {k.removeprefix("model/"): a for k, a in arrays.items() if k.startswith("model/")}
    problems += [f"model {e}" for e in model.state_dict_errors(model_state)]

    optim_state = None
    if optimizer is not None:
        saved = meta.get("optimizer")
        if saved is None:
            problems.append("the checkpoint has no optimizer state")
        elif saved["type"] != type(optimizer).__name__:
            problems.append(f"the optimizer state is for {saved['type']}, not {type(optimizer).__name__}")
        else:
            optim_state = {"param_groups": saved["param_groups"], "state": {}}
            for k, a in arrays.items():
                if k.startswith("optim/"):
                    _, i, name = k.split("/", 2)
                    optim_state["state"].setdefault(int(i), {})[name] = a
            problems += optimizer.state_dict_errors(optim_state)

    if scheduler is not None:
        saved = meta.get("scheduler")
        if saved is None:
            problems.append("the checkpoint has no scheduler state")
        elif saved["type"] != type(scheduler).__name__:
            problems.append(f"the scheduler state is for {saved['type']}, not {type(scheduler).__name__}")
        else:
            problems += scheduler.state_dict_errors(saved["state"])

    if problems:
        raise CheckpointError(f"{path}: checkpoint does not fit, nothing was loaded:\n  " + "\n  ".join(problems))
    model.load_state_dict(model_state)
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"]["state"])
    return meta["extra"]


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All arrays of the checkpoint, and its decoded `meta` document."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}  # reading each member in full checks its CRC
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (OSError, ValueError, EOFError, KeyError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "extra" not in meta:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta['version']} is newer than this "
                              f"tinyres understands ({VERSION})")
    return arrays, meta
