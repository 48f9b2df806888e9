"""Speed of tinyres.data on the real archive: first and cached load, augmentation, loader throughput.

    python benchmarks/data.py [--data PATH] [--workers N]

Targets on a 2-core machine: first load <= 15 s, cached load <= 1 s, augmenting a batch of 128 <= 5 ms.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tinyres.data import DataLoader, augment, load_cifar10, per_pixel_mean, to_float

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def median_seconds(fn, repeat: int) -> float:
    """Median wall time of fn() over repeat calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def epoch_seconds(loader: DataLoader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 in any form load_cifar10 accepts")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per CPU)")
    args = parser.parse_args()

    import PIL

    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine   {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'} usable)")
    print(f"software  Python {platform.python_version()}, NumPy {np.__version__}, Pillow {PIL.__version__}")
    if hasattr(os, "getloadavg"):  # other jobs on the machine slow everything down
        print("load      " + ", ".join(f"{load:.2f}" for load in os.getloadavg()) + " (1, 5, 15 min averages)")
    print(f"data      {args.data}\n")

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        start, cpu_start = time.perf_counter(), os.times()
        data = load_cifar10(args.data, cache_dir=cache, download=False, num_workers=args.workers)
        seconds, cpu_end = time.perf_counter() - start, os.times()
        # CPU time of this process and its (finished) decoding workers: what the load costs whatever else runs.
        cpu = sum(cpu_end[:4]) - sum(cpu_start[:4])
        rows.append(("first load (decode + write cache)", f"{seconds:.2f} s", f"<= 15 s   ({cpu:.1f} s CPU in all)"))

        cached = median_seconds(lambda: load_cifar10(args.data, cache_dir=cache, download=False), 5)
        rows.append(("cached load (memory-map)", f"{cached * 1e3:.1f} ms", "<= 1 s"))
        train_images = np.asarray(data.train_images)  # read the mapped pages once, as training would

        seconds = median_seconds(lambda: per_pixel_mean(train_images), 3)
        rows.append((f"per_pixel_mean of {len(train_images):,} images", f"{seconds * 1e3:.0f} ms", ""))
        mean = per_pixel_mean(train_images)

        seconds = median_seconds(lambda: to_float(train_images[:128], mean), 200)
        rows.append(("to_float, batch of 128", f"{seconds * 1e3:.2f} ms", ""))

        batch = to_float(train_images[:128], mean)
        rng = np.random.default_rng(0)
        seconds = median_seconds(lambda: augment(batch, rng), 300)
        rows.append(("augment, batch of 128 (median)", f"{seconds * 1e3:.2f} ms", "<= 5 ms"))

        labels = np.asarray(data.train_labels)
        for prefetch in (0, 2):
            loader = DataLoader(train_images, labels, 128, drop_last=True, augment=True, mean=mean, prefetch=prefetch)
            seconds = epoch_seconds(loader)
            rows.append((f"DataLoader epoch, augment, prefetch={prefetch}",
                         f"{len(loader) * 128 / seconds:,.0f} img/s", f"({seconds:.2f} s/epoch)"))
        del data  # release the memory maps before the cache folder goes

    width = max(len(row[0]) for row in rows)
    print(f"{'measurement':<{width}}  {'result':>14}  target")
    print("-" * (width + 26))
    for name, result, target in rows:
        print(f"{name:<{width}}  {result:>14}  {target}")


if __name__ == "__main__":
    main()
