"""What the example scripts share: one-line errors for ordinary mistakes, and the checks of their flags.

Each script's `main(argv)` raises `UsageError` (or lets an OSError, a data or a checkpoint error
through) for a mistake of the person running it; `run(main)` prints that as one line on stderr
and exits with status 2. `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tinyres import distributed
from tinyres.backend import cuda_available
from tinyres.checkpoint import CheckpointError
from tinyres.data import CIFAR10, DataError, load_cifar10
from tinyres.kernels import get_num_threads, set_num_threads
from tinyres.train import TrainConfig, schedule_preset


class UsageError(Exception):
    """A mistake in the command line or in a file it names: reported in one line, exit status 2."""


ORDINARY_ERRORS = (UsageError, OSError, DataError, CheckpointError)

# what to do about an OSError, by its errno
OS_ERROR_HINTS = {errno.ENOSPC: "free some disk space or write elsewhere",
                  errno.EFBIG: "free some disk space, raise the file-size limit or write elsewhere",
                  errno.EACCES: "check the permissions or use another path",
                  errno.EROFS: "write elsewhere"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a --debug flag; its errors are UsageErrors, so they print in one line."""

    def __init__(self, doc: str):
        super().__init__(description=doc.split("\n\n")[0])
        self.add_argument("--debug", action="store_true", help="on an error, show the full traceback")

    def error(self, message: str) -> None:  # argparse would print the whole usage text, then exit
        raise UsageError(f"{message} (see --help)")


def run(main: Callable[[list[str]], int]) -> int:
    """Run `main(argv)`; an ordinary mistake prints one line on stderr and gives exit status 2."""
    argv = sys.argv[1:]
    try:
        code = main(argv)
    except ORDINARY_ERRORS as e:
        if "--debug" in argv:
            raise
        print(f"{Path(sys.argv[0]).name}: error: {describe(e)}", file=sys.stderr)
        code = 2
    if code and distributed.get_world_size() > 1:
        distributed.abort(code)  # the other ranks may be waiting for this one: end them too
    return code


