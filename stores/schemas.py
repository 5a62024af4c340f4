"""Explicit pyarrow schemas, one per table. A table is a folder of Parquet shard files under the store.

Keys: ``image_id`` and ``text_id`` are content hashes (BLAKE2b-128, hex) of the original image file bytes and
of the normalised text; the same content from two places collapses to one id (the ``images``/``texts`` views
keep one row per id, ``image_sources`` keeps every place it came from).
"""

from __future__ import annotations

import pyarrow as pa

IMAGES = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("category", pa.string()),
        pa.field("orig_width", pa.int32(), nullable=False),
        pa.field("orig_height", pa.int32(), nullable=False),
        pa.field("orig_format", pa.string()),
        pa.field("orig_mode", pa.string()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("flags", pa.list_(pa.string())),
        pa.field("n_bytes", pa.int64(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # normalised RGB JPEG
    ],
    metadata={
        "doc": "ingested images; 'image' holds the normalised RGB JPEG (longer side <= store_max_side)"
    },
)

TEXTS = pa.schema(
    [
        pa.field("text_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("n_chars", pa.int32(), nullable=False),
    ],
    metadata={"doc": "normalised sentences of the text corpus (captions of image sources included)"},
)

KNOWN_PAIRS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("text_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # title | description | keywords | caption
        pa.field("text", pa.string(), nullable=False),
    ],
    metadata={"doc": "captions that came with an image; hidden from the unpaired pipeline, used to evaluate"},
)

REJECTS = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("input_id", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("rejected_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"doc": "one row per bad input record: which stage, which input, why"},
)

TABLES: dict[str, pa.Schema] = {
    "images": IMAGES,
    "texts": TEXTS,
    "known_pairs": KNOWN_PAIRS,
    "rejects": REJECTS,
}


def schema_of(table: str) -> pa.Schema:
    try:
        return TABLES[table]
    except KeyError:
        raise KeyError(f"unknown table {table!r}; known: {sorted(TABLES)}") from None


def register(name: str, schema: pa.Schema) -> None:
    """Later stages (detection, retrieval, …) register their tables here."""
    if name in TABLES and TABLES[name] != schema:
        raise ValueError(f"table {name!r} already registered with a different schema")
    TABLES[name] = schema
