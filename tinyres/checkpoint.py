"""Save and restore a training run, and single state dicts, in one file format: an .npz of plain arrays.

`save(obj, path)` writes a tree of dicts, lists, numbers, strings and arrays (or Tensors), as
`torch.save` does for a state dict: each array becomes a member of the .npz, and the tree a JSON
document beside them (`__tree__`), so loading with `allow_pickle=False` cannot run code, and
JSON keeps the 128-bit integers of NumPy's generators. `load(path)` gives the tree back, with
NumPy arrays.

A training checkpoint is such a file holding one dict, as a PyTorch training script would save it:

    {"format": "tinyres-checkpoint", "version": 2,
     "model": model.state_dict(),
     "optimizer": {"type": "SGD", **optimizer.state_dict()},
     "scheduler": {"type": "MultiStepLR", "state": scheduler.state_dict()},
     "extra": {...}}          # the caller's: iteration, data-loader position, config, mean image

so `tinyres.load("run/checkpoint.npz")["model"]` is the network's state dict. `save_checkpoint`
writes one and `load_checkpoint` restores model, optimizer and scheduler from it, checking every
name and shape before changing anything. Checkpoints of version 1 (arrays named `model/<name>`
and `optim/<index>/<name>` beside a JSON `meta`) are read as well.

Files are written through `tinyres.atomic`, so a crash at any moment leaves the old file or
the new one, never a half-written one.
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

__all__ = ["CheckpointError", "checkpoint_state", "is_checkpoint", "load", "load_checkpoint", "save",
           "save_checkpoint"]

FORMAT = "tinyres-checkpoint"
VERSION = 2
STATE_FORMAT = "tinyres-state"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or that does not fit the model, optimizer or scheduler."""


# ---- a whole training run ----------------------------------------------------------------

def checkpoint_state(model: Module, optimizer: Optimizer | None = None, scheduler: LRScheduler | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training checkpoint as one dict: what `save_checkpoint` writes and `load` gives back."""
    state: dict[str, Any] = {"format": FORMAT, "version": VERSION, "model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = {"type": type(optimizer).__name__, **optimizer.state_dict()}
    if scheduler is not None:
        state["scheduler"] = {"type": type(scheduler).__name__, "state": scheduler.state_dict()}
    state["extra"] = extra if extra is not None else {}
    return state


def is_checkpoint(obj: Any) -> bool:
    """Whether `obj`, as `load` returned it, is a training checkpoint (rather than a bare state dict)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def save_checkpoint(path: str | os.PathLike, model: Module, optimizer: Optimizer | None = None,
                    scheduler: LRScheduler | None = None, extra: dict[str, Any] | None = None) -> None:
    """Write model, optimizer and scheduler state and `extra` (JSON-like values and arrays) to `path`, atomically."""
    state = checkpoint_state(model, optimizer, scheduler, extra)
    try:
        save(state, path)  # the tree is encoded before the file is touched, so a bad `extra` costs nothing
    except TypeError as e:
        raise TypeError(f"save_checkpoint: `extra` and the scheduler state must hold JSON values (ints, floats, "
                        f"strings, lists, dicts) and arrays: {e}") from None


def load_checkpoint(path: str | os.PathLike, model: Module, optimizer: Optimizer | None = None,
                    scheduler: LRScheduler | None = None) -> dict[str, Any]:
    """Restore model (and optimizer, scheduler) from `path`, all checked first; return the saved `extra`.

    A file of `tinyres.save(model.state_dict(), path)` restores the model alone. Raises
    CheckpointError, naming the file and every mismatch, if the file is truncated or corrupt or
    does not fit; then nothing has been changed.
    """
    path = Path(path)
    doc = load(path)
    if not is_checkpoint(doc):
        if optimizer is not None or scheduler is not None or not _is_state_dict(doc):
            raise CheckpointError(f"{path}: not a training checkpoint but a file of tinyres.save holding "
                                  f"{_describe(doc)}; read it with tinyres.load")
        doc = {"model": doc, "extra": {}}
    if doc.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {doc['version']} is newer than this "
                              f"tinyres understands ({VERSION})")
    model_state = required(doc, "model", path)
    problems = [f"model {e}" for e in model.state_dict_errors(model_state)]

    optim_state = None
    if optimizer is not None:
        saved, problems_here = _saved_state(doc, "optimizer", optimizer, path)
        if saved is not None:
            optim_state = {"param_groups": required(saved, "param_groups", path), "state": saved.get("state", {})}
            problems_here += optimizer.state_dict_errors(optim_state)
        problems += problems_here

    scheduler_state = None
    if scheduler is not None:
        saved, problems_here = _saved_state(doc, "scheduler", scheduler, path)
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
    return required(doc, "extra", path)


def required(meta: dict[str, Any], key: str, path: str | os.PathLike) -> Any:
    """`meta[key]`, or a CheckpointError naming the file and the missing key."""
    if not isinstance(meta, dict) or key not in meta:
        raise CheckpointError(f"{path}: the checkpoint's metadata has no {key!r}: it was written by another "
                              "program or version, or damaged")
    return meta[key]


def _saved_state(doc: dict[str, Any], kind: str, owner: object, path: Path) -> tuple[dict | None, list[str]]:
    """The saved "optimizer" or "scheduler" entry if it is there and of `owner`'s type, else why not."""
    saved = doc.get(kind)
    if saved is None:
        return None, [f"the checkpoint has no {kind} state"]
    if required(saved, "type", path) != type(owner).__name__:
        return None, [f"the {kind} state is for {saved['type']}, not {type(owner).__name__}"]
    return saved, []


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, np.ndarray) for v in obj.values())


def _describe(obj: Any) -> str:
    if _is_state_dict(obj):
        return f"a state dict of {len(obj)} arrays"
    if isinstance(obj, dict):
        return "a dict with keys " + ", ".join(map(repr, list(obj)[:6])) + (", ..." if len(obj) > 6 else "")
    return f"a {type(obj).__name__}"


def _version_1(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """A checkpoint of format version 1 (arrays `model/...`, `optim/...` and a JSON `meta`) as version 2's dict."""
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    doc = {**meta, "model": {k.removeprefix("model/"): a for k, a in arrays.items() if k.startswith("model/")}}
    if isinstance(meta.get("optimizer"), dict):
        state: dict[int, dict[str, np.ndarray]] = {}
        for k, a in arrays.items():
            if k.startswith("optim/"):
                _, i, name = k.split("/", 2)
                state.setdefault(int(i), {})[name] = a
        doc["optimizer"] = {**meta["optimizer"], "state": state}
    required(doc, "extra", path)
    return doc


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
    """What `save` (or `save_checkpoint`, or a training run) wrote to `path`, with NumPy arrays; no pickle,
    so loading runs no code. A training checkpoint comes back as one dict (see the module's docstring)."""
    path = Path(path)
    arrays = _read_arrays(path)
    if "__tree__" not in arrays and "meta" in arrays:
        return _version_1(path, arrays)
    try:
        doc = json.loads(arrays.pop("__tree__").tobytes().decode("utf-8"))
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a file written by tinyres.save or a training run "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a {STATE_FORMAT} file")
    try:
        return _decode(required(doc, "tree", path), arrays)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the file's tree does not match its arrays (damaged?): "
                              f"{type(e).__name__}: {e}") from None


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
