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


# ------------------------------------------------------------------------------------------------ regions

_VISION: dict[tuple, tuple] = {}


def vision_models(cfg) -> tuple:
    """(detector, feature extractor) for a RegionsConfig, loaded once per process."""
    from vlp_core.vision.detect import build_detector
    from vlp_core.vision.features import RegionFeatureExtractor

    key = (cfg.detector, repr(sorted(cfg.detector_options.items())), cfg.conf_threshold, cfg.image_size,
           cfg.batch_size, cfg.device)  # fmt: skip
    with _LOCK:
        if key not in _VISION:
            opts = dict(cfg.detector_options)
            opts.setdefault("conf_threshold" if cfg.detector == "yolov3-tiny" else "score_threshold",
                            cfg.conf_threshold)  # fmt: skip
            detector = build_detector(cfg.detector, device=cfg.device, **opts)
            extractor = RegionFeatureExtractor(image_size=cfg.image_size, device=cfg.device,
                                               batch_size=cfg.batch_size)  # fmt: skip
            _VISION[key] = (detector, extractor)
        return _VISION[key]


def region_rows(image_ids: list[str], jpegs: list[bytes], detector, extractor, cfg) -> ShardRows:
    """Rows of ``regions`` and ``image_tags`` for one shard of distinct images.

    Region 0 of every image is the whole image (label ``"image"``); then the detections by score. Tags are
    the detector labels (de-duplicated, by score) followed, when ``cfg.imagenet_tags``, by the backbone's
    ImageNet classes above ``imagenet_min_prob``; the tag sentence (the retrieval query) joins them.
    """
    from vlp_core.images import load_rgb
    from vlp_core.language import tag_sentence
    from vlp_core.vision.detect import detection_boxes
    from vlp_core.vision.features import box5, imagenet_tags, whole_image_box

    rows = ShardRows(tables={"regions": [], "image_tags": []})
    images = [load_rgb(j) for j in jpegs]
    detections = detector.detect(images)
    boxes = [
        np.concatenate([whole_image_box(*im.size), detection_boxes(d)])
        for im, d in zip(images, detections, strict=True)
    ]
    feats = extractor.extract(images, boxes)
    for image_id, im, dets, b, f in zip(image_ids, images, detections, boxes, feats, strict=True):
        b5 = box5(b, *im.size)
        labels = ["image", *(d.label for d in dets)]
        scores = [1.0, *(d.score for d in dets)]
        for i in range(len(b)):
            rows.tables["regions"].append({
                "image_id": image_id, "region_idx": i, "label": labels[i], "score": float(scores[i]),
                "box": b[i].tolist(), "box5": b5[i].tolist(),
                "detector": "whole" if i == 0 else detector.name,
                "feature": f.regions[i].astype(np.float16),
            })  # fmt: skip
        tags: dict[str, tuple[float, str]] = {}
        for d in dets:
            tags.setdefault(d.label, (d.score, "detector"))
        if cfg.imagenet_tags:
            for name, p in imagenet_tags(f.probs, cfg.imagenet_top_k, cfg.imagenet_min_prob):
                tags.setdefault(name, (p, "imagenet"))
        names = list(tags)
        rows.tables["image_tags"].append({
            "image_id": image_id, "tags": names, "tag_scores": [tags[t][0] for t in names],
            "tag_origins": [tags[t][1] for t in names], "tag_sentence": tag_sentence(names),
        })  # fmt: skip
        rows.stats["images"] += 1
        rows.stats["regions"] += len(dets)
        rows.stats["tagged"] += bool(names)
    return rows
