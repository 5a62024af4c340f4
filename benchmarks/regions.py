"""Region data benchmark: plain pyarrow row reads vs. the project's region datasets and collator.

The region methods (µ-VLA, U-VisualBERT, VLMixer) read their image inputs from the corpus's ``regions`` table
through ``vlp_core.data.regions``: ``RegionReader`` locates the wanted images' rows (small columns) at
construction and reads the 1,280-d float16 ``feature`` lists lazily per row group through an LRU cache.
Five stages, each in its own child process (this script re-run with the hidden ``--stage`` flag), so each
stage's peak RSS (``VmHWM``) is its own:

1. ``baseline-images``  plain pyarrow, what a hand-written loader does: ``pq.read_table`` of the ``regions``
                        files' ``image_id, region_idx, box5, label, feature`` filtered to the image index's
                        images, sorted by (image, region), grouped; then per sample the image's first
                        ``max_regions`` rows sliced out and their features converted to a float32 array
                        (boxes to float32, labels to a list).
2. ``images``           ``RegionImageDataset(store, build_image_index(store, UnimodalConfig()))``,
                        ``dataset[(epoch, i)]``.
3. ``baseline-pairs``   the baseline again, in the pair index's sample order.
4. ``pairs``            ``RegionPairDataset(store, build_pair_index(store, PairsConfig(mode="retrieved")))``:
                        the image's regions plus the sentence and its phrase links.
5. ``batches``          the pair dataset through ``RegionCollator(load_tokenizer())`` in a ``DataLoader``
                        (``--batch-size``, ``--num-workers``), as the trainer draws it.

Every stage walks the same keys as the trainer's ``ResumableSampler`` (seeded per-epoch permutations; the
next epoch's when ``--samples`` is more than one epoch), the baselines the same images in the same order.
Index building and dataset construction are done before the clock (construction is timed on its own and
printed under the table); a warm-up of ``--warmup`` samples comes next, then ``--repeat`` timed passes over
the keys, of which the fastest is reported. The row-group cache is per process, so with ``--num-workers 0``
only the first pass reads features from disk; its time and cache misses are printed too. After the timed
passes an untimed pass writes every sample's features and boxes, and the parent checks that ours equal the
baseline's (max abs difference 0).

    .venv/bin/python benchmarks/regions.py                          # 2,000 samples per stage
    .venv/bin/python benchmarks/regions.py --samples 0 --json       # one epoch of each index
    .venv/bin/python benchmarks/regions.py --stages baseline-pairs,batches --num-workers 1 --profile
    .venv/bin/python benchmarks/regions.py --cache-mb 1             # a cache smaller than the table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# No vlp_core / torch import at module level: the baselines' peak RSS must be pyarrow's and numpy's only.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks.common import (  # noqa: E402
    ChildMonitor,
    fmt_table,
    load_average,
    peak_rss_mb,
    run_stage_child,
    stage_main,
)

STAGES = ("baseline-images", "images", "baseline-pairs", "pairs", "batches")
STAGE_LABELS = {
    "baseline-images": "baseline: pyarrow rows (image order)",
    "images": "ours: RegionImageDataset samples",
    "baseline-pairs": "baseline: pyarrow rows (pair order)",
    "pairs": "ours: RegionPairDataset samples",
    "batches": "ours: RegionPairDataset + RegionCollator",
}
#: the index each stage walks, and the baseline it is compared with
INDEX_OF = {"baseline-images": "images", "images": "images", "baseline-pairs": "pairs", "pairs": "pairs",
            "batches": "pairs"}  # fmt: skip
BASELINE_OF = {"images": "baseline-images", "pairs": "baseline-pairs"}
COLUMNS = ["image_id", "region_idx", "box5", "label", "feature"]


class _Clock:
    """Wall and CPU seconds (this process) of a ``with`` block."""

    def __enter__(self) -> _Clock:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0


def _ids_digest(ids: list[str]) -> str:
    return hashlib.blake2b("\n".join(ids).encode(), digest_size=8).hexdigest()


def _region_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "regions").rglob("*.parquet") if p.name != "_schema.parquet")


# ------------------------------------------------------------------------------------------ child side


class _CheckWriter:
    """Every sample's region count, features (float32) and boxes, appended to three files in key order."""

    def __init__(self, prefix: Path):
        self.files = [open(f"{prefix}.{ext}", "wb") for ext in ("count", "feat", "box")]  # noqa: SIM115

    def add(self, feats, boxes) -> None:
        import numpy as np

        counts, feat_out, box_out = self.files
        counts.write(np.int32(len(feats)).tobytes())
        feat_out.write(np.ascontiguousarray(feats, np.float32).tobytes())
        box_out.write(np.ascontiguousarray(boxes, np.float32).tobytes())

    def close(self) -> None:
        for f in self.files:
            f.close()


