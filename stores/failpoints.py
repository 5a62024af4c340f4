"""Kill points for crash tests: ``VLP_KILL_AT=<point>:<key>:<n>`` SIGKILLs this process the ``n``-th time it
reaches ``<point>`` for ``<key>`` (a stage, an index name). Without the variable a kill point costs one
dictionary lookup. The points sit where a crash is worst:

- ``before-manifest:<stage>``: a shard's data files are renamed into place, its manifest is not yet written;
- ``before-swap:<index>``: a new index version is complete on disk, the link is not yet swapped.

The corpus flow's kill tests use them to stop a build once inside each stage, deterministically.
"""

from __future__ import annotations

import os
import signal
import threading

_LOCK = threading.Lock()
_SEEN: dict[tuple[str, str], int] = {}


def kill_point(point: str, key: str) -> None:
    spec = os.environ.get("VLP_KILL_AT")
    if not spec:
        return
    want_point, want_key, n = spec.rsplit(":", 2)
    if (want_point, want_key) != (point, key):
        return
    with _LOCK:
        _SEEN[(point, key)] = _SEEN.get((point, key), 0) + 1
        if _SEEN[(point, key)] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
