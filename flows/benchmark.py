"""The ``benchmark`` flow (deployment ``benchmark/methods``): pre-train each method, fine-tune it on each
task, for each seed, at one stated budget, and write every result into the ``leaderboard`` table.

A *chain* is one (method, pairs mode, seed): its pre-training run, then one run per task started from it.
Every run is keyed by its resolved config (``runs/bench/<what>-<hash>``), and every (method, pairs mode, seed,
task) cell is committed to the store with the hash of its config, so a re-run at the same budget fills in only
the missing cells, and a killed benchmark resumes (an interrupted run resumes from its last checkpoint).

Methods: ``none`` (no vision-language pre-training: the ALBEF backbone's encoders as they come, fine-tuned
the same way), any pre-training method (a region method's cells read the regions of the task images, made
first where missing by the ``task-regions`` flow), and ``unit`` (UniT: one multitask run over the
classification-shaped tasks, at the same number of steps per task as a single-task run, evaluated per task).
Tasks (:data:`BENCH_TASKS`): easy-VQA and the bundled scene tasks, retrieval fine-tuned and zero-shot, and the
pre-training run's own zero-shot retrieval on the held-out clip art.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.train import run_training
from stores.catalog import build_catalog
from stores.schemas import schema_of
from stores.shards import ShardStore, stable_hash
from vlp_core.data.task_build import TASK_REGIONS_STAGE
from vlp_core.data.task_data import dataset_version
from vlp_core.paths import DataLayout
from vlp_core.recipes import RECIPES
from vlp_core.train.config import TrainConfig, load_train_config

__all__ = ["BENCH_TASKS", "benchmark"]

STAGE = "bench"


def budget_source(budget: dict[str, int]) -> str:
    """The store source of one budget's cells (``p100-f60-b16``): budgets are separate leaderboards, and a
    cell re-run at the same budget (new config or data) replaces its old result."""
    return f"p{budget['pretrain_steps']}-f{budget['finetune_steps']}-b{budget['batch_size']}"


def _retrieval_headline(metrics: dict[str, float]) -> str:
    """Mean recall (R@1/5/10 both ways) after ITM re-ranking where the model re-ranks, else of ITC."""
    for name in sorted(metrics):
        if name.endswith("itm_mean_r"):
            return name
    return next(n for n in sorted(metrics) if n.endswith("itc_mean_r"))


@dataclass(frozen=True)
class BenchTask:
    """A benchmark task: the train task kind, its preset, whether it is evaluated without fine-tuning, and
    its headline metric (a name, or a function of the metrics)."""

    kind: str
    preset: str
    headline: str | Callable[[dict[str, float]], str]
    zero_shot: bool = False

    def headline_of(self, metrics: dict[str, float]) -> str:
        return self.headline if isinstance(self.headline, str) else self.headline(metrics)


BENCH_TASKS: dict[str, BenchTask] = {
    "vqa": BenchTask("vqa", "vqa_easy", "vqa_accuracy"),
    "nlvr2": BenchTask("nlvr2", "nlvr2_scenes", "accuracy"),
    "snli_ve": BenchTask("snli_ve", "snli_ve_scenes", "accuracy"),
    "gqa": BenchTask("gqa", "gqa_scenes", "accuracy"),
    "refcoco": BenchTask("refcoco", "refcoco_scenes", "accuracy"),
    "retrieval": BenchTask("retrieval", "retrieval_scenes", _retrieval_headline),
    "retrieval-zs": BenchTask("retrieval", "retrieval_scenes", _retrieval_headline, zero_shot=True),
    "clipart-zs": BenchTask("pretrain", "", _retrieval_headline, zero_shot=True),
}
#: tasks a UniT multitask run covers (its heads): the classification-shaped ones.
UNIT_TASKS = ("vqa", "nlvr2", "snli_ve", "gqa", "refcoco")
#: tasks with single-modality baselines (``task.blind``).
BLIND_TASKS = ("nlvr2", "snli_ve", "gqa", "refcoco")
#: method variants: ``<method>:text-only`` / ``<method>:image-only`` fine-tune the method's run with one
#: modality blanked (``task.blind``); ``unit:single`` trains the UniT backbone on each task alone from its
#: initial weights at the same steps per task as the multitask run; ``none:regions`` is the no-pre-training
#: baseline of the region methods (their region backbone as it comes, µ-VLA's heads for retrieval).
VARIANTS = ("", "text-only", "image-only", "single", "regions")
#: what ``none`` fine-tunes, per variant: (method, the preset its clip-art zero-shot cell evaluates).
NO_VLP = {"": ("albef", "albef_tiny"), "regions": ("mu-vla", "mu_vla_tiny")}


#: the names :func:`_hash` asks its ``version`` for besides task datasets: the corpus, a task's regions
CORPUS_DATA, REGIONS_OF = "<corpus>", "<regions>:"
#: the corpus stages whose committed shards make the corpus a run reads (the index is keyed by embed)
CORPUS_STAGES = ("ingest", "regions", "embed", "retrieve", "phrases", "links", "gallery", "ground")


def corpus_version(store: ShardStore) -> str:
    """A fingerprint of the committed corpus: the keys of every corpus stage's shards. A shard's key hashes
    its units, parameters and code, so a rebuild that gives the same shards keeps it, and new data, other
    settings (e.g. ``regions.precision``) or new code change it. Reads file names only."""
    return stable_hash({stage: store.shard_keys(stage) for stage in CORPUS_STAGES})


def task_regions_version(store: ShardStore, task: str) -> str:
    """A fingerprint of a task's regions (stage ``task_regions``): its shards' keys."""
    return stable_hash(store.shard_keys(TASK_REGIONS_STAGE, task))


def _hash(cfg: TrainConfig, version: Callable[[str], str]) -> str:
    """The run's key: its resolved config (less where it runs, how often it logs and which implementation of
    the same optimiser update it uses) and the version of every store dataset it reads: each task dataset
    (:func:`~vlp_core.data.task_data.dataset_version`), the corpus when the task reads it
    (:func:`corpus_version`: pre-training, easy-VQA, clip-art retrieval) and a task's regions for a region
    backbone (:func:`task_regions_version`). So rebuilt or re-imported data re-keys the runs on it, and the
    cells fine-tuned from a pre-training run follow it (their ``init_from`` names its key)."""
    d = cfg.model_dump(mode="json")
    for k in ("name", "run_dir", "data_dir", "log_every", "checkpoint_every"):  # where, not what
        d.pop(k, None)
    d["optim"].pop("impl", None)  # how the same update is computed, not what
    names = set(cfg.task.store_datasets())
    if _reads_regions(cfg):
        names |= {REGIONS_OF + n for n in cfg.task.store_datasets()}
    if cfg.task.reads_corpus():
        names.add(CORPUS_DATA)
    data = {name: version(name) for name in sorted(names)}
    return stable_hash(d, data) if data else stable_hash(d)


def store_versions(store: ShardStore) -> Callable[[str], str]:
    """The ``version`` of :func:`_hash` over ``store``, each name computed once."""

    def version(name: str) -> str:
        if name == CORPUS_DATA:
            return corpus_version(store)
        if name.startswith(REGIONS_OF):
            return task_regions_version(store, name[len(REGIONS_OF) :])
        return dataset_version(store, name)

    return functools.cache(version)


def _config(
    preset: str, overrides: dict[str, Any], runs: Path, what: str, version: Callable[[str], str]
) -> tuple[TrainConfig, str]:
    """A run's config keyed by its hash: ``runs/<what>-<hash[:12]>``."""
    cfg = load_train_config(preset, overrides)
    h = _hash(cfg, version)
    run_dir = runs / f"{what}-{h[:12]}"
    return load_train_config(preset, {**overrides, "run_dir": str(run_dir), "name": run_dir.name}), h