def _passes(one_pass, spec: dict[str, Any], stats=None) -> dict[str, Any]:
    """``--repeat`` timed calls of ``one_pass()`` (→ (samples, regions)); ``stats()`` → cache counters.

    With DataLoader workers, their CPU seconds (sampled by :class:`ChildMonitor`) are added to the pass."""
    runs: list[dict[str, Any]] = []
    with ChildMonitor() as workers:
        for _ in range(spec["repeat"]):
            before = stats() if stats else None
            snap = workers.snapshot() if spec["num_workers"] else {}
            with _Clock() as clock:
                samples, regions = one_pass()
            run = {"seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds, "samples": samples,
                   "regions": regions}  # fmt: skip
            if spec["num_workers"]:
                run["worker_cpu_seconds"] = workers.cpu_since(snap)
            if stats:
                after = stats()
                run["cache"] = {k: after[k] - before[k] for k in ("hits", "misses")}
            runs.append(run)
    best = min(runs, key=lambda r: r["seconds"])
    return {
        "samples": best["samples"],
        "regions": best["regions"],
        "seconds": best["seconds"],
        "cpu_seconds": best["cpu_seconds"] + best.get("worker_cpu_seconds", 0.0),
        "worker_cpu_seconds": best.get("worker_cpu_seconds"),
        "worker_peak_rss_mb": workers.largest_mb,
        "runs": runs,
    }


