"""Training progress for a person watching: a tqdm bar on a terminal, plain periodic lines in a log.

The ETA counts training iterations only: time spent evaluating or saving is `pause`d out, so
a long evaluation does not make the run look slower than it is.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]

FIRST_LINE_AT = 10      # a log shows progress this early, so a stuck run is seen at once
LINE_SECONDS = 30.0     # then a line at most this often


class Progress:
    """Iterations, speed and ETA on `stream` (stderr): tqdm on a terminal when installed, else lines."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None, initial: int = 0,
                 batch_size: int = 1):
        self.total, self.enabled, self.batch_size = total, enabled, batch_size
        self.stream = stream if stream is not None else sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.it = self.start_it = initial
        self.stats = ""                    # the latest training statistics, shown beside the count
        self.train_seconds = 0.0           # time in training iterations since this process started
        self.t_last = time.perf_counter()
        self.last_line = -math.inf
        self.bar = _tqdm(total, initial, self.stream) if self.tty else None

    def update(self, it: int) -> None:
        """Count iteration `it` as done."""
        now = time.perf_counter()
        self.train_seconds += now - self.t_last
        self.t_last, self.it = now, it
        if self.bar is not None:
            self.bar.update(it - self.bar.n)
        elif self.enabled and it < self.total and (it == FIRST_LINE_AT or
                                                   (it > FIRST_LINE_AT and now - self.last_line >= LINE_SECONDS)):
            self.write_line()

    def write_line(self) -> None:
        """Print the progress line (in a log, not on a terminal)."""
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self.last_line = time.perf_counter()

    def set_stats(self, lr: float, loss: float, err: float) -> None:
        """The training statistics of the latest log window."""
        self.stats = f"lr {lr:.4g}  loss {loss:.4f}  train err {100 * err:5.2f}%"
        if self.bar is not None:
            self.bar.set_postfix_str(self.stats, refresh=False)

    def pause(self) -> None:
        """Exclude the time since the last iteration (an evaluation, a save) from speed and ETA."""
        self.t_last = time.perf_counter()
        if self.bar is not None:
            self.bar.unpause()

    def line(self) -> str:
        """'iter 10/100  <stats>  1,234 img/s  ETA 01:05'."""
        done = self.it - self.start_it
        per_iter = self.train_seconds / done if done else math.inf
        ips = self.batch_size / per_iter if done and per_iter > 0 else 0.0
        stats = f"  {self.stats}" if self.stats else ""
        return (f"iter {self.it}/{self.total}{stats}  {ips:,.0f} img/s  "
                f"ETA {hms((self.total - self.it) * per_iter)}")

    def log(self, text: str) -> None:
        """Print a line that stays (an evaluation), above the bar on a terminal."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the bar on a terminal; in a log, the last line, once the statistics of the last window are in."""
        if self.enabled and self.bar is None and not self.tty and self.it == self.total > self.start_it:
            self.write_line()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _tqdm(total: int, initial: int, stream: TextIO) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional (pip install 'tinyres[progress]'): plain lines instead
        return None
    return tqdm(total=total, initial=initial, file=stream, unit="it", dynamic_ncols=True, smoothing=0.1)


def hms(seconds: float) -> str:
    """'mm:ss', or 'h:mm:ss' from an hour on; '--:--' when unknown."""
    if not math.isfinite(seconds):
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"
