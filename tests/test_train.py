"""Training end to end on a small real corpus, one parametrised test per shared property over every method:
the Prefect deployments (pretrain/<method> → finetune/vqa from that run; ALBEF also finetune/retrieval),
torchrun with 2 gloo processes against 1 process at the same global batch, and a SIGKILLed run that resumes
to the same loss curve as an uninterrupted one (VLMo across a stage boundary, FLAVA mid round-robin); plus
VLMo's language stage leaving the frozen parameters bit-identical with only the trainable ones in the
optimiser."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import await_flow_runs, failed_run_logs, submit_deployment

from vlp_core.paths import REPO_ROOT, DataLayout
from vlp_core.train.metrics import read_metrics

# Tiny and deterministic: dropout off (its masks are drawn per process), small batches, few steps.
TINY = [
    "batch_size=8", "log_every=1", "data.num_workers=1", "eval.retrieval_images=12", "eval.itm_rerank_k=3",
    "backbone.text.dropout=0.0", "backbone.text.attention_dropout=0.0", "optim.warmup_steps=1",
]  # fmt: skip
# Per method: VLMo's stages 1 + 1 steps before the VL stage; a small MIM codebook fit.
METHOD_SETS = {
    "albef": ["recipe.queue_size=64"],
    "vlmo": ["recipe.vision_steps=1", "recipe.language_steps=1", "task.codebook_images=32"],
    "flava": ["task.codebook_images=32"],
    # µ-VLA: the curriculum's weighted phase from step 2 of 4 (a 4-step epoch is ~1/30 of the pairs).
    "mu-vla": ["recipe.curriculum_epochs=0.002"],
    "u-visualbert": [],
    "vlmixer": [],
}
#: the batch kinds of the first 4 steps (round-robin, stages).
KINDS = {
    "albef": ["pair"] * 4,
    "vlmo": ["image", "text", "pair", "pair"],
    "flava": ["image", "text", "pair", "image"],
    "mu-vla": ["pair"] * 4,
    "u-visualbert": ["image", "text", "image", "text"],
    "vlmixer": ["text", "image", "text", "image"],
}
METHODS = list(METHOD_SETS)
REGION_METHODS = ("mu-vla", "u-visualbert", "vlmixer")
NOT_CURVE = ("samples_per_s", "data_time_frac")


def _train_cmd(
    layout: DataLayout, run_dir: Path, *sets: str, nproc: int = 1, method: str = "albef"
) -> list[str]:
    config = ["-m", "vlp_core.train", "--config", f"{method.replace('-', '_')}_tiny"]
    base = [sys.executable, *config]
    if nproc > 1:
        base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *config]  # fmt: skip
    args = [*TINY, *METHOD_SETS[method], f"data_dir={layout.root}", f"run_dir={run_dir}", *sets]
    return base + [a for s in args for a in ("--set", s)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], timeout: int = 420) -> dict:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _curve(run_dir: Path) -> list[dict]:
    """Every logged quantity but the timings: losses and their parts, accuracies, temperatures, lr,
    grad-norm, and the stage and batch kind of each step."""
    return [
        {k: v for k, v in r.items() if k not in NOT_CURVE} for r in read_metrics(run_dir / "metrics.jsonl")
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


@pytest.mark.parametrize("method", METHODS)
def test_torchrun_two_gloo_processes_match_one_process(train_corpus, tmp_path, method):
    """Same global batch (8 = 1 x 8 = 2 x 4): the loss curves agree to float tolerance, over every stage and
    batch kind the method draws in 4 steps (VLMo: vision, language, 2 x VL; FLAVA: image, text, pair,
    image)."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    steps = ["max_steps=4", "checkpoint_every=4", "eval.retrieval_images=4"]
    _run(_train_cmd(train_corpus, one, *steps, method=method))
    _run(_train_cmd(train_corpus, two, *steps, nproc=2, method=method))
    a, b = _curve(one), _curve(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            if isinstance(value, str):
                assert rb[key] == value, (ra["step"], key)
            else:
                assert rb[key] == pytest.approx(value, rel=1e-3, abs=1e-4), (ra["step"], key, value, rb[key])
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert [r.get("kind", "pair") for r in a] == KINDS[method]
    if method == "mu-vla":  # the weighted phase ran
        assert "curriculum_w" not in a[0] and all("curriculum_w" in r for r in a[1:])


# Where each method is killed: ALBEF and FLAVA after the step-4 checkpoint (FLAVA: mid round-robin, the
# next step draws a text batch), VLMo after step 2 (mid language stage: the resumed run crosses into the
# VL stage at step 3 and must rebuild its optimiser there as the uninterrupted run did).
KILL_AT = {"albef": 4, "vlmo": 2, "flava": 4, "mu-vla": 4, "u-visualbert": 4, "vlmixer": 4}


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_and_resume_gives_the_uninterrupted_curve(train_corpus, tmp_path, method):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    # With dropout on: every RNG stream (dropout, masks, draws) resumes where it stopped.
    steps = ["max_steps=6", "checkpoint_every=2", "eval.retrieval_images=4", "backbone.text.dropout=0.1"]
    if method == "vlmo":
        steps += ["recipe.language_steps=2"]  # stages: vision 1, language 2 (steps 2-3), VL 3
    _run(_train_cmd(train_corpus, ref, *steps, method=method))

    proc = subprocess.Popen(
        _train_cmd(train_corpus, killed, *steps, method=method),
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    at = KILL_AT[method]
    deadline = time.time() + 400
    while not (killed / "checkpoints" / f"step_{at:08d}" / "trainer.pt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, f"no checkpoint at step {at}"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = _run(_train_cmd(train_corpus, killed, *steps, method=method))
    assert result["step"] == 6
    if result["resumed_from"] > at:
        pytest.fail("the run got past the next checkpoint before the kill landed; the test needs it mid-run")
    assert result["resumed_from"] == at
    assert _curve(killed) == _curve(ref)


def test_vlmo_language_stage_freezes_attention_and_vision_experts(train_corpus, tmp_path):
    """Across VLMo's language stage the frozen parameters (attention and its norms, vision and VL experts,
    the image embedding) stay bit-identical, the trainable ones move, and the optimiser holds exactly the
    trainable ones."""
    from safetensors.torch import load_file

    from vlp_core.train.config import load_train_config

    run = tmp_path / "vlmo"
    sets = ["max_steps=4", "checkpoint_every=1", "keep_checkpoints=10", "recipe.language_steps=2",
            "eval.retrieval_images=4"]  # fmt: skip
    _run(_train_cmd(train_corpus, run, *sets, method="vlmo"))
    ckpts = run / "checkpoints"
    before = load_file(str(ckpts / "step_00000001" / "model.safetensors"))  # end of the vision stage
    after = load_file(str(ckpts / "step_00000003" / "model.safetensors"))  # end of the language stage
    assert [r["stage"] for r in read_metrics(run / "metrics.jsonl")] == [
        "vision",
        "language",
        "language",
        "vl",
    ]

    pairs = (a.split("=", 1) for a in [*TINY, *METHOD_SETS["vlmo"], *sets])
    cfg = load_train_config("vlmo_tiny", {k: yaml.safe_load(v) for k, v in pairs})
    from vlp_core.recipes import build_recipe

    model = build_recipe("vlmo", cfg.recipe_config(), cfg.backbone_config())
    names = {id(p): n for n, p in model.named_parameters()}
    language = next(s for s in model.stages(4) if s.name == "language")
    trainable = set()
    for item in language.trainable(model):
        trainable |= {
            names[id(p)] for p in ([item] if isinstance(item, torch.nn.Parameter) else item.parameters())
        }
    b = model.backbone
    frozen_modules = [*b.attention_modules(), *b.experts("vision"), *b.experts("vl"), b.image_embed]
    frozen = {names[id(p)] for m in frozen_modules for p in m.parameters()}
    assert frozen and not frozen & trainable
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"{name} changed in the language stage"
    moved = [n for n in trainable if not torch.equal(before[n], after[n])]
    assert "backbone.stack.layers.0.ffn.experts.text.fc_in.weight" in moved
    assert "backbone.text_embeddings.word.weight" in moved

    state = torch.load(ckpts / "step_00000002" / "trainer.pt", weights_only=False)
    assert state["stage"] == 1
    in_optimizer = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
    assert in_optimizer == len(trainable)


def test_pretrain_deployment_of_every_method_then_vqa(prefect_stack, train_corpus):
    """pretrain/<method> of every method but ALBEF (its own test, through the CLI) through the local server
    and worker, then finetune/vqa from each run by its method (the backbone is the run's own; region
    backbones read the easy-VQA images' regions from the store), and µ-VLA's single-stream retrieval. Two
    waves of runs submitted together (every pre-training, then every fine-tuning), one torch thread each."""
    root = train_corpus.root
    methods = ("vlmo", "flava", *REGION_METHODS)
    pretrain = {}
    for method in methods:
        pre = {
            "data_dir": str(root), "batch_size": 8, "max_steps": 3, "checkpoint_every": 3, "log_every": 1,
            "data.num_workers": 0, "eval.retrieval_images": 12, "eval.itm_rerank_k": 3,
            "task.codebook_images": 32, **dict(s.split("=", 1) for s in METHOD_SETS[method]),
        }  # fmt: skip
        pre = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in pre.items()}
        pre["data_dir"] = str(root)
        pretrain[submit_deployment(f"pretrain/{method}", {"overrides": pre}, threads=1)] = method
    states = await_flow_runs(list(pretrain))
    assert {pretrain[i]: s for i, s in states.items()} == dict.fromkeys(methods, "COMPLETED"), (
        failed_run_logs(states)
    )
    for method in methods:
        run_dir = root / "runs" / "train" / f"pretrain-{method}-run"
        ev = json.loads((run_dir / "eval.json").read_text())
        assert ev["n_images"] == 12 and 0.0 <= ev["itc_i2t_r10"] <= 1.0, method
        assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3], method

    finetune = {}
    for method in methods:
        vqa = {"data_dir": str(root), "batch_size": 8, "max_steps": 2, "checkpoint_every": 2,
               "data.num_workers": 0, "data.limit": 32, "task.eval_questions": 24}  # fmt: skip
        params = {"method": method, "overrides": vqa}
        finetune[submit_deployment("finetune/vqa", params, threads=1)] = f"vqa-{method}"
    # a single-stream model's retrieval: ITM on every held-out pair
    ret = {"data_dir": str(root), "batch_size": 8, "max_steps": 2, "checkpoint_every": 2,
           "data.num_workers": 0, "eval.retrieval_images": 12}  # fmt: skip
    params = {"method": "mu-vla", "overrides": ret}
    finetune[submit_deployment("finetune/retrieval", params, threads=1)] = "retrieval-mu-vla"
    states = await_flow_runs(list(finetune))
    assert {finetune[i]: s for i, s in states.items()} == dict.fromkeys(finetune.values(), "COMPLETED"), (
        failed_run_logs(states)
    )
    for method in methods:
        out = root / "runs" / "train" / f"vqa-{method}-easy-vqa"
        ev = json.loads((out / "eval.json").read_text())
        assert ev["n_questions"] == 24 and 0.0 <= ev["vqa_accuracy"] <= 1.0, method
        saved = yaml.safe_load((out / "config.yaml").read_text())
        assert saved["method"] == method and saved["init_from"].endswith(f"pretrain-{method}-run")
    ev = json.loads((root / "runs" / "train" / "retrieval-mu-vla-clipart" / "eval.json").read_text())
    assert ev["n_images"] == 12 and "itm_t2i_r1" in ev


def test_vlmixer_text_only_ablation_standardises_regions_like_the_full_recipe(train_corpus):
    """Without TAVP (``mix_weights`` image 0) VLMixer draws no image batch, yet its CutMix patches enter
    through the region embedding: its standardisation is fitted on the same images as the full recipe's
    (the text-only ablations once failed at build time with nothing to fit on)."""
    from vlp_core.tasks import build_spec
    from vlp_core.train.config import load_train_config
    from vlp_core.train.trainer import init_distributed

    env = init_distributed("cpu")
    embeds = {}
    for name, sets in (("all", {}), ("text", {"recipe.mix_weights": {"text": 1.0, "image": 0.0}})):
        config = load_train_config("vlmixer_tiny", {"data_dir": str(train_corpus.root), **sets})
        spec = build_spec(config, env)
        assert set(spec.streams) == ({"text", "image"} if name == "all" else {"text"})
        embeds[name] = (spec.info["region_stats_regions"], spec.model.backbone.region_embed)
    (n_all, all_), (n_text, text) = embeds["all"], embeds["text"]
    assert n_text == n_all > 0
    assert bool(text.stats_fitted) and torch.equal(text.feat_mean, all_.feat_mean)
    assert torch.equal(text.feat_std, all_.feat_std)
