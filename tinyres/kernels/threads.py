"""Threads over the batch, scratch buffers, and cache-sized blocks: the scheduling of every kernel."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..backend import get_array_module

# ---- threads -----------------------------------------------------------------------------


def _default_threads() -> int:
    env = os.environ.get("TINYRES_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"TINYRES_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"TINYRES_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_num_threads = _default_threads()
_pool: ThreadPoolExecutor | None = None
_inside = threading.local()  # set in a part of parallel_for: nested calls run serially
_configured = False


def set_num_threads(n: int) -> None:
    """Use `n` threads for the CPU kernels (default: the cores this process may run on, or
    $TINYRES_NUM_THREADS), as `torch.set_num_threads`."""
    global _num_threads, _pool
    if int(n) != n or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive integer, got {n!r}")
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
        free_scratch()  # the buffers of the threads just ended would never be used again
    _num_threads = int(n)


def get_num_threads() -> int:
    """The number of threads the CPU kernels use."""
    return _num_threads


def _configure_process() -> None:
    """Once, before the first kernel runs: hold BLAS to one thread, and keep freed memory for reuse.

    BLAS: the kernels parallelize over the batch themselves, and an OpenBLAS worker left spinning
    beside them can halve the speed of a whole process. Memory: glibc returns every freed array
    above 128 KB to the system, so each training step's fresh activations cost ~36,000 page faults
    (7–19 % of a ResNet-20 step, benchmarks/README.md); raising its thresholds keeps them in
    the heap for the next step, as PyTorch's caching allocator does. TINYRES_KEEP_MEMORY=0 opts out."""
    global _configured
    if _configured:
        return
    _configured = True
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")
    if os.environ.get("TINYRES_KEEP_MEMORY", "1") != "0" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: arrays up to 32 MB come from the heap
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # and stay there when freed (up to 1 GB)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def parallel_for(fn: Callable[[int, int], Any], n: int, xp=np) -> list[Any]:
    """Run fn(lo, hi) over [0, n) split into contiguous parts, one per thread, and return the
    results in part order. The first part runs in the calling thread."""
    _configure_process()
    parts = min(_num_threads, n)
    if xp is not np or parts <= 1 or getattr(_inside, "active", False):
        return [fn(0, n)]
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_num_threads - 1, thread_name_prefix="tinyres")
    bounds = [n * p // parts for p in range(parts + 1)]
    futures = [_pool.submit(_part, fn, bounds[p], bounds[p + 1]) for p in range(1, parts)]
    try:
        first = _part(fn, bounds[0], bounds[1])
    finally:
        results = [f.result() for f in futures]  # wait for every part, even when the first one failed
    return [first] + results


def _part(fn, lo: int, hi: int):
    _inside.active = True
    try:
        return fn(lo, hi)
    finally:
        _inside.active = False


# ---- scratch buffers ---------------------------------------------------------------------

_scratch: dict[tuple, Any] = {}


def scratch(xp, name: str, shape: tuple[int, ...], dtype) -> Any:
    """A zero-filled buffer for the calling thread, allocated on first use and reused after.

    Keyed by thread, so two threads never share one (kernels called from several threads at once
    stay correct). Callers that rely on zeros keep them: the padded copies only write the interior.
    On CuPy a fresh buffer every time: its memory pool already recycles them.
    """
    if xp is not np:
        return xp.zeros(shape, dtype=dtype)
    key = (threading.get_ident(), name, shape, np.dtype(dtype).str)
    buf = _scratch.get(key)
    if buf is None:
        buf = _scratch[key] = np.zeros(shape, dtype=dtype)
    return buf


def free_scratch() -> None:
    """Release every scratch buffer (they are rebuilt on demand)."""
    _scratch.clear()


# ---- blocks of memory over the threads ---------------------------------------------------

_BLOCK_BYTES = 1 << 20  # 1 MB per array: large enough that the per-block calls cost little


def blockwise(fn: Callable, *arrays, rows_multiple: int = 1) -> list[Any]:
    """fn(*blocks) over blocks of rows (axis 0) of `arrays`, each about _BLOCK_BYTES and a whole
    multiple of `rows_multiple` rows (but the last), spread over the threads; the results in block
    order. On CuPy, one call on the whole arrays."""
    xp = get_array_module(arrays[0])
    if xp is not np:
        return [fn(*arrays)]
    a = arrays[0]
    row_bytes = a.itemsize * (a.size // max(len(a), 1))
    size = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    size = max(rows_multiple, size - size % rows_multiple)
    starts = range(0, len(a), size)

    def work(lo, hi):
        return [fn(*(x[s:s + size] for x in arrays)) for s in starts[lo:hi]]
    return [r for part in parallel_for(work, len(starts), xp) for r in part]


def sum_in_order(values: list):
    total = values[0]
    for v in values[1:]:  # a fixed order: the same bits on every run for a given thread count
        total = total + v
    return total
