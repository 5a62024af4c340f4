"""The ``build-corpus`` flow: plan shards per source, map the stage over them, publish counts.

Stages run as subflows so each can pick its own task runner from the config (threads by default, Dask to
scale out): ingest, regions, embed, index, retrieve, phrases, links, gallery, ground. Each shard is a Prefect
task that reads its units, computes its rows with ``vlp_core.corpus`` and commits them through ``stores``
atomically; a re-run skips committed shards, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

import vlp_core.corpus.images
import vlp_core.corpus.ingest
import vlp_core.corpus.sources
import vlp_core.corpus.text
import vlp_core.language.embed
import vlp_core.language.grounding
import vlp_core.language.linking
import vlp_core.language.phrases
import vlp_core.precision
import vlp_core.vision.darknet
import vlp_core.vision.detect
import vlp_core.vision.features
from stores.catalog import build_catalog, connect
from stores.faiss_store import FaissStore, IndexMeta, build_index_streaming, choose_factory
from stores.shards import ShardStore, code_version, stable_hash, to_table
from vlp_core.config import CorpusConfig, RunnerConfig, SourceSpec, load_corpus_config
from vlp_core.corpus import stages as corpus
from vlp_core.corpus.ingest import STAGE as INGEST
from vlp_core.corpus.ingest import ShardRows, ingest_images, ingest_texts
from vlp_core.corpus.sources import Unit, build_source
from vlp_core.memory import PeakRSS, children_peak_rss_mb, run_peak_rss_mb
from vlp_core.paths import DataLayout
from vlp_core.progress import ProgressLog

CORPUS = "corpus"  # the source name of stages over the whole (deduplicated) corpus
VISION_MODULES = (vlp_core.vision.darknet, vlp_core.vision.detect, vlp_core.vision.features)
INGEST_CODE = code_version(
    vlp_core.corpus.images, vlp_core.corpus.text, vlp_core.corpus.sources, vlp_core.corpus.ingest
)


def make_task_runner(cfg: RunnerConfig):
    """Threads on one machine; Dask (LocalCluster or an existing scheduler) with the ``dask`` extra."""
    if cfg.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers or os.cpu_count() or 2)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise RuntimeError("runner.kind=dask needs the extra: pip install -e '.[dask]'") from exc
    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.max_workers or os.cpu_count() or 2,
            "threads_per_worker": 1,
            "dashboard_address": None,  # no extra ports; loopback only
            "host": "127.0.0.1",
        }
    )


def ingest_signature(spec: SourceSpec, cfg: CorpusConfig) -> str:
    params = cfg.ingest.model_dump(exclude={"image_shard_size", "text_shard_size"})
    return stable_hash(INGEST, spec.kind, spec.resolved_options(), params, INGEST_CODE)


@dataclass
class ShardJob:
    """One shard of one stage: what to read (units), under which signature, plus stage-specific payload."""

    stage: str
    source: str
    shard: str
    signature: str
    units: list[tuple[str, str]]
    payload: dict[str, Any] = field(default_factory=dict)


def plan_jobs(
    store: ShardStore,
    stage: str,
    source: str,
    units: list[tuple[str, str]],
    signature: str,
    shard_size: int,
    payload: dict[str, Any] | None = None,
) -> list[ShardJob]:
    """Drop the source's stale shards and return the shards still to do (logged)."""
    plan = store.plan(stage, source, units, signature, shard_size)
    for key in plan.stale:
        store.drop(stage, source, key)
    get_run_logger().info(
        "%s/%s: %d units, %d shards done, %d stale dropped, %d shards (%d units) to do",
        stage, source, len(units), len(plan.done), len(plan.stale), len(plan.todo), plan.n_units_todo,
    )  # fmt: skip
    return [ShardJob(stage, source, key, signature, chunk, dict(payload or {})) for key, chunk in plan.todo]


