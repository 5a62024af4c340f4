"""Planning memory benchmark: peak RSS of planning a sentence stage plus one shard, at 1x, 4x, 16x the corpus.

The bundled text corpus (WordNet glosses and examples, the Lee news sentences) is ingested once with the
project's own sources and ``ingest_texts``; for scale k its sentences are written k times to a lines file
(copy 0 the real sentence, copy c >= 1 the sentence with `` (c)`` appended, so every copy is a distinct
sentence of realistic length) and ingested into a store of their own, in the ingest stage's 32 MiB units, with
the catalog built over it. Then, per scale, each stage runs in its own child process (this script re-run with
the hidden ``--stage`` flag), so its peak RSS (``VmHWM``) is its own:

``embed``         ``flows.build_corpus.plan_embed``: the plan streamed from DuckDB (units compared with the
                  committed manifests and ordered there, under the planner's memory limit); every job is
                  built and dropped, as the flow submits them; then the first job's shard is computed
                  (``SHARD_ROWS["embed"]``: its sentences read from their files, MiniLM embeddings; not
                  committed, so every stage sees the same store).
``ground``        ``plan_ground`` the same way, and its first shard (the concept matcher over its sentences).
``embed-before``  the planner as it was before the streamed plan, for comparison: every sentence's text read
                  into a dict, ``ShardStore.plan`` over the unit list held in memory, each job's payload
                  carrying its sentences; then the same first shard.

A flat column means memory bounded by the shard size; the table shows each stage's peak, its growth over the
1x run, the units planned and the seconds the plan took (timings only as context: they are not the point).

    .venv/bin/python benchmarks/planning.py                      # scales 1,4,16
    .venv/bin/python benchmarks/planning.py --scales 1,4 --stages embed --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks.common import fmt_table, load_average, peak_rss_mb, run_stage_child, stage_main  # noqa: E402

STAGES = ("embed", "ground", "embed-before")
UNIT_BYTES = 32 * 2**20  # the lines source's default unit: one ingest shard


# ------------------------------------------------------------------------------------------- building


def real_sentences(work: Path) -> list[str]:
    """The bundled text sources' sentences as the ingest stage stores them (deduplicated, in id order)."""
    from vlp_core.config import load_corpus_config
    from vlp_core.corpus.ingest import ingest_texts
    from vlp_core.corpus.sources import build_source

    cfg = load_corpus_config("default")
    texts: dict[str, str] = {}
    for spec in cfg.sources:
        source = build_source(spec.kind, spec.name, **spec.resolved_options())
        if source.modality != "text":
            continue
        rows = ingest_texts(source.read(source.units()), spec.name, "all", cfg.ingest.text_limits())
        texts.update((r["text_id"], r["text"]) for r in rows.tables["texts"])
    return [texts[k] for k in sorted(texts)]


