"""Sharded Parquet tables with atomic commit and per-shard manifests.

Layout under the store root::

    <table>/_schema.parquet                       zero rows: the table's schema (views work on an empty store)
    <table>/<source>/<stage>-<shard>.parquet      one file per (table, shard)
    _manifests/<stage>/<source>/<shard>.json      written last: the shard is committed iff this exists

A shard's key is a hash of its units (id + fingerprint), the stage parameters and the code version, so:

- a killed run leaves at most temp files and data files without a manifest; :meth:`ShardStore.collect_garbage`
  removes both before the next run, which then redoes exactly the uncommitted shards;
- a re-run skips committed shards; new or changed units form new shards (incremental);
- a shard whose units changed or disappeared, or whose parameters/code changed, is *stale* and dropped.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from stores.failpoints import kill_point
from stores.schemas import TABLES, schema_of


def stable_hash(*parts: Any, n: int = 16) -> str:
    """Hex BLAKE2b of the JSON encoding of ``parts`` (order-sensitive, deterministic)."""
    h = hashlib.blake2b(digest_size=n)
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _module_source(module: Any) -> bytes:
    """A module's file, or for a package (``__file__`` is its ``__init__.py``) every ``.py`` file under the
    package's directory, in sorted relative-path order, each preceded by its relative path and size."""
    path = Path(module.__file__)
    if path.name != "__init__.py":
        return path.read_bytes()
    root = path.parent
    out = []
    for rel, file in sorted((f.relative_to(root).as_posix(), f) for f in root.rglob("*.py")):
        data = file.read_bytes()
        out.append(f"{rel}\0{len(data)}\0".encode() + data)
    return b"".join(out)


def code_version(*parts: Any) -> str:
    """Hash of the source of ``parts`` (modules, or single functions where a module holds several stages):
    a change to that code re-keys the shards it produced, and only those. A module is hashed by its file; a
    package by every ``.py`` file under its directory (sorted by relative path, each preceded by that path),
    so a change in any of its submodules changes the version."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(_module_source(p) if inspect.ismodule(p) else inspect.getsource(p).encode())
    return h.hexdigest()


@dataclass
class ShardPlan:
    """What a stage has to do for one source."""

    todo: list[tuple[str, list[tuple[str, str]]]]  # (shard key, [(unit key, fingerprint)])
    done: list[str]
    stale: list[str]

    @property
    def n_units_todo(self) -> int:
        return sum(len(u) for _, u in self.todo)


class StreamPlan:
    """What a stage has to do for one source, the shards to do streamed from DuckDB (see
    :meth:`ShardStore.plan_stream`): ``done`` and ``stale`` shard keys, ``n_units_todo`` and ``n_todo``."""

    def __init__(self, con, stage: str, source: str, signature: str, shard_size: int, order_by: str,
                 done: list[str], stale: list[str], n_units_todo: int):  # fmt: skip
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self._con, self._order_by = con, order_by
        self.stage, self.source, self.signature, self.shard_size = stage, source, signature, shard_size
        self.done, self.stale, self.n_units_todo = done, stale, n_units_todo
        self.n_todo = -(-n_units_todo // shard_size)

    def shards(self) -> Iterator[tuple[str, list[tuple[str, str]], dict[str, list]]]:
        """``(shard key, [(unit key, fingerprint)], {other column: values})`` for each shard to do, in order:
        at most one shard's units are held here at a time."""
        reader = self._con.execute(f"SELECT * FROM plan_todo ORDER BY {self._order_by}").to_arrow_reader(
            self.shard_size
        )
        names = [n for n in reader.schema.names if n not in ("key", "fp")]
        chunk: dict[str, list] = {n: [] for n in ("key", "fp", *names)}
        for batch in reader:
            for name, values in zip(batch.schema.names, batch.columns, strict=True):
                if name in chunk:
                    chunk[name].extend(values.to_pylist())
            while len(chunk["key"]) >= self.shard_size:
                yield self._shard({n: v[: self.shard_size] for n, v in chunk.items()}, names)
                chunk = {n: v[self.shard_size :] for n, v in chunk.items()}
        if chunk["key"]:
            yield self._shard(chunk, names)

    def _shard(self, chunk: dict[str, list], names: list[str]):
        units = list(zip(chunk["key"], chunk["fp"], strict=True))
        key = stable_hash(self.stage, self.source, self.signature, units)
        return key, units, {n: chunk[n] for n in names if n != "ord"}


