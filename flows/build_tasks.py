"""The downstream-task flows: ``build-tasks`` generates the bundled scene tasks into the store, shard by
shard (a re-run does only what is missing; a killed run resumes); ``import-task`` imports a real dataset
(NLVR2, SNLI-VE, RefCOCO+, GQA, Karpathy splits) from its files, with a reject row per bad record. Both
publish per-split counts and rejects as Prefect artifacts; the catalog's ``task_*`` views show them.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from stores.catalog import build_catalog, connect
from stores.shards import ShardStore
from vlp_core.data import task_build
from vlp_core.paths import DataLayout

__all__ = ["build_tasks", "import_task", "task_regions"]


def _layout(data_dir: str | None) -> DataLayout:
    from pathlib import Path

    return DataLayout(Path(data_dir).expanduser().resolve()) if data_dir else DataLayout.default()


def _summary(layout: DataLayout, tasks: list[str]) -> list[dict[str, Any]]:
    build_catalog(layout.catalog, layout.store)
    with connect(layout.catalog) as db:
        return [
            dict(zip(("task", "split", "examples", "labels", "chance"), r, strict=True))
            for r in db.execute(
                "SELECT task, split, examples, labels, chance FROM task_summary WHERE list_contains(?, task) "
                "ORDER BY task, split",
                [tasks],
            ).fetchall()
        ]


@task(name="scene-shard", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def scene_shard(
    store_root: str,
    name: str,
    shard: str,
    units: list[tuple[str, str]],
    signature: str,
    seed: int,
    clipart_root: str,
) -> dict[str, int]:
    return task_build.build_scene_shard(
        ShardStore(store_root), name, shard, units, signature, seed, clipart_root=clipart_root
    )


@task(name="task-regions-shard", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def task_regions_shard(
    store_root: str,
    name: str,
    shard: str,
    units: list[tuple[str, str]],
    signature: str,
    sources: dict[str, dict[str, Any]],
    regions: dict[str, Any],
) -> dict[str, int]:
    from vlp_core.config import RegionsConfig

    return task_build.build_task_regions_shard(
        ShardStore(store_root), name, shard, units, signature, sources, RegionsConfig(**regions)
    )


@flow(name="task-regions", log_prints=True)
def task_regions(
    tasks: list[str] | None = None,
    regions: dict[str, Any] | None = None,
    shard_size: int = 128,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """The regions of every image of ``tasks`` (default: the bundled tasks), as the corpus regions stage
    makes them (``regions``: :class:`~vlp_core.config.RegionsConfig` fields over its defaults), with a
    referring task's candidate boxes as annotated regions: what region backbones (µ-VLA, U-VisualBERT,
    VLMixer) read when they fine-tune on a downstream task. A re-run does only what is missing. Shards run
    one at a time (the detector and the feature extractor use torch's threads; concurrent shards multiply
    their activations)."""
    from vlp_core.config import RegionsConfig
    from vlp_core.data.scenes import default_tasks

    log = get_run_logger()
    layout = _layout(data_dir)
    store = ShardStore(layout.store)
    store.ensure_tables()
    store.collect_garbage()
    cfg = RegionsConfig(**(regions or {}))
    t0, made = time.time(), {}
    for name in tasks or default_tasks():
        todo, done, signature, sources = task_build.plan_task_regions(store, name, cfg, shard_size)
        log.info("%s: %d images; %d shards to build, %d committed", name, len(sources), len(todo), done)
        for i, (shard, units) in enumerate(todo, 1):
            one = task_regions_shard.with_options(task_run_name=f"{name}-regions-{shard[:8]}")
            subset = {u: sources[u] for u, _ in units}
            stats = one(str(layout.store), name, shard, units, signature, subset, cfg.model_dump(mode="json"))
            made[name] = made.get(name, 0) + stats.get("images", 0)
            log.info("%s: regions shard %d/%d (%s)", name, i, len(todo), stats)
    log.info("task regions in %.1fs: %s", time.time() - t0, made)
    return {"images": made, "seconds": round(time.time() - t0, 1)}


@flow(name="build-tasks", log_prints=True)
def build_tasks(
    tasks: list[str] | None = None,
    sizes: dict[str, dict[str, int]] | None = None,
    scale: float = 1.0,
    seed: int = 0,
    shard_size: int = 200,
    regions: bool = False,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Generate the bundled scene tasks into the store (default: every task but those built on request,
    e.g. ``scene-pairs-easy``).

    ``sizes``: examples per split per task over the defaults (``{"scene-pairs": {"train": 500}}``);
    ``scale`` multiplies every default size (e.g. 0.1 for a quick look); ``regions``: also make the regions
    of their images (:func:`task_regions`, for region backbones). Returns examples per split with their
    label counts and chance level."""
    from vlp_core.data.scenes import SCENE_TASKS, default_tasks

    log = get_run_logger()
    layout = _layout(data_dir)
    store = ShardStore(layout.store)
    store.ensure_tables()
    removed = store.collect_garbage()
    if removed:
        log.info("removed %d leftover files of an interrupted run", removed)
    names = list(tasks or default_tasks())
    unknown = sorted(set(names) - set(SCENE_TASKS))
    if unknown:
        raise ValueError(f"unknown bundled tasks {unknown}; known: {sorted(SCENE_TASKS)}")
    t0 = time.time()
    built: dict[str, int] = {}
    for name in names:
        spec = SCENE_TASKS[name]
        want = {s: max(1, round(n * scale)) for s, n in spec.sizes.items()}
        want.update((sizes or {}).get(name, {}))
        todo, done, signature = task_build.plan_scene_task(store, name, want, seed, shard_size)
        log.info("%s: %s; %d shards to build, %d committed", name, want, len(todo), done)
        futures = [
            scene_shard.with_options(task_run_name=f"{name}-{shard[:8]}").submit(
                str(layout.store), name, shard, units, signature, seed, str(layout.openclipart / "png")
            )
            for shard, units in todo
        ]
        for i, f in enumerate(futures, 1):
            stats = f.result()
            built[name] = built.get(name, 0) + stats["examples"]
            log.info("%s: shard %d/%d (%d examples, %d images)", name, i, len(todo), *stats.values())
    if regions:
        task_regions(names, data_dir=str(layout.root))
    rows = _summary(layout, names)
    create_table_artifact(
        key="bundled-tasks",
        table=rows,
        description="bundled scene tasks: examples, labels and chance per split",
    )
    log.info("tasks built in %.1fs: %s", time.time() - t0, built)
    return {"built": built, "summary": rows, "seconds": round(time.time() - t0, 1)}


