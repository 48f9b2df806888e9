"""`load_cifar10`: find CIFAR-10 or download it (md5-checked), decode it once, cache it, memory-map it later.

The decoded arrays are cached as ``.npy`` files in a folder keyed to the source's path, sizes and
modification times; the folder is written under a temporary name and renamed into place, so a
crash never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from .formats import ARCHIVE_NAME, CIFAR10, CLASSES, EXPECTED_FORMS, DataError, decode_source, locate, locate_official

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"

_CACHE_VERSION = 1
_ARRAYS = {"train_images": np.uint8, "train_labels": np.int64, "test_images": np.uint8, "test_labels": np.int64}


class DownloadError(DataError):
    """The official archive could not be downloaded (offline, interrupted or a checksum mismatch)."""


def load_cifar10(
    path: str | os.PathLike | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    url: str = CIFAR10_URL,
    md5: str | None = CIFAR10_MD5,
    num_workers: int | None = None,
) -> CIFAR10:
    """Load CIFAR-10 as uint8 (N, 32, 32, 3) images and int64 (N,) labels (train 50,000, test 10,000).

    Looks at `path`, else the ``TINYRES_DATA`` environment variable, else the cache
    folder (`cache_dir`, else ``TINYRES_DATA`` if it is a folder, else
    ``~/.cache/tinyres``) for a previously downloaded archive, else downloads the
    official archive from `url` (if `download`) and checks its `md5` (None: no check).
    A path may be an archive, an extracted batches folder, an image-folder root, or a
    folder holding one of those. Decoded arrays are cached in the cache folder and
    come back read-only and memory-mapped. `num_workers` processes decode images
    (default: one per CPU on Linux; 0 or 1 decodes in this process).
    """
    env = os.environ.get("TINYRES_DATA") or None
    cache = _cache_folder(cache_dir, env)
    if path is not None:
        source = locate(Path(path).expanduser())
    elif env is not None:
        # A TINYRES_DATA folder without data in it is just where the download goes.
        source = locate(Path(env).expanduser(), allow_empty=True, origin=" (from TINYRES_DATA)")
    else:
        source = None
    if source is None:
        source = locate_official(cache)
    if source is None:
        source = cache / ARCHIVE_NAME
        if not download:
            raise DownloadError(_download_failed(url, "downloading is disabled (download=False)", cache, md5))
        try:
            _download(url, source, md5)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise DownloadError(_download_failed(url, str(e), cache, md5)) from e
    return _load_cached(source, cache, _worker_count(num_workers))


def _cache_folder(cache_dir: str | os.PathLike | None, env: str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if env is not None and Path(env).expanduser().is_dir():
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyres"


def _worker_count(num_workers: int | None) -> int:
    # Worker processes are forked: spawning would re-import the user's main script,
    # which breaks scripts without an `if __name__ == "__main__"` guard.
    if sys.platform != "linux":
        return 1
    if num_workers is None:
        return len(os.sched_getaffinity(0))
    return max(num_workers, 1)


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------


def _download_failed(url: str, reason: str, cache: Path, md5: str | None) -> str:
    checksum = f" (md5 {md5})" if md5 else ""
    return (
        f"Could not download CIFAR-10 from {url}: {reason}.\n"
        f"Fetch {ARCHIVE_NAME}{checksum} by hand and put it in {cache}, or point tinyres at any copy "
        f"of CIFAR-10 with --data PATH or the TINYRES_DATA environment variable: {EXPECTED_FORMS}."
    )


def _download(url: str, dest: Path, md5: str | None) -> None:
    """Fetch url into dest, atomically: dest appears only once the size and md5 check out."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=60) as response, atomic_write(dest) as out:
        expected = response.headers.get("Content-Length")
        print(f"Downloading {url} to {dest}", file=sys.stderr)
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        for chunk in _body_chunks(response):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        # A dropped connection can look like a normal end of the body.
        if expected is not None and size != int(expected):
            raise DownloadError(f"download interrupted after {size} of {expected} bytes")
        if md5 is not None and digest.hexdigest() != md5:
            raise DownloadError(f"md5 mismatch: got {digest.hexdigest()}, expected {md5}")


def _body_chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    # A network error is a DownloadError here: as an OSError, atomic_write would report a failure to write.
    try:
        while chunk := response.read(1 << 20):
            yield chunk
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"connection lost ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------
# Cache of decoded arrays
# ---------------------------------------------------------------------------


def _source_key(source: Path) -> str:
    """Hash of the source's absolute path, sizes and mtimes (of every file, for a folder)."""
    source = source.resolve()
    stat = source.stat()
    entries = [("", stat.st_size, stat.st_mtime_ns)]
    if source.is_dir():
        for folder, subfolders, files in os.walk(source):
            subfolders.sort()
            for name in sorted(files):
                stat = os.stat(os.path.join(folder, name))
                entries.append((os.path.relpath(os.path.join(folder, name), source), stat.st_size, stat.st_mtime_ns))
    payload = json.dumps([_CACHE_VERSION, str(source), entries])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _load_cached(source: Path, cache: Path, workers: int) -> CIFAR10:
    """Memory-map the cached arrays of source, decoding and caching them first if needed."""
    folder = cache / f"cifar10-{_source_key(source)}"
    data = _read_cache(folder)
    if data is not None:
        return data
    data = decode_source(source, workers)
    try:
        _write_cache(folder, data)
    except OSError as e:
        warnings.warn(f"could not cache decoded CIFAR-10 in {cache} ({e}); it will be decoded again next time",
                      stacklevel=3)
        return data
    return _read_cache(folder) or data


def _read_cache(folder: Path) -> CIFAR10 | None:
    """The memory-mapped arrays in a cache folder, or None if it is missing, incomplete or corrupt."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        arrays = {}
        for name, dtype in _ARRAYS.items():
            array = np.load(folder / f"{name}.npy", mmap_mode="r")
            if array.dtype != dtype or list(array.shape) != manifest["shapes"][name]:
                return None
            arrays[name] = array
        for name in ("train_labels", "test_labels"):
            if arrays[name].min() < 0 or arrays[name].max() >= len(CLASSES):
                return None
        return CIFAR10(**arrays, source=manifest["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(folder: Path, data: CIFAR10) -> None:
    """Write the arrays into a temporary folder, then rename it into place, so readers never see a partial cache."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        temp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared (a TINYRES_DATA folder)
        for name in _ARRAYS:
            np.save(temp / f"{name}.npy", getattr(data, name))
        shapes = {name: list(getattr(data, name).shape) for name in _ARRAYS}
        (temp / "manifest.json").write_text(json.dumps({"source": data.source, "shapes": shapes}))
        if folder.exists():  # a corrupt cache from an earlier run
            shutil.rmtree(folder)
        try:
            os.replace(temp, folder)
        except OSError:
            if _read_cache(folder) is None:  # else another process just cached the same data
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
