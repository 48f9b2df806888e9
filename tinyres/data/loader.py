"""From uint8 images to training batches: statistics, float conversion, the split, augmentation, `DataLoader`.

Conventions: images are uint8 (N, 32, 32, 3) as stored on disk; the network gets
float32 (N, 3, 32, 32) in [0, 1] scale with a mean subtracted (`to_float`).
Per-pixel mean subtraction is the preprocessing of He et al. (2015); statistics
(`per_pixel_mean`, `channel_stats`) are in the same [0, 1] scale.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------


def _check_uint8_images(images: np.ndarray, *, allow_empty: bool = False) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or (len(images) == 0 and not allow_empty):
        at_least_one = "" if allow_empty else " with N > 0"
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3){at_least_one}, got {images.dtype} {images.shape}")


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
    _check_uint8_images(images, allow_empty=True)
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
    giving the very same batches. With `num_replicas` K > 1 (data-parallel training) each
    batch is the `rank`-th of K equal parts of the batch that one process would get, with the
    same augmentation, so K ranks together see what one process sees.
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
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if images.ndim != 4 or images.dtype not in (np.uint8, np.float32):
            raise ValueError(f"images must be uint8 (N, H, W, 3) or float32 (N, C, H, W), got {images.dtype} "
                             f"{images.shape}")
        if len(images) == 0:
            # As with PyTorch's shuffling sampler, an empty data set is an error (stream() would never yield).
            raise ValueError(f"0 samples make no batch of {batch_size}: images of shape {images.shape}")
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
        self.split(num_replicas, rank)
        self.epoch = 0  # position of the next batch to yield
        self.batch = 0
        if len(self) == 0:
            raise ValueError(f"{len(images)} samples make no batch of {batch_size} (drop_last={drop_last})")
        if images.dtype == np.uint8:
            to_float(images[:1], self.mean, self.std)  # report a bad mean or std now, not mid-training

    def split(self, num_replicas: int, rank: int) -> None:
        """From now on yield only the `rank`-th of `num_replicas` equal parts of every batch."""
        if num_replicas < 1 or not 0 <= rank < num_replicas or self.batch_size % num_replicas:
            raise ValueError(f"a batch of {self.batch_size} cannot be split into {num_replicas} equal parts "
                             f"(rank {rank}): the batch size must be a multiple of the number of processes")
        self.num_replicas, self.rank = num_replicas, rank

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
        batches = _compute_ahead(self._make_batch, self._batch_jobs(forever), ahead=self.prefetch)
        try:
            for (_, epoch, index), (x, y) in batches:
                # Advance before yielding: a checkpoint taken after using this batch resumes at the next one.
                self.epoch, self.batch = (epoch, index + 1) if index + 1 < len(self) else (epoch + 1, 0)
                yield x, y
        finally:
            batches.close()

    def _batch_jobs(self, forever: bool) -> Iterator[tuple[np.ndarray, int, int]]:
        """The arguments (epoch's order, epoch, index) of `_make_batch` for each batch from the saved position on."""
        epoch, index = self.epoch, self.batch
        while True:
            order = self._order(epoch)
            for i in range(index, len(self)):
                yield order, epoch, i
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
        if self.num_replicas > 1:  # this rank's part, after augmenting the whole batch with its random draws
            part = slice(self.rank * len(x) // self.num_replicas, (self.rank + 1) * len(x) // self.num_replicas)
            x, selected = x[part], selected[part]
        return x, self.labels[selected]


def _compute_ahead(compute: Callable, jobs: Iterable[tuple], ahead: int) -> Iterator[tuple[tuple, object]]:
    """Yield (job, compute(*job)) for each job in order; with `ahead` > 0 a background thread works that far ahead."""
    if ahead == 0:
        for job in jobs:
            yield job, compute(*job)
        return
    pending: deque = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="tinyres-prefetch") as pool:
        try:
            for job in jobs:
                pending.append((job, pool.submit(compute, *job)))
                if len(pending) > ahead:
                    job, future = pending.popleft()
                    yield job, future.result()  # re-raises an error of compute here
            while pending:
                job, future = pending.popleft()
                yield job, future.result()
        finally:
            # Stopped early (closed, dropped or an error): skip the work not yet started; leaving
            # the `with` waits for the batch in progress, so no thread outlives the iterator.
            for _, future in pending:
                future.cancel()