def _logger():
    """The run's logger inside a flow or task; this module's otherwise (planning called as a library)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


class JobStream:
    """The shards a stage still has to do, streamed from the planner (:meth:`ShardStore.plan_stream`): ``n``
    jobs, each built when the flow is ready to submit it, so the plan's memory does not grow with the corpus.
    Iterate it once; it closes its catalog connection when exhausted (or on :meth:`close`)."""

    def __init__(self, n: int, jobs: Iterator[ShardJob], close: Callable[[], None] = lambda: None):
        self.n, self._jobs, self._close = n, jobs, close

    def __iter__(self) -> Iterator[ShardJob]:
        try:
            yield from self._jobs
        finally:
            self.close()

    def close(self) -> None:
        self._close()
        self._close = lambda: None


def stream_jobs(
    layout: DataLayout,
    stage: str,
    units_sql: str,
    signature: str,
    shard_size: int,
    order_by: str = "key",
    payload: dict[str, Any] | None = None,
    memory_mb: int = 128,
    prepare: Callable[[Any], None] | None = None,
) -> JobStream:
    """Plan ``stage`` over the corpus units ``units_sql`` (a catalog query with columns ``key``, ``fp`` and
    optionally ``file``, the Parquet file its input is read from: a job carries ``payload["files"]``,
    ``{file: [unit keys]}``, never the inputs themselves; any other column reaches the job as a payload
    list, one value per unit); drop its stale shards; log the counts. ``prepare(con)`` runs on the planning
    connection first (e.g. :func:`python_units`)."""
    store = ShardStore(layout.store)
    con = connect(layout.catalog)
    try:
        if prepare is not None:
            prepare(con)
        plan = store.plan_stream(con, stage, CORPUS, units_sql, signature, shard_size, order_by, memory_mb)
    except BaseException:
        con.close()
        raise
    for key in plan.stale:
        store.drop(stage, CORPUS, key)
    _logger().info(
        "%s/%s: %d shards done, %d stale dropped, %d shards (%d units) to do",
        stage, CORPUS, len(plan.done), len(plan.stale), plan.n_todo, plan.n_units_todo,
    )  # fmt: skip

    def jobs() -> Iterator[ShardJob]:
        for key, units, extra in plan.shards():
            job_payload = dict(payload or {})
            files = extra.pop("file", None)
            if files is not None:
                by_file: dict[str, list[str]] = {}
                for (unit, _), f in zip(units, files, strict=True):
                    by_file.setdefault(f, []).append(unit)
                job_payload["files"] = by_file
            job_payload.update(extra)
            yield ShardJob(stage, CORPUS, key, signature, units, job_payload)

    return JobStream(plan.n_todo, jobs(), con.close)


def python_units(
    con: Any,
    sql: str,
    unit: Callable[[dict[str, Any]], tuple],
    columns: list[tuple[str, Any]],
    table: str = "py_units",
    rows: int = 4096,
) -> None:
    """``TEMP TABLE table`` of units computed in Python from the rows of ``sql`` on ``con``: ``unit(row)``
    (a row as a dict) gives the values of ``columns`` (``[(name, pyarrow type)]``, ``key`` and ``fp``
    first). Streamed in batches of ``rows``: memory holds one batch, not the corpus."""
    import pyarrow as pa

    schema = pa.schema(columns)
    # rows are read on a second connection (a cursor) while ``con`` writes the table: a TEMP table belongs
    # to the connection that made it, and one connection cannot run a statement while it streams another
    reader_con = con.cursor()
    try:
        reader = reader_con.execute(sql).fetch_record_batch(rows)

        def batches():
            for batch in reader:
                values = [unit(r) for r in batch.to_pylist()]
                yield pa.RecordBatch.from_arrays(
                    [pa.array([v[i] for v in values], t) for i, (_, t) in enumerate(columns)], schema=schema
                )

        con.register("py_unit_batches", pa.RecordBatchReader.from_batches(schema, batches()))
        con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS FROM py_unit_batches")
        con.unregister("py_unit_batches")
    finally:
        reader_con.close()


def read_by_id(files: dict[str, list[str]], id_column: str, column: str) -> dict[str, Any]:
    """``{id: value}`` of ``column`` for the given ids, read from only the files they are in."""
    out: dict[str, Any] = {}
    for f, ids in files.items():
        t = pq.read_table(f, columns=[id_column, column], filters=[(id_column, "in", ids)])
        out.update(zip(t.column(id_column).to_pylist(), t.column(column).to_pylist(), strict=True))
    return out


@task(name="plan-ingest", cache_policy=NO_CACHE)
def plan_ingest(spec: SourceSpec, cfg: CorpusConfig, store_root: str) -> list[ShardJob]:
    """List the source's units and plan its ingest shards."""
    source = build_source(spec.kind, spec.name, **spec.resolved_options())
    units = [(u.key, u.fingerprint) for u in source.units()]
    if cfg.limit_per_source is not None:
        units = units[: cfg.limit_per_source]
    size = cfg.ingest.image_shard_size if source.modality == "image" else cfg.ingest.text_shard_size
    payload = {"spec": spec, "modality": source.modality}
    return plan_jobs(
        ShardStore(store_root), INGEST, spec.name, units, ingest_signature(spec, cfg), size, payload
    )


def _ingest_rows(job: ShardJob, cfg: CorpusConfig) -> ShardRows:
    spec: SourceSpec = job.payload["spec"]
    source = build_source(spec.kind, spec.name, **spec.resolved_options())
    records = source.read([Unit(k, fp) for k, fp in job.units], max_file_bytes=cfg.ingest.max_file_bytes)
    if job.payload["modality"] == "image":
        return ingest_images(
            records, spec.name, job.shard, cfg.ingest.decode_limits(), cfg.ingest.text_limits()
        )
    return ingest_texts(records, spec.name, job.shard, cfg.ingest.text_limits())