@dataclass
class Manifest:
    stage: str
    source: str
    shard: str
    signature: str
    units: list[tuple[str, str]]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    committed_at: float = 0.0


#: DuckDB's memory limit while planning (it spills to disk beyond it): the planner's memory does not grow with
#: the corpus
PLAN_MEMORY_MB = 128
_MANIFEST_ROWS = pa.schema([
    ("shard", pa.string()), ("signature", pa.string()), ("key", pa.string()), ("fp", pa.string())
])  # fmt: skip


def _safe(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or "\\" in name:
        raise ValueError(f"bad name {name!r}: must be non-empty, no slashes, not hidden")
    return name


class ShardStore:
    """The Parquet store rooted at ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- layout
    def table_dir(self, table: str) -> Path:
        schema_of(table)
        return self.root / table

    def manifest_dir(self, stage: str, source: str) -> Path:
        return self.root / "_manifests" / _safe(stage) / _safe(source)

    def _data_file(self, table: str, stage: str, source: str, shard: str) -> Path:
        if "-" in stage:  # the file name is <stage>-<shard>: readers split it at the first "-"
            raise ValueError(f"bad stage name {stage!r}: no '-' allowed")
        return self.table_dir(table) / _safe(source) / f"{_safe(stage)}-{shard}.parquet"

    # -- tables
    def ensure_tables(self) -> None:
        """Write each registered table's zero-row schema file (so SQL views exist on an empty store)."""
        for name, schema in TABLES.items():
            path = self.table_dir(name) / "_schema.parquet"
            if path.exists() and pq.read_schema(path).equals(schema, check_metadata=False):
                continue
            _atomic_write_parquet(schema.empty_table(), path)

    # -- manifests
    def manifests(self, stage: str, source: str) -> dict[str, Manifest]:
        return dict(self.iter_manifests(stage, source))

    def shard_keys(self, stage: str, source: str | None = None) -> list[str]:
        """The committed shards of ``stage``: of one ``source`` as keys, or of every source as ``source/key``;
        sorted, from the manifest file names alone (nothing is read)."""
        if source is not None:
            return sorted(p.stem for p in self.manifest_dir(stage, source).glob("*.json"))
        root = self.root / "_manifests" / _safe(stage)
        return sorted(f"{p.parent.name}/{p.stem}" for p in root.glob("*/*.json"))

    def iter_manifests(self, stage: str, source: str, units: bool = True) -> Iterator[tuple[str, Manifest]]:
        """``(shard key, manifest)`` of every committed shard, sorted, read one at a time; ``units=False``
        leaves each manifest's unit list empty (its outputs and stats are what a reader over a corpus-sized
        stage wants, in memory that does not grow with the units)."""
        d = self.manifest_dir(stage, source)
        if d.exists():
            for p in sorted(d.glob("*.json")):
                m = json.loads(p.read_text())
                m["units"] = [tuple(u) for u in m["units"]] if units else []
                yield p.stem, Manifest(**m)

    def plan(
        self,
        stage: str,
        source: str,
        units: Iterable[tuple[str, str]],
        signature: str,
        shard_size: int,
    ) -> ShardPlan:
        """Group the units not covered by a valid committed shard into new shards of ``shard_size``, in the
        order given (a unit list held in memory; :meth:`plan_stream` for a corpus-sized one)."""
        units = list(units)
        table = pa.table({
            "key": pa.array([k for k, _ in units], pa.string()),
            "fp": pa.array([fp for _, fp in units], pa.string()),
            "ord": pa.array(range(len(units)), pa.int64()),
        })  # fmt: skip
        con = duckdb.connect()
        try:
            con.register("given_units", table)
            plan = self.plan_stream(
                con, stage, source, "SELECT * FROM given_units", signature, shard_size, "ord"
            )
            return ShardPlan(todo=[(k, u) for k, u, _ in plan.shards()], done=plan.done, stale=plan.stale)
        finally:
            con.close()

    def plan_stream(
        self,
        con: duckdb.DuckDBPyConnection,
        stage: str,
        source: str,
        units_sql: str,
        signature: str,
        shard_size: int,
        order_by: str = "key",
        memory_mb: int = PLAN_MEMORY_MB,
    ) -> StreamPlan:
        """:meth:`plan` in memory bounded by the shard size, not the number of units.

        ``units_sql`` is a query on ``con`` whose rows are the units: ``key``, ``fp`` and any further columns
        (carried to each unit's shard, e.g. the file its input is read from), keys distinct. The comparison
        with the committed manifests (read by DuckDB, never all at once into Python) and the ordering by
        ``order_by`` run in DuckDB under ``memory_mb`` (spilling to disk beyond it); the shards to do are
        then streamed in that order by :meth:`StreamPlan.shards`. ``con`` must stay open until they are
        consumed; the plan's temporary tables live on it."""
        con.execute(f"SET memory_limit = '{int(memory_mb)}MB'")
        con.execute("SET preserve_insertion_order = false")
        con.execute(f"CREATE OR REPLACE TEMP TABLE plan_units AS {units_sql}")
        # The committed manifests, streamed into DuckDB in batches (one manifest in Python at a time): a
        # row per unit, and one with no key per shard (so a shard of no units still counts). Not DuckDB's
        # read_json: it holds a 32 MiB buffer per thread whatever the files' size, and fails under the limit.
        con.register("plan_manifests", pa.RecordBatchReader.from_batches(
            _MANIFEST_ROWS, self._manifest_batches(stage, source)
        ))  # fmt: skip
        con.execute("CREATE OR REPLACE TEMP TABLE plan_committed AS FROM plan_manifests")
        con.unregister("plan_manifests")
        con.execute(
            "CREATE OR REPLACE TEMP TABLE plan_shards AS SELECT DISTINCT shard, signature FROM plan_committed"
        )
        con.execute(
            """CREATE OR REPLACE TEMP TABLE plan_stale AS
            SELECT shard FROM plan_shards WHERE signature IS DISTINCT FROM $sig
            UNION
            SELECT DISTINCT c.shard FROM plan_committed c LEFT JOIN plan_units p ON p.key = c.key
            WHERE c.key IS NOT NULL AND p.fp IS DISTINCT FROM c.fp""",
            {"sig": signature},
        )
        stale = sorted(r[0] for r in con.execute("SELECT shard FROM plan_stale").fetchall())
        done = sorted(
            r[0]
            for r in con.execute(
                "SELECT shard FROM plan_shards WHERE shard NOT IN (FROM plan_stale)"
            ).fetchall()
        )
        con.execute(
            """CREATE OR REPLACE TEMP TABLE plan_covered AS
            SELECT DISTINCT key FROM plan_committed
            WHERE key IS NOT NULL AND shard NOT IN (FROM plan_stale)"""
        )
        con.execute(
            "CREATE OR REPLACE TEMP VIEW plan_todo AS FROM plan_units p ANTI JOIN plan_covered c USING (key)"
        )
        n_units = con.execute("SELECT count(*) FROM plan_todo").fetchone()[0]
        return StreamPlan(con, stage, source, signature, shard_size, order_by, done, stale, n_units)

    def _manifest_batches(self, stage: str, source: str, rows: int = 65_536) -> Iterator[pa.RecordBatch]:
        cols: dict[str, list] = {n: [] for n in _MANIFEST_ROWS.names}

        def add(shard: str, signature: str, key: str | None, fp: str | None) -> None:
            for name, v in zip(_MANIFEST_ROWS.names, (shard, signature, key, fp), strict=True):
                cols[name].append(v)

        for shard, m in self.iter_manifests(stage, source):
            add(shard, m.signature, None, None)
            for key, fp in m.units:
                add(shard, m.signature, key, fp)
            if len(cols["shard"]) >= rows:
                yield pa.RecordBatch.from_pydict(cols, schema=_MANIFEST_ROWS)
                cols = {n: [] for n in _MANIFEST_ROWS.names}
        if cols["shard"]:
            yield pa.RecordBatch.from_pydict(cols, schema=_MANIFEST_ROWS)

    def read_manifest(self, stage: str, source: str, shard: str) -> Manifest:
        """One committed shard's manifest."""
        m = json.loads((self.manifest_dir(stage, source) / f"{shard}.json").read_text())
        m["units"] = [tuple(u) for u in m["units"]]
        return Manifest(**m)

    def is_committed(self, stage: str, source: str, shard: str) -> bool:
        return (self.manifest_dir(stage, source) / f"{shard}.json").exists()

    def _file_committed(self, path: Path) -> bool:
        """Whether a data file ``<table>/<source>/<stage>-<shard>.parquet`` belongs to a committed shard."""
        stage, _, shard = path.stem.partition("-")
        return bool(shard) and self.is_committed(stage, path.parent.name, shard)

    def committed_files(self, table: str) -> list[Path]:
        """The data files of ``table``'s committed shards, sorted. A file whose manifest is missing (a crash
        between the file's rename and the manifest, or a file put there by hand) is not part of the table:
        readers see a shard only once its manifest exists (the catalog's views apply the same rule)."""
        tdir = self.table_dir(table)
        if not tdir.exists():
            return []
        return sorted(p for p in tdir.glob("*/*.parquet") if self._file_committed(p))

    def commit(
        self,
        stage: str,
        source: str,
        shard: str,
        signature: str,
        units: list[tuple[str, str]],
        tables: dict[str, pa.Table],
        stats: dict[str, int] | None = None,
        seconds: float = 0.0,
    ) -> Manifest:
        """Atomically publish a shard: every table file (temp + rename), then the manifest."""
        outputs = {}
        for table, data in tables.items():
            data = data.cast(schema_of(table))
            if data.num_rows == 0:
                outputs[table] = {"file": None, "rows": 0}
                continue
            path = self._data_file(table, stage, source, shard)
            _atomic_write_parquet(data, path)
            outputs[table] = {"file": str(path.relative_to(self.root)), "rows": data.num_rows}
        m = Manifest(
            stage=stage,
            source=source,
            shard=shard,
            signature=signature,
            units=[tuple(u) for u in units],
            outputs=outputs,
            stats=dict(stats or {}),
            seconds=round(seconds, 3),
            committed_at=time.time(),
        )
        mpath = self.manifest_dir(stage, source) / f"{shard}.json"
        kill_point("before-manifest", stage)
        _atomic_write_bytes(json.dumps(asdict(m), indent=1).encode(), mpath)
        return m

    def drop(self, stage: str, source: str, shard: str) -> None:
        """Un-commit a shard: manifest first (so a crash here leaves only garbage), then its files."""
        mpath = self.manifest_dir(stage, source) / f"{shard}.json"
        mpath.unlink(missing_ok=True)
        for table in TABLES:
            self._data_file(table, stage, source, shard).unlink(missing_ok=True)

    def collect_garbage(self) -> int:
        """Delete temp files and data files whose shard has no manifest; returns how many."""
        removed = 0
        for table in TABLES:
            tdir = self.root / table
            if not tdir.exists():
                continue
            for p in tdir.rglob("*"):
                if not p.is_file():
                    continue
                if ".tmp-" in p.name:
                    p.unlink(missing_ok=True)
                    removed += 1
                    continue
                if p.parent == tdir or p.suffix != ".parquet":
                    continue
                if not self._file_committed(p):
                    p.unlink(missing_ok=True)
                    removed += 1
        for p in (self.root / "_manifests").rglob("*.tmp-*") if (self.root / "_manifests").exists() else []:
            p.unlink(missing_ok=True)
            removed += 1
        return removed

    def read_table(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """All committed shards of a table, concatenated (small tables and tests; SQL for the rest)."""
        files = self.committed_files(table)
        parts = [pq.read_table(f, columns=columns, schema=schema_of(table)) for f in files]
        schema = schema_of(table)
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        return pa.concat_tables(parts) if parts else schema.empty_table()


def to_table(name: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts) → a table with the registered schema; missing optional fields become null."""
    return pa.Table.from_pylist(rows, schema=schema_of(name))


def _atomic_write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd", row_group_size=1024)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
