"""The DuckDB catalog: a database file holding only views over the Parquet store, created from ``sql/*.sql``.

Views glob the Parquet files at query time, so the catalog needs rebuilding only when view definitions or the
store location change. ``${STORE}`` in the SQL files is replaced by the store's absolute path.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb

from stores.shards import ShardStore

SQL_DIR = Path(os.environ.get("VLP_SQL_DIR", Path(__file__).resolve().parent.parent / "sql"))


def sql_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    files = sorted(sql_dir.glob("*.sql"))
    if not files:
        raise FileNotFoundError(f"no .sql files in {sql_dir}")
    return files


def build_catalog(catalog: str | Path, store_root: str | Path, sql_dir: Path = SQL_DIR) -> list[str]:
    """(Re)create every view in ``catalog``; returns the view names. Atomic: built aside, then renamed."""
    catalog = Path(catalog)
    catalog.parent.mkdir(parents=True, exist_ok=True)
    ShardStore(store_root).ensure_tables()
    store = str(Path(store_root).resolve()).replace("'", "''")
    tmp = catalog.with_name(f"{catalog.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        for f in sql_files(sql_dir):
            try:
                con.execute(f.read_text().replace("${STORE}", store))
            except duckdb.Error as exc:
                raise RuntimeError(f"{f.name}: {exc}") from exc
        views = [
            r[0]
            for r in con.execute(
                "SELECT view_name FROM duckdb_views() WHERE NOT internal ORDER BY view_name"
            ).fetchall()
        ]
    finally:
        con.close()
    os.replace(tmp, catalog)
    Path(f"{tmp}.wal").unlink(missing_ok=True)
    return views


def connect(catalog: str | Path, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open the catalog (read-only by default: inspection never changes anything)."""
    catalog = Path(catalog)
    if not catalog.exists():
        raise FileNotFoundError(f"no catalog at {catalog}: build the corpus first (vlp ingest / vlp run)")
    return duckdb.connect(str(catalog), read_only=read_only)