def join_mpi_job() -> int:
    """Join the other processes when started by mpiexec (see tinyres.distributed); their number, else 1.

    Unless $TINYRES_NUM_THREADS says otherwise, the ranks on one machine share its cores: two
    ranks of two threads each on two cores would take turns instead of working."""
    if distributed.launched_by_mpiexec():
        try:
            distributed.init_process_group()
        except RuntimeError as e:
            raise UsageError(f"mpiexec: {e}") from None
        if "TINYRES_NUM_THREADS" not in os.environ:
            set_num_threads(max(1, get_num_threads() // distributed.get_local_world_size()))
    return distributed.get_world_size()


def describe(e: BaseException) -> str:
    """The error as one line: file and reason for an OSError, with what to do where that is clear."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        hint = OS_ERROR_HINTS.get(e.errno)
        text += f"; {hint}" if hint else ""
    else:
        text = str(e)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def require(module: str, extra: str, why: str) -> None:
    """Import `module` now, or raise UsageError naming the extra that installs it."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{why} needs {module}, which is not installed: pip install -e '.[{extra}]'") from None


def check_at_least(minimum: int, **flags: int | None) -> None:
    """Raise UsageError for the first flag (underscores for dashes) below `minimum`; None means not given."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


def check_depth(depth: int, flag: str = "--depth") -> None:
    """Raise UsageError unless `depth` is 6n+2 (n >= 1), the depths of the paper's CIFAR-10 nets."""
    if depth < 8 or (depth - 2) % 6:
        raise UsageError(f"{flag}: a CIFAR-10 net has 6n+2 layers (20, 32, 44, 56, 110, 1202), not {depth}")


def check_config(config: TrainConfig) -> None:
    """Raise UsageError, naming the flag, for any setting that `train` cannot run with."""
    check_depth(config.depth)
    check_at_least(1, iters=config.iters, batch_size=config.batch_size, eval_every=config.eval_every,
                   checkpoint_every=config.checkpoint_every)
    check_at_least(0, seed=config.seed, prefetch=config.prefetch)
    processes = distributed.get_world_size()
    if config.batch_size % processes:
        raise UsageError(f"--batch-size {config.batch_size} cannot be split evenly over the {processes} processes "
                         f"of mpiexec -n {processes}: choose a number of processes that divides the batch size")
    outside = [m for m in config.milestones if not 0 < m <= config.iters]
    if outside:
        saved = f" (from {Path(config.out) / 'config.json'})" if config.resume else ""
        raise UsageError(f"--milestones {' '.join(map(str, outside))}{saved}: outside the run's {config.iters} "
                         "iterations (--iters); give --milestones between 1 and --iters")
    if not config.lr > 0 or config.weight_decay < 0 or not 0 <= config.momentum < 1:
        raise UsageError(f"need --lr > 0, --weight-decay >= 0 and 0 <= --momentum < 1; got {config.lr}, "
                         f"{config.weight_decay} and {config.momentum}")
    if config.lr_schedule == "onecycle" and not 0 <= config.base_momentum <= config.momentum:
        raise UsageError(f"--base-momentum {config.base_momentum}: need 0 <= --base-momentum <= --momentum "
                         f"({config.momentum}), the lowest and highest momentum of the cycle")
    if not 0 <= config.pct_start < 1 or not config.div_factor >= 1 or not config.final_div_factor >= 1:
        raise UsageError(f"need 0 <= --pct-start < 1, --div-factor >= 1 and --final-div-factor >= 1; got "
                         f"{config.pct_start}, {config.div_factor} and {config.final_div_factor}")
    if config.device == "cuda" and not cuda_available():
        raise UsageError("--device cuda: CuPy with a usable GPU is not available (pip install -e '.[cuda]', "
                         "or --device cpu)")


def check_data_fits(config: TrainConfig, n_train: int) -> None:
    """Raise UsageError if a batch is larger than the `n_train` training images of --data."""
    n_train -= config.val_size if config.val_split else 0
    if config.batch_size > n_train:
        where = f"--data {config.data_path}" if config.data_path else "the data set"
        raise UsageError(f"--batch-size {config.batch_size}: larger than the {n_train:,} training images in {where}")


def scaled_schedule(iters: int, milestones: tuple[int, ...], new_iters: int) -> tuple[int, ...]:
    """The lr `milestones` of an `iters`-iteration schedule, moved to the same fractions of `new_iters`."""
    return tuple(max(1, round(m * new_iters / iters)) for m in milestones)


def schedule_settings(schedule: str, iters: int | None = None,
                      milestones: list[int] | None = None) -> dict[str, Any]:
    """The TrainConfig fields of the named --schedule, with --iters (its lr milestones moved to the same
    fractions of the run) and --milestones applied when given."""
    settings = schedule_preset(schedule)
    settings["milestones"] = tuple(settings["milestones"])
    if iters is not None:
        settings["iters"], settings["milestones"] = iters, scaled_schedule(settings["iters"], settings["milestones"],
                                                                          iters)
    if milestones is not None:
        settings["milestones"] = tuple(milestones)
    return settings


def check_writable_folder(folder: Path, flag: str) -> None:
    """Raise UsageError if `folder` cannot be created or written to (checked on its nearest existing part)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is not a folder; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: {existing} is not writable; choose another {flag}")


def load_data(path: str | None) -> CIFAR10:
    """CIFAR-10 from --data (see `load_cifar10`), its errors reported as about --data."""
    try:
        return load_cifar10(path)
    except (OSError, DataError) as e:
        raise UsageError(f"--data: {describe(e)}") from e


@contextlib.contextmanager
def removed_if_left_empty(folder: Path) -> Iterator[None]:
    """Remove `folder` and the parents it needs if they are new and the block fails leaving them empty."""
    new = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for p in new:
            with contextlib.suppress(OSError):  # not empty: the run wrote something worth keeping
                p.rmdir()
        raise


def save_figure(fig: Any, out: str | Path) -> Path:
    """Write a matplotlib Figure to `out` (its folder made if needed); return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out