# stage name -> function computing one shard's rows (the library does the work; this only wires it)
SHARD_ROWS: dict[str, Callable[[ShardJob, CorpusConfig], ShardRows]] = {INGEST: _ingest_rows}


@task(name="shard", retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)
def run_shard(job: ShardJob, cfg: CorpusConfig, store_root: str) -> dict[str, int]:
    """Compute and atomically commit one shard. Idempotent: a committed shard is skipped."""
    store = ShardStore(store_root)
    if store.is_committed(job.stage, job.source, job.shard):
        return {"skipped_shards": 1}
    t0 = time.time()
    rows = SHARD_ROWS[job.stage](job, cfg)
    tables = {name: to_table(name, r) for name, r in rows.tables.items()}
    store.commit(
        job.stage, job.source, job.shard, job.signature, job.units, tables, dict(rows.stats),
        seconds=time.time() - t0,
    )  # fmt: skip
    return {**rows.stats, "shards": 1}


#: shards submitted ahead of the ones running: enough to keep every worker busy, few enough that the jobs in
#: flight (and their payloads) do not grow with the corpus
IN_FLIGHT = 16


def map_shards(
    stage: str,
    jobs: list[ShardJob] | JobStream,
    cfg: CorpusConfig,
    store_root: str,
    in_flight: int = IN_FLIGHT,
) -> Counter:
    """Run ``jobs`` on the flow's task runner, at most ``in_flight`` submitted at a time, with a progress bar
    (a terminal) and progress log lines (rate and ETA, every 10 s: what a worker's log and ``vlp run``
    show); log and return the summed counts."""
    totals: Counter = Counter()
    per_source: dict[str, Counter] = {}
    total = jobs.n if isinstance(jobs, JobStream) else len(jobs)
    todo = iter(jobs)
    running: dict[Any, str] = {}

    def submit() -> None:
        for job in todo:
            fut = run_shard.with_options(task_run_name=f"{stage}-{job.source}-{job.shard[:8]}").submit(
                job, cfg, store_root
            )
            running[fut] = job.source
            if len(running) >= in_flight:
                return

    progress = ProgressLog(total, f"{stage} shards", get_run_logger().info)
    with tqdm(total=total, desc=f"{stage} shards", unit="shard", disable=None) as bar:
        submit()
        while running:
            fut = next(as_completed(list(running)))
            stats = fut.result()
            source = running.pop(fut)
            totals.update(stats)
            per_source.setdefault(source, Counter()).update(stats)
            bar.update(1)
            progress.update(1)
            submit()
    for name, c in sorted(per_source.items()):
        get_run_logger().info("%s/%s: %s", stage, name, dict(sorted(c.items())))
    return totals


def _ingest(cfg: CorpusConfig, store_root: str) -> Counter:
    plans = [plan_ingest.submit(spec, cfg, store_root) for spec in cfg.sources]
    return map_shards(INGEST, [job for p in plans for job in p.result()], cfg, store_root)


# ------------------------------------------------------------------------------------------------ regions


def _query(catalog: str, sql: str) -> list[tuple]:
    con = connect(catalog)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


REGIONS = "regions"
REGIONS_CODE = code_version(corpus.region_rows, corpus.vision_models, *VISION_MODULES, vlp_core.precision)


def _region_rows(job: ShardJob, cfg: CorpusConfig) -> ShardRows:
    ids = [k for k, _ in job.units]
    jpeg_of = read_by_id(job.payload["files"], "image_id", "image")  # only this shard's rows of its files
    detector, extractor = corpus.vision_models(cfg.regions)
    return corpus.region_rows(ids, [jpeg_of[i] for i in ids], detector, extractor, cfg.regions)


SHARD_ROWS[REGIONS] = _region_rows


def plan_regions(cfg: CorpusConfig, layout: DataLayout) -> JobStream:
    """Every distinct image without regions under the current settings → shards of ``regions.shard_size``."""
    params = corpus.regions_params(cfg.regions, {"shard_size", "batch_size", "device"})
    signature = stable_hash(REGIONS, params, REGIONS_CODE)
    units = "SELECT image_id AS key, image_id AS fp, filename AS file FROM images"
    return stream_jobs(layout, REGIONS, units, signature, cfg.regions.shard_size, "file, key",
                       memory_mb=cfg.runner.plan_memory_mb)  # fmt: skip


@flow(name="regions")
def regions_flow(cfg: CorpusConfig, layout: DataLayout) -> dict[str, int]:
    return dict(map_shards(REGIONS, plan_regions(cfg, layout), cfg, str(layout.store)))


# ------------------------------------------------------------------------------------------ embed, index

EMBED, INDEX = "embed", "index"
EMBED_CODE = code_version(corpus.embed_rows, vlp_core.language.embed, vlp_core.precision)


