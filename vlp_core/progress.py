"""Progress as log lines: where a bar cannot be seen (a worker's log, a Prefect UI, a CI log), long work says
how far it is, how fast it goes and when it will end, at a bounded rate."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ProgressLog", "format_eta"]


def format_eta(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLog:
    """``update(n)`` after each piece of ``total``; a line ``"<desc>: 12/40 (30%), 2.10 <unit>/s, ETA 13s"``
    goes to ``log`` at the first update, then at most every ``every_s`` seconds, and at the last one.
    ``clock`` is injectable for tests."""

    def __init__(
        self,
        total: int,
        desc: str,
        log: Callable[[str], None],
        unit: str = "shards",
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.log, self.unit = int(total), desc, log, unit
        self.every_s, self.clock = float(every_s), clock
        self.done = 0
        self.t0 = clock()
        self._last: float | None = None

    def line(self) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.done / elapsed
        pct = 100 * self.done / self.total if self.total else 100.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = (
            "done"
            if self.done >= self.total
            else ("ETA ?" if left == float("inf") else f"ETA {format_eta(left)}")
        )
        return f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%), {rate:.2f} {self.unit}/s, {eta}"

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if self._last is None or now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            self.log(self.line())
