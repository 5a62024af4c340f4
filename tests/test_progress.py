"""Progress log lines: rate, percentage and ETA by hand, at a bounded rate."""

from __future__ import annotations

from vlp_core.progress import ProgressLog, format_eta


def test_progress_lines_by_hand():
    now = [100.0]
    lines: list[str] = []
    p = ProgressLog(40, "regions shards", lines.append, every_s=10.0, clock=lambda: now[0])
    now[0] = 104.0
    p.update(2)  # the first update always logs: 2 in 4 s = 0.5/s, 38 left = 76 s
    now[0] = 108.0
    p.update(2)  # 4 s after the last line: silent
    now[0] = 120.0
    p.update(6)  # 10 in 20 s = 0.5/s, 30 left: 60 s
    now[0] = 180.0
    p.update(30)  # the last one always logs
    assert lines == [
        "regions shards: 2/40 (5%), 0.50 shards/s, ETA 1m16s",
        "regions shards: 10/40 (25%), 0.50 shards/s, ETA 1m00s",
        "regions shards: 40/40 (100%), 0.50 shards/s, done",
    ]
    assert [format_eta(s) for s in (0.4, 59, 61, 3600 + 120)] == ["0s", "59s", "1m01s", "1h02m"]