def _texts_of(job: ShardJob) -> list[str]:
    """The sentences of a job's units, read from the ``texts`` files the planner located them in."""
    text_of = read_by_id(job.payload["files"], "text_id", "text")
    return [text_of[k] for k, _ in job.units]


#: a corpus stage's sentence units: content-hashed ids (the id is its own fingerprint), with their file
TEXT_UNITS = "SELECT text_id AS key, text_id AS fp, filename AS file FROM texts_located"


def _encoder(cfg: CorpusConfig):
    """The embed stage's sentence encoder (the retrieve stage encodes its queries with the same)."""
    return corpus.sentence_encoder(
        cfg.embed.model_path, cfg.embed.device, cfg.embed.batch_size, cfg.embed.precision
    )


def _embed_precision(cfg: CorpusConfig) -> str:
    return vlp_core.precision.resolve(cfg.embed.precision, cfg.embed.device)


def _embed_rows(job: ShardJob, cfg: CorpusConfig) -> ShardRows:
    enc = _encoder(cfg)
    return corpus.embed_rows(enc, [k for k, _ in job.units], _texts_of(job))


SHARD_ROWS[EMBED] = _embed_rows


def plan_embed(cfg: CorpusConfig, layout: DataLayout) -> JobStream:
    """Every distinct sentence not yet embedded under the current model → shards of ``embed.shard_size``."""
    signature = stable_hash(EMBED, cfg.embed.model_path, _embed_precision(cfg), EMBED_CODE)
    return stream_jobs(layout, EMBED, TEXT_UNITS, signature, cfg.embed.shard_size, "file, key",
                       memory_mb=cfg.runner.plan_memory_mb)  # fmt: skip


@task(name="build-index", cache_policy=NO_CACHE)
def build_sentence_index(cfg: CorpusConfig, layout: DataLayout) -> dict[str, Any]:
    """(Re)build the FAISS index over all sentence embeddings when the embedded set changed."""
    store = ShardStore(layout.store)
    manifests = dict(store.iter_manifests(EMBED, CORPUS, units=False))
    files = sorted(
        str(store.root / m.outputs["text_embeddings"]["file"])
        for m in manifests.values()
        if m.outputs.get("text_embeddings", {}).get("file")
    )
    n = sum(m.outputs.get("text_embeddings", {}).get("rows", 0) for m in manifests.values())
    signature = stable_hash(INDEX, sorted(manifests), cfg.index.model_dump())
    fs = FaissStore(layout.indexes)
    try:
        meta = fs.load_meta("sentences")
        if meta.signature == signature:
            get_run_logger().info(
                "index 'sentences' is up to date (%d vectors, %s)", meta.count, meta.factory
            )
            return {"index_vectors": meta.count, "index_rebuilt": 0}
    except FileNotFoundError:
        pass
    if n == 0:
        return {"index_vectors": 0, "index_rebuilt": 0}
    t0 = time.time()
    ids: list[str] = []
    dim = next(corpus.iter_embeddings(files[:1]))[1].shape[1]
    factory = cfg.index.factory or choose_factory(
        n, dim, int(cfg.index.memory_budget_gb * 2**30), exact_below=cfg.index.exact_below
    )

    def batches():
        ids.clear()
        for batch_ids, vecs in corpus.iter_embeddings(files):
            ids.extend(batch_ids)
            yield vecs

    index = build_index_streaming(batches, n, dim, factory, train_sample=cfg.index.train_sample)
    meta = IndexMeta(
        name="sentences",
        factory=factory,
        dim=dim,
        count=n,
        nprobe=cfg.index.nprobe,
        built_at=time.time(),
        seconds=round(time.time() - t0, 2),
        signature=signature,
    )
    fs.save("sentences", index, ids, meta)
    get_run_logger().info("index 'sentences': %d vectors, %s, %.1fs", n, factory, meta.seconds)
    return {"index_vectors": n, "index_rebuilt": 1}


# --------------------------------------------------------------------------- retrieve, phrases, links

RETRIEVE, PHRASES, LINKS = "retrieve", "phrases", "links"
LANGUAGE_CODE = code_version(
    corpus.phrase_rows,
    corpus.link_rows,
    vlp_core.language.phrases,
    vlp_core.language.linking,
)
RETRIEVE_CODE = code_version(corpus.retrieve_rows)
_INDEX_CACHE: dict[str, tuple] = {}


def _sentence_index(layout_indexes: str, signature: str) -> tuple:
    """The FAISS index + id map, loaded once per process and index version."""
    key = f"{layout_indexes}:{signature}"
    if key not in _INDEX_CACHE:
        index, ids, _ = FaissStore(layout_indexes).load("sentences")
        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = (index, ids)
    return _INDEX_CACHE[key]


