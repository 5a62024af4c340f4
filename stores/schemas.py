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


# --------------------------------------------------------------------------- corpus stages (after ingest)


def vector(dim: int, dtype: pa.DataType = pa.float16()) -> pa.DataType:
    """A fixed-size vector column (float16 on disk by default; DuckDB reads it as FLOAT[])."""
    return pa.list_(dtype, dim)


REGIONS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("region_idx", pa.int16(), nullable=False),  # 0 = the whole image
        pa.field("label", pa.string(), nullable=False),  # detector label ("image" for the whole image)
        pa.field("score", pa.float32(), nullable=False),
        pa.field("box", vector(4, pa.float32()), nullable=False),  # x1, y1, x2, y2 px of the stored image
        pa.field("box5", vector(5, pa.float32()), nullable=False),  # normalised box + area fraction
        pa.field("detector", pa.string(), nullable=False),
        pa.field("feature", pa.list_(pa.float16()), nullable=False),  # pooled backbone feature (RoIAlign)
    ],
    metadata={"doc": "detected regions (plus the whole image) with RoIAlign features"},
)

IMAGE_TAGS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("tags", pa.list_(pa.string()), nullable=False),  # de-duplicated, by score
        pa.field("tag_scores", pa.list_(pa.float32()), nullable=False),
        pa.field("tag_origins", pa.list_(pa.string()), nullable=False),  # detector | imagenet
        pa.field("tag_sentence", pa.string(), nullable=False),  # the retrieval query
    ],
    metadata={"doc": "object tags per image and the tag sentence used as the retrieval query"},
)

TEXT_EMBEDDINGS = pa.schema(
    [
        pa.field("text_id", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float16()), nullable=False),  # L2-normalised
    ],
    metadata={"doc": "Sentence-BERT embeddings of the distinct corpus sentences"},
)

RETRIEVED_PAIRS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),  # 1 = best
        pa.field("text_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # cosine(tag sentence, sentence)
    ],
    metadata={"doc": "top-K corpus sentences per image, retrieved with the image's tag sentence"},
)

NOUN_PHRASES = pa.schema(
    [
        pa.field("text_id", pa.string(), nullable=False),
        pa.field("phrase_idx", pa.int16(), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("start_char", pa.int32(), nullable=False),
        pa.field("end_char", pa.int32(), nullable=False),
        pa.field("root_lemma", pa.string(), nullable=False),
    ],
    metadata={"doc": "spaCy noun chunks of every retrieved sentence, with character spans"},
)

PHRASE_LINKS = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("text_id", pa.string(), nullable=False),
        pa.field("region_idx", pa.int16(), nullable=False),  # the region carrying the tag (0: whole image)
        pa.field("tag", pa.string(), nullable=False),
        pa.field("phrase_idx", pa.int16(), nullable=False),
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # tag-phrase similarity
        pa.field("mask_prob", pa.float32(), nullable=False),  # R-P masking probability (0.15 x score)
    ],
    metadata={"doc": "best noun phrase per (image, retrieved sentence, tagged region)"},
)

