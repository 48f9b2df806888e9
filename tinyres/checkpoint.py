"""Save and restore a training run: model, optimizer, schedule and any JSON-able extras, in one .npz.

The file holds only plain arrays (loaded with `allow_pickle=False`, so opening a checkpoint
cannot run code): `model/<name>` for each parameter and buffer, `optim/<index>/<name>` for
optimizer state such as momentum buffers, and `meta`, the UTF-8 bytes of a JSON document with
the optimizer's hyperparameters, the scheduler's state and the caller's `extra` (iteration,
data-loader position: JSON keeps the 128-bit integers of NumPy's generators).

Files are written through `tinyres.atomic`, so a crash at any moment leaves the old file or
the new one, never a half-written one. Loading checks every name and shape before changing
anything. `save` and `load` do the same for a single state dict, as `torch.save`/`torch.load` do.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write
from .backend import is_cupy
from .nn.modules import Module
from .optim import LRScheduler, Optimizer
from .tensor import Tensor

__all__ = ["CheckpointError", "load", "load_checkpoint", "save", "save_checkpoint"]

FORMAT = "tinyres-checkpoint"
VERSION = 1
STATE_FORMAT = "tinyres-state"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that does not fit the model, optimizer or scheduler."""


# ---- a whole training run ----------------------------------------------------------------

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
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load_checkpoint(path: str | os.PathLike, model: Module, optimizer: Optimizer | None = None,
                    scheduler: LRScheduler | None = None) -> dict[str, Any]:
    """Restore model (and optimizer, scheduler) from `path`, all checked first; return the saved `extra`.

    Raises CheckpointError, naming the file and every mismatch, if the file is truncated or
    corrupt or does not fit; then nothing has been changed.
    """
    path = Path(path)
    arrays, meta = _read(path)
    model_state = {k.removeprefix("model/"): a for k, a in arrays.items() if k.startswith("model/")}
    problems = [f"model {e}" for e in model.state_dict_errors(model_state)]

    optim_state = None
    if optimizer is not None:
        saved, problems_here = _saved_state(meta, "optimizer", optimizer, path)
        if saved is not None:
            optim_state = {"param_groups": required(saved, "param_groups", path), "state": {}}
            for k, a in arrays.items():
                if k.startswith("optim/"):
                    _, i, name = k.split("/", 2)
                    optim_state["state"].setdefault(int(i), {})[name] = a
            problems_here += optimizer.state_dict_errors(optim_state)
        problems += problems_here

    scheduler_state = None
    if scheduler is not None:
        saved, problems_here = _saved_state(meta, "scheduler", scheduler, path)
        if saved is not None:
            scheduler_state = required(saved, "state", path)
            problems_here += scheduler.state_dict_errors(scheduler_state)
        problems += problems_here

    if problems:
        raise CheckpointError(f"{path}: checkpoint does not fit, nothing was loaded:\n  " + "\n  ".join(problems))
    model.load_state_dict(model_state)
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)
    return meta["extra"]


def required(meta: dict[str, Any], key: str, path: str | os.PathLike) -> Any:
    """`meta[key]`, or a CheckpointError naming the file and the missing key."""
    if not isinstance(meta, dict) or key not in meta:
        raise CheckpointError(f"{path}: the checkpoint's metadata has no {key!r}: it was written by another "
                              "program or version, or damaged")
    return meta[key]


def _saved_state(meta: dict[str, Any], kind: str, owner: object, path: Path) -> tuple[dict | None, list[str]]:
    """The saved "optimizer" or "scheduler" entry if it is there and of `owner`'s type, else why not."""
    saved = meta.get(kind)
    if saved is None:
        return None, [f"the checkpoint has no {kind} state"]
    if required(saved, "type", path) != type(owner).__name__:
        return None, [f"the {kind} state is for {saved['type']}, not {type(owner).__name__}"]
    return saved, []


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All arrays of the checkpoint, and its decoded `meta` document."""
    arrays = _read_arrays(path)
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    required(meta, "extra", path)
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta['version']} is newer than this "
                              f"tinyres understands ({VERSION})")
    return arrays, meta


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array in the .npz `path`, each read in full (which checks its CRC)."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None


# ---- a single state dict, as torch.save / torch.load ---------------------------------------
# The tree of dicts, lists and numbers goes into a JSON document, with each array replaced by
# {"array": name}; every dict becomes {"dict": [[key, value], ...]}, so that integer keys (an
# optimizer's parameter indices) come back as integers.

def save(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a state dict (nested dicts/lists of arrays, Tensors and numbers) to the .npz `path`, atomically."""
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(obj, arrays, f"save({path})")
    arrays["__tree__"] = np.frombuffer(json.dumps({"format": STATE_FORMAT, "tree": tree}).encode(), dtype=np.uint8)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load(path: str | os.PathLike) -> Any:
    """The state dict that `save` wrote to `path`, with NumPy arrays (no pickle: loading runs no code)."""
    path = Path(path)
    arrays = _read_arrays(path)
    try:
        doc = json.loads(arrays.pop("__tree__").tobytes().decode("utf-8"))
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a file written by tinyres.save ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a {STATE_FORMAT} file")
    return _decode(required(doc, "tree", path), arrays)


def _encode(obj: Any, arrays: dict[str, np.ndarray], where: str) -> Any:
    if isinstance(obj, Tensor):
        obj = obj.data
    if isinstance(obj, np.ndarray) or is_cupy(obj):
        name = f"a{len(arrays)}"
        arrays[name] = obj.get() if is_cupy(obj) else obj
        return {"array": name}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: dict keys must be strings or ints, got {k!r}")
        return {"dict": [[k, _encode(v, arrays, where)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, arrays, where) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} (arrays, Tensors, numbers, strings, "
                    "lists and dicts only)")


def _decode(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, arrays) for v in tree]
    if isinstance(tree, dict):
        if "array" in tree:
            return arrays[tree["array"]]
        return {k: _decode(v, arrays) for k, v in tree["dict"]}
    return tree