def _retrieve_rows(job: ShardJob, cfg: CorpusConfig) -> ShardRows:
    enc = _encoder(cfg)
    index, ids = _sentence_index(job.payload["indexes"], job.payload["index_signature"])
    image_ids = [k for k, _ in job.units]
    return corpus.retrieve_rows(enc, index, ids, image_ids, job.payload["query"], cfg.retrieve.top_k)


def _phrase_rows(job: ShardJob, cfg: CorpusConfig) -> ShardRows:
    return corpus.phrase_rows(corpus.phrase_extractor(), [k for k, _ in job.units], _texts_of(job))


#: per image of ``image_tags`` (narrowed by ``{where}``): its tags, their origins, the best-scoring region of
#: each detected label, and its retrieved sentences in rank order with their noun phrases in order
LINK_ITEMS = """
WITH t AS (SELECT image_id, tags, tag_origins FROM image_tags {where}),
best AS (
    SELECT image_id, list(struct_pack(label := label, region_idx := region_idx)) AS best FROM (
        SELECT image_id, label, arg_max(region_idx, score) AS region_idx FROM regions
        WHERE region_idx > 0 AND image_id IN (SELECT image_id FROM t) GROUP BY ALL
    ) GROUP BY image_id
),
ret AS (SELECT image_id, text_id, rank FROM retrieved_pairs WHERE image_id IN (SELECT image_id FROM t)),
ph AS (
    SELECT text_id, list(struct_pack(i := phrase_idx, p := phrase) ORDER BY phrase_idx) AS phrases
    FROM noun_phrases WHERE text_id IN (SELECT text_id FROM ret) GROUP BY text_id
),
texts AS (
    SELECT r.image_id, list(struct_pack(text_id := r.text_id, phrases := p.phrases) ORDER BY r.rank) AS texts
    FROM ret r LEFT JOIN ph p USING (text_id) GROUP BY r.image_id
)
SELECT t.image_id, t.tags, t.tag_origins, b.best, x.texts
FROM t LEFT JOIN best b USING (image_id) LEFT JOIN texts x USING (image_id)
"""


