"""Pick NumPy or CuPy from the arrays at hand, so every op has one code path for both."""

from __future__ import annotations

import functools
import importlib.util
import sys
from types import ModuleType
from typing import NamedTuple

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


class GPUStatus(NamedTuple):
    """Whether the GPU can be used; if not, why, and whether that is a fault rather than an absence."""

    usable: bool
    reason: str   # what was found: the GPU and CuPy version, or why it cannot be used
    broken: bool  # True: CuPy is installed but fails (import, driver mismatch, kernel) — an error, not a skip


CUDA_ERROR_NO_DEVICE = 100  # cudaErrorNoDevice: the driver runs but finds no GPU
INSTALL_HINT = "pip install 'tinyres[cuda13]' (CUDA 13) or 'tinyres[cuda]' (CUDA 12)"


@functools.lru_cache(maxsize=1)
def gpu_status() -> GPUStatus:
    """Probe CuPy and GPU 0 once per process with a real elementwise kernel, reduction and matmul."""
    if importlib.util.find_spec("cupy") is None:
        return GPUStatus(False, f"CuPy is not installed ({INSTALL_HINT})", broken=False)
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 - a missing CUDA library or dependency shows as many error types
        return GPUStatus(False, f"CuPy is installed but does not import: {type(e).__name__}: {e}", broken=True)
    version = f"CuPy {getattr(cupy, '__version__', '?')}"
    try:
        if cupy.cuda.runtime.driverGetVersion() == 0:
            return GPUStatus(False, f"{version} is installed but there is no NVIDIA driver (no GPU)", broken=False)
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError, or an import error from a lazily loaded library
        if getattr(e, "status", None) == CUDA_ERROR_NO_DEVICE:
            return GPUStatus(False, f"{version}: the NVIDIA driver finds no GPU", broken=False)
        return GPUStatus(False, f"{version}: the CUDA driver fails: {type(e).__name__}: {e}", broken=True)
    if count == 0:
        return GPUStatus(False, f"{version}: the NVIDIA driver finds no GPU", broken=False)
    try:
        _run_probe_kernels(cupy)
    except Exception as e:  # noqa: BLE001 - NVRTC, cuBLAS or a CUDA version mismatch: each its own type
        return GPUStatus(False, f"{version} sees {count} GPU(s) but cannot run a kernel: "
                                f"{type(e).__name__}: {e}", broken=True)
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return GPUStatus(True, f"{version} on {name}", broken=False)


def _run_probe_kernels(cupy: ModuleType) -> None:
    """Compile and run an elementwise add (NVRTC), a sum and a matmul (cuBLAS) on GPU 0; raise if wrong."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    x = cupy.asarray(a)
    y = x + 1
    results = [(x @ y.T).get(), y.sum().get()]
    cupy.cuda.Device(0).synchronize()  # errors of asynchronous launches surface here
    expected = [a @ (a + 1).T, (a + 1).sum()]
    for got, want in zip(results, expected):
        if not np.allclose(got, want):
            raise RuntimeError(f"wrong result from the GPU: {got.tolist()} instead of {want.tolist()}")


def import_cupy() -> ModuleType:
    """Import CuPy, with a clear error when it or a usable GPU is missing."""
    status = gpu_status()
    if not status.usable:
        raise RuntimeError(f"device 'cuda': {status.reason}")
    import cupy
    return cupy


def cuda_available() -> bool:
    """True when CuPy imports and runs a kernel on a GPU."""
    return gpu_status().usable


def to_device(a, device: str):
    """Copy array `a` to `device` ('cpu' or 'cuda'); no copy if it is already there."""
    device = normalize_device(device)
    if device == "cpu":
        return a.get() if is_cupy(a) else np.asarray(a)
    cp = import_cupy()
    return cp.asarray(a)
