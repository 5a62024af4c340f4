"""Integration: the project's Prefect server + worker run a deployment started from the Prefect CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vlp_core.paths import REPO_ROOT, DataLayout


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(args), cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=timeout
    )


def test_deployment_run_through_cli_completes(prefect_stack, real):
    prefect = [sys.executable, "-m", "prefect"]
    ls = _run(*prefect, "deployment", "ls")
    assert ls.returncode == 0, ls.stderr
    for name in ("build-corpus/nightly", "build-corpus/default", "build-corpus/smoke"):
        assert name in ls.stdout

    nightly = _run(*prefect, "deployment", "inspect", "build-corpus/nightly")
    assert "0 2 * * *" in nightly.stdout and "vlp-local" in nightly.stdout

    run = _run(*prefect, "deployment", "run", "build-corpus/smoke", "--watch", "--watch-timeout", "280")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Completed" in run.stdout

    # the worker's flow run wrote into the session's data directory; inspect it with the project's CLI
    out = _run(sys.executable, "-m", "flows.cli", "sql", "select * from ingest_summary", "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = {r["source"]: r for r in json.loads(out.stdout)}
    assert rows["openclipart"]["image_rows"] > 100 and rows["wordnet"]["text_rows"] > 40_000
    assert DataLayout.default().catalog.exists()


def test_cli_user_errors_are_one_line(prefect_stack):
    out = _run(sys.executable, "-m", "flows.cli", "sql", "select * from no_such_view")
    assert out.returncode == 2 and "SQL error" in out.stderr and "Traceback" not in out.stderr
    out = _run(sys.executable, "-m", "flows.cli", "ingest", "--config", "no-such-preset")
    assert out.returncode == 2 and "presets" in out.stderr and "Traceback" not in out.stderr
