"""Where every file of a project run lives.

One data directory holds everything generated: fetched raw data, models, the Parquet store, the DuckDB
catalog, FAISS indexes, Prefect's home and training runs. It defaults to ``<repo>/data`` (git-ignored) and is
overridden by the ``VLP_DATA_DIR`` environment variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The data directory: ``$VLP_DATA_DIR`` if set, else ``<repo>/data``."""
    env = os.environ.get("VLP_DATA_DIR")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "data"


@dataclass(frozen=True)
class DataLayout:
    """Named locations inside one data directory."""

    root: Path

    @classmethod
    def default(cls) -> DataLayout:
        return cls(data_dir())

    @property
    def raw(self) -> Path:
        """Fetched third-party data (Debian packages unpacked here)."""
        return self.root / "raw"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def store(self) -> Path:
        """Parquet tables, one folder per table, plus shard manifests."""
        return self.root / "store"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def indexes(self) -> Path:
        return self.root / "indexes"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def openclipart(self) -> Path:
        return self.raw / "debian" / "usr" / "share" / "openclipart"

    @property
    def wordnet(self) -> Path:
        return self.raw / "debian" / "usr" / "share" / "wordnet"

    @property
    def yolo(self) -> Path:
        return self.models / "yolov3-tiny"
