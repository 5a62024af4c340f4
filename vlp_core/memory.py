"""Peak memory of this process: the whole run's exact peak and a block's own peak, measured side by side.

The kernel keeps one high-water mark of resident memory per process (``VmHWM``). Resetting it between
stages (``/proc/self/clear_refs``) would give each stage its own peak but lose the run's, also for outside
tools such as ``/usr/bin/time``. So the run's peak is read from the untouched high-water mark, and a block's
peak (a stage of a flow) comes from :class:`PeakRSS`, which samples the current resident size in a
background thread: a spike shorter than the sampling interval can be missed there, never in the run's peak.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20


def status_kb(key: str, status_path: str = "/proc/self/status") -> int | None:
    """A ``kB`` field of a Linux ``/proc/<pid>/status`` file (``VmHWM``, ``VmRSS``), or None where there is
    none."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _rusage_peak_mib(who: int) -> float:
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024  # macOS: bytes, Linux/BSD: KiB
    return resource.getrusage(who).ru_maxrss * scale


def run_peak_rss_mb() -> float:
    """This process's peak resident memory since it started, in MiB (Linux ``VmHWM``; elsewhere
    ``getrusage``)."""
    kb = status_kb("VmHWM")
    return round(kb / 1024 if kb is not None else _rusage_peak_mib(resource.RUSAGE_SELF), 1)


def children_peak_rss_mb() -> float:
    """The largest peak resident memory of any finished child process (process-pool workers), in MiB."""
    return round(_rusage_peak_mib(resource.RUSAGE_CHILDREN), 1)


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE_MB
    except (OSError, ValueError, IndexError):
        return run_peak_rss_mb()  # no /proc: the best bound there is


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.peak_mb``: the largest resident size sampled every ``interval``
    seconds while the block ran (and at its start and end), without touching the kernel's high-water mark."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb, current_rss_mb())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.peak_mb = round(self.peak_mb, 1)