def _profile(one_pass, top: int = 14) -> str:
    """One more pass under cProfile: the ``top`` functions by internal time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(one_pass)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    return text[text.find("   ncalls") :].rstrip() if "   ncalls" in text else text.rstrip()


def _stage_baseline(stage: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    keys = [tuple(k) for k in spec["keys"]]
    row_image = spec["row_image"]  # the image id of each index row
    max_regions = spec["max_regions"]
    rss0 = peak_rss_mb()
    with _Clock() as build:
        wanted = sorted(set(row_image))
        files = [str(p) for p in _region_files(Path(spec["store"]))]
        table = pq.read_table(files, columns=COLUMNS, filters=pc.field("image_id").isin(wanted))
        table = table.sort_by([("image_id", "ascending"), ("region_idx", "ascending")]).combine_chunks()
        ids = table["image_id"].to_numpy(zero_copy_only=False)
        uniq, start, count = np.unique(ids, return_index=True, return_counts=True)
        where = {s: (int(a), int(n)) for s, a, n in zip(uniq.tolist(), start, count, strict=True)}
        feature, box5, label = (table[c].chunk(0) for c in ("feature", "box5", "label"))
    duplicates = table.num_rows - len(table.select(["image_id", "region_idx"]).group_by(
        ["image_id", "region_idx"]).aggregate([]))  # fmt: skip
    rss_built = peak_rss_mb()

    def sample(index: int):
        first, n = where[row_image[index]]
        n = min(n, max_regions)
        feats = feature.slice(first, n).flatten().to_numpy(zero_copy_only=False).reshape(n, -1)
        boxes = box5.slice(first, n).flatten().to_numpy(zero_copy_only=False).reshape(n, 5)
        return feats.astype(np.float32), boxes.astype(np.float32), label.slice(first, n).to_pylist()

    def one_pass():
        regions = 0
        for _, index in keys:
            feats, _, _ = sample(index)
            regions += len(feats)
        return len(keys), regions

    for _, index in keys[: spec["warmup"]]:
        sample(index)
    res = _passes(one_pass, spec)
    res["peak_rss_mb"] = peak_rss_mb()  # before the check pass below
    check = _CheckWriter(work / stage)
    for _, index in keys:
        feats, boxes, _ = sample(index)
        check.add(feats, boxes)
    check.close()
    res.update(
        construct_s=build.seconds, construct_cpu_s=build.cpu_seconds, rss_at_start_mb=rss0,
        rss_constructed_mb=rss_built, table_rows=table.num_rows, table_mb=table.nbytes / 1e6,
        images_found=len(where), images_wanted=len(wanted), duplicate_rows=duplicates,
        distinct_images=len({row_image[i] for _, i in keys}), files=len(files),
    )  # fmt: skip
    return res


def _stage_ours(stage: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    from stores.shards import ShardStore
    from vlp_core.data import PairsConfig, UnimodalConfig, build_image_index, build_pair_index
    from vlp_core.data.regions import RegionImageDataset, RegionPairDataset

    rss_imports = peak_rss_mb()
    keys = [tuple(k) for k in spec["keys"]]
    store = ShardStore(spec["store"])
    t0 = time.perf_counter()
    if INDEX_OF[stage] == "images":
        index = build_image_index(store, UnimodalConfig(), seed=spec["seed"])
    else:
        index = build_pair_index(store, PairsConfig(mode="retrieved"), seed=spec["seed"])
    index_s = time.perf_counter() - t0
    if _ids_digest(index["image_id"].to_pylist()) != spec["index_digest"]:
        raise RuntimeError("the index differs from the parent's (has the store changed?)")
    rss_index = peak_rss_mb()
    collator = None
    if stage == "batches":
        from vlp_core.data import load_tokenizer
        from vlp_core.data.regions import RegionCollator

        collator = RegionCollator(load_tokenizer())
    rss_tok = peak_rss_mb()
    with _Clock() as build:
        if stage == "images":
            dataset = RegionImageDataset(store, index, seed=spec["seed"])
        else:
            dataset = RegionPairDataset(store, index, seed=spec["seed"])
    rss_built = peak_rss_mb()
    reader = dataset.reader
    if spec["cache_bytes"]:
        reader.cache_bytes = spec["cache_bytes"]  # read when the (per-process) cache is created

    def stats() -> dict[str, int]:
        cache = reader._cache  # None until the first feature read in this process
        return {"hits": cache.hits if cache else 0, "misses": cache.misses if cache else 0}

    def samples_pass():
        regions = 0
        for key in keys:
            regions += len(dataset[key]["region_feats"])
        return len(keys), regions

    def loader():
        from torch.utils.data import DataLoader

        return DataLoader(
            dataset, batch_size=spec["batch_size"], sampler=keys, collate_fn=collator,
            num_workers=spec["num_workers"], pin_memory=False, drop_last=True, persistent_workers=False,
        )  # fmt: skip

    def batches_pass():
        samples = regions = 0
        for batch in loader():  # a new loader per pass, as the trainer makes one per epoch
            samples += len(batch["region_mask"])
            regions += int(batch["region_mask"].sum())
        return samples, regions

    if collator is None:
        for key in keys[: spec["warmup"]]:
            dataset[key]
        one_pass = samples_pass
    else:
        collator([dataset[key] for key in keys[: max(spec["warmup"], 1)]])
        one_pass = batches_pass
    in_process = collator is None or spec["num_workers"] == 0
    res = _passes(one_pass, spec, stats if in_process else None)
    res["peak_rss_mb"] = peak_rss_mb()  # before the check and profile passes below
    check = _CheckWriter(work / stage)
    links = linked_samples = 0
    images = set()
    if collator is None:
        for key in keys:
            s = dataset[key]
            check.add(s["region_feats"], s["region_boxes"])
            images.add(s["image_key"])
            links += len(s.get("links", ()))
            linked_samples += bool(s.get("links"))
    else:
        for batch in loader():
            mask = batch["region_mask"].numpy().astype(bool)
            feats, boxes = batch["region_feats"].numpy(), batch["region_boxes"].numpy()
            for i in range(len(mask)):
                check.add(feats[i][mask[i]], boxes[i][mask[i]])
            images.update(batch["image_key"].tolist())
            links += int((batch["link_region"] >= 0).sum())
            linked_samples += int((batch["link_region"] >= 0).any(1).sum())
    check.close()
    if spec["profile"]:
        res["profile"] = _profile(one_pass)
    res.update(
        index_s=index_s, index_rows=index.num_rows, construct_s=build.seconds,
        construct_cpu_s=build.cpu_seconds, rss_at_start_mb=rss_imports, rss_index_mb=rss_index,
        rss_tokenizer_mb=rss_tok,
        rss_constructed_mb=rss_built, images_located=reader.n_images,
        regions_located=int(sum(len(loc) for loc in reader._loc)), distinct_images=len(images),
        row_groups=len({(int(f), int(g)) for loc in reader._loc for f, g, _ in loc.tolist()}),
        cache_bytes=reader.cache_bytes, cache_entries=len(reader._cache.items) if reader._cache else None,
        cache_mb=reader._cache.nbytes / 1e6 if reader._cache else None,
        links=links if stage != "images" else None, linked_samples=linked_samples,
    )  # fmt: skip
    return res


def run_stage(stage: str, spec: dict[str, Any]) -> dict[str, Any]:
    work = Path(spec["work"])
    fn = _stage_baseline if stage.startswith("baseline") else _stage_ours
    res = fn(stage, spec, work)
    res["stage"] = stage
    return res


# ---------------------------------------------------------------------------------------- parent side


def sampler_keys(n: int, batch: int, seed: int, samples: int) -> list[tuple[int, int]]:
    """The first ``samples`` keys the trainer's sampler yields (0: one epoch), whole batches only."""
    from vlp_core.data import ResumableSampler

    sampler = ResumableSampler(n, global_batch=batch, seed=seed)
    want = samples or len(sampler)
    keys: list[tuple[int, int]] = []
    while len(keys) < want:
        keys.extend(sampler)
        sampler.set_epoch(sampler.epoch + 1)
    return keys[: want - want % batch]