def build_store(sentences: list[str], scale: int, root: Path) -> dict[str, Any]:
    """A data directory whose ``texts`` table holds ``scale`` copies of ``sentences`` (ingested by the
    project's lines source in its 32 MiB units), with its catalog."""
    from stores.catalog import build_catalog
    from stores.shards import ShardStore, stable_hash, to_table
    from vlp_core.corpus.ingest import TextLimits, ingest_texts
    from vlp_core.corpus.sources import LineTextSource
    from vlp_core.paths import DataLayout

    layout = DataLayout(root)
    store = ShardStore(layout.store)
    store.ensure_tables()
    lines = root / "sentences.txt"
    with open(lines, "w", encoding="utf-8") as f:
        for c in range(scale):
            suffix = f" ({c})" if c else ""
            for s in sentences:
                f.write(f"{s}{suffix}\n")
    source = LineTextSource("synthetic", str(lines), unit_bytes=UNIT_BYTES)
    t0, n = time.perf_counter(), 0
    for unit in source.units():
        shard = stable_hash("bench-ingest", unit.key)
        rows = ingest_texts(source.read([unit]), source.name, shard, TextLimits())
        tables = {name: to_table(name, r) for name, r in rows.tables.items()}
        store.commit("ingest", source.name, shard, "bench", [(unit.key, unit.fingerprint)], tables)
        n += len(rows.tables["texts"])
    lines.unlink()
    build_catalog(layout.catalog, layout.store)
    return {"root": str(root), "texts": n, "ingest_seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------ child side


def _run_stage(stage: str, spec: dict[str, Any]) -> dict[str, Any]:
    import flows.build_corpus as bc
    from stores.catalog import connect
    from stores.shards import ShardStore, stable_hash
    from vlp_core.config import load_corpus_config
    from vlp_core.paths import DataLayout

    layout = DataLayout(Path(spec["root"]))
    cfg = load_corpus_config("default", {"runner.plan_memory_mb": spec["plan_memory_mb"]})
    rss_imports = peak_rss_mb()
    t0 = time.perf_counter()
    first = None
    n_jobs = n_units = 0
    if stage == "embed-before":
        con = connect(layout.catalog)
        text_of = dict(con.execute("SELECT text_id, text FROM texts ORDER BY text_id").fetchall())
        con.close()
        units = [(tid, tid) for tid in text_of]
        signature = stable_hash(bc.EMBED, cfg.embed.model_path, bc.EMBED_CODE)
        plan = ShardStore(layout.store).plan(bc.EMBED, bc.CORPUS, units, signature, cfg.embed.shard_size)
        jobs = [
            bc.ShardJob(bc.EMBED, bc.CORPUS, key, signature, chunk, {"texts": [text_of[k] for k, _ in chunk]})
            for key, chunk in plan.todo
        ]
        n_jobs, n_units, first = len(jobs), sum(len(j.units) for j in jobs), jobs[0]
        plan_seconds = time.perf_counter() - t0
        texts = first.payload["texts"]
        enc = bc.corpus.sentence_encoder(cfg.embed.model_path, cfg.embed.device, cfg.embed.batch_size)
        rows = bc.corpus.embed_rows(enc, [k for k, _ in first.units], texts)
    else:
        planner = {"embed": bc.plan_embed, "ground": bc.plan_ground}[stage]
        stream = planner(cfg, layout)
        for job in stream:  # built one at a time and dropped, as map_shards submits them
            n_jobs += 1
            n_units += len(job.units)
            first = first or job
        plan_seconds = time.perf_counter() - t0
        rows = bc.SHARD_ROWS[stage](first, cfg)
    return {
        "jobs": n_jobs,
        "units": n_units,
        "shard_units": len(first.units),
        "shard_rows": {k: len(v) for k, v in rows.tables.items()},
        "plan_seconds": round(plan_seconds, 2),
        "seconds": round(time.perf_counter() - t0, 2),
        "rss_after_imports_mb": rss_imports,
        "peak_rss_mb": peak_rss_mb(),
    }


# ----------------------------------------------------------------------------------------- parent side


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1,4,16", help="multiples of the bundled text corpus")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--plan-memory-mb", type=int, default=128, help="runner.plan_memory_mb: DuckDB's limit")
    ap.add_argument("--work", help="keep the synthetic stores here (default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        return stage_main(args, _run_stage)
    scales = [int(x) for x in args.scales.split(",")]
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="vlp-plan-bench-", dir=args.work) as tmp:
        work = Path(tmp)
        sentences = real_sentences(work)
        print(f"bundled text corpus: {len(sentences):,} distinct sentences", flush=True)
        results: list[dict[str, Any]] = []
        for k in scales:
            built = build_store(sentences, k, work / f"x{k}")
            print(
                f"{k}x: {built['texts']:,} sentence rows ingested in {built['ingest_seconds']} s", flush=True
            )
            for stage in stages:
                r = run_stage_child(
                    __file__, stage, {"root": built["root"], "plan_memory_mb": args.plan_memory_mb}, work, env
                )
                results.append({"scale": k, "stage": stage, "texts": built["texts"], **r})
                print(f"  {stage}: peak {r['peak_rss_mb']:.0f} MB, {r['units']:,} units", flush=True)
    base = {r["stage"]: r["peak_rss_mb"] for r in results if r["scale"] == scales[0]}
    lines = [
        [r["stage"], f"{r['scale']}x", f"{r['texts']:,}", f"{r['units']:,}", f"{r['jobs']:,}",
         f"{r['plan_seconds']:.1f}", f"{r['rss_after_imports_mb']:,.0f}", f"{r['peak_rss_mb']:,.0f}",
         f"{(r['peak_rss_mb'] / base[r['stage']] - 1) * 100:+.1f}%"]
        for r in sorted(results, key=lambda r: (STAGES.index(r["stage"]), r["scale"]))
    ]  # fmt: skip
    header = ["stage", "scale", "sentences", "units planned", "shards", "plan s", "RSS imports MB",
              "peak RSS MB", f"vs {scales[0]}x"]  # fmt: skip
    print()
    print(fmt_table(header, lines))
    print(
        f"  load average {load_average()}; one shard computed per stage (not committed); "
        f"runner.plan_memory_mb {args.plan_memory_mb}"
    )
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
