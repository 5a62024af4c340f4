"""Ingest benchmark: a plain PIL loop vs. ``decode_image`` vs. the full ingest stage, on the same files.

Three stages run one after another, each in its own child process (this script re-run with the hidden
``--stage`` flag), so each stage's peak RSS is its own and not polluted by the others:

1. ``baseline``     plain Pillow: ``Image.open(path)`` + ``im.convert("RGB")`` (a full decode), with
                    ``Image.MAX_IMAGE_PIXELS`` at Pillow's default. Exceptions are counted by type. Files
                    whose header says more than ``--baseline-max-pixels`` are skipped (reported with the
                    memory a full decode would have allocated), so the loop cannot take the machine down.
2. ``decode``       ``vlp_core.corpus.images.decode_image(bytes, limits)`` per file: read, identify, bomb /
                    size
                    checks, decode, normalise to RGB, downscale to the store size, JPEG-encode.
3. ``ingest``       what the flow's ``ingest-shard`` task does, without Prefect: ``OpenClipArtSource.read``
                    (SVG captions) or ``ImageDirSource.read`` → ``ingest_images`` → ``to_table`` →
                    ``ShardStore.commit`` of shards of ``--shard-size`` units into a temporary store.

All stages see the same list of files (the source's units, sorted, first ``--limit``). The files are read
once before the first stage so every stage runs on a warm page cache. Time is wall-clock over the stage's
work only (imports, listing units and starting workers are not timed); CPU seconds are reported beside it
because a shared machine makes wall time noisy. ``--workers K`` runs every stage (baseline included, so the
ratio stays like for like) with a 'spawn' pool of K processes over disjoint chunks, handed out dynamically:
ingest shards of ``--shard-size`` units, or ``--chunk-size`` files for baseline/decode. Peak RSS is then
that of the largest single process; the sum over processes is printed below the table and in the JSON.

    .venv/bin/python benchmarks/ingest.py                 # first 1000 clip-art PNGs
    .venv/bin/python benchmarks/ingest.py --limit 0       # the whole collection
    .venv/bin/python benchmarks/ingest.py --limit 0 --workers 2 --json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Deliberately no vlp_core / PIL import at module level: the baseline stage (and its spawn workers, which
# re-import this module) must run with Pillow's defaults, and importing vlp_core.corpus.images switches off
# Pillow's decompression-bomb limit process-wide.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

STAGES = ("baseline", "decode", "ingest")
STAGE_LABELS = {
    "baseline": "baseline: PIL open+convert",
    "decode": "ours: decode_image",
    "ingest": "ours: ingest stage + commit",
}
DEFAULT_MAX_PIXELS = 64_000_000  # vlp_core.corpus.images.DecodeLimits().max_pixels (checked at start-up)
MB = 1e6


def _rss_mb() -> float:
    """Peak RSS of this process so far, in MB.

    Linux: ``VmHWM`` from /proc/self/status, the high-water mark of this process's own address space.
    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used there because Linux carries it across fork + exec: a
    stage child would report at least the parent's RSS at the time it was started (the parent has pyarrow
    loaded: ~75 MB even for the PIL-only baseline). Elsewhere ru_maxrss is the fallback.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MB  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS: bytes, Linux/BSD: KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not sys.stderr.isatty())


# ---------------------------------------------------------------------------------------------- workers
# One function per stage; each processes one chunk of files and returns mergeable counts. They run in the
# stage process itself (--workers 1) or in spawn workers.


