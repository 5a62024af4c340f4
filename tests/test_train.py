"""Training end to end on a small real corpus: the Prefect deployments (pretrain/albef → finetune/vqa,
finetune/retrieval), torchrun with 2 gloo processes against 1 process at the same global batch, and a
SIGKILLed run that resumes to the same loss curve as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlp_core.paths import REPO_ROOT, DataLayout
from vlp_core.train.metrics import read_metrics

# Tiny and deterministic: dropout off (its masks are drawn per process), small batches, few steps.
TINY = [
    "batch_size=8", "log_every=1", "data.num_workers=1", "eval.retrieval_images=12", "eval.itm_rerank_k=3",
    "backbone.text.dropout=0.0", "backbone.text.attention_dropout=0.0", "recipe.queue_size=64",
    "optim.warmup_steps=1",
]  # fmt: skip
CURVE_KEYS = ("loss", "loss_itc", "loss_itm", "loss_mlm", "alpha", "temp", "lr", "grad_norm")


def _train_cmd(layout: DataLayout, run_dir: Path, *sets: str, nproc: int = 1) -> list[str]:
    base = [sys.executable, "-m", "vlp_core.train", "--config", "albef_tiny"]
    if nproc > 1:
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "vlp_core.train", "--config", "albef_tiny"]  # fmt: skip
    args = [*TINY, f"data_dir={layout.root}", f"run_dir={run_dir}", *sets]
    return base + [a for s in args for a in ("--set", s)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: int = 420) -> dict:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _curve(run_dir: Path) -> list[dict]:
    return [
        {k: r[k] for k in ("step", *CURVE_KEYS) if k in r} for r in read_metrics(run_dir / "metrics.jsonl")
    ]


def _prefect(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("prefect")
    return subprocess.run([str(exe), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_pretrain_then_finetune_deployments(prefect_stack, train_corpus):
    """pretrain/albef → finetune/vqa and finetune/retrieval through the local server and worker."""
    root = train_corpus.root
    pre = {
        "data_dir": str(root), "batch_size": 8, "max_steps": 3, "checkpoint_every": 3, "log_every": 1,
        "data.num_workers": 0, "eval.retrieval_images": 12, "eval.itm_rerank_k": 3, "recipe.queue_size": 64,
    }  # fmt: skip
    done = _prefect(
        "deployment", "run", "pretrain/albef", "--params", json.dumps({"overrides": pre}), "--watch"
    )
    assert done.returncode == 0 and "Completed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    run_dir = root / "runs" / "train" / "pretrain-albef-run"
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["n_images"] == 12 and 0.0 <= ev["itc_i2t_r10"] <= 1.0 and "itm_t2i_r1" in ev
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]

    vqa = {**pre, "data.limit": 64, "task.eval_questions": 48}
    for k in ("eval.retrieval_images", "eval.itm_rerank_k", "recipe.queue_size"):
        vqa.pop(k)
    done = _prefect(
        "deployment", "run", "finetune/vqa", "--params", json.dumps({"overrides": vqa}), "--watch"
    )
    assert done.returncode == 0 and "Completed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    ev = json.loads((root / "runs" / "train" / "vqa-albef-easy-vqa" / "eval.json").read_text())
    assert ev["n_questions"] == 48 and 0.0 <= ev["vqa_accuracy"] <= 1.0 and ev["answer_coverage"] > 0.9

    ret = {**pre, "max_steps": 2, "checkpoint_every": 2}
    done = _prefect(
        "deployment", "run", "finetune/retrieval", "--params", json.dumps({"overrides": ret}), "--watch"
    )
    assert done.returncode == 0 and "Completed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]
    run = json.loads((root / "runs" / "train" / "retrieval-albef-clipart" / "run.json").read_text())
    assert run["origins"] == {"known": run["pairs"]} and run["init_from"].endswith("pretrain-albef-run")

    listing = subprocess.run(
        [str(Path(sys.executable).with_name("vlp")), "runs"], cwd=REPO_ROOT, capture_output=True, text=True,
        env={**os.environ, "VLP_DATA_DIR": str(root), "COLUMNS": "250"}, timeout=120,
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    for name in ("pretrain-albef-run", "vqa-albef-easy-vqa", "retrieval-albef-clipart"):
        assert name in listing.stdout


def test_torchrun_two_gloo_processes_match_one_process(train_corpus, tmp_path):
    """Same global batch (8 = 1 x 8 = 2 x 4): the loss curves agree to float tolerance."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    steps = ["max_steps=4", "checkpoint_every=4", "eval.retrieval_images=4"]
    _run(_train_cmd(train_corpus, one, *steps))
    _run(_train_cmd(train_corpus, two, *steps, nproc=2))
    a, b = _curve(one), _curve(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in CURVE_KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-4), (ra["step"], key, ra[key], rb[key])
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


def test_sigkill_and_resume_gives_the_uninterrupted_curve(train_corpus, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    steps = ["max_steps=6", "checkpoint_every=2", "eval.retrieval_images=4"]
    _run(_train_cmd(train_corpus, ref, *steps))

    proc = subprocess.Popen(
        _train_cmd(train_corpus, killed, *steps),
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 400
    while not (killed / "checkpoints" / "step_00000004" / "trainer.pt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint at step 4"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = _run(_train_cmd(train_corpus, killed, *steps))
    assert result["resumed_from"] in (4, 6) and result["step"] == 6
    if result["resumed_from"] == 6:
        pytest.fail("the run finished before the kill landed; the test needs the kill mid-run")
    assert _curve(killed) == _curve(ref)
