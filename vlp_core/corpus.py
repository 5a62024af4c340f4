"""Corpus stages after ingest, as pure functions from one shard's inputs to rows (the flow commits them).

- ``embed``: Sentence-BERT embeddings of every distinct sentence (float16 on disk).
- ``index``: a FAISS inner-product index over them (see ``stores.faiss_store`` for the type rule).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq

from vlp_core.ingest import ShardRows

_ENCODERS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def sentence_encoder(model_path: str | None, device: str | None, batch_size: int):
    """One encoder per process and settings (shards on a thread pool share it)."""
    from vlp_core.language import SentenceEncoder

    key = (model_path, device, batch_size)
    with _LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = SentenceEncoder(model_path=model_path, device=device, batch_size=batch_size)
        return _ENCODERS[key]


def embed_rows(encoder, text_ids: list[str], texts: list[str]) -> ShardRows:
    """Rows of ``text_embeddings`` for one shard: L2-normalised float16 vectors, ids aligned."""
    rows = ShardRows(tables={"text_embeddings": []})
    emb = encoder.encode_f16(texts)
    rows.tables["text_embeddings"] = [
        {"text_id": tid, "embedding": vec} for tid, vec in zip(text_ids, emb, strict=True)
    ]
    rows.stats["embedded"] += len(text_ids)
    return rows


def iter_embeddings(files: list[str], batch_rows: int = 65_536) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream (ids, float32 [b, dim]) batches from ``text_embeddings`` Parquet files."""
    for f in files:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["text_id", "embedding"]):
            if batch.num_rows == 0:
                continue
            flat = batch.column("embedding").flatten()  # respects slicing offsets
            vecs = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(batch.num_rows, -1)
            yield batch.column("text_id").to_pylist(), vecs