def _chunk_baseline(job: dict[str, Any], tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    from PIL import Image

    root, guard = Path(job["root"]), job["baseline_max_pixels"]
    if job.get("baseline_no_bomb_check"):
        Image.MAX_IMAGE_PIXELS = None
    counts: Counter = Counter()
    skipped: list[dict[str, Any]] = []
    messages: dict[str, str] = {}  # first message per warning / exception type
    over = {"files": 0, "seconds": 0.0}  # files over --max-pixels (the ones decode_image rejects unread)
    for key in job["keys"]:
        path = root / key
        t0, w, h, decoded = time.perf_counter(), 0, 0, False
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with Image.open(path) as im:
                    w, h = im.size
                    if w * h > guard:
                        bands = len(im.getbands())
                        # decode buffer (bands × 8 bit) + the RGB copy convert() makes
                        skipped.append({"key": key, "w": w, "h": h, "bytes": w * h * (bands + 3)})
                        counts["skipped_by_guard"] += 1
                    else:
                        im.convert("RGB")
                        counts["ok"] += 1
                        decoded = True
            for warn in caught:
                counts[f"warning:{warn.category.__name__}"] += 1
                messages.setdefault(warn.category.__name__, str(warn.message)[:200])
        except Exception as exc:  # noqa: BLE001 - the point is to count what a plain loop runs into
            counts[f"error:{type(exc).__name__}"] += 1
            messages.setdefault(type(exc).__name__, str(exc)[:200])
        if decoded and w * h > job["max_pixels"]:
            over["files"] += 1
            over["seconds"] += time.perf_counter() - t0
        if tick:
            tick(1)
    return {
        "n": len(job["keys"]),
        "counts": counts,
        "skipped": skipped,
        "messages": messages,
        "over_max_pixels": over,
        "rss_mb": _rss_mb(),
        "pid": os.getpid(),
    }


def _chunk_decode(job: dict[str, Any], tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    from vlp_core.corpus.images import DecodedImage, DecodeLimits, decode_image
    from vlp_core.corpus.sources import ReadError, read_file_bounded

    root, limits = Path(job["root"]), DecodeLimits(max_pixels=job["max_pixels"])
    counts: Counter = Counter()
    for key in job["keys"]:
        data = read_file_bounded(root / key, limits.max_file_bytes)
        if isinstance(data, ReadError):
            counts[f"reject:{data.reason}"] += 1
        else:
            out = decode_image(data, limits)
            counts["ok" if isinstance(out, DecodedImage) else f"reject:{out.reason}"] += 1
        if tick:
            tick(1)
    return {"n": len(job["keys"]), "counts": counts, "rss_mb": _rss_mb(), "pid": os.getpid()}


def _make_source(root: Path):
    from vlp_core.corpus.sources import ImageDirSource, OpenClipArtSource
    from vlp_core.paths import DataLayout

    clipart_png = (DataLayout.default().openclipart / "png").resolve()
    if root.resolve() == clipart_png or (root.name == "png" and (root.parent / "svg").is_dir()):
        return OpenClipArtSource("openclipart", root.parent)
    return ImageDirSource("bench", root)


class _TickingIter:
    """Wraps the record iterator so the progress bar moves per image inside one shard."""

    def __init__(self, it, tick: Callable[[int], None] | None):
        self.it, self.tick = iter(it), tick

    def __iter__(self):
        return self

    def __next__(self):
        rec = next(self.it)
        if self.tick:
            self.tick(1)
        return rec


def _chunk_ingest(job: dict[str, Any], tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    from stores.shards import ShardStore, stable_hash, to_table
    from vlp_core.corpus.images import DecodeLimits
    from vlp_core.corpus.ingest import STAGE, ingest_images
    from vlp_core.corpus.sources import Unit

    source = _make_source(Path(job["root"]))
    limits = DecodeLimits(max_pixels=job["max_pixels"])
    store = ShardStore(job["store"])
    units = [Unit(k, fp) for k, fp in job["units"]]
    signature = stable_hash("benchmark", source.kind, limits)
    shard = stable_hash(STAGE, source.name, signature, job["units"])
    t0 = time.perf_counter()
    records = _TickingIter(source.read(units, max_file_bytes=limits.max_file_bytes), tick)
    rows = ingest_images(records, source.name, shard, limits)
    tables = {name: to_table(name, r) for name, r in rows.tables.items()}
    store.commit(
        STAGE, source.name, shard, signature, job["units"], tables, dict(rows.stats), time.perf_counter() - t0
    )
    counts = Counter(rows.stats)
    counts["ok"] = counts.pop("images", 0)
    return {"n": len(units), "counts": counts, "rss_mb": _rss_mb(), "pid": os.getpid()}


def _init_worker(stage: str, barrier) -> None:
    if stage == "decode":
        import vlp_core.corpus.images  # noqa: F401
        import vlp_core.corpus.sources  # noqa: F401
    elif stage == "ingest":
        import stores.shards  # noqa: F401
        import vlp_core.corpus.ingest  # noqa: F401
    else:
        import PIL.Image  # noqa: F401
    # a replacement worker (after a crash) finds nobody at the barrier: give up waiting, work anyway
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=120)


CHUNK_FUNCS = {"baseline": _chunk_baseline, "decode": _chunk_decode, "ingest": _chunk_ingest}


def _run_chunk(stage: str, job: dict[str, Any], tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One chunk of a stage, plus the CPU seconds (user + system) this process spent on it."""
    cpu0 = time.process_time()
    res = CHUNK_FUNCS[stage](job, tick)
    res["cpu_s"] = time.process_time() - cpu0
    return res


# ---------------------------------------------------------------------------------------------- a stage


def run_stage(stage: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one stage over ``spec['keys']`` in this process (or its pool); return its measurements."""
    if stage == "baseline":
        from PIL import Image

        assert "vlp_core.corpus.images" not in sys.modules, "baseline must not import vlp_core.corpus.images"
        pil_limit = None if spec["baseline_no_bomb_check"] else Image.MAX_IMAGE_PIXELS
    # import what the stage needs before the clock starts (the baseline needs only PIL)
    elif stage == "decode":
        import vlp_core.corpus.images  # noqa: F401
        import vlp_core.corpus.sources  # noqa: F401
    else:
        import stores.shards  # noqa: F401
        import vlp_core.corpus.ingest  # noqa: F401
    keys, size, workers = spec["keys"], spec["shard_size"], spec["workers"]
    common = {k: spec[k] for k in ("root", "max_pixels", "baseline_max_pixels", "baseline_no_bomb_check")}
    store_dir = None
    if stage == "ingest":
        # Listing the units and creating the store is the flow's plan step: not timed.
        from stores.shards import ShardStore

        wanted = set(keys)
        units = [(u.key, u.fingerprint) for u in _make_source(Path(spec["root"])).units() if u.key in wanted]
        assert [k for k, _ in units] == keys, "source units and the benchmark's file list differ"
        store_dir = tempfile.mkdtemp(prefix="vlp-bench-store-")
        ShardStore(store_dir).ensure_tables()
        jobs = [
            {**common, "store": store_dir, "units": units[i : i + size]} for i in range(0, len(units), size)
        ]
    else:
        step = size if workers <= 1 else spec["chunk_size"]
        jobs = [{**common, "keys": keys[i : i + step]} for i in range(0, len(keys), step)]
    rss_before = _rss_mb()
    results = []
    with _progress(len(keys), STAGE_LABELS[stage]) as bar:
        t0 = time.perf_counter()
        if workers <= 1:
            results = [_run_chunk(stage, job, bar.update) for job in jobs]
        else:
            import multiprocessing as mp

            # Workers start and import before the clock starts (the barrier waits for all of them).
            ctx = mp.get_context("spawn")
            barrier = ctx.Barrier(workers + 1)
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(stage, barrier))
            barrier.wait()
            t0 = time.perf_counter()
            with pool:
                for res in pool.imap_unordered(
                    functools.partial(_run_chunk, stage), jobs
                ):  # dynamic: big files cluster
                    results.append(res)
                    bar.update(res["n"])
        seconds = time.perf_counter() - t0
    counts: Counter = Counter()
    per_pid: dict[int, float] = {}
    skipped: list[dict[str, Any]] = []
    messages: dict[str, str] = {}
    over: dict[str, float] = {}
    cpu_s = 0.0
    for res in results:
        counts.update(res["counts"])
        cpu_s += res["cpu_s"]
        per_pid[res["pid"]] = max(per_pid.get(res["pid"], 0.0), res["rss_mb"])
        skipped += res.get("skipped", [])
        for k, v in res.get("messages", {}).items():
            messages.setdefault(k, v)
        for k, v in res.get("over_max_pixels", {}).items():
            over[k] = over.get(k, 0) + v
    own = _rss_mb()
    per_pid[os.getpid()] = own
    out: dict[str, Any] = {
        "stage": stage,
        "files": len(keys),
        "input_bytes": spec["input_bytes"],
        "seconds": seconds,
        "cpu_seconds": cpu_s,
        "workers": workers,
        "ok": counts.pop("ok", 0),
        "counts": dict(sorted(counts.items())),
        "rss_at_start_mb": rss_before,
        "peak_rss_mb": max(per_pid.values()),
        "peak_rss_sum_mb": sum(per_pid.values()),
    }
    if stage == "baseline":
        out["pil_max_image_pixels"] = pil_limit
        out["skipped"] = skipped
        out["messages"] = messages
        out["over_max_pixels"] = over
        out["skipped_alloc_gb"] = sum(s["bytes"] for s in skipped) / 1e9
    if store_dir is not None:
        out["store_mb"] = sum(p.stat().st_size for p in Path(store_dir).rglob("*") if p.is_file()) / MB
        import shutil

        shutil.rmtree(store_dir, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------- driver


def list_files(root: Path, limit: int) -> list[str]:
    """The source's units (relative keys), sorted; the first ``limit`` (0 = all)."""
    from vlp_core.corpus.sources import ImageDirSource

    keys = [u.key for u in ImageDirSource("bench", root).units()]
    return keys[:limit] if limit else keys


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["stage"] == "baseline"), None)
    header = [
        "stage", "files", "ok", "not ok", "seconds", "CPU s", "images/s", "MB/s", "peak RSS MB", "vs baseline"
    ]  # fmt: skip
    lines = []
    for r in rows:
        ips = r["files"] / r["seconds"] if r["seconds"] else float("inf")
        ratio = base["seconds"] / r["seconds"] if base and r["seconds"] else float("nan")
        lines.append(
            [
                STAGE_LABELS[r["stage"]],
                f"{r['files']:,}",
                f"{r['ok']:,}",
                f"{r['files'] - r['ok']:,}",
                f"{r['seconds']:.2f}",
                f"{r['cpu_seconds']:.2f}",
                f"{ips:,.1f}",
                f"{r['input_bytes'] / MB / r['seconds']:.1f}",
                f"{r['peak_rss_mb']:,.0f}",
                f"{ratio:.2f}x",
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = ["<"] + [">"] * (len(header) - 1)

    def row(cells: list[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, fmt, widths, strict=True))

    return "\n".join([row(header), row(["-" * w for w in widths]), *(row(line) for line in lines)])


def _details(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        counts = ", ".join(f"{k}={v}" for k, v in r["counts"].items()) or "-"
        out.append(f"{r['stage']:>8}: {counts}")
        if r["stage"] == "baseline":
            lim = r["pil_max_image_pixels"]
            out.append(f"          Image.MAX_IMAGE_PIXELS={lim}" + (" (Pillow default)" if lim else " (off)"))
            over = r.get("over_max_pixels") or {}
            if over.get("files"):
                out.append(
                    f"          {over['seconds']:.1f} s (per-file time, summed over workers) went to the "
                    f"{over['files']} file(s) over --max-pixels that it decoded (decode_image rejects them "
                    "from the header)"
                )
            if r["skipped"]:
                names = ", ".join(f"{s['key']} ({s['w']}x{s['h']})" for s in r["skipped"])
                out.append(
                    f"          skipped {len(r['skipped'])} file(s) over --baseline-max-pixels: "
                    f"plain PIL would allocate {r['skipped_alloc_gb']:.1f} GB here: {names}"
                )
        if "store_mb" in r:
            out.append(f"          store written: {r['store_mb']:.1f} MB of Parquet")
        for k, v in r.get("messages", {}).items():
            out.append(f"          e.g. {k}: {v}")
        out.append(f"          RSS at stage start (imports done) {r['rss_at_start_mb']:.0f} MB")
        if r["workers"] > 1:
            out.append(
                f"          {r['workers']} workers: peak RSS summed over the stage process and its workers "
                f"{r['peak_rss_sum_mb']:,.0f} MB"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-dir", type=Path, help="default: the fetched Open Clip Art png/ folder")
    p.add_argument("--limit", type=int, default=1000, help="first N files, sorted (0 = all; default 1000)")
    p.add_argument("--workers", type=int, default=1, help="processes per stage (default 1)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="DecodeLimits.max_pixels")
    p.add_argument("--shard-size", type=int, default=200, help="units per shard of the ingest stage")
    p.add_argument(
        "--chunk-size", type=int, default=50, help="files per task of baseline/decode with --workers > 1"
    )
    p.add_argument(
        "--baseline-max-pixels",
        type=int,
        default=200_000_000,
        help="baseline skips (and reports) files whose header says more pixels (default 200 MP)",
    )
    p.add_argument(
        "--baseline-no-bomb-check",
        action="store_true",
        help="baseline with Image.MAX_IMAGE_PIXELS=None (what any process that imported "
        "vlp_core.corpus.images "
        "gets); --baseline-max-pixels then is the only guard",
    )
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--json", action="store_true", help="also print one JSON line of results")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.stage:  # child: one stage, results to a file
        spec = json.loads(args.spec.read_text())
        args.result.write_text(json.dumps(run_stage(args.stage, spec)))
        return 0

    from vlp_core.corpus.images import DecodeLimits
    from vlp_core.paths import DataLayout

    assert DecodeLimits().max_pixels == DEFAULT_MAX_PIXELS, "update DEFAULT_MAX_PIXELS"
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        p.error(f"unknown stage(s): {sorted(unknown)}")
    root = (args.source_dir or DataLayout.default().openclipart / "png").expanduser()
    if not root.is_dir():
        p.error(f"{root} is not a directory (fetch the Open Clip Art data first, or pass --source-dir)")
    keys = list_files(root, args.limit)
    input_bytes = 0
    for key in keys:  # warm the page cache so no stage pays for cold reads
        with open(root / key, "rb") as f:
            while chunk := f.read(1 << 20):
                input_bytes += len(chunk)
    spec = {
        "root": str(root),
        "keys": keys,
        "input_bytes": input_bytes,
        "workers": args.workers,
        "shard_size": args.shard_size,
        "chunk_size": args.chunk_size,
        "max_pixels": args.max_pixels,
        "baseline_max_pixels": args.baseline_max_pixels,
        "baseline_no_bomb_check": args.baseline_no_bomb_check,
    }
    print(
        f"{len(keys):,} files, {input_bytes / MB:.1f} MB from {root}; workers={args.workers}, "
        f"max_pixels={args.max_pixels / 1e6:g} MP, {os.cpu_count()} CPU cores",
        file=sys.stderr,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlp-bench-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for stage in stages:
            result = Path(tmp) / f"{stage}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage]
            subprocess.run([*cmd, "--spec", str(spec_path), "--result", str(result)], check=True)
            rows.append(json.loads(result.read_text()))
    print(_fmt_table(rows))
    print(_details(rows))
    if args.json:
        base = next((r for r in rows if r["stage"] == "baseline"), None)
        for r in rows:
            r["images_per_s"] = r["files"] / r["seconds"]
            r["mb_per_s"] = r["input_bytes"] / MB / r["seconds"]
            r["vs_baseline"] = base["seconds"] / r["seconds"] if base else None
        print(
            json.dumps({"source_dir": str(root), "limit": args.limit, "cpus": os.cpu_count(), "stages": rows})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
