"""The ingest stage: raw records → rows of ``images``, ``texts``, ``known_pairs`` and ``rejects``.

Pure functions over one shard's records; the caller (``flows.build_corpus``) plans shards and commits the rows
through ``stores``. Bad records never raise: each becomes a reject row ``(stage, source, input_id, reason,
detail)`` and the shard goes on.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vlp_core.corpus.images import DecodedImage, DecodeLimits, decode_image
from vlp_core.corpus.sources import ImageRecord, TextRecord
from vlp_core.corpus.text import TextLimits, TextReject, clean_text, decode_utf8

STAGE = "ingest"


def content_id(data: bytes | str) -> str:
    """BLAKE2b-128 hex of the content: image file bytes, or the normalised text (UTF-8)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class ShardRows:
    """Rows per table produced by one shard, plus counts for the manifest and progress reports."""

    tables: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"images": [], "texts": [], "known_pairs": [], "rejects": []}
    )
    stats: Counter = field(default_factory=Counter)

    def reject(self, source: str, shard: str, input_id: str, reason: str, detail: str, stage: str = STAGE):
        self.tables["rejects"].append(
            {
                "stage": stage,
                "source": source,
                "input_id": input_id,
                "reason": reason,
                "detail": detail[:2000],
                "shard": shard,
                "rejected_at": datetime.now(UTC),
            }
        )
        self.stats[f"reject:{reason}"] += 1


def _add_text(rows: ShardRows, source: str, uri: str, text: str) -> str:
    tid = content_id(text)
    rows.tables["texts"].append(
        {"text_id": tid, "source": source, "uri": uri, "text": text, "n_chars": len(text)}
    )
    rows.stats["texts"] += 1
    return tid


def ingest_images(
    records: Iterable[ImageRecord],
    source: str,
    shard: str,
    limits: DecodeLimits = DecodeLimits(),
    text_limits: TextLimits = TextLimits(),
) -> ShardRows:
    """Decode and normalise images; captions that came with them become texts + known pairs."""
    rows = ShardRows()
    for rec in records:
        rows.stats["inputs"] += 1
        if rec.meta_error is not None:
            rows.reject(source, shard, rec.uri, rec.meta_error.reason, rec.meta_error.detail)
        if rec.error is not None:
            rows.reject(source, shard, rec.uri, rec.error.reason, rec.error.detail)
            continue
        out = decode_image(rec.data, limits)
        if not isinstance(out, DecodedImage):
            rows.reject(source, shard, rec.uri, out.reason, out.detail)
            continue
        image_id = content_id(rec.data)
        rows.tables["images"].append(
            {
                "image_id": image_id,
                "source": source,
                "uri": rec.uri,
                "category": rec.category,
                "orig_width": out.orig_width,
                "orig_height": out.orig_height,
                "orig_format": out.orig_format,
                "orig_mode": out.orig_mode,
                "width": out.width,
                "height": out.height,
                "flags": out.flags,
                "n_bytes": len(rec.data),
                "image": out.jpeg,
            }
        )
        rows.stats["images"] += 1
        for kind, caption in rec.captions:
            for i, part in enumerate(clean_text(caption, text_limits)):
                uri = f"{rec.uri}#{kind}" + (f"[{i}]" if i else "")
                if isinstance(part, TextReject):
                    rows.reject(source, shard, uri, part.reason, part.detail)
                    continue
                tid = _add_text(rows, source, uri, part)
                rows.tables["known_pairs"].append(
                    {"image_id": image_id, "text_id": tid, "source": source, "kind": kind, "text": part}
                )
                rows.stats["known_pairs"] += 1
    return rows


def ingest_texts(
    records: Iterable[TextRecord], source: str, shard: str, limits: TextLimits = TextLimits()
) -> ShardRows:
    """Decode, normalise and (for documents or over-long lines) sentence-split text records."""
    rows = ShardRows()
    for rec in records:
        rows.stats["inputs"] += 1
        if rec.error is not None:
            rows.reject(source, shard, rec.uri, rec.error.reason, rec.error.detail)
            continue
        text = decode_utf8(rec.data) if isinstance(rec.data, bytes) else rec.data
        if isinstance(text, TextReject):
            rows.reject(source, shard, rec.uri, text.reason, text.detail)
            continue
        for i, part in enumerate(clean_text(text, limits, split=rec.split)):
            uri = f"{rec.uri}#s{i}" if (rec.split or i) else rec.uri
            if isinstance(part, TextReject):
                rows.reject(source, shard, uri, part.reason, part.detail)
            else:
                _add_text(rows, source, uri, part)
    return rows
