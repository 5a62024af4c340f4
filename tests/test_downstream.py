"""Downstream tasks end to end on the small real corpus: the bundled scene tasks built by ``build-tasks``
(labels, chance, single-modality baselines), ``finetune/<task>`` of every task from an ALBEF run through the
session's server and worker (submitted together, awaited together), zero-shot retrieval, ``pretrain/unit``
(UniT's multitask run, evaluated per task) and the ``benchmark`` flow filling only missing cells."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import await_flow_runs, failed_run_logs, submit_deployment

from stores.catalog import build_catalog, connect
from stores.schemas import schema_of
from stores.shards import ShardStore
from vlp_core.data.task_data import read_task_examples
from vlp_core.paths import REPO_ROOT, DataLayout

TINY = {
    "batch_size": 4, "max_steps": 2, "checkpoint_every": 2, "log_every": 1, "data.num_workers": 0,
    "eval.batch_size": 16,
}  # fmt: skip
#: (deployment, its parameters beyond the overrides, the run dir name, a key its eval.json must have)
DEPLOYMENTS = [
    ("finetune/nlvr2", {}, "nlvr2-albef-scene-pairs", "accuracy_test"),
    ("finetune/snli-ve", {}, "snli_ve-albef-scene-entailment", "accuracy_test"),
    ("finetune/gqa", {}, "gqa-albef-scene-qa", "accuracy_test_qtype_count"),
    ("finetune/refcoco", {}, "refcoco-albef-scene-refs", "accuracy_testB"),
    ("finetune/retrieval-scenes", {}, "retrieval-albef-scene-captions", "test_itm_t2i_r1"),
    ("finetune/retrieval-scenes", {"zero_shot": True}, "retrieval-albef-scene-captions-zero-shot",
     "test_itc_mean_r"),
]  # fmt: skip


@pytest.fixture(scope="module")
def tasks_corpus(prefect_stack, train_corpus) -> DataLayout:
    """The training corpus plus the bundled scene tasks at 1 % of their default sizes."""
    from flows.build_tasks import build_tasks

    out = build_tasks(scale=0.01, data_dir=str(train_corpus.root))
    assert set(out["built"]) == {
        "scene-pairs",
        "scene-entailment",
        "scene-refs",
        "scene-qa",
        "scene-captions",
    }
    return train_corpus


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "VLP_DATA_DIR": str(root), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_bundled_tasks_are_in_the_catalog_with_chance_levels(tasks_corpus):
    layout = tasks_corpus
    build_catalog(layout.catalog, layout.store)
    with connect(layout.catalog) as db:
        rows = db.execute("SELECT task, split, examples, labels, chance FROM task_summary").fetchall()
        images = db.execute("SELECT task, count(*), min(png_bytes) FROM task_images GROUP BY 1").fetchall()
    summary = {(t, s): (n, lab, c) for t, s, n, lab, c in rows}
    assert summary[("scene-pairs", "train")][1] == 2 and summary[("scene-entailment", "test")][1] >= 2
    assert {s for t, s in summary if t == "scene-refs"} == {"train", "val", "testA", "testB"}
    assert 0.2 < summary[("scene-refs", "testA")][2] <= 1 / 3 + 1e-6  # 3-4 candidates
    assert {t for t, *_ in images} == {t for t, _ in summary} and all(m > 100 for *_, m in images)


def test_finetune_deployment_of_every_task_from_an_albef_run(tasks_corpus):
    root = tasks_corpus.root
    pre = root / "runs" / "train" / "pretrain-albef-tasks"
    cmd = [
        sys.executable, "-m", "vlp_core.train", "--config", "albef_tiny", "--set", f"run_dir={pre}",
        "--set", "max_steps=2", "--set", "batch_size=4", "--set", "data.num_workers=0",
        "--set", "eval.retrieval_images=8", "--set", "recipe.queue_size=32",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = []
    for name, extra, _, _ in DEPLOYMENTS:
        params = {"init_from": str(pre), "overrides": {**TINY, "data_dir": str(root)}, **extra}
        ids.append(submit_deployment(name, params, threads=1))
    states = await_flow_runs(ids)
    assert all(s == "COMPLETED" for s in states.values()), failed_run_logs(states)
    for name, _, run_name, key in DEPLOYMENTS:
        ev = json.loads((root / "runs" / "train" / run_name / "eval.json").read_text())
        assert key in ev and all(0.0 <= v <= 1.0 for k, v in ev.items() if "accuracy" in k or "_r" in k), name
        saved = (root / "runs" / "train" / run_name / "config.yaml").read_text()
        assert str(pre) in saved and "method: albef" in saved


def test_single_modality_baselines_see_one_modality(tasks_corpus):
    """``task.blind``: text-only replaces images by grey, image-only empties the text; both train."""
    from vlp_core.tasks import build_spec
    from vlp_core.train.config import load_train_config
    from vlp_core.train.trainer import init_distributed

    env = init_distributed("cpu")
    for blind in ("text", "image"):
        cfg = load_train_config("snli_ve_scenes", {"init_from": None, "data_dir": str(tasks_corpus.root),
                                                   "task.blind": blind})  # fmt: skip
        spec = build_spec(cfg, env)
        sample = spec.streams["pair"].dataset[0]
        if blind == "text":
            assert sample["pixel_values"].std() == 0 and sample["text"]
        else:
            assert sample["pixel_values"].std() > 0 and sample["text"] == ""


def test_fused_probe_encodes_each_image_of_an_example_and_fits_held_out(tasks_corpus, tmp_path, monkeypatch):
    """``scripts/fused_probe.py``: the frozen fused vectors (one pass per image, concatenated), the probe."""
    import numpy as np

    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    from fused_probe import fused_features, probe

    from vlp_core.train.config import load_train_config

    def cfg(preset: str):
        over = {"init_from": None, "data_dir": str(tasks_corpus.root), "run_dir": str(tmp_path / preset)}
        return load_train_config(preset, over)

    x2, y2 = fused_features(cfg("nlvr2_scenes"), 30)
    x1, y1 = fused_features(cfg("snli_ve_scenes"), 30)
    width = x1.shape[1]
    assert x2.shape == (len(y2), 2 * width) and x1.shape == (len(y1), width) and len(y1) >= 12
    assert np.isfinite(x2).all() and not np.allclose(x2[:, :width], x2[:, width:])  # left and right differ
    chance, rows = probe(x1, y1, held_out=0.3)
    assert 0 < chance <= 1 and [r["C"] for r in rows] == [0.1, 1.0, 10.0]
    assert all(0 <= r["train"] <= 1 and 0 <= r["held_out"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="two labels"):
        probe(x1[:4], np.zeros(4, dtype=int))


def test_unit_multitask_deployment_then_the_benchmark_fills_only_missing_cells(tasks_corpus):
    root = tasks_corpus.root
    over = {**TINY, "max_steps": 6, "checkpoint_every": 6, "data_dir": str(root),
            "task.tasks.vqa.eval_questions": 8}  # fmt: skip
    ids = [submit_deployment("pretrain/unit", {"overrides": over})]
    states = await_flow_runs(ids)
    assert states == {ids[0]: "COMPLETED"}, failed_run_logs(states)
    run = root / "runs" / "train" / "multitask-unit-run"
    ev = json.loads((run / "eval.json").read_text())
    assert {
        "vqa/vqa_accuracy",
        "nlvr2/accuracy",
        "snli_ve/accuracy",
        "gqa/accuracy",
        "refcoco/accuracy",
    } <= set(ev)
    kinds = {json.loads(line).get("kind") for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert len(kinds) >= 2  # the steps drew several tasks

    from flows.benchmark import benchmark

    params = {"methods": ["none", "unit"], "seeds": [0], "tasks": ["snli_ve", "clipart-zs"],
              "pretrain_steps": 2, "finetune_steps": 2, "batch_size": 4, "data_dir": str(root)}  # fmt: skip
    first = benchmark(**params)
    assert sorted(first["ran"]) == ["none|-|0|clipart-zs", "none|-|0|snli_ve", "unit|-|0|snli_ve"]
    assert Path(first["page"]).is_file() and Path(first["chart"]).stat().st_size > 1000
    runs = root / "runs" / "bench"
    assert not list(runs.glob("*/checkpoints/step_*"))  # results committed: fine-tuning checkpoints freed
    assert benchmark(**params)["ran"] == []  # everything committed: nothing runs
    store = ShardStore(root / "store")
    victim = next(
        m for m in store.manifests("bench", "p2-f2-b4").values() if m.units[0][0] == "none|-|0|snli_ve"
    )
    store.drop("bench", "p2-f2-b4", victim.shard)  # a cell lost (as if killed before its commit)
    assert benchmark(**params)["ran"] == ["none|-|0|snli_ve"]
    build_catalog(tasks_corpus.catalog, tasks_corpus.store)
    with connect(tasks_corpus.catalog) as db:
        rows = db.execute("SELECT method, task, seeds FROM leaderboard_summary ORDER BY 1, 2").fetchall()
    assert rows == [("none", "clipart-zs", 1), ("none", "snli_ve", 1), ("unit", "snli_ve", 1)]


def test_benchmark_plans_variants_and_refuses_unknown_methods(tasks_corpus, data_dir):
    """What each method spec runs: single-modality variants share their method's pre-training run and
    only run the tasks that have such a baseline; ``unit:single`` trains the UniT backbone per task at the
    multitask run's steps per task; a run's key includes the version of the task data it reads; a bad
    spec, or tasks not built, is an error before anything runs."""
    from flows.benchmark import CORPUS_DATA, REGIONS_OF, _hash, _reads_regions, plan_chains

    budget = {"pretrain_steps": 5, "finetune_steps": 3, "batch_size": 4}
    tasks = ["vqa", "nlvr2", "refcoco", "retrieval", "clipart-zs"]
    chains = plan_chains(
        ["albef", "albef:image-only", "unit", "unit:single"], [7], tasks, budget, "known", tasks_corpus
    )
    full, blind, unit, single = chains
    assert full.pretrain.resolved_run_dir() == blind.pretrain.resolved_run_dir()
    assert full.pretrain.data.pairs["mode"] == "known" and full.pretrain.max_steps == 5
    assert [c.task for c in blind.cells] == ["nlvr2", "refcoco"]
    assert {c.config.task.blind for c in blind.cells} == {"image"}
    assert [c.task for c in unit.cells] == ["vqa", "nlvr2", "refcoco"] and unit.pretrain is None
    assert unit.cells[0].config.max_steps == 3 * 3 and unit.cells[0].config.task.kind == "multitask"
    assert [(c.task, c.config.method, c.config.max_steps) for c in single.cells] == [
        ("vqa", "unit", 3), ("nlvr2", "unit", 3), ("refcoco", "unit", 3),
    ]  # fmt: skip
    assert len({c.config_hash for ch in chains for c in ch.cells}) == 2 + 2 + 1 + 3 + 3 + 0  # shared: one
    nlvr2 = full.cells[1].config
    assert _hash(nlvr2, lambda name: "v1") != _hash(nlvr2, lambda name: "v2")  # rebuilt data: a new key

    def changed(*names):  # a version function under which only ``names`` (or names starting so) changed
        return lambda name: "v2" if any(name.startswith(n) for n in names) else "v1"

    assert _hash(full.pretrain, changed()) == _hash(full.pretrain, changed("scene-"))  # no task data
    assert _hash(full.pretrain, changed()) != _hash(full.pretrain, changed(CORPUS_DATA))  # a rebuilt corpus
    assert _hash(nlvr2, changed()) == _hash(nlvr2, changed(CORPUS_DATA, REGIONS_OF))  # reads neither
    vqa = full.cells[0].config
    assert vqa.task.kind == "vqa" and _hash(vqa, changed()) != _hash(vqa, changed(CORPUS_DATA))
    (regions,) = plan_chains(["none:regions"], [7], ["nlvr2", "clipart-zs"], budget, "known", tasks_corpus)
    assert regions.pretrain is None and [c.config.method for c in regions.cells] == ["mu-vla", "mu-vla"]
    assert [_reads_regions(c.config) for c in regions.cells] == [True, True]
    on_task = regions.cells[0].config  # nlvr2 on its task regions
    assert _hash(on_task, changed()) != _hash(on_task, changed(REGIONS_OF))
    for bad in ("albef:single", "unit:text-only-x", "nope", "albef:regions"):
        with pytest.raises(ValueError):
            plan_chains([bad], [0], tasks, budget, "known", tasks_corpus)
    with pytest.raises(ValueError, match="build-tasks"):
        plan_chains(["albef"], [0], ["nlvr2"], budget, "known", data_dir)


def test_corpus_and_task_regions_versions_follow_their_committed_shards(tmp_path):
    """The corpus a run reads is fingerprinted by its stages' shard keys (file names only): a new corpus shard
    changes it, a task's shard does not; a task's regions likewise by the task_regions shards of that task."""
    from flows.benchmark import corpus_version, task_regions_version
    from vlp_core.data.task_build import TASK_REGIONS_STAGE

    store = ShardStore(tmp_path)
    store.ensure_tables()
    empty, regions = corpus_version(store), task_regions_version(store, "scene-refs")
    store.commit("tasks", "scene-refs", "s1", "sig", [("a", "1")], {})
    assert corpus_version(store) == empty
    store.commit("regions", "corpus", "r1", "sig", [("img", "1")], {})
    grown = corpus_version(store)
    assert grown != empty and corpus_version(store) == grown
    store.commit(TASK_REGIONS_STAGE, "scene-refs", "t1", "sig", [("img", "1")], {})
    assert task_regions_version(store, "scene-refs") != regions
    assert task_regions_version(store, "scene-pairs") == regions and corpus_version(store) == grown


def test_a_benchmark_of_some_cells_keeps_the_others_and_reruns_only_changed_ones(tmp_path):
    """Running the benchmark for a subset (one method, one task) at a budget must leave that budget's other
    committed cells alone; a cell asked for with a new config hash is dropped and planned again. (A subset
    run once dropped every other cell of its budget: the planner calls a committed shard whose unit is not
    in the list stale.)"""
    from flows.benchmark import STAGE, plan_cells

    store = ShardStore(tmp_path)
    store.ensure_tables()
    cells = [("albef|0|vqa", "h1"), ("albef|0|nlvr2", "h2"), ("vlmo|0|vqa", "h3")]
    for key, shard in plan_cells(store, "b", cells).items():
        store.commit(STAGE, "b", shard, "v1", [next(c for c in cells if c[0] == key)], {})
    assert plan_cells(store, "b", cells) == {}
    todo = plan_cells(store, "b", [("vlmo|0|vqa", "h3-new")])  # one cell, with a changed config
    assert list(todo) == ["vlmo|0|vqa"]
    left = {u[0] for _, m in store.iter_manifests(STAGE, "b") for u in m.units}
    assert left == {"albef|0|vqa", "albef|0|nlvr2"}  # the other cells kept, the changed one dropped
    assert plan_cells(store, "b", cells[:2]) == {}


def test_a_bundled_task_shard_rebuilt_alone_in_a_fresh_process_gives_the_same_bytes(tasks_corpus, tmp_path):
    """Drop one committed shard of every bundled task and rebuild it in a fresh process from its manifest's
    units alone: its data files are byte-identical to the first build's, and the tasks' data versions (what
    benchmark runs are keyed by) are unchanged; a changed example changes its task's version."""
    from vlp_core.data.task_data import dataset_version

    store = ShardStore(tasks_corpus.store)
    names = ("scene-pairs", "scene-entailment", "scene-refs", "scene-qa", "scene-captions")
    versions = {t: dataset_version(store, t) for t in names}
    before, shards = {}, []
    for task in names:
        m = sorted(store.manifests("tasks", task).values(), key=lambda m: m.shard)[0]
        files = [store.root / o["file"] for o in m.outputs.values() if o["file"]]
        before.update({str(f): f.read_bytes() for f in files})
        shards.append((task, m.shard, m.units, m.signature))
        store.drop("tasks", task, m.shard)
    script = (
        "import json, sys\n"
        "from stores.shards import ShardStore\n"
        "from vlp_core.data.task_build import build_scene_shard\n"
        "for task, shard, units, sig in json.loads(sys.argv[2]):\n"
        "    build_scene_shard(ShardStore(sys.argv[1]), task, shard, [tuple(u) for u in units], sig, 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(store.root), json.dumps(shards)], cwd=REPO_ROOT,
        env=_env(tasks_corpus.root), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {f: Path(f).read_bytes() for f in before} == before
    assert {t: dataset_version(store, t) for t in names} == versions
    (ex, *_), _ = read_task_examples(store, "scene-pairs", ["val"])
    flipped = "true" if ex.label == "false" else "false"

    def version_of(label: str, shard: str, where: str) -> str:
        one = ShardStore(tmp_path / where)
        row = {**ex.row(), "image_root": "/images", "label": label}
        table = pa.Table.from_pylist([row], schema=schema_of("task_examples"))
        one.commit("tasks", "scene-pairs", shard, "sig", [("val/0", "0")], {"task_examples": table})
        return dataset_version(one, "scene-pairs")

    same = version_of(ex.label, "a", "one")
    assert version_of(ex.label, "b", "two") == same  # content, not shard names
    assert version_of(flipped, "a", "three") != same


def test_region_methods_fine_tune_every_task_on_the_task_regions(tasks_corpus):
    """The task-regions flow makes the regions of every bundled image (a re-run makes none), a referring
    task's candidates stored as annotated regions right after the whole image; a region method
    (U-VisualBERT from its packaged weights, no VLP) fine-tunes and evaluates every downstream task on
    them, scoring each candidate as its own region; its text-only baseline keeps no image feature."""
    from flows.build_tasks import task_regions
    from vlp_core.tasks import build_spec
    from vlp_core.train.config import load_train_config
    from vlp_core.train.trainer import init_distributed

    root = tasks_corpus.root
    made = task_regions(data_dir=str(root))["images"]
    assert set(made) == {"scene-pairs", "scene-entailment", "scene-refs", "scene-qa", "scene-captions"}
    assert task_regions(data_dir=str(root))["images"] == {}  # all committed
    store = ShardStore(tasks_corpus.store)
    regions = store.read_table("regions", ["image_id", "region_idx", "label", "detector"]).to_pylist()
    refs, _ = read_task_examples(store, "scene-refs", ["train", "val", "testA", "testB"])
    annotated = [r for r in regions if r["detector"] == "annotated"]
    assert {r["label"] for r in annotated} == {"candidate"} and len(annotated) == sum(
        len(e.boxes) for e in refs
    )
    assert all(1 <= r["region_idx"] <= 4 for r in annotated)  # right after the whole image (0)

    expect = {"nlvr2_scenes": "accuracy", "snli_ve_scenes": "accuracy", "gqa_scenes": "accuracy",
              "refcoco_scenes": "accuracy_testB", "retrieval_scenes": "n_texts"}  # fmt: skip
    for preset, key in expect.items():
        run = root / "runs" / "train" / f"regions-{preset}"
        cmd = [
            sys.executable, "-m", "vlp_core.train", "--config", preset, "--set", "method=u-visualbert",
            "--set", "init_from=null", "--set", f"run_dir={run}", "--set", "max_steps=2",
            "--set", "batch_size=4", "--set", "data.num_workers=0",
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(root), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert key in json.loads((run / "eval.json").read_text()), preset

    cfg = load_train_config(
        "refcoco_scenes",
        {"method": "u-visualbert", "init_from": None, "data_dir": str(root), "task.blind": "text"},
    )
    sample = build_spec(cfg, init_distributed("cpu")).streams["pair"].dataset[0]
    (image,) = sample["regions"]
    assert not image["region_feats"].any() and len(image["region_feats"]) == 1 + len(sample["boxes"])
    assert sample["cand_regions"].tolist() == list(range(1, 1 + len(sample["boxes"])))
