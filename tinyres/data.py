"""CIFAR-10 for the trainer: find it, decode it once, cache it, and serve mini-batches.

Where the data comes from (detected from the path, see `load_cifar10`):

* the official python archive ``cifar-10-python.tar.gz`` or its extracted
  ``cifar-10-batches-py/`` folder of pickled batches;
* an image layout ``train/<class>/*.png|jpg`` and ``test/<class>/*``, as a folder
  or as a ``.tar`` / ``.tar.gz`` (optionally under one top-level folder);
* a download of the official archive, verified against its md5.

Decoded arrays are cached as ``.npy`` files and memory-mapped on later loads.

Conventions: images are uint8 (N, 32, 32, 3) as stored on disk; the network gets
float32 (N, 3, 32, 32) in [0, 1] scale with a mean subtracted (`to_float`).
Per-pixel mean subtraction is the preprocessing of He et al. (2015); statistics
(`per_pixel_mean`, `channel_stats`) are in the same [0, 1] scale.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import itertools
import json
import multiprocessing
import os
import pickle
import queue
import shutil
import sys
import tarfile
import tempfile
import threading
import urllib.request
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_FOLDER = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"
_BATCH_FILES = (*_TRAIN_BATCHES, _TEST_BATCH, _META)
_SPLITS = ("train", "test")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_EXPECTED = (
    "the official cifar-10-python.tar.gz, its extracted cifar-10-batches-py/ folder, or "
    "train/<class>/ and test/<class>/ image folders (as a folder or a .tar/.tar.gz)"
)

# Images per decoding task: big enough to amortize inter-process traffic, small
# enough that reading the archive and decoding overlap.
_DECODE_CHUNK = 1000
_CACHE_VERSION = 1
_ARRAYS = {"train_images": np.uint8, "train_labels": np.int64, "test_images": np.uint8, "test_labels": np.int64}


class DataError(ValueError):
    """The data set is missing, malformed or not what CIFAR-10 should be."""


class DownloadError(DataError):
    """The official archive could not be downloaded (offline, interrupted or a checksum mismatch)."""


@dataclass
class CIFAR10:
    """CIFAR-10 arrays: images uint8 (N, 32, 32, 3) RGB, labels int64 (N,) indexing `CLASSES`."""

    train_images: np.ndarray = field(repr=False)
    train_labels: np.ndarray = field(repr=False)
    test_images: np.ndarray = field(repr=False)
    test_labels: np.ndarray = field(repr=False)
    source: str

    def __repr__(self) -> str:
        return f"CIFAR10(train={len(self.train_images)}, test={len(self.test_images)}, source={self.source!r})"


# ---------------------------------------------------------------------------
# Finding and loading
# ---------------------------------------------------------------------------


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
    if cache_dir is not None:
        cache = Path(cache_dir).expanduser()
    elif env is not None and Path(env).expanduser().is_dir():
        cache = Path(env).expanduser()
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyres"

    if path is not None:
        source = _locate(Path(path).expanduser())
    elif env is not None:
        # A TINYRES_DATA folder without data in it is just where the download goes.
        source = _locate(Path(env).expanduser(), allow_empty=True, origin=" (from TINYRES_DATA)")
    else:
        source = None
    if source is None:
        source = _locate_official(cache)
    if source is None:
        source = cache / ARCHIVE_NAME
        if not download:
            raise DownloadError(_download_failed(url, "downloading is disabled (download=False)", cache, md5))
        try:
            _download(url, source, md5)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise DownloadError(_download_failed(url, str(e), cache, md5)) from e
    return _load_cached(source, cache, _worker_count(num_workers))


def _download_failed(url: str, reason: str, cache: Path, md5: str | None) -> str:
    checksum = f" (md5 {md5})" if md5 else ""
    return (
        f"Could not download CIFAR-10 from {url}: {reason}.\n"
        f"Fetch {ARCHIVE_NAME}{checksum} by hand and put it in {cache}, or point tinyres at any copy "
        f"of CIFAR-10 with --data PATH or the TINYRES_DATA environment variable: {_EXPECTED}."
    )


def _locate(path: Path, *, allow_empty: bool = False, origin: str = "") -> Path | None:
    """The data source at path (an archive, a batches folder or an image-folder root); None if a folder has none."""
    if not path.exists():
        raise FileNotFoundError(f"{path}{origin}: no such file or folder (expected {_EXPECTED})")
    if path.is_file() or _is_batches_folder(path) or _is_image_root(path):
        return path
    found = _locate_official(path)
    if found is not None:
        return found
    archives = sorted(
        p for p in path.iterdir()
        if p.is_file() and "cifar" in p.name.lower() and p.name.lower().endswith((".tar", ".tar.gz", ".tgz"))
    )
    if len(archives) > 1:
        names = ", ".join(p.name for p in archives)
        raise DataError(f"{path}{origin}: several CIFAR archives ({names}); pass the one to use")
    if archives:
        return archives[0]
    if allow_empty:
        return None
    what = "empty folder" if not any(path.iterdir()) else "no CIFAR-10 data found"
    raise DataError(f"{path}{origin}: {what}; expected {_EXPECTED}")


def _locate_official(folder: Path) -> Path | None:
    """The extracted batches folder or the official archive inside folder, if there is one."""
    if (folder / BATCHES_FOLDER).is_dir():
        return folder / BATCHES_FOLDER
    if (folder / ARCHIVE_NAME).is_file():
        return folder / ARCHIVE_NAME
    return None


def _is_batches_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _BATCH_FILES)


def _is_image_root(folder: Path) -> bool:
    return any((folder / split).is_dir() for split in _SPLITS)


def _worker_count(num_workers: int | None) -> int:
    # Worker processes are forked: spawning would re-import the user's main script,
    # which breaks scripts without an `if __name__ == "__main__"` guard.
    if sys.platform != "linux":
        return 1
    if num_workers is None:
        return len(os.sched_getaffinity(0))
    return max(num_workers, 1)


def _decode_source(source: Path, workers: int) -> CIFAR10:
    """Decode a located source into in-memory arrays."""
    if source.is_file():
        return _read_archive(source, workers)
    if _is_batches_folder(source):
        blobs = {name: (str(source / name), (source / name).read_bytes())
                 for name in _BATCH_FILES if (source / name).is_file()}
        return _from_batches(blobs, str(source))
    return _read_image_folder(source, workers)


# ---------------------------------------------------------------------------
# Archives and folders
# ---------------------------------------------------------------------------


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (name, contents) of each regular file in a .tar or .tar.gz, reading it once front to back."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if compressed else raw
        try:
            # Streaming mode never seeks backwards, so a .tar.gz is decompressed exactly once.
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if member.isfile():
                        yield member.name, tar.extractfile(member).read()
                end = tar.offset
            if compressed:
                # GzipFile checks the CRC and length at the end of the stream: this
                # catches truncation and corruption that tarfile lets pass.
                while stream.read(1 << 20):
                    pass
            else:
                # tarfile stops quietly at a cut-off or garbled header; a complete
                # archive ends in (at least two) zero blocks instead.
                raw.seek(end)
                tail = raw.read()
                if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
                    raise DataError(f"{path}: corrupt or truncated archive (no end-of-archive marker at byte {end})")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {e})") from e


def _read_archive(path: Path, workers: int) -> CIFAR10:
    """Decode an archive holding either the official pickled batches or train/ and test/ images."""
    batches: dict[str, tuple[str, bytes]] = {}
    prefix = None
    decoder = _ImageDecoder(workers)
    try:
        for name, data in _tar_members(path):
            parts = PurePosixPath(name).parts
            where = f"{path}:{name}"
            if parts[-1].startswith("."):  # hidden files, e.g. macOS "._x.png" resource forks
                continue
            if parts[-1] in _BATCH_FILES:
                if parts[-1] in batches:
                    raise DataError(f"{where}: {parts[-1]} appears twice in the archive")
                batches[parts[-1]] = (where, data)
            elif parts[-1].lower().endswith(_IMAGE_SUFFIXES):
                if len(parts) < 3:
                    raise DataError(f"{where}: image is not inside train/<class>/ or test/<class>/")
                if prefix is None:
                    prefix = parts[:-3]
                elif parts[:-3] != prefix:
                    top = "/".join(prefix) + "/" if prefix else ""
                    raise DataError(f"{where}: expected every image under {top}train/<class>/ or {top}test/<class>/")
                decoder.add(_image_key(where, *parts[-3:]), where, data)
        if batches and decoder.keys:
            raise DataError(f"{path}: holds both pickled batches and image files; expected one or the other")
        if batches:
            return _from_batches(batches, str(path))
        if decoder.keys:
            return decoder.finish(str(path))
    finally:
        decoder.close()
    raise DataError(f"{path}: no CIFAR-10 data in this archive; expected {_EXPECTED}")


def _read_image_folder(root: Path, workers: int) -> CIFAR10:
    """Decode train/<class>/* and test/<class>/* images under root."""
    for split in _SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"{root}: missing split folder {split}/ (expected train/<class>/ and test/<class>/)")
    decoder = _ImageDecoder(workers)
    try:
        for split in _SPLITS:
            for class_dir in sorted((root / split).iterdir()):
                if class_dir.name.startswith(".") or not class_dir.is_dir():
                    continue
                for file in sorted(class_dir.iterdir()):
                    if file.name.startswith(".") or file.suffix.lower() not in _IMAGE_SUFFIXES:
                        continue
                    decoder.add(_image_key(str(file), split, class_dir.name, file.name), str(file), file.read_bytes())
        return decoder.finish(str(root))
    finally:
        decoder.close()


def _image_key(where: str, split: str, class_name: str, file_name: str) -> tuple[int, int, str]:
    """Sort key (split, label, file name) of an image at .../split/class_name/file_name."""
    if split not in _SPLITS:
        raise DataError(f"{where}: '{split}' is not a split folder; expected train/<class>/ or test/<class>/")
    if class_name not in CLASSES:
        raise DataError(f"{where}: unknown class folder '{class_name}'; expected one of {', '.join(CLASSES)}")
    return _SPLITS.index(split), CLASSES.index(class_name), file_name


def _decode_image(name: str, data: bytes) -> np.ndarray:
    """Decode one 32x32 RGB PNG or JPEG into uint8 (32, 32, 3)."""
    from PIL import Image  # imported lazily: only image folders need Pillow

    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as image:
            # Check the header before decoding: converting would quietly turn a
            # grayscale or wrongly sized file into plausible-looking data.
            if image.mode != "RGB" or image.size != (32, 32):
                width, height = image.size
                raise DataError(f"{name}: expected a 32x32 RGB image, got {width}x{height} mode {image.mode}")
            return np.asarray(image)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (Pillow raises many exception types for broken files)
        raise DataError(f"{name}: cannot read image ({type(e).__name__}: {e})") from None


def _decode_chunk(chunk: list[tuple[str, bytes]]) -> np.ndarray:
    """Decode (name, bytes) pairs into uint8 (len(chunk), 32, 32, 3); runs in worker processes."""
    images = np.empty((len(chunk), 32, 32, 3), np.uint8)
    for i, (name, data) in enumerate(chunk):
        images[i] = _decode_image(name, data)
    return images


class _ImageDecoder:
    """Collects encoded images and decodes them in chunks, in worker processes once there are many."""

    def __init__(self, workers: int):
        self.workers = workers
        self.keys: list[tuple[int, int, str]] = []
        self._chunk: list[tuple[str, bytes]] = []
        self._parts: list[np.ndarray | Future] = []
        self._pool: ProcessPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def add(self, key: tuple[int, int, str], name: str, data: bytes) -> None:
        self.keys.append(key)
        self._chunk.append((name, data))
        if len(self._chunk) >= _DECODE_CHUNK:
            self._submit()

    def _submit(self, last: bool = False) -> None:
        chunk, self._chunk = self._chunk, []
        # Only data sets of more than one chunk are worth starting processes for.
        if self._pool is None and self.workers > 1 and not last:
            from PIL import Image  # noqa: F401  (import before forking, so workers inherit it)

            # Workers decode while this process keeps reading the archive.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"))
        if self._pool is not None:
            self._parts.append(self._pool.submit(_decode_chunk, chunk))
        else:
            self._parts.append(_decode_chunk(chunk))

    def finish(self, where: str) -> CIFAR10:
        """Wait for all images and order them by (split, class, file name)."""
        if self._chunk:
            self._submit(last=True)
        parts = [part.result() if isinstance(part, Future) else part for part in self._parts]
        self._parts = []
        return _assemble(self.keys, np.concatenate(parts), where)


def _assemble(keys: list[tuple[int, int, str]], images: np.ndarray, where: str) -> CIFAR10:
    """Sort decoded images by key and split them into train and test, checking every class is there."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    keys = [keys[i] for i in order]
    for a, b in itertools.pairwise(keys):
        if a == b:
            raise DataError(f"{where}: {_SPLITS[a[0]]}/{CLASSES[a[1]]}/{a[2]} appears twice")
    images = images[np.array(order)]
    splits = np.array([key[0] for key in keys])
    labels = np.array([key[1] for key in keys], np.int64)
    n_train = int(np.count_nonzero(splits == 0))
    for split, selected in zip(_SPLITS, (slice(0, n_train), slice(n_train, None))):
        present = set(labels[selected].tolist())
        if not present:
            raise DataError(f"{where}: missing split folder {split}/ (no {split}/<class>/ images)")
        missing = [name for i, name in enumerate(CLASSES) if i not in present]
        if missing:
            raise DataError(f"{where}: {split}/ has no images of class {', '.join(missing)}")
    return CIFAR10(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], where)


_PICKLE_GLOBALS = frozenset({
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
})


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10 batches contain (dicts, lists, bytes, NumPy arrays): no arbitrary code."""

    def find_class(self, module: str, name: str):
        # The official pickles predate NumPy 2, which renamed numpy.core to numpy._core.
        module = module.replace("numpy.core.", "numpy._core.")
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(where: str, data: bytes) -> object:
    try:
        return _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001  (pickle raises many exception types for broken input)
        raise DataError(f"{where}: not a CIFAR-10 batch file ({type(e).__name__}: {e})") from None


def _read_batch(where: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 32, 32, 3) and labels int64 (N,) from one pickled batch, checked strictly."""
    batch = _unpickle(where, data)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{where}: expected a dict with keys b'data' and b'labels'")
    pixels = batch[b"data"]
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise DataError(f"{where}: b'data' must be a uint8 array of shape (N, 3072), got {got}")
    labels = np.asarray(batch[b"labels"])
    if len(pixels) == 0 or labels.shape != (len(pixels),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: expected {len(pixels)} integer labels, got {labels.dtype} {labels.shape}")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise DataError(f"{where}: labels must be in 0..9, got values from {labels.min()} to {labels.max()}")
    # Rows are stored channel-major (1024 R, 1024 G, 1024 B values); make them HWC.
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def _from_batches(blobs: dict[str, tuple[str, bytes]], where: str) -> CIFAR10:
    """Assemble the official batches (name -> (location, pickled bytes)) into arrays."""
    missing = [name for name in (*_TRAIN_BATCHES, _TEST_BATCH) if name not in blobs]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}")
    if _META in blobs:
        meta = _unpickle(*blobs[_META])
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if names is not None:
            names = [n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names]
            if names != list(CLASSES):
                raise DataError(f"{blobs[_META][0]}: label_names {names} are not CIFAR-10's {list(CLASSES)}")
    train = [_read_batch(*blobs[name]) for name in _TRAIN_BATCHES]
    test_images, test_labels = _read_batch(*blobs[_TEST_BATCH])
    return CIFAR10(
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        np.ascontiguousarray(test_images),
        test_labels,
        where,
    )


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------


def _download(url: str, dest: Path, md5: str | None) -> None:
    """Fetch url into dest through a temporary file beside it, renamed only once size and md5 check out."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    temp = Path(temp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            expected = response.headers.get("Content-Length")
            print(f"Downloading {url} to {dest}", file=sys.stderr)
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        # A dropped connection can look like a normal end of the body.
        if expected is not None and size != int(expected):
            raise DownloadError(f"download interrupted after {size} of {expected} bytes")
        if md5 is not None and digest.hexdigest() != md5:
            raise DownloadError(f"md5 mismatch: got {digest.hexdigest()}, expected {md5}")
        os.replace(temp, dest)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


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
    data = _decode_source(source, workers)
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


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------


def _check_uint8_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3) with N > 0, got {images.dtype} {images.shape}")


def per_pixel_mean(images: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Mean image float32 (3, H, W) in [0, 1] scale of uint8 images (N, H, W, 3)."""
    _check_uint8_images(images)
    # float64 sums of integers are exact here; chunking avoids an (N, H, W, 3) float64 copy.
    total = np.zeros(images.shape[1:], np.float64)
    for start in range(0, len(images), chunk):
        total += images[start:start + chunk].sum(axis=0, dtype=np.float64)
    mean = total / (len(images) * 255.0)
    return np.ascontiguousarray(mean.transpose(2, 0, 1), dtype=np.float32)


def channel_stats(images: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std, float32 (3,) each, in [0, 1] scale, of uint8 images (N, H, W, 3)."""
    _check_uint8_images(images)
    n, height, width, channels = images.shape
    sums = np.zeros(height * width * channels, np.float64)
    squares = np.zeros_like(sums)
    for start in range(0, n, chunk):
        block = images[start:start + chunk].reshape(-1, height * width * channels)
        sums += block.sum(axis=0, dtype=np.float64)
        squared = block.astype(np.uint16)  # 255**2 fits in uint16
        squared *= squared
        squares += squared.sum(axis=0, dtype=np.float64)
    count = n * height * width
    mean = sums.reshape(-1, channels).sum(axis=0) / count
    variance = squares.reshape(-1, channels).sum(axis=0) / count - mean**2
    std = np.sqrt(np.maximum(variance, 0.0))
    return (mean / 255).astype(np.float32), (std / 255).astype(np.float32)


def _as_stat(value: np.ndarray, name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A mean or std of shape (C,) or (C, H, W) as float32, broadcastable against (N, C, H, W)."""
    value = np.asarray(value, dtype=np.float32)
    if value.shape == shape[:1]:
        return value.reshape(-1, 1, 1)
    if value.shape == shape:
        return value
    raise ValueError(f"{name} must have shape ({shape[0]},) or {shape}, got {value.shape}")


def to_float(images: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None = None) -> np.ndarray:
    """Convert uint8 images (N, H, W, 3) to float32 (N, 3, H, W): x / 255, minus mean (3,) or (3, H, W), over std."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    n, height, width, channels = images.shape
    out = np.empty((n, channels, height, width), np.float32)
    # Scale and transpose in one pass, into a C-contiguous NCHW array.
    np.multiply(images.transpose(0, 3, 1, 2), np.float32(1 / 255), out=out)
    if mean is not None:
        out -= _as_stat(mean, "mean", out.shape[1:])
    if std is not None:
        out /= _as_stat(std, "std", out.shape[1:])
    return out


def train_val_split(n: int, val_size: int = 5000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 index arrays (train (n - val_size,), val (val_size,)) from a fixed random permutation."""
    if not 0 <= val_size <= n:
        raise ValueError(f"val_size must be between 0 and n={n}, got {val_size}")
    permutation = np.random.default_rng(seed).permutation(n)
    return np.sort(permutation[val_size:]), np.sort(permutation[:val_size])


def augment(batch: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True) -> np.ndarray:
    """Random crop after zero padding, and random horizontal flip, of a batch (N, C, H, W); returns a new array.

    Padding with zeros on mean-subtracted data pads with the mean, as the
    usual CIFAR ResNet implementations do. The same `rng` state gives the same result.
    """
    if batch.ndim != 4:
        raise ValueError(f"expected a batch of shape (N, C, H, W), got {batch.shape}")
    n, channels, height, width = batch.shape
    if pad > 0:
        padded = np.zeros((n, channels, height + 2 * pad, width + 2 * pad), batch.dtype)
        padded[:, :, pad:pad + height, pad:pad + width] = batch
        top = rng.integers(0, 2 * pad + 1, n)
        left = rng.integers(0, 2 * pad + 1, n)
        # All (2 pad + 1)^2 crops of every image as a view, shape (N, C, 2 pad + 1, 2 pad + 1, H, W);
        # fancy indexing then copies out one crop per image.
        windows = sliding_window_view(padded, (height, width), axis=(2, 3))
        out = windows[np.arange(n), :, top, left]
    else:
        out = batch.copy()
    if flip:
        mirrored = rng.random(n) < 0.5
        out[mirrored] = out[mirrored, :, :, ::-1]
    return out


# ---------------------------------------------------------------------------
# Mini-batches
# ---------------------------------------------------------------------------


class DataLoader:
    """Mini-batches (x float32 (B, 3, H, W), y int64 (B,)) of a data set, reproducible and exactly resumable.

    `images` are uint8 (N, H, W, 3), converted per batch with `to_float(x, mean, std)`,
    or float32 (N, C, H, W) used as they are. Epoch e is shuffled by
    ``default_rng([seed, e])`` and batch i of it augmented by ``default_rng([seed, e, i, 1])``,
    so the position (epoch, batch) is the whole state. ``iter(loader)`` yields the rest
    of the current epoch and `stream()` yields forever; both start at the saved
    position and advance it as batches are consumed (use one at a time).
    `prefetch` > 0 prepares that many batches ahead in a background thread,
    giving the very same batches.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int = 128,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: bool = False,  # shadows the function `augment` only inside __init__
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
        seed: int = 0,
        prefetch: int = 0,
    ):
        if images.ndim != 4 or images.dtype not in (np.uint8, np.float32):
            raise ValueError(f"images must be uint8 (N, H, W, 3) or float32 (N, C, H, W), got {images.dtype} "
                             f"{images.shape}")
        if images.dtype == np.float32 and (mean is not None or std is not None):
            raise ValueError("mean and std apply to uint8 images; float32 images are used as they are")
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
        if batch_size < 1 or seed < 0 or prefetch < 0:
            raise ValueError(f"need batch_size >= 1, seed >= 0, prefetch >= 0; got {batch_size}, {seed}, {prefetch}")
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.mean = None if mean is None else np.asarray(mean, np.float32)
        self.std = None if std is None else np.asarray(std, np.float32)
        self.seed = seed
        self.prefetch = prefetch
        self.epoch = 0  # position of the next batch to yield
        self.batch = 0
        if len(self) == 0:
            raise ValueError(f"{len(images)} samples make no batch of {batch_size} (drop_last={drop_last})")
        if images.dtype == np.uint8:
            to_float(images[:1], self.mean, self.std)  # report a bad mean or std now, not mid-training

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return len(self.images) // self.batch_size
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch: {"epoch": e, "batch": i}."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by `state_dict`."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"invalid position epoch={epoch}, batch={batch} for {len(self)} batches per epoch")
        self.epoch, self.batch = (epoch + 1, 0) if batch == len(self) else (epoch, batch)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (x, y) batches for the rest of the current epoch."""
        return self._run(forever=False)

    def stream(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (x, y) batches forever, epoch after epoch."""
        return self._run(forever=True)

    def _run(self, forever: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        produced = self._produce(self.epoch, self.batch, forever)
        if self.prefetch:
            produced = _prefetched(produced, self.prefetch)
        try:
            for epoch, index, x, y in produced:
                # Advance before yielding: a checkpoint taken after using this batch resumes at the next one.
                self.epoch, self.batch = (epoch, index + 1) if index + 1 < len(self) else (epoch + 1, 0)
                yield x, y
        finally:
            produced.close()

    def _produce(self, epoch: int, index: int, forever: bool) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        while True:
            order = self._order(epoch)
            for i in range(index, len(self)):
                yield epoch, i, *self._make_batch(order, epoch, i)
            if not forever:
                return
            epoch, index = epoch + 1, 0

    def _order(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        return np.arange(len(self.images))

    def _make_batch(self, order: np.ndarray, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        selected = order[index * self.batch_size:(index + 1) * self.batch_size]
        x = self.images[selected]
        if x.dtype == np.uint8:
            x = to_float(x, self.mean, self.std)
        if self.augment:
            x = augment(x, np.random.default_rng([self.seed, epoch, index, 1]))
        return x, self.labels[selected]


def _prefetched(items: Iterator, size: int) -> Iterator:
    """Yield from items, which a daemon thread computes up to `size` ahead; its exceptions re-raise here."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(entry: tuple[str, object]) -> bool:
        # Time out now and then to notice that the consumer has gone away.
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except Exception as e:  # noqa: BLE001  (handed over to the consumer, which re-raises it)
            put(("error", e))
        finally:
            items.close()

    thread = threading.Thread(target=produce, name="tinyres-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
