"""Typed configuration: one place for defaults, YAML presets under ``configs/``, dotted-key overrides.

Every run writes its resolved config beside its outputs (see ``flows``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from vlp_core.corpus.images import DecodeLimits
from vlp_core.corpus.text import TextLimits
from vlp_core.paths import REPO_ROOT, data_dir
from vlp_core.precision import Precision

CONFIG_DIR = REPO_ROOT / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Strict):
    """One input. ``options`` go to the source class; ``{data}`` in a string expands to the data dir."""

    name: str
    kind: str
    options: dict[str, Any] = Field(default_factory=dict)

    def resolved_options(self) -> dict[str, Any]:
        root = str(data_dir())
        return {k: v.replace("{data}", root) if isinstance(v, str) else v for k, v in self.options.items()}


class IngestConfig(_Strict):
    """Limits for safe decoding and text cleaning, and shard sizes."""

    max_pixels: int = DecodeLimits.max_pixels
    max_file_bytes: int = DecodeLimits.max_file_bytes
    min_side: int = DecodeLimits.min_side
    store_max_side: int = DecodeLimits.store_max_side
    jpeg_quality: int = DecodeLimits.jpeg_quality
    min_chars: int = TextLimits.min_chars
    max_chars: int = TextLimits.max_chars
    image_shard_size: int = Field(500, description="image files (or tars/row groups) per shard")
    text_shard_size: int = Field(1, description="text units (32 MiB byte ranges, files) per shard")

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_pixels=self.max_pixels,
            max_file_bytes=self.max_file_bytes,
            min_side=self.min_side,
            store_max_side=self.store_max_side,
            jpeg_quality=self.jpeg_quality,
        )

    def text_limits(self) -> TextLimits:
        return TextLimits(min_chars=self.min_chars, max_chars=self.max_chars)


class RunnerConfig(_Strict):
    """Task runner of the corpus flow: threads on one machine, Dask to scale out."""

    kind: Literal["thread", "dask"] = "thread"
    max_workers: int | None = None  # threads; default: CPU count
    dask_address: str | None = None  # an existing scheduler; None starts a LocalCluster
    plan_memory_mb: int = Field(
        128, ge=16, description="DuckDB's memory while planning a stage (it spills to disk beyond it)"
    )


class EmbedConfig(_Strict):
    """Sentence-BERT embeddings of every corpus sentence (float16 on disk)."""

    model_path: str | None = Field(None, description="sentence-transformers model dir (default: MiniLM)")
    batch_size: int = 128
    shard_size: int = Field(2048, description="sentences per shard")
    device: str | None = None  # None: CUDA when available
    precision: Precision = Field(
        "auto",
        description="autocast of the sentence encoder (vlp_core.precision): auto = bf16 on a GPU or a CPU "
        "with native bf16, else fp32; the queries of the retrieve stage use the same",
    )


class IndexConfig(_Strict):
    """FAISS index over sentence embeddings; the type follows corpus size and memory unless forced."""

    factory: str | None = Field(None, description="FAISS factory string; None chooses by size and memory")
    memory_budget_gb: float = 4.0
    exact_below: int = Field(
        1_000_000, description="exact (Flat) below this many vectors; see stores.faiss_store.EXACT_BELOW"
    )
    nprobe: int = Field(
        128,
        description="IVF lists searched; on the bundled corpus's real embeddings (2,048 lists) recall@5 "
        "was 0.84 at 16, 0.92 at 64, 0.955 at 128",
    )
    train_sample: int = 262_144


class RegionsConfig(_Strict):
    """Region detection + RoIAlign features + tags, per distinct image."""

    detector: str = Field("yolov3-tiny", description="yolov3-tiny (CPU default) | detectron2 (GPU clusters)")
    detector_options: dict[str, Any] = Field(default_factory=dict)
    conf_threshold: float = 0.2
    image_size: int = Field(384, description="backbone input side for region features")
    imagenet_tags: bool = Field(True, description="add the backbone's ImageNet top-k classes as tags")
    imagenet_top_k: int = 3
    imagenet_min_prob: float = 0.2
    batch_size: int = 16
    shard_size: int = Field(256, description="images per shard")
    device: str | None = None
    precision: Precision = Field(
        "auto",
        description="autocast of the detector's and backbone's convolutions (vlp_core.precision): auto = "
        "bf16 on a GPU or a CPU with native bf16, else fp32; heads, softmax and RoIAlign stay float32",
    )


class RetrieveConfig(_Strict):
    """Top-K sentences per image by its tag sentence (µ-VLA: K = 5; their code stored 10)."""

    top_k: int = 5
    shard_size: int = Field(1024, description="images per shard")


class LinkConfig(_Strict):
    """Noun phrases of retrieved sentences and tag-phrase links (µ-VLA R-P)."""

    similarity: Literal["sbert", "spacy_vectors"] = Field(
        "sbert", description="sbert: Sentence-BERT cosine (the µ-VLA code); spacy_vectors: word vectors"
    )
    min_score: float = 0.0
    mask_base: float = Field(0.15, description="mask probability = mask_base x similarity (µ-VLA code)")
    shard_size: int = Field(1024, description="sentences (phrases) or images (links) per shard")


class GalleryConfig(_Strict):
    """VLMixer patch gallery: per concept, the best region of each image, capped. Concepts are the detector's
    labels and, with ``image_tag_patches``, confident image-level (ImageNet) tags, whose patch is the whole
    image (region 0)."""

    min_score: float = Field(0.3, description="detection confidence needed to enter the gallery")
    max_per_concept: int = Field(64, description="cap per concept (one patch per image keeps it diverse)")
    thumb_side: int = 64
    image_tag_patches: bool = Field(
        True, description="also add the whole image as a patch of each confident ImageNet tag"
    )
    image_tag_min_score: float = Field(
        0.5, description="ImageNet tag probability needed (>= 0.5: the class outweighs all others together)"
    )


class GroundConfig(_Strict):
    """Grounded words (CMC) of every corpus sentence against the gallery's concepts."""

    shard_size: int = Field(2048, description="sentences per shard")


StageName = Literal[
    "ingest", "regions", "embed", "index", "retrieve", "phrases", "links", "gallery", "ground"
]
STAGES: tuple[str, ...] = StageName.__args__  # pipeline order


class CorpusConfig(_Strict):
    sources: list[SourceSpec]
    stages: list[StageName] = Field(
        default_factory=lambda: ["ingest"], description="stages to run, in pipeline order"
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    regions: RegionsConfig = Field(default_factory=RegionsConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    link: LinkConfig = Field(default_factory=LinkConfig)
    gallery: GalleryConfig = Field(default_factory=GalleryConfig)
    ground: GroundConfig = Field(default_factory=GroundConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    limit_per_source: int | None = Field(
        None, description="process only the first N units of each source (quick runs, smoke tests)"
    )


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys (``ingest.max_pixels``) in a nested dict; returns the same dict."""
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def load_yaml_config(kind: str, name_or_path: str, overrides: dict[str, Any] | None = None) -> dict:
    """Load ``configs/<kind>/<name>.yaml`` (or a path) and apply dotted overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
        raise FileNotFoundError(f"no {kind} config {name_or_path!r}; presets: {known}, or give a .yaml path")
    data = yaml.safe_load(path.read_text()) or {}
    return apply_overrides(data, overrides)


def load_corpus_config(
    name_or_path: str = "default", overrides: dict[str, Any] | None = None
) -> CorpusConfig:
    return CorpusConfig.model_validate(load_yaml_config("corpus", name_or_path, overrides))