PATCH_GALLERY = pa.schema(
    [
        pa.field("concept", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("region_idx", pa.int16(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("box5", vector(5, pa.float32()), nullable=False),
        pa.field("feature", pa.list_(pa.float16()), nullable=False),
        pa.field("thumbnail", pa.binary(), nullable=False),  # JPEG crop, longer side <= thumb_side
        # detector: a detected region, score = detection confidence; image_tag: the whole image (region 0)
        # under a confident image-level (ImageNet) tag, score = the tag's class probability
        pa.field("origin", pa.string(), nullable=False),
    ],
    metadata={
        "doc": "VLMixer CutMix patch gallery: capped, diverse patches per concept (one per image), from "
        "detected regions (origin detector) and whole images under confident ImageNet tags (image_tag)"
    },
)

CONCEPTS = pa.schema(
    [
        pa.field("concept", pa.string(), nullable=False),
        pa.field("forms", pa.list_(pa.string()), nullable=False),  # surface forms matched in sentences
        pa.field("n_patches", pa.int32(), nullable=False),
        pa.field("origin", pa.string(), nullable=False),  # detector (a detector label) | image_tag
    ],
    metadata={
        "doc": "concept vocabulary for grounded-word matching, with gallery sizes: every detector label, "
        "then the image-tag concepts that have patches"
    },
)

GROUNDED_WORDS = pa.schema(
    [
        pa.field("text_id", pa.string(), nullable=False),
        pa.field("word_idx", pa.int16(), nullable=False),  # 0, 1, ... among the sentence's grounded words
        pa.field("start_char", pa.int32(), nullable=False),
        pa.field("end_char", pa.int32(), nullable=False),
        pa.field("word", pa.string(), nullable=False),  # text[start_char:end_char]; may span several words
        pa.field("concept", pa.string(), nullable=False),  # a concept with gallery patches
    ],
    metadata={"doc": "visually grounded words of every corpus sentence (VLMixer CMC candidates)"},
)

# --------------------------------------------------------------------------- downstream tasks

TASK_EXAMPLES = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),  # dataset name: nlvr2, snli-ve, scene-pairs, ...
        pa.field("split", pa.string(), nullable=False),  # the dataset's own split name
        pa.field("example_id", pa.string(), nullable=False),  # unique within (task, split)
        pa.field("images", pa.list_(pa.string()), nullable=False),  # relative to image_root
        pa.field("image_root", pa.string(), nullable=False),  # a folder, or "store:task_images"
        pa.field("text", pa.string(), nullable=False),
        pa.field("label", pa.string()),  # class label / answer; null where the shape has none
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # candidates, pixels x1 y1 x2 y2
        pa.field("target", pa.int32()),  # index of the referred box
        pa.field("group", pa.string()),  # retrieval: the caption's image; referring: the ref id
        pa.field("meta", pa.string()),  # JSON object of strings
    ],
    metadata={"doc": "downstream task examples in one shape (vlp_core.data.examples.TaskExample)"},
)

TASK_IMAGES = pa.schema(
    [
        pa.field("task", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),  # the name examples use (store:task_images)
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("png", pa.binary(), nullable=False),
    ],
    metadata={"doc": "images of the bundled (generated) tasks, committed with their examples"},
)

LEADERBOARD = pa.schema(
    [
        pa.field("method", pa.string(), nullable=False),  # a method, or none (no VL pre-training)
        pa.field("pairs_mode", pa.string(), nullable=False),  # the pre-training pairs (retrieved, known, ...)
        pa.field("seed", pa.int32(), nullable=False),
        pa.field("task", pa.string(), nullable=False),  # the benchmark's task name (nlvr2, retrieval-zs, ...)
        pa.field("metric", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("headline", pa.bool_(), nullable=False),  # the task's headline metric
        pa.field("run_id", pa.string(), nullable=False),  # the run directory's name under runs/bench/
        pa.field("config_hash", pa.string(), nullable=False),  # hash of the run's resolved config
        pa.field("budget", pa.string(), nullable=False),  # JSON: the stated budget of the benchmark
        pa.field("finished_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"doc": "the method x task benchmark: one row per metric of a (method, seed, task)"},
)

TABLES: dict[str, pa.Schema] = {
    "images": IMAGES,
    "texts": TEXTS,
    "known_pairs": KNOWN_PAIRS,
    "rejects": REJECTS,
    "regions": REGIONS,
    "image_tags": IMAGE_TAGS,
    "text_embeddings": TEXT_EMBEDDINGS,
    "retrieved_pairs": RETRIEVED_PAIRS,
    "noun_phrases": NOUN_PHRASES,
    "phrase_links": PHRASE_LINKS,
    "patch_gallery": PATCH_GALLERY,
    "concepts": CONCEPTS,
    "grounded_words": GROUNDED_WORDS,
    "task_examples": TASK_EXAMPLES,
    "task_images": TASK_IMAGES,
    "leaderboard": LEADERBOARD,
}


#: the tables the corpus build writes (the others: downstream tasks and the benchmark).
CORPUS_TABLES: tuple[str, ...] = tuple(t for t in TABLES if not t.startswith("task_") and t != "leaderboard")


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
