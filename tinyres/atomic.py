"""Write files so that a crash, a kill or a full disk never leaves a half-written one behind.

Every file tinyres writes for keeps (checkpoints, logs' summaries, configs, caches) goes
through `atomic_write`: the bytes go to a fresh temporary file beside the target, are flushed
to disk, and only then renamed over it, so the target is always either the old or the new file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


class AtomicWriteError(OSError):
    """Writing a file failed (disk full, no permission, ...); the old file, if any, is intact."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file for binary writing; on success it replaces `path` atomically.

    On any error the temporary file is removed and an `AtomicWriteError` names `path`.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise AtomicWriteError(e.errno, f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the file
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file is an ordinary one
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise AtomicWriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file at `path` with `data`, atomically."""
    with atomic_write(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace the file at `path` with UTF-8 `text`, atomically."""
    write_bytes(path, text.encode("utf-8"))


def _sync_folder(folder: Path) -> None:
    """Make a rename inside `folder` survive a power cut (POSIX only)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
