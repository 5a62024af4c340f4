"""Prefect flows for training: ``pretrain`` (any method) and ``finetune`` (any task, from any method's run).

The flows orchestrate; the work happens in ``python -m vlp_core.train`` (or ``torchrun`` with ``nproc > 1``)
started as a child process, so a multi-process DDP run looks exactly like the direct ``torchrun`` launch a
GPU cluster user would type. Output lines are streamed into the flow run's log; metrics and evaluation are
published as artifacts; checkpoints and ``metrics.jsonl`` stay under ``<data>/runs/train/<run>/``.
Re-running a deployment resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from vlp_core.paths import REPO_ROOT
from vlp_core.train.config import TrainConfig, load_train_config
from vlp_core.train.metrics import read_metrics

__all__ = ["finetune", "launch_command", "pretrain"]


def launch_command(config_path: Path, nproc: int) -> list[str]:
    """The command line of one training run: plain Python for one process, torchrun (standalone) for more."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if nproc == 1:
        return [sys.executable, "-m", "vlp_core.train", "--config", str(config_path)]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "vlp_core.train", "--config", str(config_path),
    ]  # fmt: skip


@task(name="train", cache_policy=NO_CACHE)
def run_training(config: TrainConfig, nproc: int, eval_only: bool = False) -> dict[str, Any]:
    """Run (or resume) the training child process; stream its output; return its RESULT summary.
    ``eval_only``: evaluate the run's latest checkpoint, or the initial model, without training."""
    logger = get_run_logger()
    run_dir = config.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    requested = run_dir / "requested_config.yaml"
    requested.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    cmd = launch_command(requested, 1 if eval_only else nproc) + (["--eval-only"] if eval_only else [])
    logger.info("launch: %s", " ".join(cmd))
    env = {
        **os.environ,
        "TQDM_MININTERVAL": "20",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
    }
    tail: deque[str] = deque(maxlen=40)
    result: dict[str, Any] | None = None
    with subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            for line in raw.replace("\r", "\n").splitlines():
                line = line.rstrip()
                if not line:
                    continue
                if line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT ") :])
                    continue
                tail.append(line)
                logger.info(line)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"training exited with code {proc.returncode}; last output:\n" + "\n".join(tail))
    return result


def _publish(kind: str, config: TrainConfig, result: dict[str, Any]) -> None:
    run_dir = Path(result["run_dir"])
    records = read_metrics(run_dir / "metrics.jsonl")
    every = max(1, len(records) // 20)
    rows = [r for i, r in enumerate(records) if i % every == 0 or i == len(records) - 1]
    key = f"{kind}-{config.method}-{config.name}".lower().replace("_", "-")
    if rows:
        create_table_artifact(key=f"{key}-curve", table=rows, description=f"{kind} loss curve ({run_dir})")
    ev = result.get("eval") or {}
    lines = [
        f"# {kind}: {config.method} ({config.task.kind}, preset {config.preset})",
        "",
        f"run dir `{run_dir}`, steps {result['step']} (resumed from {result['resumed_from']})",
        "",
    ]
    if ev:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in sorted(ev.items())]
    create_markdown_artifact(key=f"{key}-eval", markdown="\n".join(lines), description=f"{kind} evaluation")


@flow(name="pretrain")
def pretrain(
    method: str = "albef",
    config: str | None = None,
    overrides: dict[str, Any] | None = None,
    nproc: int = 1,
) -> dict[str, Any]:
    """Pre-train ``method`` with the train preset ``config`` (default ``<method>_tiny``, ``-`` read as
    ``_``) + dotted ``overrides``, then evaluate zero-shot retrieval on the held-out clip art. ``nproc > 1``
    runs torchrun DDP (gloo on CPU, NCCL on GPUs)."""
    preset = config or f"{method.replace('-', '_')}_tiny"
    cfg = load_train_config(preset, {**(overrides or {}), "method": method})
    if cfg.task.kind not in ("pretrain", "multitask"):
        raise ValueError(f"config {config!r} is a {cfg.task.kind!r} config; use the finetune flow")
    result = run_training(cfg, nproc)
    _publish("pretrain", cfg, result)
    get_run_logger().info("pretrain done: %s", json.dumps(result.get("eval", {})))
    return result


#: the preset of each fine-tuning task.
FINETUNE_PRESETS = {
    "vqa": "vqa_easy",
    "retrieval": "retrieval_clipart",
    "nlvr2": "nlvr2_scenes",
    "snli_ve": "snli_ve_scenes",
    "gqa": "gqa_scenes",
    "refcoco": "refcoco_scenes",
}


@flow(name="finetune")
def finetune(
    task: str = "vqa",
    method: str | None = None,
    config: str | None = None,
    init_from: str | None = None,
    overrides: dict[str, Any] | None = None,
    nproc: int = 1,
    zero_shot: bool = False,
) -> dict[str, Any]:
    """Fine-tune for ``task`` (``vqa`` | ``retrieval`` | ``nlvr2`` | ``snli_ve`` | ``gqa`` | ``refcoco``) from
    a pre-trained run, then evaluate (easy-VQA / VQA v2 accuracy, retrieval R@1/5/10, accuracy per split).
    ``config`` picks another preset of the task (e.g. ``retrieval_scenes``); ``zero_shot`` evaluates the
    run as it is, without fine-tuning (retrieval).

    The run to start from: ``init_from`` (a run or checkpoint dir), else ``method``'s ``pretrain`` run
    (``{data}/runs/train/pretrain-<method>-run``), else the preset's. The backbone and the method are the
    run's own, so any method's run fine-tunes the same way."""
    if task not in FINETUNE_PRESETS:
        raise ValueError(f"unknown fine-tuning task {task!r}; known: {sorted(FINETUNE_PRESETS)}")
    extra = dict(overrides or {})
    if init_from is not None:
        extra["init_from"] = init_from
    elif method is not None:
        extra["init_from"] = f"{{data}}/runs/train/pretrain-{method}-run"
    cfg = load_train_config(config or FINETUNE_PRESETS[task], extra)
    if cfg.task.kind != task:
        raise ValueError(f"config {config!r} is a {cfg.task.kind!r} config, not {task!r}")
    if method is not None and cfg.method != method:
        raise ValueError(f"init_from {cfg.init_from} is a {cfg.method} run, not {method}")
    if zero_shot:  # a run dir of its own: never a fine-tuned checkpoint of the same name
        cfg = load_train_config(config or FINETUNE_PRESETS[task], {**extra, "name": f"{cfg.name}-zero-shot"})
    result = run_training(cfg, nproc, eval_only=zero_shot)
    _publish("zero-shot" if zero_shot else "finetune", cfg, result)
    get_run_logger().info("finetune %s done: %s", task, json.dumps(result.get("eval", {})))
    return result