@dataclass
class Cell:
    method: str
    pairs_mode: str
    seed: int
    task: str
    config: TrainConfig
    config_hash: str

    @property
    def key(self) -> str:
        return f"{self.method}|{self.pairs_mode}|{self.seed}|{self.task}"


@dataclass
class Chain:
    """One (method, pairs mode, seed): the run every cell starts from (``None``: no pre-training) and the
    cells."""

    pretrain: TrainConfig | None
    cells: list[Cell]


def plan_chains(
    methods: list[str],
    seeds: list[int],
    tasks: list[str],
    budget: dict[str, int],
    pairs_mode: str,
    layout: DataLayout,
) -> list[Chain]:
    """Every chain's configs at ``budget`` (``pretrain_steps``, ``finetune_steps``, ``batch_size``), on the
    data of ``layout``, with run dirs under ``runs/bench``."""
    runs = layout.runs / "bench"
    store = ShardStore(layout.store)
    version = store_versions(store)
    unknown = sorted(set(tasks) - set(BENCH_TASKS))
    if unknown:
        raise ValueError(f"unknown benchmark tasks {unknown}; known: {sorted(BENCH_TASKS)}")
    common = {
        "batch_size": budget["batch_size"], "log_every": 10, "checkpoint_every": 50,
        "data_dir": str(layout.root),
    }  # fmt: skip
    chains = []
    for method in methods:
        base, _, variant = method.partition(":")
        known = base == "none" or base in RECIPES
        if (
            not known or variant not in VARIANTS or (variant == "single") != (method == "unit:single")
            or (variant == "regions") != (method == "none:regions")
        ):  # fmt: skip
            raise ValueError(
                f"benchmark method {method!r}: a method ({', '.join(sorted(RECIPES))}), none, none:regions, "
                "unit:single, or <method>:text-only / <method>:image-only"
            )
        for seed in seeds:
            cells: list[Cell] = []
            if method == "unit":
                mix = [t for t in tasks if t in UNIT_TASKS]
                if not mix:
                    continue
                # each sub-task exactly as its single-task preset has it (same data, same evaluation)
                fields = {
                    t: load_train_config(BENCH_TASKS[t].preset).task.model_dump(mode="json", exclude={"kind"})
                    for t in mix
                }
                over = {
                    **common, "seed": seed, "max_steps": budget["finetune_steps"] * len(mix),
                    "task.tasks": fields, "task.ratios": {t: 1.0 for t in mix},
                }  # fmt: skip
                cfg, h = _config("unit_tiny", over, runs, f"unit-s{seed}", version)
                cells = [Cell(method, "-", seed, t, cfg, h) for t in mix]
                chains.append(Chain(None, cells))
                continue
            pre, init = None, None
            mode = "-" if base in ("none", "unit") else pairs_mode
            train_method = NO_VLP[variant][0] if base == "none" else base
            if base not in ("none", "unit"):
                pre, _ = _config(
                    f"{base.replace('-', '_')}_tiny",
                    {
                        **common,
                        "seed": seed,
                        "max_steps": budget["pretrain_steps"],
                        "data.pairs.mode": pairs_mode,
                    },  # fmt: skip
                    runs,
                    f"pretrain-{base}-{pairs_mode}-s{seed}",
                    version,
                )
                init = str(pre.resolved_run_dir())
            for t in tasks:
                bt = BENCH_TASKS[t]
                if variant in ("text-only", "image-only") and t not in BLIND_TASKS:
                    continue
                if variant == "single" and t not in UNIT_TASKS:
                    continue
                if bt.kind == "pretrain":
                    if pre is None:
                        tag = method.replace(":", "-")
                        cfg, h = _config(
                            NO_VLP[variant][1],
                            {**common, "seed": seed},
                            runs,
                            f"{tag}-clipart-s{seed}",
                            version,
                        )
                    else:
                        cfg, h = pre, _hash(pre, version)
                    cells.append(Cell(method, mode, seed, t, cfg, h))
                    continue
                over = {**common, "seed": seed, "init_from": init, "method": train_method}
                if not bt.zero_shot:
                    over["max_steps"] = budget["finetune_steps"]
                if variant in ("text-only", "image-only"):
                    over["task.blind"] = variant.split("-")[0]
                if variant == "single":
                    over["optim.clip_grad_norm"] = 0.1  # UniT's, as in its multitask run
                tag = method.replace(":", "-") if mode == "-" else f"{method.replace(':', '-')}-{mode}"
                cfg, h = _config(bt.preset, over, runs, f"{t}-{tag}-s{seed}", version)
                cells.append(Cell(method, mode, seed, t, cfg, h))
            chains.append(Chain(pre, cells))
    return chains


