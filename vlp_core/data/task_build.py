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
    "import_dataset",
    "plan_scene_task",
    "build_scene_shard",
    "reject_rows",
]

IMPORT_STAGE = "import"
SCENE_STAGE = "tasks"


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