@flow(name="import-task", log_prints=True)
def import_task(
    kind: str,
    files: list[str],
    images: str,
    name: str | None = None,
    check_images: bool = True,
    options: dict[str, Any] | None = None,
    regions: bool = False,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Import a real dataset (``kind``: nlvr2 | snli_ve | refcoco | gqa | karpathy) from its ``files`` with
    images under ``images``, as the task ``name`` (default the dataset's own name). Bad records become
    ``rejects`` rows (stage ``import``); re-importing unchanged files does nothing. ``regions``: also make
    the regions of its images (:func:`task_regions`, for region backbones)."""
    log = get_run_logger()
    layout = _layout(data_dir)
    store = ShardStore(layout.store)
    store.ensure_tables()
    store.collect_garbage()
    out = task_build.import_dataset(
        store, kind, files, images, name=name, check_images=check_images, options=options, log=log.info
    )
    build_catalog(layout.catalog, layout.store)
    with connect(layout.catalog) as db:
        rejects = [
            dict(zip(("reason", "n"), r, strict=True))
            for r in db.execute(
                "SELECT reason, count(*) FROM rejects WHERE stage = 'import' AND shard = ? "
                "GROUP BY reason ORDER BY 2 DESC, 1",
                [out["shard"]],
            ).fetchall()
        ]
    if regions:
        task_regions([out["task"]], data_dir=str(layout.root))
    rows = _summary(layout, [out["task"]])
    key = "import-" + "".join(c if c.isalnum() else "-" for c in out["task"].lower())
    create_table_artifact(key=key, table=rows + rejects, description=f"{kind} import: examples and rejects")
    return {**out, "summary": rows, "rejects": rejects}
