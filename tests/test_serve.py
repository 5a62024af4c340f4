"""Integration: the project's Prefect server + worker run a deployment started from the command line (``vlp
run``, which follows its logs; Prefect's own CLI lists and inspects the deployments)."""

from __future__ import annotations

import json
import os
import re
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
    for name in (
        "build-corpus/nightly", "build-corpus/default", "build-corpus/smoke", "build-tasks/bundled",
        "task-regions/regions", "import-task/import", "benchmark/methods", "pretrain/unit", "finetune/nlvr2",
        "finetune/snli-ve", "finetune/gqa", "finetune/refcoco", "finetune/retrieval-scenes",
    ):  # fmt: skip
        assert name in ls.stdout

    nightly = _run(*prefect, "deployment", "inspect", "build-corpus/nightly")
    assert "0 2 * * *" in nightly.stdout and "vlp-local" in nightly.stdout
    assert "'active': False" in nightly.stdout  # registered paused: a fresh server starts no build unasked

    run = _run(sys.executable, "-m", "flows.cli", "run", "build-corpus/smoke", timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "build-corpus/smoke: COMPLETED" in run.stdout
    # the worker's log lines reached the terminal as they came: every stage's shards with a rate, then done
    assert re.search(r"ingest shards: \d+/\d+ \(100%\), [\d.]+ shards/s, done", run.stdout), run.stdout[
        -3000:
    ]
    assert "corpus built in" in run.stdout
    bad = _run(sys.executable, "-m", "flows.cli", "run", "no-such/deployment", timeout=60)
    assert bad.returncode == 2 and "no deployment" in bad.stderr and "Traceback" not in bad.stderr

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


def test_cli_ingest_works_from_any_directory_with_a_new_data_dir(real, tmp_path):
    """No server configured, run from `/`, a data directory that does not exist yet: the CLI creates Prefect's
    home there, runs on a temporary server (prefect.toml is not read outside the repository root, so the
    project sets its start-up timeout itself), and prints its tables uncut into a pipe."""
    from conftest import link_fetched

    root = tmp_path / "new" / "data"
    root.mkdir(parents=True)
    link_fetched(root)  # the fetched inputs only (fetch is a no-op then): no prefect/, store/ or catalog yet
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"VLP_DATA_DIR": str(root)}
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", "--config", "smoke", "--set", "limit_per_source=20"],
        cwd="/", env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "temporary" in out.stdout and (root / "prefect").is_dir()
    assert "openclipart" in out.stdout and "…" not in out.stdout  # a pipe gets whole cells
    assert "too_short" in out.stdout  # wordnet's three one-word examples, under "rejects by stage and reason"
    none = subprocess.run(
        [sys.executable, "-m", "flows.cli", "sql", "select * from rejects_by_reason where stage = 'none'",
         "--title", "rejects", "--empty", "no rejects"],
        cwd="/", env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert none.returncode == 0 and none.stdout.strip() == "rejects: no rejects", none.stdout + none.stderr