def link_item(row: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A :data:`LINK_ITEMS` row -> (the links stage's item for the image, its fingerprint): ``tags``
    [(tag, region)] (a detector tag's best-scoring region, 0 for image-level tags), ``texts`` [(text_id,
    [(phrase_idx, phrase)])]."""
    region = {b["label"]: b["region_idx"] for b in row["best"] or []}
    tags = [
        (t, region.get(t, 0) if o == "detector" else 0)
        for t, o in zip(row["tags"], row["tag_origins"], strict=True)
    ]
    texts = [(x["text_id"], [(p["i"], p["p"]) for p in x["phrases"] or []]) for x in row["texts"] or []]
    return {"image_id": row["image_id"], "tags": tags, "texts": texts}, stable_hash(tags, texts, n=8)


def _link_rows(job: ShardJob, cfg: CorpusConfig) -> ShardRows:
    """The shard's images' items, read from the catalog and checked against the planned fingerprints (the
    catalog cannot have changed between plan and shard unnoticed)."""
    con = connect(job.payload["catalog"])
    try:
        sql = LINK_ITEMS.format(where="WHERE image_id IN (SELECT unnest($ids))")
        rows = con.execute(sql, {"ids": [k for k, _ in job.units]}).to_arrow_table().to_pylist()
    finally:
        con.close()
    item_of = {r["image_id"]: link_item(r) for r in rows}
    for key, fp in job.units:
        if key not in item_of or item_of[key][1] != fp:
            raise RuntimeError(f"links shard {job.shard}: image {key} changed in the catalog since planning")
    sim = corpus.similarity(cfg.link.similarity)
    items = [item_of[k][0] for k, _ in job.units]
    return corpus.link_rows(sim, items, cfg.link.min_score, cfg.link.mask_base)


SHARD_ROWS.update({RETRIEVE: _retrieve_rows, PHRASES: _phrase_rows, LINKS: _link_rows})


def plan_retrieve(cfg: CorpusConfig, layout: DataLayout) -> JobStream:
    """Every image's tag sentence against the current index; a job carries its images' queries. A new index
    (new sentences) re-keys every shard: retrieval over a grown corpus can change any image's top-K."""
    import pyarrow as pa

    meta = FaissStore(layout.indexes).load_meta("sentences")
    signature = stable_hash(RETRIEVE, meta.signature, cfg.retrieve.top_k, cfg.embed.model_path,
                            _embed_precision(cfg), EMBED_CODE, RETRIEVE_CODE)  # fmt: skip

    def prepare(con) -> None:
        python_units(
            con, "SELECT image_id, tag_sentence FROM image_tags",
            lambda r: (r["image_id"], stable_hash(r["tag_sentence"], n=8), r["tag_sentence"]),
            [("key", pa.string()), ("fp", pa.string()), ("query", pa.string())],
        )  # fmt: skip

    payload = {"indexes": str(layout.indexes), "index_signature": meta.signature}
    return stream_jobs(layout, RETRIEVE, "FROM py_units", signature, cfg.retrieve.shard_size, "key", payload,
                       cfg.runner.plan_memory_mb, prepare)  # fmt: skip


def plan_phrases(cfg: CorpusConfig, layout: DataLayout) -> JobStream:
    """Noun phrases of every sentence that some image retrieved."""
    units = f"{TEXT_UNITS} WHERE text_id IN (SELECT text_id FROM retrieved_pairs)"
    return stream_jobs(layout, PHRASES, units, stable_hash(PHRASES, LANGUAGE_CODE), cfg.link.shard_size,
                       "file, key", memory_mb=cfg.runner.plan_memory_mb)  # fmt: skip


def plan_links(cfg: CorpusConfig, layout: DataLayout) -> JobStream:
    """Per image: its tags (with their regions) and the noun phrases of its retrieved sentences, each image's
    fingerprint computed from them while the catalog streams them (:func:`link_item`); a shard reads its own
    images' items from the catalog when it runs."""
    import pyarrow as pa

    def prepare(con) -> None:
        python_units(
            con, LINK_ITEMS.format(where=""), lambda r: (r["image_id"], link_item(r)[1]),
            [("key", pa.string()), ("fp", pa.string())],
        )  # fmt: skip

    signature = stable_hash(LINKS, cfg.link.model_dump(exclude={"shard_size"}), LANGUAGE_CODE)
    return stream_jobs(layout, LINKS, "FROM py_units", signature, cfg.link.shard_size, "key",
                       {"catalog": str(layout.catalog)}, cfg.runner.plan_memory_mb, prepare)  # fmt: skip


@flow(name="retrieve")
def retrieve_flow(cfg: CorpusConfig, layout: DataLayout) -> dict[str, int]:
    return dict(map_shards(RETRIEVE, plan_retrieve(cfg, layout), cfg, str(layout.store)))


@flow(name="phrases")
def phrases_flow(cfg: CorpusConfig, layout: DataLayout) -> dict[str, int]:
    return dict(map_shards(PHRASES, plan_phrases(cfg, layout), cfg, str(layout.store)))


@flow(name="links")
def links_flow(cfg: CorpusConfig, layout: DataLayout) -> dict[str, int]:
    return dict(map_shards(LINKS, plan_links(cfg, layout), cfg, str(layout.store)))


@flow(name="embed")
def embed_flow(cfg: CorpusConfig, layout: DataLayout) -> dict[str, int]:
    return dict(map_shards(EMBED, plan_embed(cfg, layout), cfg, str(layout.store)))


@flow(name="ingest")
def ingest_flow(cfg: CorpusConfig, layout: DataLayout) -> dict[str, int]:
    return dict(_ingest(cfg, str(layout.store)))


# ------------------------------------------------------------------------------------------------ gallery

GALLERY = "gallery"
GALLERY_CODE = code_version(corpus.gallery_rows, vlp_core.language.grounding)


# Candidates, in output order: per (concept, image) its best detected region; then, with image-tag patches on,
# the whole image (region 0) under each ImageNet tag of probability >= image_tag_min_score, unless the image
# already has a detected region of that concept. Per concept detector patches come first (the detector-only
# gallery is kept whole), then image-tag patches, each by score then image_id; at most max_per_concept.
GALLERY_SQL = """
WITH det AS (
    SELECT label AS concept, image_id, region_idx, score, box, box5, feature, 'detector' AS origin
    FROM regions WHERE region_idx > 0 AND score >= $min_score
    QUALIFY row_number() OVER (PARTITION BY label, image_id ORDER BY score DESC, region_idx) = 1
), tags AS (
    SELECT image_id, unnest(tags) AS concept, unnest(tag_scores) AS score, unnest(tag_origins) AS tag_origin
    FROM image_tags
), img AS (
    SELECT t.concept, t.image_id, r.region_idx, t.score, r.box, r.box5, r.feature, 'image_tag' AS origin
    FROM tags t JOIN regions r ON r.image_id = t.image_id AND r.region_idx = 0
    WHERE $image_tags AND t.tag_origin = 'imagenet' AND t.score >= $tag_min_score
      AND NOT EXISTS (SELECT 1 FROM det d WHERE d.concept = t.concept AND d.image_id = t.image_id)
    QUALIFY row_number() OVER (PARTITION BY t.concept, t.image_id ORDER BY t.score DESC) = 1
), cand AS (
    SELECT * FROM det UNION ALL BY NAME SELECT * FROM img
)
SELECT concept, image_id, region_idx, score, box, box5, feature, origin FROM cand
QUALIFY row_number() OVER (
    PARTITION BY concept ORDER BY origin = 'image_tag', score DESC, image_id) <= $max_per_concept
ORDER BY concept, origin = 'image_tag', score DESC, image_id
"""


def gallery_candidates(con, g) -> tuple[list[dict], dict[str, bytes]]:
    """The gallery's candidate patches (``GALLERY_SQL`` under GalleryConfig ``g``) and their images' JPEGs."""
    rel = con.execute(GALLERY_SQL, {
        "min_score": g.min_score, "image_tags": g.image_tag_patches, "tag_min_score": g.image_tag_min_score,
        "max_per_concept": g.max_per_concept,
    })  # fmt: skip
    cols = [d[0] for d in rel.description]
    candidates = [dict(zip(cols, r, strict=True)) for r in rel.fetchall()]
    ids = sorted({c["image_id"] for c in candidates})
    jpeg_of = dict(con.execute("SELECT image_id, image FROM images WHERE list_contains(?, image_id)",
                               [ids]).fetchall())  # fmt: skip
    return candidates, jpeg_of


def _gallery_rows(job: ShardJob, cfg: CorpusConfig) -> ShardRows:
    con = connect(job.payload["catalog"])
    try:
        candidates, jpeg_of = gallery_candidates(con, cfg.gallery)
    finally:
        con.close()
    detector, _ = corpus.vision_models(cfg.regions)
    return corpus.gallery_rows(candidates, jpeg_of, detector.labels, cfg.gallery.thumb_side)


SHARD_ROWS[GALLERY] = _gallery_rows


@flow(name="gallery")
def gallery_flow(cfg: CorpusConfig, layout: DataLayout) -> dict[str, int]:
    """One shard over the whole region set (regions and image tags), rebuilt when they or the gallery
    settings change."""
    regions = sorted(k for k, _ in ShardStore(layout.store).iter_manifests(REGIONS, CORPUS, units=False))
    signature = stable_hash(GALLERY, cfg.gallery.model_dump(), REGIONS_CODE, GALLERY_CODE, GALLERY_SQL)
    unit = [("regions", stable_hash(regions))]
    jobs = plan_jobs(ShardStore(layout.store), GALLERY, CORPUS, unit, signature, 1,
                     {"catalog": str(layout.catalog)})  # fmt: skip
    return dict(map_shards(GALLERY, jobs, cfg, str(layout.store)))


# ------------------------------------------------------------------------------------------------- ground

GROUND = "ground"
GROUND_CODE = code_version(corpus.ground_rows, corpus.concept_matcher, vlp_core.language.grounding)


def ground_signature(concepts: list[tuple[str, list[str], int]]) -> str:
    """Keyed by the concept vocabulary the sentences are matched against: every concept's forms and whether
    it has patches (not how many: a gallery that only grows or shrinks within its concepts keeps the rows)."""
    vocab = sorted((c, list(forms), n > 0) for c, forms, n in concepts)
    return stable_hash(GROUND, vocab, GROUND_CODE)


def _ground_rows(job: ShardJob, cfg: CorpusConfig) -> ShardRows:
    forms = {c: list(f) for c, f, _ in job.payload["concepts"]}
    with_patches = frozenset(c for c, _, n in job.payload["concepts"] if n > 0)
    return corpus.ground_rows(
        corpus.concept_matcher(forms), [k for k, _ in job.units], _texts_of(job), with_patches
    )


SHARD_ROWS[GROUND] = _ground_rows


def plan_ground(cfg: CorpusConfig, layout: DataLayout) -> JobStream:
    """Grounded words of every corpus sentence, matched against exactly the surface forms of the ``concepts``
    table (disjoint between concepts: the gallery resolved their conflicts); a new concept set re-keys every
    shard."""
    concepts = [
        (c, list(f), n)
        for c, f, n in _query(
            str(layout.catalog), "SELECT concept, forms, n_patches FROM concepts ORDER BY concept"
        )
    ]
    return stream_jobs(layout, GROUND, TEXT_UNITS, ground_signature(concepts), cfg.ground.shard_size,
                       "file, key", {"concepts": concepts}, cfg.runner.plan_memory_mb)  # fmt: skip


@flow(name="ground")
def ground_flow(cfg: CorpusConfig, layout: DataLayout) -> dict[str, int]:
    return dict(map_shards(GROUND, plan_ground(cfg, layout), cfg, str(layout.store)))


# sharded stages, each a subflow so it can run on its own task runner
STAGE_FLOWS = {
    INGEST: ingest_flow,
    REGIONS: regions_flow,
    EMBED: embed_flow,
    RETRIEVE: retrieve_flow,
    PHRASES: phrases_flow,
    LINKS: links_flow,
    GALLERY: gallery_flow,
    GROUND: ground_flow,
}


def _publish(layout: DataLayout) -> dict[str, Any]:
    from stores.catalog import connect

    con = connect(layout.catalog)
    try:
        summary = con.execute("SELECT * FROM ingest_summary").to_arrow_table().to_pylist()
        rejects = (
            con.execute("SELECT stage, source, reason, n, example_input FROM rejects_by_reason")
            .to_arrow_table()
            .to_pylist()
        )
    finally:
        con.close()
    create_table_artifact(key="corpus-summary", table=summary, description="rows per source (ingest)")
    lines = [
        "# Rejects by stage and reason",
        "",
        "| stage | source | reason | n | example |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['stage']} | {r['source']} | {r['reason']} | {r['n']} | `{r['example_input'][-60:]}` |"
        for r in rejects
    ]
    create_markdown_artifact(key="corpus-rejects", markdown="\n".join(lines) if rejects else "No rejects.")
    out: dict[str, Any] = {"summary": summary, "rejects": rejects}
    if (layout.store / "_manifests" / RETRIEVE).exists():
        from flows.report import quality_metrics, write_html

        metrics = quality_metrics(layout)
        q = metrics["quality"]
        create_table_artifact(key="corpus-quality", table=[q], description="retrieved vs random pairs")
        create_table_artifact(key="corpus-tag-coverage", table=metrics["tag_coverage"])
        create_table_artifact(
            key="corpus-cmc-coverage", table=metrics["cmc_coverage"],
            description="sentences with a grounded word and words CutMix replaces in expectation",
        )  # fmt: skip
        page = write_html(layout, layout.root / "reports" / "corpus.html", metrics)
        create_markdown_artifact(
            key="corpus-quality-report",
            markdown=(
                f"# Corpus quality\n\n{q['images_evaluated']} images with known captions; K = {q['k']}.\n\n"
                "| metric | retrieved | random |\n|---|---|---|\n"
                f"| alignment@1 | {q['alignment_at_1']} | {q['random_alignment_at_1']:.4f} |\n"
                f"| alignment@K | {q['alignment_at_k']} | {q['random_alignment_at_k']:.4f} |\n"
                f"| category@K | {q['category_at_k']} | {q['random_category_at_k']:.4f} |\n\n"
                f"Link rate {q['link_rate']}; CMC: {q['cmc_grounded_sentences']} sentences with a grounded "
                f"word ({q['cmc_grounded_share']:.2%}), {q['cmc_expected_replaced_share']:.2%} of words "
                f"replaced in expectation. HTML report with a retrieval gallery: `{page}`"
            ),
        )
        out["quality"] = q
    return out


@flow(name="build-corpus", log_prints=True)
def build_corpus(config: str = "default", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the corpus described by ``configs/corpus/<config>.yaml`` (or a YAML path) + dotted overrides.

    Returns per-source row counts and reject counts (also published as Prefect artifacts).
    """
    log = get_run_logger()
    cfg = load_corpus_config(config, overrides)
    layout = DataLayout.default()
    store = ShardStore(layout.store)
    store.ensure_tables()
    removed = store.collect_garbage() + FaissStore(layout.indexes).collect_garbage()
    if removed:
        log.info("removed %d leftover files of an interrupted run", removed)
    run_dir = layout.runs / "corpus" / time.strftime("%Y%m%dT%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))

    t0 = time.time()
    counts: dict[str, Any] = {}
    stage_seconds: dict[str, float] = {}
    build_catalog(layout.catalog, layout.store)
    stage_peak_mb: dict[str, float] = {}
    for stage in cfg.stages:
        ts = time.time()
        with PeakRSS() as mem:  # sampled: the kernel's high-water mark stays the whole run's
            if stage == INDEX:  # one task, not sharded
                counts[stage] = build_sentence_index(cfg, layout)
            else:
                runner = make_task_runner(cfg.runner)
                counts[stage] = STAGE_FLOWS[stage].with_options(task_runner=runner)(cfg, layout)
        stage_seconds[stage] = round(time.time() - ts, 1)
        stage_peak_mb[stage] = mem.peak_mb
        log.info(
            "stage %s done in %.1fs, peak RSS %.0f MB", stage, stage_seconds[stage], stage_peak_mb[stage]
        )
    publish = _publish(layout)
    # The whole run in this process: the kernel's high-water mark (what /usr/bin/time reports too), which the
    # kernel updates lazily, so a sampled stage peak can read a little above it.
    peak_mb = max(run_peak_rss_mb(), *stage_peak_mb.values(), 0.0)
    result = {
        "counts": counts,
        "seconds": round(time.time() - t0, 1),
        "stage_seconds": stage_seconds,
        "peak_rss_mb": peak_mb,
        "stage_peak_rss_mb": stage_peak_mb,
        "children_peak_rss_mb": children_peak_rss_mb(),  # process-pool workers, when the runner has them
        **publish,
    }
    (run_dir / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    log.info("corpus built in %.1fs, peak RSS %.0f MB: %s", result["seconds"], peak_mb, counts)
    return result


if __name__ == "__main__":
    build_corpus()
