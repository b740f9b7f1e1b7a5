"""What the user watches during a run: a tqdm bar on a terminal, else one log line per interval.

Both show the same figures: shards done of total (and failed), images labelled (and failed rows),
images per second over the run so far, and the ETA from the shard rate.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta

from tqdm import tqdm

logger = logging.getLogger(__name__)


class Progress:
    """Shard-level progress of one run; call `shard_done` per finished shard and `close` at the end."""

    def __init__(self, total_shards: int, interval: float = 30.0, tty: bool | None = None) -> None:
        self.total = total_shards
        self.interval = interval
        self.done = 0
        self.failed = 0
        self.images = 0
        self.failed_rows = 0
        self.started = time.monotonic()
        self._last_log = self.started
        use_bar = sys.stderr.isatty() if tty is None else tty
        self._bar = tqdm(total=total_shards, unit="shard", dynamic_ncols=True) if use_bar and total_shards else None

    def restart_clock(self) -> None:
        """Measure rates from now (call when the first model is ready: start-up is not labelling time)."""
        self.started = self._last_log = time.monotonic()
        if self._bar is not None and not self.done:
            self._bar.reset()  # the bar's own clock too, for its rate and ETA

    @property
    def images_per_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.images / elapsed if elapsed > 0 else 0.0

    def shard_done(self, ok: bool, images: int = 0, failed_rows: int = 0) -> None:
        """Count one finished shard (committed when `ok`, else given up) and its labelled images."""
        self.done += 1
        self.failed += 0 if ok else 1
        self.images += images
        self.failed_rows += failed_rows
        if self._bar is not None:
            failed = f"{self.failed} shards failed, " if self.failed else ""
            self._bar.set_postfix_str(failed + self._figures(), refresh=False)
            self._bar.update(1)
        else:
            self.tick(force=self.done == self.total)

    def tick(self, force: bool = False) -> None:
        """Log the progress line when `interval` seconds have passed since the last one (no bar only)."""
        if self._bar is None and (force or time.monotonic() - self._last_log >= self.interval):
            self._last_log = time.monotonic()
            logger.info("%s", self.line())

    def line(self) -> str:
        eta = self._eta()
        eta_text = str(timedelta(seconds=round(eta))) if eta is not None else "?"
        failed = f" ({self.failed} failed)" if self.failed else ""
        return f"shards {self.done}/{self.total}{failed}, {self._figures()}, ETA {eta_text}"

    def _figures(self) -> str:
        rows = f" ({self.failed_rows} failed)" if self.failed_rows else ""
        return f"images {self.images}{rows}, {self.images_per_s:.1f} img/s"

    def _eta(self) -> float | None:
        if not self.done:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.done * (self.total - self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
