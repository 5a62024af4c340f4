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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
        d = self.manifest_dir(stage, source)
        out = {}
        if d.exists():
            for p in sorted(d.glob("*.json")):
                m = json.loads(p.read_text())
                m["units"] = [tuple(u) for u in m["units"]]
                out[p.stem] = Manifest(**m)
        return out

    def plan(
        self,
        stage: str,
        source: str,
        units: Iterable[tuple[str, str]],
        signature: str,
        shard_size: int,
    ) -> ShardPlan:
        """Group the units not covered by a valid committed shard into new shards of ``shard_size``."""
        units = list(units)
        current = dict(units)
        committed = self.manifests(stage, source)
        covered: set[str] = set()
        done, stale = [], []
        for key, m in committed.items():
            valid = m.signature == signature and all(current.get(k) == fp for k, fp in m.units)
            if valid:
                done.append(key)
                covered.update(k for k, _ in m.units)
            else:
                stale.append(key)
        pending = [(k, fp) for k, fp in units if k not in covered]
        todo = []
        for i in range(0, len(pending), shard_size):
            chunk = pending[i : i + shard_size]
            todo.append((stable_hash(stage, source, signature, chunk), chunk))
        return ShardPlan(todo=todo, done=done, stale=stale)

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
