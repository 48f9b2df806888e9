"""Several processes training one model: MPI through mpi4py, in the names of `torch.distributed`.

    mpiexec -n 2 python examples/train_cifar.py ...     # pip install -e '.[mpi]' gives mpiexec

Each process (a rank) runs the same script; `init_process_group()` joins them. Arrays are
reduced on the host: a CuPy array is copied to the host, reduced and copied back, so the same
code serves the CPU and the GPU (a CUDA-aware MPI or NCCL could later go behind `all_reduce`).
Without `init_process_group()` every function here acts as if there were one process, and
nothing imports mpi4py.

An uncaught error on one rank brings the whole job down (MPI_Abort), as `abort` does for the
scripts' other failures (examples/cli.py): the other ranks may be waiting for it in a
collective, and would wait forever.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from .backend import get_array_module, is_cupy
from .tensor import Tensor

__all__ = [
    "ReduceOp", "abort", "all_reduce", "barrier", "broadcast", "get_local_world_size", "get_rank", "get_world_size",
    "init_process_group", "is_initialized", "launched_by_mpiexec",
]

_comm: Any = None   # mpi4py's COMM_WORLD once initialized
_MPI: Any = None    # the mpi4py.MPI module

# the environment variables that MPI launchers give each process: world size
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class ReduceOp:
    """The reductions of `all_reduce`, as `torch.distributed.ReduceOp`."""

    SUM = "sum"
    MAX = "max"
    MIN = "min"


def launched_by_mpiexec() -> bool:
    """Whether this process was started by mpiexec/mpirun (read from the environment; imports nothing)."""
    return any(k in os.environ for k in _LAUNCHER_SIZE)


def init_process_group(backend: str = "mpi") -> None:
    """Join the processes of the MPI job; afterwards an uncaught error on any rank aborts them all."""
    global _comm, _MPI
    if backend != "mpi":
        raise ValueError(f"init_process_group: only the 'mpi' backend is available, got {backend!r}")
    if _comm is not None:
        return
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("several processes need mpi4py and an MPI library: pip install -e '.[mpi]'") from None
    _MPI, _comm = MPI, MPI.COMM_WORLD
    if _comm.Get_size() > 1:
        previous = sys.excepthook

        def abort_on_uncaught(kind, value, tb):
            previous(kind, value, tb)
            abort(1, f"{kind.__name__} on rank {get_rank()}")
        sys.excepthook = abort_on_uncaught


def is_initialized() -> bool:
    """Whether `init_process_group()` has been called."""
    return _comm is not None


def get_rank() -> int:
    """This process's number, 0 .. world size - 1 (0 without a process group)."""
    return _comm.Get_rank() if _comm is not None else 0


def get_world_size() -> int:
    """The number of processes (1 without a process group)."""
    return _comm.Get_size() if _comm is not None else 1


def get_local_world_size() -> int:
    """The number of ranks on this machine (1 without a process group)."""
    if _comm is None:
        return 1
    local = _comm.Split_type(_MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_size()
    finally:
        local.Free()


def abort(code: int = 1, why: str = "") -> None:
    """End every rank of the job now, with exit status `code`; says so on stderr first."""
    if _comm is None or _comm.Get_size() == 1:
        sys.exit(code)
    print(f"rank {get_rank()} of {get_world_size()}: {why or f'exit status {code}'}; stopping all ranks",
          file=sys.stderr, flush=True)
    time.sleep(0.5)  # mpiexec forwards what this rank printed; the abort would cut it short
    _comm.Abort(code)


def _host(a: Any) -> np.ndarray:
    """A C-contiguous NumPy copy of (or view on) `a` for MPI's buffers."""
    return np.ascontiguousarray(a.get() if is_cupy(a) else a)


def all_reduce(tensor: Any, op: str = ReduceOp.SUM) -> Any:
    """Reduce `tensor` (a NumPy/CuPy array or a Tensor) over all ranks, in place, and return it."""
    data = tensor.data if isinstance(tensor, Tensor) else tensor
    if _comm is None or _comm.Get_size() == 1:
        return tensor
    ops = {ReduceOp.SUM: _MPI.SUM, ReduceOp.MAX: _MPI.MAX, ReduceOp.MIN: _MPI.MIN}
    if op not in ops:
        raise ValueError(f"all_reduce: op must be one of {', '.join(ops)}, got {op!r}")
    buf = _host(data)
    _comm.Allreduce(_MPI.IN_PLACE, buf, op=ops[op])
    _copy_back(buf, data)
    return tensor


def broadcast(tensor: Any, src: int = 0) -> Any:
    """Overwrite `tensor` (array or Tensor) on every rank with rank `src`'s, in place, and return it."""
    data = tensor.data if isinstance(tensor, Tensor) else tensor
    if _comm is None or _comm.Get_size() == 1:
        return tensor
    buf = _host(data)
    _comm.Bcast(buf, root=src)
    _copy_back(buf, data)
    return tensor


def _copy_back(buf: np.ndarray, data: Any) -> None:
    if buf is not data:  # a host copy was made: a CuPy array, or a non-contiguous one
        data[...] = get_array_module(data).asarray(buf)


def barrier() -> None:
    """Wait until every rank gets here."""
    if _comm is not None:
        _comm.Barrier()
