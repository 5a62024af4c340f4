"""Helpers shared by the benchmarks: peak RSS, the per-stage child process, and the text table.

Every measured stage runs in a child process (the benchmark script re-run with a hidden ``--stage`` flag)
so that its peak RSS is its own; the child reads a JSON spec and writes a JSON result next to it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from vlp_core.memory import status_kb

MB = 1e6


def _vmhwm_kb(status_path: str) -> int | None:
    return status_kb("VmHWM", status_path)


def peak_rss_mb() -> float:
    """Peak RSS of this process so far, in MB.

    Linux: ``VmHWM`` from /proc/self/status, the high-water mark of this process's own address space.
    ``getrusage(RUSAGE_SELF).ru_maxrss`` is only the fallback: Linux carries it across fork + exec, so a
    stage child would report at least its parent's RSS at the time it was started.
    """
    kb = _vmhwm_kb("/proc/self/status")
    if kb is not None:
        return kb * 1024 / MB
    scale = 1 if sys.platform == "darwin" else 1024  # macOS: bytes, Linux/BSD: KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB


class ChildMonitor:
    """Peak RSS and CPU seconds of this process's descendants (e.g. DataLoader workers) while a block runs.

    A background thread lists the descendants every ``interval`` seconds and keeps, per pid, the largest
    ``VmHWM`` seen (it only grows, so a late sample is the closest to the true peak) and the latest CPU
    seconds (user + system). A worker that lives less than ``interval`` may be missed, and up to
    ``interval`` of a worker's last CPU time is not seen. Linux only for RSS.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peaks: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        with self._lock:
            for child in children:
                kb = _vmhwm_kb(f"/proc/{child.pid}/status")
                if kb is not None:
                    self.peaks[child.pid] = max(self.peaks.get(child.pid, 0.0), kb * 1024 / MB)
                try:
                    times = child.cpu_times()
                except psutil.Error:
                    continue
                self.cpu[child.pid] = times.user + times.system

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def snapshot(self) -> dict[int, float]:
        """CPU seconds per descendant now (pass it to :meth:`cpu_since`)."""
        self._sample()
        with self._lock:
            return dict(self.cpu)

    def cpu_since(self, snapshot: dict[int, float]) -> float:
        """CPU seconds the descendants spent since ``snapshot`` (new ones: all of theirs)."""
        with self._lock:
            return sum(cpu - snapshot.get(pid, 0.0) for pid, cpu in self.cpu.items())

    def __enter__(self) -> ChildMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    @property
    def largest_mb(self) -> float | None:
        return max(self.peaks.values()) if self.peaks else None


def run_stage_child(
    script: str | Path, stage: str, spec: dict[str, Any], work: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``script --stage STAGE --spec S --result R`` in a fresh interpreter and return its JSON result.

    Raises ``RuntimeError`` (with the exit status) when the child fails; its traceback is on stderr.
    """
    spec_path, result = work / f"{stage}-spec.json", work / f"{stage}-result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(script).resolve()), "--stage", stage]
    proc = subprocess.run(
        [*cmd, "--spec", str(spec_path), "--result", str(result)], env={**os.environ, **(env or {})}
    )
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"stage {stage!r} failed (exit status {proc.returncode})")
    return json.loads(result.read_text())


def stage_main(args: Any, run: Any) -> int:
    """The child side of :func:`run_stage_child`: ``run(stage, spec)`` → the result file."""
    spec = json.loads(Path(args.spec).read_text())
    Path(args.result).write_text(json.dumps(run(args.stage, spec)))
    return 0


def fmt_table(header: list[str], lines: list[list[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = ["<"] + [">"] * (len(header) - 1)

    def row(cells: list[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, fmt, widths, strict=True))

    return "\n".join([row(header), row(["-" * w for w in widths]), *(row(line) for line in lines)])


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
