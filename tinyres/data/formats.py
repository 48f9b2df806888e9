"""The forms CIFAR-10 comes in: recognize each on disk and decode it into arrays.

* the official python archive ``cifar-10-python.tar.gz`` or its extracted
  ``cifar-10-batches-py/`` folder of pickled batches (unpickled with a whitelist, never arbitrary objects);
* an image layout ``train/<class>/*.png|jpg`` and ``test/<class>/*``, as a folder
  or as a ``.tar`` / ``.tar.gz`` (optionally under one top-level folder).

Every problem is a `DataError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import pickle
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_FOLDER = "cifar-10-batches-py"
EXPECTED_FORMS = (
    "the official cifar-10-python.tar.gz, its extracted cifar-10-batches-py/ folder, or "
    "train/<class>/ and test/<class>/ image folders (as a folder or a .tar/.tar.gz)"
)

_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"
_BATCH_FILES = (*_TRAIN_BATCHES, _TEST_BATCH, _META)
_SPLITS = ("train", "test")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Images per decoding task: big enough to amortize inter-process traffic, small
# enough that reading the archive and decoding overlap.
_DECODE_CHUNK = 1000

ImageKey = tuple[int, int, str]  # (split index, class index, file name): the order images are served in
EncodedImage = tuple[ImageKey, str, bytes]  # (key, location for error messages, PNG or JPEG bytes)


class DataError(ValueError):
    """The data set is missing, malformed or not what CIFAR-10 should be."""


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
# Finding the data
# ---------------------------------------------------------------------------


def locate(path: Path, *, allow_empty: bool = False, origin: str = "") -> Path | None:
    """The data source at path (an archive, a batches folder or an image-folder root); None if a folder has none."""
    if not path.exists():
        raise FileNotFoundError(f"{path}{origin}: no such file or folder (expected {EXPECTED_FORMS})")
    if path.is_file() or _is_batches_folder(path) or _is_image_root(path):
        return path
    found = locate_official(path)
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
    raise DataError(f"{path}{origin}: {what}; expected {EXPECTED_FORMS}")


def locate_official(folder: Path) -> Path | None:
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


# ---------------------------------------------------------------------------
# Decoding archives and folders
# ---------------------------------------------------------------------------


def decode_source(source: Path, workers: int) -> CIFAR10:
    """Decode a located source into in-memory arrays."""
    if source.is_file():
        return _read_archive(source, workers)
    if _is_batches_folder(source):
        blobs = {name: (str(source / name), (source / name).read_bytes())
                 for name in _BATCH_FILES if (source / name).is_file()}
        return _from_batches(blobs, str(source))
    return _read_image_folder(source, workers)


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (name, contents) of each regular file in a .tar or .tar.gz, front to back, then check its end."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    yield member.name, tar.extractfile(member).read()
            # tarfile stops quietly at a header that is cut off or garbled; a complete archive ends
            # in (at least two) zero blocks instead. Reading to the end also makes gzip check its
            # CRC and length, which catches corruption that tarfile lets pass.
            tar.fileobj.seek(tar.offset)
            tail = tar.fileobj.read()
            if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
                raise DataError(f"{path}: corrupt or truncated archive (no end-of-archive marker at byte {tar.offset})")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {e})") from e


def _read_archive(path: Path, workers: int) -> CIFAR10:
    """Decode an archive holding either the official pickled batches or train/ and test/ images."""
    batches: dict[str, tuple[str, bytes]] = {}

    def images() -> Iterator[EncodedImage]:
        # Batches are set aside; images are decoded while the rest of the archive is read.
        prefix = None
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
                yield _image_key(where, *parts[-3:]), where, data

    keys, decoded = _decode_images(images(), workers)
    if batches and keys:
        raise DataError(f"{path}: holds both pickled batches and image files; expected one or the other")
    if batches:
        return _from_batches(batches, str(path))
    if keys:
        return _assemble(keys, decoded, str(path))
    raise DataError(f"{path}: no CIFAR-10 data in this archive; expected {EXPECTED_FORMS}")


def _read_image_folder(root: Path, workers: int) -> CIFAR10:
    """Decode train/<class>/* and test/<class>/* images under root."""
    for split in _SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"{root}: missing split folder {split}/ (expected train/<class>/ and test/<class>/)")
    keys, decoded = _decode_images(_folder_images(root), workers)
    return _assemble(keys, decoded, str(root))


def _folder_images(root: Path) -> Iterator[EncodedImage]:
    """The image files under root/<split>/<class>/, skipping hidden files and folders and other files."""
    for split in _SPLITS:
        for class_dir in sorted((root / split).iterdir()):
            if class_dir.name.startswith(".") or not class_dir.is_dir():
                continue
            for file in sorted(class_dir.iterdir()):
                if file.name.startswith(".") or file.suffix.lower() not in _IMAGE_SUFFIXES:
                    continue
                yield _image_key(str(file), split, class_dir.name, file.name), str(file), file.read_bytes()


def _image_key(where: str, split: str, class_name: str, file_name: str) -> ImageKey:
    """Sort key (split, label, file name) of an image at .../split/class_name/file_name."""
    if split not in _SPLITS:
        raise DataError(f"{where}: '{split}' is not a split folder; expected train/<class>/ or test/<class>/")
    if class_name not in CLASSES:
        raise DataError(f"{where}: unknown class folder '{class_name}'; expected one of {', '.join(CLASSES)}")
    return _SPLITS.index(split), CLASSES.index(class_name), file_name


def _decode_images(images: Iterable[EncodedImage], workers: int) -> tuple[list[ImageKey], np.ndarray]:
    """Keys and uint8 (N, 32, 32, 3) images; decoded in `workers` processes if there is more than one chunk of them."""
    keys: list[ImageKey] = []
    parts: list[np.ndarray | Future] = []
    pool = None
    try:
        for chunk in _chunks(images, _DECODE_CHUNK):
            keys += [key for key, _, _ in chunk]
            encoded = [(where, data) for _, where, data in chunk]
            if pool is None and workers > 1 and len(chunk) == _DECODE_CHUNK:
                from PIL import Image  # noqa: F401  (imported before forking, so workers inherit it)

                # Workers decode while this process keeps reading the archive.
                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            parts.append(pool.submit(_decode_chunk, encoded) if pool else _decode_chunk(encoded))
        arrays = [part.result() if isinstance(part, Future) else part for part in parts]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return keys, np.concatenate(arrays) if arrays else np.empty((0, 32, 32, 3), np.uint8)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _decode_chunk(encoded: list[tuple[str, bytes]]) -> np.ndarray:
    """Decode (location, bytes) pairs into uint8 (len(encoded), 32, 32, 3); runs in worker processes."""
    images = np.empty((len(encoded), 32, 32, 3), np.uint8)
    for i, (where, data) in enumerate(encoded):
        images[i] = _decode_image(where, data)
    return images


def _decode_image(where: str, data: bytes) -> np.ndarray:
    """Decode one 32x32 RGB PNG or JPEG into uint8 (32, 32, 3)."""
    from PIL import Image  # imported lazily: only image folders need Pillow

    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as image:
            # Check the header before decoding: converting would quietly turn a
            # grayscale or wrongly sized file into plausible-looking data.
            if image.mode != "RGB" or image.size != (32, 32):
                width, height = image.size
                raise DataError(f"{where}: expected a 32x32 RGB image, got {width}x{height} mode {image.mode}")
            return np.asarray(image)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (Pillow raises many exception types for broken files)
        raise DataError(f"{where}: cannot read image ({type(e).__name__}: {e})") from None


def _assemble(keys: list[ImageKey], images: np.ndarray, where: str) -> CIFAR10:
    """Sort decoded images by key and split them into train and test, checking every class is there."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    keys = [keys[i] for i in order]
    for a, b in itertools.pairwise(keys):
        if a == b:
            raise DataError(f"{where}: {_SPLITS[a[0]]}/{CLASSES[a[1]]}/{a[2]} appears twice")
    images = images[np.array(order, np.int64)]
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


# ---------------------------------------------------------------------------
# The official pickled batches
# ---------------------------------------------------------------------------


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