def _reads_regions(cfg: TrainConfig) -> bool:
    from vlp_core.models.backbones.region_stream import RegionStreamConfig

    return isinstance(cfg.backbone_config(), RegionStreamConfig)


def _rows(cell: Cell, metrics: dict[str, float], budget: dict[str, int]) -> pa.Table:
    bt = BENCH_TASKS[cell.task]
    prefix = f"{cell.task}/" if cell.method == "unit" else ""  # the multitask run's metrics
    metrics = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    headline = bt.headline_of(metrics)
    now = datetime.now(UTC)
    rows = [
        {
            "method": cell.method,
            "pairs_mode": cell.pairs_mode,
            "seed": cell.seed,
            "task": cell.task,
            "metric": k,
            "value": float(v),
            "headline": k == headline,
            "run_id": cell.config.resolved_run_dir().name,
            "config_hash": cell.config_hash,
            "budget": json.dumps(budget, sort_keys=True),
            "finished_at": now,
        }  # fmt: skip
        for k, v in sorted(metrics.items())
        if isinstance(v, int | float)
    ]
    return pa.Table.from_pylist(rows, schema=schema_of("leaderboard"))


def _commit(store: ShardStore, cell: Cell, shard: str, table: pa.Table, source: str) -> None:
    store.commit(STAGE, source, shard, "v1", [(cell.key, cell.config_hash)], {"leaderboard": table})


