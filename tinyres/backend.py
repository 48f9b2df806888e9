"""Pick NumPy or CuPy from the arrays at hand, so every op has one code path for both."""

from __future__ import annotations

import sys
from types import ModuleType

import numpy as np


def _cupy() -> ModuleType | None:
    # An array can only be a CuPy array if CuPy was imported, so looking in sys.modules
    # keeps `import tinyres` free of CuPy and of its start-up cost.
    return sys.modules.get("cupy")


def is_cupy(a) -> bool:
    """True when `a` is a CuPy array."""
    cp = _cupy()
    return cp is not None and isinstance(a, cp.ndarray)


def get_array_module(*arrays, op: str = "op") -> ModuleType:
    """The array module (numpy or cupy) of `arrays`; raise if they live on different devices."""
    on_gpu = [is_cupy(a) for a in arrays if a is not None and hasattr(a, "shape")]
    if any(on_gpu):
        if not all(on_gpu):
            shapes = ", ".join(f"{'cuda' if g else 'cpu'}{tuple(a.shape)}" for g, a in
                               zip(on_gpu, [a for a in arrays if a is not None and hasattr(a, "shape")]))
            raise RuntimeError(f"{op}: inputs are on different devices ({shapes}); "
                               "move them with .to('cuda') or .to('cpu') first")
        return _cupy()
    return np


def device_of(a) -> str:
    """'cuda' for a CuPy array, 'cpu' otherwise."""
    return "cuda" if is_cupy(a) else "cpu"


def normalize_device(device: str) -> str:
    """'cpu' or 'cuda' from 'cpu', 'cuda', 'cuda:0', 'gpu'."""
    name = str(device).lower().split(":")[0]
    if name == "gpu":
        name = "cuda"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    return name


def import_cupy() -> ModuleType:
    """Import CuPy, with a clear error when it or a GPU is missing."""
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("device 'cuda' needs CuPy: pip install 'tinyres[cuda]' "
                           "(or the cupy-cudaXXx wheel matching your CUDA)") from e
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA runtime errors have several types across CuPy versions
        raise RuntimeError(f"device 'cuda': CuPy imports but no GPU is usable ({e})") from e
    return cupy


def cuda_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy, no driver or no device: all mean "no GPU"
        return False


def to_device(a, device: str):
    """Copy array `a` to `device` ('cpu' or 'cuda'); no copy if it is already there."""
    device = normalize_device(device)
    if device == "cpu":
        return a.get() if is_cupy(a) else np.asarray(a)
    cp = import_cupy()
    return cp.asarray(a)
