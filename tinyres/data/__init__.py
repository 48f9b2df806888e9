"""CIFAR-10 for the trainer: find it, decode it once, cache it, and serve mini-batches.

* `formats`: the forms CIFAR-10 comes in (official archive, its folder, image folders and archives) and their decoding;
* `cifar`: `load_cifar10`, which finds or downloads the data and caches the decoded arrays;
* `loader`: statistics, `to_float`, `train_val_split`, `augment` and `DataLoader`.
"""

from .cifar import CIFAR10_MD5, CIFAR10_URL, DownloadError, load_cifar10
from .formats import ARCHIVE_NAME, BATCHES_FOLDER, CIFAR10, CLASSES, DataError
from .loader import DataLoader, augment, channel_stats, per_pixel_mean, to_float, train_val_split

__all__ = [
    "ARCHIVE_NAME",
    "BATCHES_FOLDER",
    "CIFAR10",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "CLASSES",
    "DataError",
    "DataLoader",
    "DownloadError",
    "augment",
    "channel_stats",
    "load_cifar10",
    "per_pixel_mean",
    "to_float",
    "train_val_split",
]