def _prune(run_dir: Path, keep_last: bool) -> None:
    """Free a finished run's checkpoints: all of them (``keep_last`` False: a fine-tuning cell, whose result
    is in the store), or all but the newest (a pre-training run the cells start from)."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    for p in ckpts[:-1] if keep_last else ckpts:
        shutil.rmtree(p, ignore_errors=True)


def _result(cfg: TrainConfig, zero_shot: bool, prune: str = "none") -> dict[str, Any]:
    """A finished run's evaluation (``bench_result.json`` in its run dir), else run it (resuming) now, then
    free its checkpoints as ``prune`` says (``none``, ``older``: all but the newest, ``all``). Chains that
    share a run (a method and its single-modality variants share the pre-training run) take a lock on its
    directory, so one trains it and the others wait for its result."""
    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "bench_result.json"
    with open(run_dir / ".bench.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            result = run_training.fn(cfg, 1, eval_only=zero_shot)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(done)
        if prune != "none":
            _prune(run_dir, keep_last=prune == "older")
        return json.loads(done.read_text())


@task(name="bench-chain", cache_policy=NO_CACHE)
def run_chain(
    store_root: str, chain: Chain, todo: dict[str, str], budget: dict[str, int], keep_checkpoints: bool
) -> list[str]:
    """Run a chain's missing cells (``todo``: cell key -> shard), pre-training first where a cell needs it.
    Cells' checkpoints are freed once their result is in, and a pre-training run keeps only its newest
    (``keep_checkpoints`` keeps them all)."""
    log = get_run_logger()
    store = ShardStore(store_root)
    done = []
    if chain.pretrain is not None:
        log.info("pre-training %s", chain.pretrain.resolved_run_dir().name)
        pre = _result(chain.pretrain, zero_shot=False, prune="none" if keep_checkpoints else "older")
    for cell in chain.cells:
        if cell.key not in todo:
            continue
        bt = BENCH_TASKS[cell.task]
        if bt.kind == "pretrain" and chain.pretrain is not None:
            metrics = pre["eval"]
        else:
            log.info("%s: %s", cell.key, cell.config.resolved_run_dir().name)
            zero_shot = bt.zero_shot and cell.method != "unit"
            prune = "none" if keep_checkpoints else "all"
            metrics = _result(cell.config, zero_shot=zero_shot, prune=prune)["eval"]
        table = _rows(cell, metrics, budget)
        _commit(store, cell, todo[cell.key], table, budget_source(budget))
        done.append(cell.key)
        head = next((r for r in table.to_pylist() if r["headline"]), None)
        log.info("%s done: %s", cell.key, f"{head['metric']} {head['value']:.4f}" if head else "no headline")
    return done


@flow(name="run-chains")
def run_chains(
    store_root: str, chains: list[Chain], todo: dict[str, str], budget: dict[str, int], keep_checkpoints: bool
) -> list[str]:
    """The chains, as many at once as the task runner's workers."""
    futures = [run_chain.submit(store_root, ch, todo, budget, keep_checkpoints) for ch in chains]
    return [k for f in futures for k in f.result()]


