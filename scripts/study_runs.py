"""What the study scripts share (``scripts/pairing_study.py``, ``scripts/method_study.py``): launch one
``python -m vlp_core.train`` run as a child process with its own log, skip runs that finished, refuse to
mix budgets in one run directory, and summarise a metric over seeds.

Not a package module: the study scripts import it from their own directory (``scripts/`` is ``sys.path[0]``
when a script there is run).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> str:
    return os.environ.get("VLP_DATA_DIR", str(REPO_ROOT / "data"))


def train_command(config: str, sets: dict[str, Any], *, eval_only: bool = False) -> list[str]:
    """``python -m vlp_core.train --config CONFIG [--eval-only] --set k=v ...`` (values as YAML text)."""
    cmd = [sys.executable, "-m", "vlp_core.train", "--config", config]
    if eval_only:
        cmd.append("--eval-only")
    for key, value in sets.items():
        cmd += ["--set", f"{key}={yaml_text(value)}"]
    return cmd


def yaml_text(value: Any) -> str:
    """A value as the YAML text ``--set`` parses back to it (strings are passed through as YAML text)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("...\n").strip()


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            raise KeyError(dotted)
        tree = tree[part]
    return tree


def budget_mismatch(run_dir: Path, expected: dict[str, Any]) -> list[str]:
    """``key: saved != expected`` for each ``expected`` entry that the run's saved ``config.yaml`` holds
    with another value (nothing when the run has no config yet). A run dir keeps its checkpoints, so a run
    started again with another budget would resume the old one."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    saved = yaml.safe_load(path.read_text()) or {}
    out = []
    for key, want in expected.items():
        try:
            have = _lookup(saved, key)
        except KeyError:
            continue
        same = (
            math.isclose(have, want, rel_tol=1e-9)
            if isinstance(have, int | float) and isinstance(want, int | float)
            else have == want
        )
        if not same:
            out.append(f"{key}: {have!r} != {want!r}")
    return out


def finished_eval(run_dir: Path, *, eval_only: bool = False) -> dict[str, float] | None:
    """The ``eval.json`` of a finished run (a trained run also has ``run.json``), else ``None``."""
    done = run_dir / "eval.json"
    if done.exists() and (eval_only or (run_dir / "run.json").exists()):
        return json.loads(done.read_text())
    return None


def run_train(
    cmd: list[str], run_dir: Path, *, threads: int, label: str, eval_only: bool = False
) -> tuple[dict[str, float], float | None]:
    """Run ``cmd`` (a :func:`train_command`) unless ``run_dir`` has finished; its output goes to
    ``<run_dir>.log``. Returns ``(eval.json, seconds)``, seconds ``None`` when the run was skipped."""
    if (metrics := finished_eval(run_dir, eval_only=eval_only)) is not None:
        return metrics, None
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    log = run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    metrics = finished_eval(run_dir, eval_only=eval_only)
    if proc.returncode != 0 or metrics is None:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}); see {log}")
    print(f"  {label}: {seconds:.0f}s", flush=True)
    return metrics, seconds


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def parse_list(text: str, cast: type = str) -> list[Any]:
    return [cast(x) for x in text.split(",") if x.strip()]


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{k: v}`` (values stay YAML text, as ``python -m vlp_core.train`` reads them)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    return out