def compare(work: Path, ours: str, base: str) -> dict[str, Any]:
    """Ours vs. the baseline's written samples: region counts, max |feature diff|, boxes."""
    import numpy as np

    def load(stage: str):
        counts = np.fromfile(work / f"{stage}.count", np.int32)
        feats = np.fromfile(work / f"{stage}.feat", np.float32)
        boxes = np.fromfile(work / f"{stage}.box", np.float32)
        return counts, feats, boxes

    (ca, fa, ba), (cb, fb, bb) = load(ours), load(base)
    out: dict[str, Any] = {"samples": len(ca), "regions": int(ca.sum())}
    out["count_mismatches"] = int((ca != cb).sum()) if len(ca) == len(cb) else abs(len(ca) - len(cb))
    if out["count_mismatches"] or fa.size != fb.size:
        out["max_abs_diff"] = None
        return out
    out["values"] = fa.size
    out["max_abs_diff"] = float(np.abs(fa - fb).max()) if fa.size else 0.0
    out["boxes_max_abs_diff"] = float(np.abs(ba - bb).max()) if ba.size else 0.0
    return out


def summarise(rows: list[dict[str, Any]]) -> None:
    by_stage = {r["stage"]: r for r in rows}
    for r in rows:
        r["samples_per_s"] = r["samples"] / r["seconds"]
        base = by_stage.get(BASELINE_OF[INDEX_OF[r["stage"]]])
        r["vs_baseline"] = r["samples_per_s"] / base["samples_per_s"] if base else None
        per_sample = r["cpu_seconds"] / r["samples"]
        r["cpu_vs_baseline"] = base["cpu_seconds"] / base["samples"] / per_sample if base else None


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def table(rows: list[dict[str, Any]]) -> str:
    header = ["stage", "samples", "regions", "seconds", "CPU s", "samples/s", "peak RSS MB",
              "over imports MB", "vs baseline", "CPU vs baseline"]  # fmt: skip
    lines = [
        [STAGE_LABELS[r["stage"]], f"{r['samples']:,}", f"{r['regions']:,}", f"{r['seconds']:.3f}",
         f"{r['cpu_seconds']:.3f}", f"{r['samples_per_s']:,.0f}", f"{r['peak_rss_mb']:,.0f}",
         f"{r['peak_rss_mb'] - r['rss_at_start_mb']:,.0f}", _ratio(r["vs_baseline"]),
         _ratio(r["cpu_vs_baseline"])]
        for r in rows
    ]  # fmt: skip
    return fmt_table(header, lines)


def _cache_text(run: dict[str, Any]) -> str:
    c = run.get("cache")
    return "-" if c is None else f"{c['hits']:,} hits / {c['misses']:,} misses"


