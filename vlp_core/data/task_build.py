"""Writing downstream tasks into the store: real datasets imported from their files, and the bundled scene
tasks generated shard by shard. Both go through :class:`~stores.shards.ShardStore` like every corpus stage:
a shard is committed with its manifest or not at all, a re-run does only what is missing, and a shard whose
inputs, parameters or code changed is dropped and redone.

- **Import** (stage ``import``, source = the dataset's name): one shard per import, whose units are the
  input files (fingerprint ``size:mtime``). Bad records become ``rejects`` rows (stage ``import``), as do
  examples whose image file is missing under the image root (``missing_image``, when ``check_images``).
- **Bundled scenes** (stage ``tasks``, source = the task's name): units are the examples ``<split>/<i>``;
  example ``i`` and its images are a pure function of (task, split, i, seed, code), so any shard rebuilt
  alone, in any process, gives the same bytes. The scene images go into ``task_images`` with the examples.
- **Task regions** (stage ``task_regions``, source = the task's name): what region backbones read of a
  task's images, made as the corpus regions stage makes them (the whole image, then the detector's boxes,
  RoIAlign features, tags) into the same ``regions`` / ``image_tags`` tables, keyed by the images' content
  hash; a referring task's candidate boxes are added as annotated regions (1, 2, ... after the whole image),
  so a region model scores each candidate as a region of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from stores.schemas import schema_of
from stores.shards import ShardStore, code_version, stable_hash
from vlp_core.data import examples as examples_module
from vlp_core.data.examples import ReadResult, TaskReject
from vlp_core.data.task_data import STORE_IMAGES

__all__ = [
    "IMPORT_STAGE",
    "SCENE_STAGE",
    "TASK_REGIONS_STAGE",
    "build_task_regions_shard",
    "import_dataset",
    "plan_task_regions",
    "task_image_sources",
    "plan_scene_task",
    "build_scene_shard",
    "reject_rows",
]

IMPORT_STAGE = "import"
SCENE_STAGE = "tasks"
TASK_REGIONS_STAGE = "task_regions"  # no "-": data files are <stage>-<shard>.parquet


def reject_rows(rejects: Sequence[TaskReject], stage: str, shard: str) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        {
            "stage": stage,
            "source": r.source,
            "input_id": r.input_id,
            "reason": r.reason,
            "detail": r.detail[:2000],
            "shard": shard,
            "rejected_at": now,
        }
        for r in rejects
    ]


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def import_dataset(
    store: ShardStore,
    kind: str,
    files: Sequence[str | Path],
    image_root: str | Path,
    *,
    name: str | None = None,
    check_images: bool = True,
    options: dict[str, Any] | None = None,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Import a real dataset's files (a :data:`~vlp_core.data.formats.READERS` kind) as the task ``name``
    (default: what the reader names it). Returns a summary: examples per split, rejects per reason, and
    whether the import was already committed (``skipped``).

    Raises:
        FileNotFoundError / ValueError: a missing input file, an unknown kind, a file the reader cannot read
            at all (see the readers).
    """
    from vlp_core.data import formats

    paths = [Path(f).expanduser().resolve() for f in files]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{kind}: input file {p} does not exist")
    root = Path(image_root).expanduser().resolve()
    options = dict(options or {})
    units = [(str(p), _fingerprint(p)) for p in paths]
    signature = stable_hash(
        kind, str(root), check_images, options, name, code_version(formats, examples_module, import_dataset)
    )
    source = name or kind
    plan = store.plan(IMPORT_STAGE, source, units, signature, shard_size=len(units))
    for stale in plan.stale:
        store.drop(IMPORT_STAGE, source, stale)
    if not plan.todo:
        m = store.manifests(IMPORT_STAGE, source)[plan.done[0]]
        return {"task": source, "shard": plan.done[0], "skipped": True, **m.stats}
    shard, shard_units = plan.todo[0]
    t0 = time.time()
    log(f"{kind}: reading {', '.join(p.name for p in paths)}")
    result: ReadResult = formats.read_task_file(kind, *paths, **options)
    rows, rejects = [], list(result.rejects)
    for ex in result.examples:
        if name is not None:
            ex = type(ex)(**{**ex.__dict__, "task": name})
        if check_images:
            missing = [i for i in ex.images if not (root / i).is_file()]
            if missing:
                rejects.append(
                    TaskReject(
                        paths[0].name, ex.example_id, "missing_image", f"{missing[0]} not under {root}"
                    )
                )
                continue
        rows.append({**ex.row(), "image_root": str(root)})
    stats: dict[str, int] = {}
    for r in rows:
        stats[f"split:{r['split']}"] = stats.get(f"split:{r['split']}", 0) + 1
    for r in rejects:
        stats[f"reject:{r.reason}"] = stats.get(f"reject:{r.reason}", 0) + 1
    task_name = rows[0]["task"] if rows else source
    store.commit(
        IMPORT_STAGE,
        source,
        shard,
        signature,
        shard_units,
        {
            "task_examples": _table("task_examples", rows),
            "rejects": _table("rejects", reject_rows(rejects, IMPORT_STAGE, shard)),
        },
        stats=stats,
        seconds=time.time() - t0,
    )
    log(f"{task_name}: {len(rows)} examples, {len(rejects)} rejects")
    return {"task": task_name, "shard": shard, "skipped": False, **stats}


def _table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema_of(name))


# --------------------------------------------------------------------------- bundled scene tasks


def _scene_signature(task: str, seed: int) -> str:
    """``scenes`` is a package: its code version covers every module of it (sprites, composition, each
    task's generator), so a change to any of them re-keys the task's shards."""
    from vlp_core.data import scenes

    return stable_hash(task, seed, code_version(scenes, examples_module, build_scene_shard))