def plan_cells(store: ShardStore, source: str, units: list[tuple[str, str]]) -> dict[str, str]:
    """The cells of ``units`` (cell key, config hash) still to run: ``{cell key: shard}``. A committed cell
    asked for again with another config or data (another hash) is dropped and runs again; committed cells
    not asked for this time (other methods, tasks or seeds at this budget) stay as they are."""
    plan = store.plan(STAGE, source, units, "v1", shard_size=1)
    asked = {key for key, _ in units}
    for stale in plan.stale:
        if any(key in asked for key, _ in store.read_manifest(STAGE, source, stale).units):
            store.drop(STAGE, source, stale)
    return {u[0][0]: shard for shard, u in plan.todo}


@flow(name="benchmark", log_prints=True)
def benchmark(
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
    tasks: list[str] | None = None,
    pretrain_steps: int = 100,
    finetune_steps: int = 60,
    batch_size: int = 16,
    pairs_mode: str = "retrieved",
    parallel: int = 2,
    threads: int = 1,
    data_dir: str | None = None,
    keep_checkpoints: bool = False,
) -> dict[str, Any]:
    """The method x task leaderboard at one budget; see the module docstring. Returns the summary rows and
    the paths of the HTML page and the chart. Fine-tuning runs' checkpoints are deleted once their result
    is committed and pre-training runs keep only their newest (the cells' starting point), unless
    ``keep_checkpoints``: a full leaderboard would otherwise hold a few hundred MB per cell."""
    from flows.leaderboard import render

    log = get_run_logger()
    layout = DataLayout(Path(data_dir).expanduser().resolve()) if data_dir else DataLayout.default()
    methods = methods or ["none", "albef", "vlmo", "flava", "unit"]
    seeds = seeds if seeds is not None else [0, 1, 2]
    tasks = tasks or list(BENCH_TASKS)
    budget = {"pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps, "batch_size": batch_size}
    store = ShardStore(layout.store)
    store.ensure_tables()
    store.collect_garbage()
    chains = plan_chains(methods, seeds, tasks, budget, pairs_mode, layout)
    with_regions = sorted({
        d for ch in chains for c in ch.cells if _reads_regions(c.config)
        for d in c.config.task.store_datasets()
    })  # fmt: skip
    if with_regions:
        # Region methods read the regions of the task images, and their cells are keyed by them: make what
        # is missing or stale first (a no-op when they are up to date), then key the cells.
        from flows.build_tasks import task_regions

        task_regions(with_regions, data_dir=str(layout.root))
        chains = plan_chains(methods, seeds, tasks, budget, pairs_mode, layout)
    units = [(c.key, c.config_hash) for ch in chains for c in ch.cells]
    source = budget_source(budget)
    todo = plan_cells(store, source, units)
    log.info(
        "benchmark at %s: %d cells, %d committed, %d to run (%d chains)", budget, len(units),
        len(units) - len(todo), len(todo), sum(any(c.key in todo for c in ch.cells) for ch in chains),
    )  # fmt: skip
    os.environ["OMP_NUM_THREADS"] = str(threads)  # each training child process
    # breadth first: every method's seed 0, then seed 1, ... (a stopped benchmark leaves whole seeds)
    pending = sorted(
        (ch for ch in chains if any(c.key in todo for c in ch.cells)), key=lambda ch: ch.cells[0].seed
    )
    runner = ThreadPoolTaskRunner(max_workers=max(1, parallel))
    finished = run_chains.with_options(task_runner=runner)(
        str(layout.store), pending, todo, budget, keep_checkpoints
    )
    build_catalog(layout.catalog, layout.store)
    page, chart, summary = render(layout, json.dumps(budget, sort_keys=True))
    create_markdown_artifact(
        key="leaderboard",
        markdown=summary,
        description=f"method x task leaderboard ({len(finished)} cells run now); page {page}, chart {chart}",
    )
    return {"ran": finished, "page": str(page), "chart": str(chart), "budget": budget}
