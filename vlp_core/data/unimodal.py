"""Image-only and text-only training data, for methods that also learn from unpaired images and sentences
(FLAVA, VLMo, U-VisualBERT: round-robin over image-only, text-only and paired batches).

- :func:`build_image_index`: every distinct image of ``images`` (optionally of some image sources) minus the
  held-out evaluation images, in a seeded order.
- :func:`build_text_index`: every distinct sentence of ``texts`` (optionally of some text sources) minus the
  held-out images' evaluation captions, in a seeded order. Captions of image sources are sentences too
  (``texts`` pools them), so every caption outside the held-out set is a text-only sample.
- :class:`ImageDataset` / :class:`TextDataset`: samples keyed by the sampler's ``(epoch, index)`` like
  :class:`~vlp_core.data.pairs.PairDataset`, with the same per-sample seeds, lazy JPEG reads and per-worker
  cache; batch them with :class:`~vlp_core.data.collate.ImageCollator` /
  :class:`~vlp_core.data.collate.TextCollator`.

The held-out set is :func:`~vlp_core.data.pairs.heldout_split` with the same defaults as
:class:`~vlp_core.data.pairs.PairsConfig`, so the images and captions held out for evaluation are the same
in every pre-training mode, paired or not. Keys are :func:`~vlp_core.data.pairs.stable_keys` of the ids: an
``image_key`` / ``text_key`` means the same image / sentence here as in a pair index of the same store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from stores.shards import ShardStore
from vlp_core.data.pairs import (
    _KEY_MASK,
    PairsConfig,
    _allowed_images,
    _as_store,
    _distinct_sorted,
    _hash64,
    _not_in,
    _only_in,
    _read_sentences,
    _split_key,
    _StoredImages,
    heldout_split,
    stable_keys,
)
from vlp_core.data.sampler import sample_seed

__all__ = ["ImageDataset", "TextDataset", "UnimodalConfig", "build_image_index", "build_text_index"]


@dataclass
class UnimodalConfig:
    """Which images and sentences the image-only and text-only steps of a pre-training run see.

    Attributes:
        sources: image sources (the ``source`` column of ``images``) whose images are used; ``None``: all.
        text_sources: text sources (the ``source`` column of ``texts``) whose sentences are used; ``None``:
            all.
        heldout_fraction: fraction of the captioned images held out for evaluation, in [0, 1). Keep it equal
            to the paired data's :class:`~vlp_core.data.pairs.PairsConfig` (the defaults are equal).
        heldout_salt: salt of the held-out hash (as :class:`~vlp_core.data.pairs.PairsConfig`).
        limit: keep at most this many samples (a seeded shuffle, then the first ``limit``), for small runs.
    """

    sources: list[str] | None = None
    text_sources: list[str] | None = None
    heldout_fraction: float = PairsConfig.heldout_fraction
    heldout_salt: str = PairsConfig.heldout_salt
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("sources", "text_sources"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not value):
                raise ValueError(f"{name} {value!r}: a non-empty list of source names, or None for all")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction {self.heldout_fraction} outside [0, 1)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit {self.limit} < 1")


# ------------------------------------------------------------------------------------------- the indexes


def _seeded_order(ids: pa.Table, column: str, key: str, seed: int, limit: int | None) -> pa.Array:
    """The distinct, sorted ``ids[column]`` in a permutation seeded by ``(seed, key)``, cut to ``limit``."""
    rng = np.random.default_rng(sample_seed(seed, 0, _hash64(f"unimodal:{key}") & _KEY_MASK))
    order = rng.permutation(ids.num_rows)
    if limit is not None:
        order = order[:limit]
    return ids[column].combine_chunks().cast(pa.string()).take(pa.array(order, pa.int64()))


def build_image_index(store: ShardStore | str | Path, cfg: UnimodalConfig, seed: int = 0) -> pa.Table:
    """The image-only samples: every distinct image of ``images`` (of ``cfg.sources``), held-out images
    removed, in a seeded order (then ``cfg.limit``).

    Deterministic given the store contents, ``cfg`` and ``seed`` (ids are de-duplicated and sorted before the
    shuffle, so shard layout and file order do not matter). Reads the ``image_id`` (and ``source``) columns.

    Returns:
        a table with columns ``image_id`` (string) and ``image_key`` (int64), one row per sample.

    Raises:
        ValueError: when a source of ``cfg.sources`` has no images, or no image is left.
    """
    store = _as_store(store)
    held = heldout_split(store, cfg.heldout_fraction, cfg.heldout_salt)
    allowed = _allowed_images(store, cfg.sources)
    ids = _distinct_sorted(store.read_table("images", ["image_id"]), ["image_id"])
    if allowed is not None:
        ids = _only_in(ids, "image_id", allowed)
    ids = _not_in(ids, "image_id", set(held["image_id"].to_pylist()))
    if ids.num_rows == 0:
        raise ValueError("no images left outside the held-out set (has the ingest stage run?)")
    image_ids = _seeded_order(ids, "image_id", "images", seed, cfg.limit)
    return pa.table({"image_id": image_ids, "image_key": pa.array(stable_keys(image_ids), pa.int64())})


def build_text_index(store: ShardStore | str | Path, cfg: UnimodalConfig, seed: int = 0) -> pa.Table:
    """The text-only samples: every distinct sentence of ``texts`` (of ``cfg.text_sources``), the held-out
    images' evaluation captions removed, in a seeded order (then ``cfg.limit``).

    Deterministic like :func:`build_image_index`. Reads only the ``text_id`` (and, with ``text_sources``,
    ``source``) columns of ``texts``, never the sentences themselves.

    Returns:
        a table with columns ``text_id`` (string) and ``text_key`` (int64), one row per sample.

    Raises:
        ValueError: when a source of ``cfg.text_sources`` has no sentences, or no sentence is left.
    """
    store = _as_store(store)
    held = heldout_split(store, cfg.heldout_fraction, cfg.heldout_salt)
    if cfg.text_sources is None:
        texts = store.read_table("texts", ["text_id"])
    else:
        texts = store.read_table("texts", ["text_id", "source"])
        present = set(pc.unique(texts["source"]).to_pylist())
        missing = sorted(set(cfg.text_sources) - present)
        if missing:
            raise ValueError(
                f"text sources {missing} have no sentences in the store; present: {sorted(present)}"
            )
        texts = _only_in(texts, "source", set(cfg.text_sources))
    ids = _not_in(_distinct_sorted(texts, ["text_id"]), "text_id", set(held["text_id"].to_pylist()))
    if ids.num_rows == 0:
        raise ValueError("no sentences left outside the held-out captions (has the ingest stage run?)")
    text_ids = _seeded_order(ids, "text_id", "texts", seed, cfg.limit)
    return pa.table({"text_id": text_ids, "text_key": pa.array(stable_keys(text_ids), pa.int64())})


# ------------------------------------------------------------------------------------------- the datasets


class ImageDataset(_StoredImages):
    """Map-style image-only samples of an image index, keyed by the sampler's ``(epoch, index)``.

    Reads images exactly as :class:`~vlp_core.data.pairs.PairDataset` does: at construction only the
    ``image_id`` column of ``images`` (a locator), then JPEGs lazily in each process through its own LRU of
    row groups bounded by ``cache_bytes``; picklable for DataLoader workers (a fresh cache per process).

    ``__getitem__((epoch, index))`` returns ``{"pixel_values": (3, S, S) float32, "image_key": int,
    "sample_seed": int}``; ``transform`` runs under ``torch.manual_seed(sample_seed(seed, epoch, index))``
    inside ``fork_rng``. A plain int key means epoch 0.

    Raises:
        KeyError: at construction, if an image of the index is missing from the store.
        ImageDecodeError: when a stored JPEG cannot be decoded (a damaged store; never skipped).
    """

    def __init__(
        self,
        store: ShardStore | str | Path,
        index: pa.Table,
        transform: Callable[[Any], torch.Tensor],
        seed: int = 0,
        *,
        cache_bytes: int = 256 * 2**20,
    ):
        self.transform = transform
        self.seed = int(seed)
        self.image_keys = index["image_key"].to_numpy().astype(np.int64)
        self._init_images(_as_store(store), index["image_id"], cache_bytes, "image index")

    def __len__(self) -> int:
        return len(self.image_keys)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = _split_key(key, len(self))
        seed = sample_seed(self.seed, epoch, index)
        return {
            "pixel_values": self._pixels(index, seed),
            "image_key": int(self.image_keys[index]),
            "sample_seed": seed,
        }


class TextDataset(Dataset):
    """Map-style text-only samples of a text index, keyed by the sampler's ``(epoch, index)``.

    The index's sentences are read once at construction (only those, from ``texts`` one row group at a time)
    and kept as one Arrow string array, shared copy-on-write by forked DataLoader workers.

    ``__getitem__((epoch, index))`` returns ``{"text": str, "text_key": int, "sample_seed": int}`` with
    ``sample_seed = sample_seed(seed, epoch, index)`` (the collator's MLM mask is seeded by it). A plain int
    key means epoch 0.

    Raises:
        KeyError: at construction, if a sentence of the index is missing from the store.
    """

    def __init__(self, store: ShardStore | str | Path, index: pa.Table, seed: int = 0):
        self.seed = int(seed)
        self.text_keys = index["text_key"].to_numpy().astype(np.int64)
        self._texts, self._row_text = _read_sentences(_as_store(store), index["text_id"], "text index")

    def __len__(self) -> int:
        return len(self.text_keys)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = _split_key(key, len(self))
        return {
            "text": self._texts[int(self._row_text[index])].as_py(),
            "text_key": int(self.text_keys[index]),
            "sample_seed": sample_seed(self.seed, epoch, index),
        }