def details(rows: list[dict[str, Any]], checks: dict[str, dict[str, Any]], spec: dict[str, Any]) -> str:
    out = []
    for r in rows:
        name, first = r["stage"], r["runs"][0]
        passes = ", ".join(f"{run['seconds']:.3f}" for run in r["runs"])
        if name.startswith("baseline"):
            out.append(
                f"  {name}: construction {r['construct_s']:.2f} s (read_table of {r['files']} files, "
                f"{r['table_rows']:,} rows for {r['images_found']:,}/{r['images_wanted']:,} images, "
                f"{r['table_mb']:.1f} MB in Arrow; sort, group); RSS after imports "
                f"{r['rss_at_start_mb']:,.0f} MB, after construction {r['rss_constructed_mb']:,.0f} MB; "
                f"{r['duplicate_rows']} duplicate (image, region) rows; passes {passes} s"
            )
            continue
        workers = spec["num_workers"] if name == "batches" else 0
        line = (
            f"  {name}: index {r['index_rows']:,} rows built in {r['index_s']:.2f} s (not timed); "
            f"construction {r['construct_s']:.2f} s ({r['images_located']:,} images, "
            f"{r['regions_located']:,} regions located in {r['row_groups']} row groups); RSS after imports "
            f"{r['rss_at_start_mb']:,.0f} MB, with the index {r['rss_index_mb']:,.0f} MB"
        )
        if name == "batches":
            line += f", with the tokenizer {r['rss_tokenizer_mb']:,.0f} MB"
        line += f", after construction {r['rss_constructed_mb']:,.0f} MB; passes {passes} s"
        out.append(line)
        if workers:
            out.append(
                f"  {' ' * len(name)}  {workers} DataLoader worker(s): CPU s includes theirs "
                f"({r['worker_cpu_seconds']:.3f} s); largest worker peak RSS "
                f"{r['worker_peak_rss_mb'] or 0:,.0f} MB; the row-group cache lives in the workers, new "
                "ones every pass (so every pass reads the features again)"
            )
        else:
            later = list(dict.fromkeys(_cache_text(run) for run in r["runs"][1:]))
            later_text = "each " + later[0] if len(later) == 1 else ", ".join(later) or "-"
            out.append(
                f"  {' ' * len(name)}  row-group cache (counted per region lookup): first pass "
                f"{_cache_text(first)} ({first['seconds']:.3f} s, after the warm-up), later passes "
                f"{later_text}; {r['cache_entries']} row group(s) = {r['cache_mb'] or 0:.1f} MB held "
                f"(limit {r['cache_bytes'] / 2**20:.0f} MiB)"
            )
        if r.get("links") is not None:
            kept = " (those whose phrase is within max_len)" if name == "batches" else ""
            out.append(
                f"  {' ' * len(name)}  {r['distinct_images']:,} distinct images, {r['links']:,} phrase links"
                f"{kept} in {r['linked_samples']:,} of {r['samples']:,} samples"
            )
    for name, c in checks.items():
        if c["max_abs_diff"] is None:
            out.append(
                f"  check {name} vs {BASELINE_OF[INDEX_OF[name]]}: MISMATCH, {c['count_mismatches']} "
                f"sample(s) with a different number of regions"
            )
        else:
            out.append(
                f"  check {name} vs {BASELINE_OF[INDEX_OF[name]]}: {c['samples']:,} samples, "
                f"{c['regions']:,} regions, {c['values']:,} feature values: max |ours - baseline| = "
                f"{c['max_abs_diff']:g}, boxes {c['boxes_max_abs_diff']:g}"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-dir", type=Path, help="data directory with the store (default $VLP_DATA_DIR or <repo>/data)"
    )
    p.add_argument(
        "--samples", type=int, default=2000, help="samples per stage, whole batches (2000; 0: one epoch)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the sampler and collator (16)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers of the batches stage (0)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes per stage, fastest reported (3)")
    p.add_argument("--warmup", type=int, default=16, help="samples read before the clock (default 16)")
    p.add_argument("--seed", type=int, default=0, help="index, sampler and dataset seed (default 0)")
    p.add_argument(
        "--cache-mb", type=float, default=0, help="row-group cache of the reader, MiB (default: its own, 64)"
    )
    p.add_argument("--profile", action="store_true", help="cProfile one extra pass of each of our stages")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--json", action="store_true", help="also print one JSON line of results")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.stage:  # child: one stage, results to a file
        return stage_main(args, run_stage)

    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        p.error(f"unknown stage(s): {sorted(unknown)}")
    stages = [s for s in STAGES if s in stages]  # each baseline before the stages compared with it
    if args.batch_size < 1 or args.repeat < 1 or args.samples < 0 or args.warmup < 0 or args.num_workers < 0:
        p.error("--batch-size and --repeat must be >= 1, --samples, --warmup and --num-workers >= 0")

    from stores.shards import ShardStore
    from vlp_core.data import PairsConfig, UnimodalConfig, build_image_index, build_pair_index
    from vlp_core.data.regions import RegionConfig
    from vlp_core.paths import DataLayout, data_dir

    root = args.data_dir.expanduser().resolve() if args.data_dir else data_dir()
    store_path = DataLayout(root).store
    if not _region_files(store_path):
        print(f"error: no regions in {store_path}: build the corpus first (make quickstart)", file=sys.stderr)
        return 2
    store = ShardStore(store_path)
    indexes = {}
    try:
        indexes["images"] = build_image_index(store, UnimodalConfig(), seed=args.seed)
        indexes["pairs"] = build_pair_index(store, PairsConfig(mode="retrieved"), seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    max_regions = RegionConfig().max_regions
    load0 = load_average()
    print(
        f"{os.cpu_count()} CPU cores, load average {load0 if load0 is None else f'{load0:.1f}'}; "
        f"{indexes['images'].num_rows:,} image-index rows, {indexes['pairs'].num_rows:,} retrieved pairs in "
        f"{store_path}",
        file=sys.stderr,
    )
    rows, checks = [], {}
    with tempfile.TemporaryDirectory(prefix="vlp-bench-regions-") as tmp:
        work = Path(tmp)
        specs = {}
        for kind, index in indexes.items():
            row_image = index["image_id"].to_pylist()
            keys = sampler_keys(index.num_rows, args.batch_size, args.seed, args.samples)
            specs[kind] = {
                "store": str(store_path), "work": str(work), "keys": keys, "row_image": row_image,
                "index_digest": _ids_digest(row_image), "max_regions": max_regions, "seed": args.seed,
                "repeat": args.repeat, "warmup": args.warmup, "batch_size": args.batch_size,
                "num_workers": 0, "cache_bytes": int(args.cache_mb * 2**20), "profile": args.profile,
            }  # fmt: skip
        for stage in stages:
            spec = dict(specs[INDEX_OF[stage]])
            if stage == "batches":
                spec["num_workers"] = args.num_workers
            print(f"[{STAGE_LABELS[stage]}] ...", file=sys.stderr)
            try:
                rows.append(run_stage_child(__file__, stage, spec, work))
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        done = {r["stage"] for r in rows}
        for stage in ("images", "pairs", "batches"):
            base = BASELINE_OF[INDEX_OF[stage]]
            if stage in done and base in done:
                checks[stage] = compare(work, stage, base)
    load1 = load_average()
    summarise(rows)
    n_keys = {k: len(s["keys"]) for k, s in specs.items()}
    print(
        f"\n== region data path, {n_keys['images']:,} image-index / {n_keys['pairs']:,} pair-index samples "
        f"in the sampler's order (seed {args.seed}), batch {args.batch_size}, at most {max_regions} regions: "
        f"fastest of {args.repeat} passes after {args.warmup} warm-up samples"
    )
    print(table(rows))
    print(details(rows, checks, vars(args)))
    loads = "?" if load0 is None or load1 is None else f"{load0:.1f} -> {load1:.1f}"
    print(
        "  vs baseline: samples/s over the baseline of the same index (image or pair order); CPU s: the "
        "stage process over the fastest pass; over imports: peak RSS minus the RSS after the stage's imports "
        f"(ours import torch). {os.cpu_count()} CPU cores, load average {loads}: timings on a shared machine "
        "vary between runs"
    )
    for r in rows:
        if r.get("profile"):
            where = " (main process only)" if r["stage"] == "batches" and args.num_workers else ""
            print(f"\n-- cProfile of one more pass of {r['stage']}{where}, by internal time\n{r['profile']}")
    if args.json:
        print(json.dumps({
            "data_dir": str(root), "samples": args.samples, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "repeat": args.repeat, "warmup": args.warmup, "seed": args.seed,
            "cache_mb": args.cache_mb, "max_regions": max_regions, "cpus": os.cpu_count(),
            "load_average": [load0, load1], "index_rows": {k: v.num_rows for k, v in indexes.items()},
            "keys": n_keys, "stages": rows, "checks": checks,
        }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
