"""Tests of tinyres.data on small synthetic data sets built here, in every supported form, and on the real archive."""

from __future__ import annotations

import gc
import gzip
import hashlib
import io
import os
import pickle
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.testing import assert_allclose, assert_array_equal

from tinyres import data
from tinyres.data import (
    ARCHIVE_NAME,
    CLASSES,
    DataError,
    DataLoader,
    DownloadError,
    augment,
    channel_stats,
    formats,
    load_cifar10,
    per_pixel_mean,
    to_float,
    train_val_split,
)

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """No test sees the user's TINYRES_DATA, writes to ~/.cache or sends localhost traffic through a proxy."""
    monkeypatch.delenv("TINYRES_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# ---------------------------------------------------------------------------
# Building data sets in every form
# ---------------------------------------------------------------------------


def make_arrays(train_per_class: int = 3, test_per_class: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images and shuffled labels, as the official batches would hold them."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        arrays[f"{split}_labels"] = labels.astype(np.int64)
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    return arrays


def sorted_by_class(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays in the order an image folder gives them: by class, then file name (= order of appearance)."""
    out = {}
    for split in ("train", "test"):
        order = np.argsort(arrays[f"{split}_labels"], kind="stable")
        out[f"{split}_images"] = arrays[f"{split}_images"][order]
        out[f"{split}_labels"] = arrays[f"{split}_labels"][order]
    return out


def batch_bytes(images: np.ndarray, labels: np.ndarray, overrides: dict | None = None) -> bytes:
    """One pickled batch in the official layout (rows of 3072 bytes, channel-major)."""
    batch = {
        b"batch_label": b"synthetic batch",
        b"labels": [int(label) for label in labels],
        b"data": images.transpose(0, 3, 1, 2).reshape(len(images), 3072),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    batch.update(overrides or {})
    return pickle.dumps(batch, protocol=2)


def write_batches(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """cifar-10-batches-py/ as in the official archive."""
    folder.mkdir(parents=True)
    parts = np.array_split(np.arange(len(arrays["train_labels"])), 5)
    for i, part in enumerate(parts, start=1):
        (folder / f"data_batch_{i}").write_bytes(batch_bytes(arrays["train_images"][part], arrays["train_labels"][part]))
    (folder / "test_batch").write_bytes(batch_bytes(arrays["test_images"], arrays["test_labels"]))
    meta = {b"label_names": [name.encode() for name in CLASSES], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    (folder / "readme.html").write_text("<html>the official archive has one of these</html>")
    return folder


def write_official_archive(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """cifar-10-python.tar.gz: the batches folder, gzipped."""
    folder = write_batches(path.parent / f"{path.name}.src" / "cifar-10-batches-py", arrays)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return path


def write_image_folder(root: Path, arrays: dict[str, np.ndarray], suffix: str = ".png") -> Path:
    """train/<class>/NNNN.png and test/<class>/NNNN.png, numbered in order of appearance."""
    for split in ("train", "test"):
        counts = dict.fromkeys(range(10), 0)
        for image, label in zip(arrays[f"{split}_images"], arrays[f"{split}_labels"]):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{counts[label]:04d}{suffix}")
            counts[label] += 1
    return root


def write_image_tar(path: Path, root: Path, prefix: str = "cifar10") -> Path:
    """The image folder as a .tar or .tar.gz (by the name of path), under an optional top-level folder."""
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=f"{prefix}/{split}" if prefix else split)
    return path


def png_bytes(image: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image, mode).save(out, format="PNG")
    return out.getvalue()


def assert_same(loaded: data.CIFAR10, expected: dict[str, np.ndarray]) -> None:
    for name, array in expected.items():
        got = getattr(loaded, name)
        assert got.dtype == array.dtype, name
        assert_array_equal(got, array, err_msg=name)


def cache_entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*")) if cache.exists() else []


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return make_arrays()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# ---------------------------------------------------------------------------
# Loading every form
# ---------------------------------------------------------------------------


def test_batches_folder_loads_exactly(tmp_path, cache, arrays):
    folder = write_batches(tmp_path / "cifar-10-batches-py", arrays)
    loaded = load_cifar10(folder, cache_dir=cache)
    assert_same(loaded, arrays)
    assert loaded.train_images.shape == (30, 32, 32, 3) and loaded.test_labels.shape == (20,)
    assert loaded.source == str(folder)
    assert "CIFAR10(train=30, test=20" in repr(loaded)


def test_official_archive_loads_exactly(tmp_path, cache, arrays):
    archive = write_official_archive(tmp_path / ARCHIVE_NAME, arrays)
    assert_same(load_cifar10(archive, cache_dir=cache), arrays)
    # A folder holding the archive (or the extracted folder) works too.
    assert_same(load_cifar10(tmp_path, cache_dir=cache), arrays)


@pytest.mark.parametrize("name, prefix", [("images.tar.gz", "cifar10"), ("images.tar", ""), ("x.tgz", "a")])
def test_png_archive_loads_exactly(tmp_path, cache, arrays, name, prefix):
    root = write_image_folder(tmp_path / "png", arrays)
    archive = write_image_tar(tmp_path / name, root, prefix)
    assert_same(load_cifar10(archive, cache_dir=cache), sorted_by_class(arrays))


def test_png_folder_loads_exactly_and_ignores_strays(tmp_path, cache, arrays):
    root = write_image_folder(tmp_path / "png", arrays)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"editor backup")
    (root / "test" / ".ipynb_checkpoints").mkdir()
    assert_same(load_cifar10(root, cache_dir=cache), sorted_by_class(arrays))


def test_jpeg_folder_and_archive_load_closely(tmp_path, cache):
    # Smooth images (a colour plus a ramp), so that JPEG's loss stays small.
    arrays = make_arrays(2, 1)
    ramp = np.linspace(0, 120, 32)[None, None, :, None]
    for split in ("train", "test"):
        colour = arrays[f"{split}_images"][:, :1, :1, :] // 2
        arrays[f"{split}_images"] = np.broadcast_to(colour + ramp, colour.shape[:1] + (32, 32, 3)).astype(np.uint8)
    root = write_image_folder(tmp_path / "jpg", arrays, suffix=".jpg")
    expected = sorted_by_class(arrays)
    for source in (root, write_image_tar(tmp_path / "cifar10-jpeg.tar.gz", root)):
        loaded = load_cifar10(source, cache_dir=cache)
        for name in ("train", "test"):
            assert_array_equal(getattr(loaded, f"{name}_labels"), expected[f"{name}_labels"])
            error = np.abs(getattr(loaded, f"{name}_images").astype(int) - expected[f"{name}_images"].astype(int))
            assert error.mean() < 3


def test_folder_with_a_cifar_archive_and_environment_variable(tmp_path, cache, arrays, monkeypatch):
    folder = tmp_path / "downloads"
    folder.mkdir()
    write_image_tar(folder / "cifar10-png.tar.gz", write_image_folder(tmp_path / "png", arrays))
    expected = sorted_by_class(arrays)
    assert_same(load_cifar10(folder, cache_dir=cache), expected)
    monkeypatch.setenv("TINYRES_DATA", str(folder))
    loaded = load_cifar10(cache_dir=cache)
    assert_same(loaded, expected)
    assert loaded.source == str(folder / "cifar10-png.tar.gz")


def test_several_archives_in_a_folder_are_ambiguous(tmp_path, cache, arrays):
    root = write_image_folder(tmp_path / "png", arrays)
    folder = tmp_path / "downloads"
    folder.mkdir()
    write_image_tar(folder / "cifar10-a.tar.gz", root)
    write_image_tar(folder / "cifar10-b.tar", root)
    with pytest.raises(DataError, match="several CIFAR archives"):
        load_cifar10(folder, cache_dir=cache)


def test_worker_processes_decode_the_same(tmp_path, cache, arrays, monkeypatch):
    monkeypatch.setattr(formats, "_DECODE_CHUNK", 7)  # several chunks, so the pool starts
    root = write_image_folder(tmp_path / "png", arrays)
    loaded = load_cifar10(root, cache_dir=cache, num_workers=2)
    assert_same(loaded, sorted_by_class(arrays))
    # An error in a worker surfaces here, naming the file.
    (root / "train" / "dog" / "0001.png").write_bytes(png_bytes(np.zeros((32, 32), np.uint8)))
    with pytest.raises(DataError, match=r"dog/0001\.png.*mode L"):
        load_cifar10(root, cache_dir=tmp_path / "cache2", num_workers=2)


# ---------------------------------------------------------------------------
# The cache of decoded arrays
# ---------------------------------------------------------------------------


def test_cache_is_memory_mapped_and_keyed_to_the_source(tmp_path, cache, arrays):
    archive = write_official_archive(tmp_path / ARCHIVE_NAME, arrays)
    first = load_cifar10(archive, cache_dir=cache)
    start = time.perf_counter()
    second = load_cifar10(archive, cache_dir=cache)
    assert time.perf_counter() - start < 1.0
    assert_same(second, arrays)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert isinstance(getattr(first, name), np.memmap) and isinstance(getattr(second, name), np.memmap)
        assert Path(getattr(second, name).filename).parent.parent == cache
    assert len(list(cache.glob("cifar10-*"))) == 1
    # A changed source gets a new cache entry.
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert_same(load_cifar10(archive, cache_dir=cache), arrays)
    assert len(list(cache.glob("cifar10-*"))) == 2
    assert not [p for p in cache_entries(cache) if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("damage", ["truncate images", "delete labels", "garble manifest", "bad labels"])
def test_corrupt_cache_is_rebuilt(tmp_path, cache, arrays, damage):
    archive = write_official_archive(tmp_path / ARCHIVE_NAME, arrays)
    load_cifar10(archive, cache_dir=cache)
    (entry,) = cache.glob("cifar10-*")
    if damage == "truncate images":
        size = (entry / "train_images.npy").stat().st_size
        with open(entry / "train_images.npy", "r+b") as f:
            f.truncate(size // 2)
    elif damage == "delete labels":
        (entry / "test_labels.npy").unlink()
    elif damage == "garble manifest":
        (entry / "manifest.json").write_text("{not json")
    else:
        np.save(entry / "train_labels.npy", np.full(30, 99, np.int64))
    assert_same(load_cifar10(archive, cache_dir=cache), arrays)
    assert (entry / "train_images.npy").stat().st_size == 30 * 3072 + 128


def test_failed_decode_leaves_no_cache(tmp_path, cache, arrays):
    root = write_image_folder(tmp_path / "png", arrays)
    (root / "test" / "cat" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError):
        load_cifar10(root, cache_dir=cache)
    assert cache_entries(cache) == []


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_missing_path_and_empty_folder(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_cifar10(tmp_path / "nowhere", cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        load_cifar10(tmp_path / "empty", cache_dir=cache)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no CIFAR-10 data"):
        load_cifar10(tmp_path / "other", cache_dir=cache)
    assert cache_entries(cache) == []


@pytest.mark.parametrize("kind", ["truncated gz", "corrupt gz", "truncated tar at member", "truncated tar in data",
                                  "not an archive", "empty file"])
def test_corrupt_or_truncated_archive(tmp_path, cache, arrays, kind):
    root = write_image_folder(tmp_path / "png", arrays)
    if kind.endswith("gz"):
        path = write_official_archive(tmp_path / ARCHIVE_NAME, arrays)
        blob = bytearray(path.read_bytes())
        if kind == "truncated gz":
            del blob[len(blob) * 2 // 3:]
        else:
            blob[len(blob) // 2:len(blob) // 2 + 16] = bytes(16)
    elif kind.startswith("truncated tar"):
        path = write_image_tar(tmp_path / "images.tar", root)
        with tarfile.open(path) as tar:
            member = tar.getmembers()[len(tar.getmembers()) // 2]
        blob = bytearray(path.read_bytes())
        del blob[member.offset if kind.endswith("member") else member.offset_data + 100:]
    else:
        path = tmp_path / "cifar10.tar.gz"
        blob = bytearray(os.urandom(5000) if kind == "not an archive" else b"")
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=f"{path.name}: corrupt or truncated archive"):
        load_cifar10(path, cache_dir=cache)
    assert cache_entries(cache) == []


def test_gzipped_tar_cut_at_a_member_is_truncated(tmp_path, cache, arrays):
    # The gzip stream is whole and every class is still there (the cut drops test/truck/0001.png):
    # only the missing end-of-archive marker of the tar inside shows that images are missing.
    plain = write_image_tar(tmp_path / "images.tar", write_image_folder(tmp_path / "png", arrays))
    with tarfile.open(plain) as tar:
        last = tar.getmembers()[-1]
    assert last.name == "cifar10/test/truck/0001.png"
    cut = last.offset
    path = tmp_path / "images.tar.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()[:cut]))
    with pytest.raises(DataError, match=f"{path.name}: corrupt or truncated archive"):
        load_cifar10(path, cache_dir=cache)
    assert cache_entries(cache) == []


def test_missing_split_folder(tmp_path, cache, arrays):
    root = write_image_folder(tmp_path / "png", arrays)
    for split in ("test", "train"):
        os.rename(root / split, root / f"{split}-moved")
        with pytest.raises(DataError, match=f"missing split folder {split}/"):
            load_cifar10(root, cache_dir=cache)
        os.rename(root / f"{split}-moved", root / split)
    only_train = tmp_path / "only-train.tar.gz"
    with tarfile.open(only_train, "w:gz") as tar:
        tar.add(root / "train", arcname="train")
    with pytest.raises(DataError, match="missing split folder test/"):
        load_cifar10(only_train, cache_dir=cache)
    assert cache_entries(cache) == []


def test_unknown_class_folder_and_missing_class(tmp_path, cache, arrays):
    root = write_image_folder(tmp_path / "png", arrays)
    (root / "train" / "dragon").mkdir()
    (root / "train" / "dragon" / "0000.png").write_bytes(png_bytes(arrays["train_images"][0]))
    with pytest.raises(DataError, match="unknown class folder 'dragon'"):
        load_cifar10(root, cache_dir=cache)
    with pytest.raises(DataError, match="unknown class folder 'dragon'"):
        load_cifar10(write_image_tar(tmp_path / "x.tar", root), cache_dir=cache)
    (root / "train" / "dragon" / "0000.png").unlink()
    for file in (root / "test" / "frog").iterdir():
        file.unlink()
    with pytest.raises(DataError, match="test/ has no images of class frog"):
        load_cifar10(root, cache_dir=cache)
    assert cache_entries(cache) == []


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32), np.uint8), "32x32 mode L"),
    (np.zeros((32, 32, 4), np.uint8), "32x32 mode RGBA"),
    (np.zeros((28, 28, 3), np.uint8), "28x28 mode RGB"),
    (np.zeros((32, 33, 3), np.uint8), "33x32 mode RGB"),
])
def test_image_that_is_not_32x32_rgb(tmp_path, cache, arrays, image, message):
    root = write_image_folder(tmp_path / "png", arrays)
    (root / "train" / "ship" / "0001.png").write_bytes(png_bytes(image))
    with pytest.raises(DataError, match=rf"ship/0001\.png: expected a 32x32 RGB image, got {message}"):
        load_cifar10(root, cache_dir=cache)
    with pytest.raises(DataError, match=rf"images\.tar\.gz:cifar10/train/ship/0001\.png: .*got {message}"):
        load_cifar10(write_image_tar(tmp_path / "images.tar.gz", root), cache_dir=cache)
    assert cache_entries(cache) == []


def test_grayscale_jpeg_is_an_error(tmp_path, cache, arrays):
    root = write_image_folder(tmp_path / "jpg", arrays, suffix=".jpg")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "test" / "bird" / "0000.jpg")
    with pytest.raises(DataError, match=r"bird/0000\.jpg: .*mode L"):
        load_cifar10(root, cache_dir=cache)


@pytest.mark.parametrize("content", [b"definitely not an image", b"truncated"])
def test_unreadable_image(tmp_path, cache, arrays, content):
    root = write_image_folder(tmp_path / "png", arrays)
    path = root / "train" / "horse" / "0002.png"
    if content == b"truncated":
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"horse/0002\.png: cannot read image"):
        load_cifar10(root, cache_dir=cache)
    assert cache_entries(cache) == []


def test_image_outside_the_split_folders(tmp_path, cache, arrays):
    root = write_image_folder(tmp_path / "png", arrays)
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(root / "train", arcname="train")
        tar.add(root / "test", arcname="test")
        tar.add(root / "train" / "cat" / "0000.png", arcname="stray.png")
    with pytest.raises(DataError, match="stray.png: image is not inside train/<class>/"):
        load_cifar10(path, cache_dir=cache)


def _broken_batches(folder: Path, arrays, case: str) -> None:
    images, labels = arrays["train_images"][:6], arrays["train_labels"][:6]
    if case == "shape":
        blob = batch_bytes(images, labels, {b"data": np.zeros((6, 3000), np.uint8)})
    elif case == "dtype":
        blob = batch_bytes(images, labels, {b"data": np.zeros((6, 3072), np.int32)})
    elif case == "label range":
        blob = batch_bytes(images, labels, {b"labels": [0, 1, 2, 3, 4, 10]})
    elif case == "label count":
        blob = batch_bytes(images, labels, {b"labels": [0, 1, 2]})
    elif case == "not a dict":
        blob = pickle.dumps([1, 2, 3], protocol=2)
    elif case == "not a pickle":
        blob = b"garbage" * 10
    else:  # a pickle that would run a shell command when loaded
        blob = b"cos\nsystem\n(S'echo hacked'\ntR."
    (folder / "data_batch_2").write_bytes(blob)


@pytest.mark.parametrize("case, message", [
    ("shape", r"uint8 array of shape \(N, 3072\), got uint8 \(6, 3000\)"),
    ("dtype", r"got int32 \(6, 3072\)"),
    ("label range", "labels must be in 0..9, got values from 0 to 10"),
    ("label count", r"expected 6 integer labels, got int64 \(3,\)"),
    ("not a dict", "expected a dict"),
    ("not a pickle", "not a CIFAR-10 batch file"),
    ("code", "refusing to load os.system|posix.system"),
])
def test_malformed_batches(tmp_path, cache, arrays, case, message):
    folder = write_batches(tmp_path / "cifar-10-batches-py", arrays)
    _broken_batches(folder, arrays, case)
    with pytest.raises(DataError, match=rf"data_batch_2: .*({message})"):
        load_cifar10(folder, cache_dir=cache)
    assert cache_entries(cache) == []


def test_missing_batch_and_wrong_label_names(tmp_path, cache, arrays):
    folder = write_batches(tmp_path / "cifar-10-batches-py", arrays)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_cifar10(folder, cache_dir=cache)
    folder = write_batches(tmp_path / "b" / "cifar-10-batches-py", arrays)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"apple"] * 100}, protocol=2))
    with pytest.raises(DataError, match="label_names"):
        load_cifar10(folder, cache_dir=cache)


# ---------------------------------------------------------------------------
# Download from a real local HTTP server
# ---------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        body, behaviour = route
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if behaviour == "interrupted":
            # Promise the whole body, send half, hang up.
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        else:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.routes = {}
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def official_blob(tmp_path_factory, arrays) -> bytes:
    return write_official_archive(tmp_path_factory.mktemp("official") / ARCHIVE_NAME, arrays).read_bytes()


def _serve(server, blob: bytes, behaviour: str = "whole") -> str:
    server.routes["/kriz/cifar-10-python.tar.gz"] = (blob, behaviour)
    return f"http://127.0.0.1:{server.server_port}/kriz/cifar-10-python.tar.gz"


def _assert_helpful(error: pytest.ExceptionInfo, url: str, cache: Path) -> None:
    message = str(error.value)
    for part in (url, str(cache), ARCHIVE_NAME, "--data PATH", "TINYRES_DATA"):
        assert part in message


def test_download_verifies_and_caches(server, cache, arrays, official_blob):
    url = _serve(server, official_blob)
    md5 = hashlib.md5(official_blob).hexdigest()
    assert_same(load_cifar10(cache_dir=cache, url=url, md5=md5), arrays)
    assert (cache / ARCHIVE_NAME).read_bytes() == official_blob
    assert not [p for p in cache_entries(cache) if p.name.startswith(".")]
    # Later loads need no network.
    server.routes.clear()
    assert_same(load_cifar10(cache_dir=cache, url=url, download=False), arrays)


def test_download_into_tinyres_data_folder(server, tmp_path, arrays, official_blob, monkeypatch):
    folder = tmp_path / "data-home"
    folder.mkdir()
    monkeypatch.setenv("TINYRES_DATA", str(folder))
    url = _serve(server, official_blob)
    assert_same(load_cifar10(url=url, md5=hashlib.md5(official_blob).hexdigest()), arrays)
    assert (folder / ARCHIVE_NAME).is_file()


@pytest.mark.parametrize("failure", ["interrupted", "md5 mismatch", "not found"])
def test_failed_download_leaves_nothing(server, cache, official_blob, failure):
    url = _serve(server, official_blob, "interrupted" if failure == "interrupted" else "whole")
    md5 = "0" * 32 if failure == "md5 mismatch" else hashlib.md5(official_blob).hexdigest()
    if failure == "not found":
        url = url.replace("kriz", "nobody")
    with pytest.raises(DownloadError, match={"interrupted": "interrupted after", "md5 mismatch": "md5 mismatch",
                                             "not found": "404"}[failure]) as error:
        load_cifar10(cache_dir=cache, url=url, md5=md5)
    _assert_helpful(error, url, cache)
    assert cache_entries(cache) == []


def test_offline(cache):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"
    with pytest.raises(DownloadError, match="refused") as error:
        load_cifar10(cache_dir=cache, url=url)
    _assert_helpful(error, url, cache)
    with pytest.raises(DownloadError, match="download=False") as error:
        load_cifar10(cache_dir=cache, url=url, download=False)
    _assert_helpful(error, url, cache)
    assert [p for p in cache_entries(cache) if p.is_file()] == []


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------


uint8_images = hnp.arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 4), st.integers(1, 4), st.just(3)))


@given(uint8_images, st.integers(1, 4))
def test_statistics_match_a_float64_reference(images, chunk):
    reference = images.astype(np.float64) / 255
    mean = per_pixel_mean(images, chunk=chunk)
    assert mean.dtype == np.float32 and mean.shape == (3, *images.shape[1:3]) and mean.flags.c_contiguous
    assert_allclose(mean, reference.mean(axis=0).transpose(2, 0, 1), rtol=1e-6, atol=1e-7)
    channel_mean, channel_std = channel_stats(images, chunk=chunk)
    assert channel_mean.dtype == channel_std.dtype == np.float32
    assert_allclose(channel_mean, reference.mean(axis=(0, 1, 2)), rtol=1e-6, atol=1e-7)
    assert_allclose(channel_std, reference.std(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)


def test_statistics_of_many_pixels_do_not_saturate():
    # 50,000 images: a float32 accumulator would lose the low bits; these sums are exact.
    images = np.broadcast_to(np.array([200, 100, 1], np.uint8), (50000, 32, 32, 3))
    assert_allclose(per_pixel_mean(images)[:, 5, 7], np.array([200, 100, 1]) / 255, rtol=1e-7)
    mean, std = channel_stats(images)
    assert_allclose(mean, np.array([200, 100, 1]) / 255, rtol=1e-7)
    assert_array_equal(std, 0)


def test_to_float(arrays):
    images = arrays["train_images"][:5]
    x = images.astype(np.float64).transpose(0, 3, 1, 2) / 255
    pixel_mean = per_pixel_mean(arrays["train_images"])
    channel_mean, channel_std = channel_stats(arrays["train_images"])
    for mean, std, expected in [
        (None, None, x),
        (pixel_mean, None, x - pixel_mean),
        (channel_mean.astype(np.float64), channel_std.astype(np.float64),
         (x - channel_mean[:, None, None]) / channel_std[:, None, None]),
        ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25], (x - 0.5) / 0.25),
    ]:
        out = to_float(images, mean, std)
        assert out.dtype == np.float32 and out.shape == (5, 3, 32, 32) and out.flags.c_contiguous
        assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mean must have shape"):
        to_float(images, np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="uint8"):
        to_float(images.astype(np.float32), None)


def test_train_val_split():
    train, val = train_val_split(50000)
    assert len(train) == 45000 and len(val) == 5000 and train.dtype == val.dtype == np.int64
    assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(50000))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert_array_equal(train_val_split(50000)[1], val)
    assert not np.array_equal(train_val_split(50000, seed=1)[1], val)
    assert len(train_val_split(10, val_size=0)[1]) == 0
    with pytest.raises(ValueError):
        train_val_split(10, val_size=11)


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------


def _find_crops(batch: np.ndarray, out: np.ndarray, pad: int) -> list[tuple[int, int, bool]]:
    """For each output image, the (top, left, flipped) crop of the zero-padded input it equals."""
    padded = np.pad(batch, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    height, width = batch.shape[2:]
    found = []
    for image, result in zip(padded, out):
        matches = [
            (top, left, flipped)
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            for flipped in (False, True)
            if np.array_equal(image[:, top:top + height, left:left + width][..., ::-1 if flipped else 1], result)
        ]
        assert len(matches) == 1, "output is not a crop of the padded input"
        found.append(matches[0])
    return found


def test_augment_crops_real_windows_and_flips_half():
    batch = np.random.default_rng(0).standard_normal((1200, 2, 6, 5)).astype(np.float32)
    before = batch.copy()
    out = augment(batch, np.random.default_rng(1))
    assert out.shape == batch.shape and out.dtype == np.float32
    assert_array_equal(batch, before)  # the input is left alone
    crops = _find_crops(batch, out, pad=4)
    assert {(top, left) for top, left, _ in crops} == {(t, s) for t in range(9) for s in range(9)}
    flips = sum(flipped for _, _, flipped in crops)
    assert 1200 * 0.5 - 90 < flips < 1200 * 0.5 + 90  # 5 standard deviations


def test_augment_is_reproducible_and_configurable():
    batch = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    first = augment(batch, np.random.default_rng(7))
    assert_array_equal(first, augment(batch, np.random.default_rng(7)))
    assert not np.array_equal(first, augment(batch, np.random.default_rng(8)))
    assert_array_equal(augment(batch, np.random.default_rng(7), pad=0, flip=False), batch)
    no_flip = _find_crops(batch, augment(batch, np.random.default_rng(3), pad=2, flip=False), pad=2)
    assert not any(flipped for _, _, flipped in no_flip)
    only_flip = augment(batch, np.random.default_rng(3), pad=0)
    for image, result in zip(batch, only_flip):
        assert np.array_equal(result, image) or np.array_equal(result, image[..., ::-1])


# ---------------------------------------------------------------------------
# DataLoader
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_set() -> tuple[np.ndarray, np.ndarray]:
    """Ten images whose labels are their indices, so batches show which samples they hold."""
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    return images, np.arange(10)


def _take(iterator, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert_array_equal(xa, xb)
        assert_array_equal(ya, yb)


def test_loader_covers_every_sample_once_per_epoch(small_set):
    images, labels = small_set
    mean = per_pixel_mean(images)
    loader = DataLoader(images, labels, batch_size=4, mean=mean)
    assert len(loader) == 3
    epochs = [list(loader), list(loader)]
    for batches in epochs:
        assert [len(y) for _, y in batches] == [4, 4, 2]
        seen = np.concatenate([y for _, y in batches])
        assert_array_equal(np.sort(seen), labels)
        for x, y in batches:
            assert x.dtype == np.float32 and x.shape == (len(y), 3, 32, 32) and y.dtype == np.int64
            assert_allclose(x, to_float(images[y], mean), rtol=0, atol=0)
    assert not np.array_equal(np.concatenate([y for _, y in epochs[0]]), np.concatenate([y for _, y in epochs[1]]))
    assert loader.state_dict() == {"epoch": 2, "batch": 0}


def test_loader_drop_last_and_order(small_set):
    images, labels = small_set
    loader = DataLoader(images, labels, batch_size=4, drop_last=True, shuffle=False)
    assert len(loader) == 2
    assert_array_equal(np.concatenate([y for _, y in loader]), np.arange(8))
    with pytest.raises(ValueError, match="no batch"):
        DataLoader(images, labels, batch_size=11, drop_last=True)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_resumes_exactly(small_set, prefetch):
    images, labels = small_set
    kwargs = {"batch_size": 4, "augment": True, "mean": per_pixel_mean(images), "seed": 3, "prefetch": prefetch}
    reference = _take(DataLoader(images, labels, **kwargs).stream(), 8)
    loader = DataLoader(images, labels, **kwargs)
    stream = loader.stream()
    _assert_same_batches(_take(stream, 4), reference[:4])
    state = loader.state_dict()
    assert state == {"epoch": 1, "batch": 1}
    stream.close()
    resumed = DataLoader(images, labels, **kwargs)
    resumed.load_state_dict(state)
    _assert_same_batches(_take(resumed.stream(), 4), reference[4:])
    # iter() continues the current epoch where it stopped.
    partial = DataLoader(images, labels, **kwargs)
    partial.load_state_dict({"epoch": 0, "batch": 1})
    _assert_same_batches(list(partial), reference[1:3])
    _assert_same_batches(list(partial), reference[3:6])


def test_prefetch_gives_the_same_batches_and_stops(small_set):
    images, labels = small_set
    kwargs = {"batch_size": 3, "augment": True, "mean": per_pixel_mean(images), "seed": 5}
    plain = _take(DataLoader(images, labels, **kwargs).stream(), 9)
    stream = DataLoader(images, labels, prefetch=3, **kwargs).stream()
    _assert_same_batches(_take(stream, 9), plain)
    assert _prefetch_threads()
    stream.close()
    assert not _prefetch_threads()
    # Dropping an unfinished iterator stops its thread too.
    stream = DataLoader(images, labels, prefetch=1, **kwargs).stream()
    next(stream)
    del stream
    gc.collect()
    assert not _prefetch_threads()


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tinyres-prefetch") and t.is_alive()]


def test_prefetch_reraises_errors(small_set, monkeypatch):
    images, labels = small_set
    loader = DataLoader(images, labels, batch_size=2, prefetch=2)
    make_batch = loader._make_batch

    def failing(order, epoch, index):
        if index == 2:
            raise RuntimeError("broken batch")
        return make_batch(order, epoch, index)

    monkeypatch.setattr(loader, "_make_batch", failing)
    stream = loader.stream()
    _take(stream, 2)
    with pytest.raises(RuntimeError, match="broken batch"):
        next(stream)
    assert not _prefetch_threads()


def test_loader_over_no_samples_names_the_sizes():
    # As PyTorch's shuffling sampler does, refuse an empty data set up front: stream() would never yield.
    for labels in (np.zeros(0, np.int64), []):
        with pytest.raises(ValueError, match=r"0 samples make no batch of 4: images of shape \(0, 32, 32, 3\)"):
            DataLoader(np.zeros((0, 32, 32, 3), np.uint8), labels, batch_size=4)
    _, val = train_val_split(10, val_size=0)  # an empty selection, of float32 images this time
    with pytest.raises(ValueError, match=r"0 samples make no batch of 128: images of shape \(0, 3, 8, 8\)"):
        DataLoader(np.zeros((10, 3, 8, 8), np.float32)[val], np.arange(10)[val], shuffle=False)


def test_an_empty_batch_goes_through_preprocessing():
    x = to_float(np.zeros((0, 32, 32, 3), np.uint8), np.zeros(3), np.ones(3))
    assert x.shape == (0, 3, 32, 32) and x.dtype == np.float32
    for pad, flip in ((4, True), (0, True), (2, False)):
        out = augment(x, np.random.default_rng(0), pad=pad, flip=flip)
        assert out.shape == (0, 3, 32, 32) and out.dtype == np.float32


def test_loader_float_input_and_validation(small_set):
    images, labels = small_set
    floats = to_float(images, None)
    x, _ = next(iter(DataLoader(floats, labels, batch_size=4, shuffle=False)))
    assert_array_equal(x, floats[:4])
    with pytest.raises(ValueError, match="mean and std apply to uint8"):
        DataLoader(floats, labels, mean=np.zeros(3))
    with pytest.raises(ValueError, match="integer labels"):
        DataLoader(images, labels[:5])
    with pytest.raises(ValueError, match="mean must have shape"):
        DataLoader(images, labels, mean=np.zeros(4))
    loader = DataLoader(images, labels, batch_size=4)
    with pytest.raises(ValueError, match="invalid position"):
        loader.load_state_dict({"epoch": 0, "batch": 4})
    loader.load_state_dict({"epoch": 2, "batch": 3})  # the end of epoch 2 is the start of epoch 3
    assert loader.state_dict() == {"epoch": 3, "batch": 0}


# ---------------------------------------------------------------------------
# The real archive
# ---------------------------------------------------------------------------


@pytest.mark.real_data
def test_real_archive(tmp_path, real_archive):
    loaded = load_cifar10(real_archive, cache_dir=tmp_path)
    assert loaded.train_images.shape == (50000, 32, 32, 3) and loaded.test_images.shape == (10000, 32, 32, 3)
    assert_array_equal(np.bincount(loaded.train_labels), [5000] * 10)
    assert_array_equal(np.bincount(loaded.test_labels), [1000] * 10)
    mean, std = channel_stats(loaded.train_images)
    assert_allclose(mean, [0.491, 0.482, 0.447], atol=0.002)
    assert_allclose(std, [0.245, 0.243, 0.261], atol=0.002)
    # Images come sorted by split, class and file name.
    wanted = {"train/airplane/0000.jpg": loaded.train_images[0], "train/automobile/0000.jpg": loaded.train_images[5000]}
    with tarfile.open(real_archive, "r|gz") as tar:
        for member in tar:
            if member.name in wanted:
                assert_array_equal(np.asarray(Image.open(tar.extractfile(member))), wanted.pop(member.name))
                if not wanted:
                    break
    start = time.perf_counter()
    again = load_cifar10(real_archive, cache_dir=tmp_path)
    assert time.perf_counter() - start < 1.0
    assert isinstance(again.train_images, np.memmap)