def plan_scene_task(
    store: ShardStore, task: str, sizes: dict[str, int], seed: int, shard_size: int
) -> tuple[list[tuple[str, list[tuple[str, str]]]], int, str]:
    """The shards still to build for a bundled task at ``sizes`` (examples per split): ``(todo, done,
    signature)``; stale shards (other sizes, seed or code) are dropped here."""
    units = [(f"{split}/{i}", str(seed)) for split, n in sizes.items() for i in range(n)]
    signature = _scene_signature(task, seed)
    plan = store.plan(SCENE_STAGE, task, units, signature, shard_size)
    for stale in plan.stale:
        store.drop(SCENE_STAGE, task, stale)
    return plan.todo, len(plan.done), signature


def build_scene_shard(
    store: ShardStore,
    task: str,
    shard: str,
    units: list[tuple[str, str]],
    signature: str,
    seed: int,
    clipart_root: str | Path | None = None,
) -> dict[str, int]:
    """Generate and commit one shard of a bundled task: its examples and their scene images
    (``clipart_root``: the Open Clip Art ``png`` folder, default the data directory's)."""
    from vlp_core.data import scenes

    t0 = time.time()
    rows, images = [], {}
    for key, _ in units:
        split, _, i = key.partition("/")
        exs, ims = scenes.generate(task, split, int(i), seed, clipart_root=clipart_root)
        rows.extend({**e.row(), "image_root": STORE_IMAGES} for e in exs)
        images.update(ims)
    image_rows = []
    for name in sorted(images):
        im = images[name]
        image_rows.append(
            {
                "task": task,
                "image": name,
                "width": im.width,
                "height": im.height,
                "png": scenes.encode_png(im),
            }
        )
    stats = {"examples": len(rows), "images": len(image_rows)}
    store.commit(
        SCENE_STAGE,
        task,
        shard,
        signature,
        units,
        {"task_examples": _table("task_examples", rows), "task_images": _table("task_images", image_rows)},
        stats=stats,
        seconds=time.time() - t0,
    )
    return stats


# --------------------------------------------------------------------------- regions of task images


def task_image_sources(store: ShardStore, task: str) -> dict[str, dict[str, Any]]:
    """Every distinct image of ``task`` (all splits) by its store id (content hash): ``{"root", "name",
    "boxes": the candidate boxes of the examples on it, in pixels, de-duplicated in order of first
    appearance}``."""
    from vlp_core.data.task_data import TaskImages, read_task_examples, task_splits

    images = TaskImages(store, task)
    examples, roots = read_task_examples(store, task, list(task_splits(store, task)))
    out: dict[str, dict[str, Any]] = {}
    ids: dict[tuple[str, str], str] = {}
    for ex, root in zip(examples, roots, strict=True):
        for j, name in enumerate(ex.images):
            key = (root, name)
            if key not in ids:
                ids[key] = images.image_id(root, name)
            src = out.setdefault(ids[key], {"root": root, "name": name, "boxes": []})
            if j == 0:
                for b in ex.boxes:
                    box = [float(v) for v in b]
                    if box not in src["boxes"]:
                        src["boxes"].append(box)
    return out


def _regions_signature(cfg: Any) -> str:
    from vlp_core import precision
    from vlp_core.corpus import stages
    from vlp_core.vision import darknet, detect, features

    return stable_hash(
        stages.regions_params(cfg),
        code_version(stages.region_rows, stages.vision_models, darknet, detect, features, precision),
    )


def plan_task_regions(
    store: ShardStore, task: str, cfg: Any, shard_size: int
) -> tuple[list[tuple[str, list[tuple[str, str]]]], int, str, dict[str, dict[str, Any]]]:
    """The shards still to build of the regions of ``task``'s images under the corpus regions config
    ``cfg``: ``(todo, done, signature, sources)``. Units are the images (fingerprint: their candidate
    boxes); stale shards are dropped here."""
    sources = task_image_sources(store, task)
    units = [(iid, stable_hash(src["boxes"])) for iid, src in sorted(sources.items())]
    signature = _regions_signature(cfg)
    plan = store.plan(TASK_REGIONS_STAGE, task, units, signature, shard_size)
    for stale in plan.stale:
        store.drop(TASK_REGIONS_STAGE, task, stale)
    return plan.todo, len(plan.done), signature, sources


def build_task_regions_shard(
    store: ShardStore,
    task: str,
    shard: str,
    units: list[tuple[str, str]],
    signature: str,
    sources: dict[str, dict[str, Any]],
    cfg: Any,
) -> dict[str, int]:
    """Detect and featurise one shard of a task's images, exactly as the corpus regions stage does, with
    the examples' candidate boxes as annotated regions right after the whole image (region 1, 2, ...);
    commit them to the ``regions`` and ``image_tags`` tables (stage ``task_regions``, source = the task)."""
    import numpy as np

    from vlp_core.corpus.stages import region_rows, vision_models
    from vlp_core.data.task_data import TaskImages

    t0 = time.time()
    images = TaskImages(store, task)
    ids = [iid for iid, _ in units]
    data = [images.data(sources[i]["root"], sources[i]["name"]) for i in ids]
    extra = [np.asarray(sources[i]["boxes"], np.float32).reshape(-1, 4) for i in ids]
    detector, extractor = vision_models(cfg)
    rows = region_rows(ids, data, detector, extractor, cfg, extra_boxes=extra)
    store.commit(
        TASK_REGIONS_STAGE,
        task,
        shard,
        signature,
        units,
        {name: _table(name, r) for name, r in rows.tables.items()},
        stats=dict(rows.stats),
        seconds=time.time() - t0,
    )
    return dict(rows.stats)
