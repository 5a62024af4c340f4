"""Region inputs for the single-stream region methods (µ-VLA, U-VisualBERT, VLMixer): what the corpus stages
built, read back per sample.

Per image (``regions`` + ``image_tags``): its region features (RoIAlign over the EfficientNet-Lite0 map),
5-d boxes ``[x1/W, y1/H, x2/W, y2/H, area/(W·H)]``, each region's class tag, and the image's tags, each
tag carrying the region it names (:func:`tag_regions`). Per pair (``retrieved_pairs`` or any pair index, +
``phrase_links`` + ``noun_phrases``): the sentence and its linked noun phrases (character span, the linked
region, the link's R-P mask probability).

Region choice: region 0 (the whole image) and then the detections in stored order (by score), at most
``max_regions`` in all. A region's *class tag* (the target of masked region classification) is its
detector label; region 0's is the image's best ImageNet tag when it has one (none otherwise: such a region
still gets feature regression).

Memory like :class:`~vlp_core.data.pairs.PairDataset`: the 1,280-d features are read lazily per sample
through a per-process LRU of row groups bounded by ``cache_bytes`` (256 MiB: about 100,000 regions). At
construction it scans the small columns of every ``regions`` row (keeping those of the index's images) and
reads ``image_tags`` (for pairs also ``noun_phrases`` and ``phrase_links``) whole, so construction grows
with those tables (a fraction of a second and a few MB at the bundled scale; a corpus of millions of images
wants filtered reads here). Samples are keyed by the sampler's ``(epoch, index)`` with the same per-sample
seeds as every other dataset; masks are drawn by the recipes from those seeds.

Batches (:class:`RegionCollator`), B samples, R = most regions, T = longest tag sequence, L = longest
sentence, P = most phrase links, K = most wordpieces of a class tag / linked phrase:

- ``region_feats`` float32 (B, R, F), ``region_boxes`` float32 (B, R, 5), ``region_mask`` int64 (B, R);
- ``region_class_ids`` int64 (B, R, K): wordpiece ids of each region's class tag, -1 padded (all -1: none);
- ``tag_ids``, ``tag_mask`` int64 (B, T): ``[CLS] tag wordpieces … [SEP]``; ``tag_region`` (B, T) the
  region position each tag wordpiece carries the box of, ``tag_index`` (B, T) which tag it belongs to (-1
  for [CLS] / [SEP] / padding);
- with sentences: ``input_ids``, ``attention_mask``, ``mlm_input_ids``, ``mlm_labels`` as
  :class:`~vlp_core.data.collate.PretrainCollator` draws them, ``text_key``; ``phrase_link`` (B, L) the link
  a token belongs to (-1: none), ``link_region`` (B, P) its region position, ``link_prob`` float32 (B, P) its
  mask probability, ``link_ids`` (B, P, K) the phrase's wordpieces (p-MRTC targets), -1 padded;
- ``image_key``, ``sample_seed`` int64 (B,).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from stores.shards import ShardStore
from vlp_core.data.collate import _MaskedText, _tokenize
from vlp_core.data.pairs import (
    _as_store,
    _read_sentences,
    _RowGroupCache,
    _split_key,
    _table_files,
    stable_keys,
)
from vlp_core.data.sampler import sample_seed

__all__ = [
    "RegionVQADataset",
    "region_feature_sample",
    "RegionCollator",
    "RegionConfig",
    "RegionImageDataset",
    "RegionPairDataset",
    "RegionReader",
    "tag_regions",
]

_SMALL = ["image_id", "region_idx", "label", "score", "box5"]


class _Features:
    """One row group's ``feature`` column: flat float16 values and list offsets (an LRU cache entry)."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values, self.offsets = values, offsets
        self.nbytes = values.nbytes + offsets.nbytes

    def __getitem__(self, row: int) -> np.ndarray:
        return self.values[self.offsets[row] : self.offsets[row + 1]]


@dataclass
class RegionConfig:
    """How many regions and tags a sample keeps.

    Attributes:
        max_regions: region 0 (the whole image) plus the best detections, at most this many in all.
        max_tags: the image's first tags (by score), at most this many.
        max_tag_tokens: the tag sequence is cut to this many wordpieces, [CLS] and [SEP] included.
    """

    max_regions: int = 10
    max_tags: int = 8
    max_tag_tokens: int = 24

    def __post_init__(self) -> None:
        if self.max_regions < 1 or self.max_tags < 0 or self.max_tag_tokens < 3:
            raise ValueError(f"bad region limits: {self}")


def tag_regions(
    tags: Sequence[str], origins: Sequence[str], labels: Sequence[str], scores: Sequence[float]
) -> list[int]:
    """The region each tag names: a detector tag → the best-scoring region (index > 0) with that label;
    an image-level tag (ImageNet) or a detector tag without a kept region → region 0, the whole image.

    ``labels`` / ``scores``: the image's regions in order (index 0 = the whole image)."""
    best: dict[str, int] = {}
    for i in range(1, len(labels)):
        if labels[i] not in best or scores[i] > scores[best[labels[i]]]:
            best[labels[i]] = i
    return [best.get(t, 0) if o == "detector" else 0 for t, o in zip(tags, origins, strict=True)]


class RegionReader:
    """The regions and tags of a set of images, located at construction, features read on demand.

    Memory: the small columns of the wanted images' rows (ids are not kept: positions are), their tags, and
    per process one LRU of row groups' ``feature`` columns bounded by ``cache_bytes``.

    Raises:
        KeyError: an image has no regions (the regions stage has not covered it): every image a run touches
            must be in the corpus.
    """

    def __init__(
        self,
        store: ShardStore,
        image_ids: Sequence[str],
        cfg: RegionConfig,
        cache_bytes: int = 256 * 2**20,
        prefer_source: str | None = None,
    ):
        self.cfg = cfg
        self.cache_bytes = int(cache_bytes)
        wanted = {s: i for i, s in enumerate(image_ids)}
        self.n_images = len(image_ids)
        # An image's regions come from one file: the first that has them, files of ``prefer_source`` (a
        # task whose regions include its candidates) before the others. An image made by two stages (a
        # COCO image of RefCOCO+ and of the Karpathy split) never mixes their region lists.
        files = _table_files(store, "regions")
        files.sort(key=lambda p: (p.parent.name != prefer_source, str(p)))
        self._files = [str(p) for p in files]
        rows: list[tuple[int, int, int, int, int, str, float, list[float]]] = []
        for fi, path in enumerate(self._files):
            pf = pq.ParquetFile(path)
            try:
                for rg in range(pf.num_row_groups):
                    part = pf.read_row_group(rg, columns=_SMALL).to_pydict()
                    for r, iid in enumerate(part["image_id"]):
                        pos = wanted.get(iid)
                        if pos is not None:
                            rows.append((pos, part["region_idx"][r], fi, rg, r, part["label"][r],
                                         part["score"][r], part["box5"][r]))  # fmt: skip
            finally:
                pf.close()
        # One row per (image, region_idx), all from the image's first file (shards may repeat rows).
        rows.sort(key=lambda t: (t[0], t[2], t[1], t[3], t[4]))
        per_image: list[list[tuple]] = [[] for _ in range(self.n_images)]
        for row in rows:
            regions = per_image[row[0]]
            if not regions or (regions[-1][2] == row[2] and regions[-1][1] != row[1]):
                regions.append(row)
        missing = [image_ids[i] for i, r in enumerate(per_image) if not r or r[0][1] != 0]
        if missing:
            raise KeyError(
                f"{len(missing)} images have no regions (or no whole-image region 0) in the store, e.g. "
                f"{missing[:3]}: run the corpus regions stage over every image a run uses"
            )
        keep = [r[: cfg.max_regions] for r in per_image]
        self._loc = [np.array([(fi, rg, r) for _, _, fi, rg, r, *_ in k], np.int64) for k in keep]
        self._region_idx = [[int(t[1]) for t in k] for k in keep]
        self._labels = [[t[5] for t in k] for k in keep]
        self._scores = [[float(t[6]) for t in k] for k in keep]
        self._boxes = [np.asarray([t[7] for t in k], np.float32) for k in keep]
        self._tags: list[list[tuple[str, int]]] = [[] for _ in range(self.n_images)]
        self._region_class: list[list[str | None]] = [[None] + lab[1:] for lab in self._labels]
        tags = store.read_table("image_tags", ["image_id", "tags", "tag_origins"]).to_pydict()
        seen: set[int] = set()
        for iid, names, origins in zip(tags["image_id"], tags["tags"], tags["tag_origins"], strict=True):
            pos = wanted.get(iid)
            if pos is None or pos in seen:
                continue
            seen.add(pos)
            names, origins = names[: cfg.max_tags], origins[: cfg.max_tags]
            where = tag_regions(names, origins, self._labels[pos], self._scores[pos])
            self._tags[pos] = list(zip(names, where, strict=True))
            image_level = [t for t, o in zip(names, origins, strict=True) if o != "detector"]
            if image_level:
                self._region_class[pos][0] = image_level[0]
        self._cache: _RowGroupCache | None = None
        self._pid = -1

    def _features_of(self, file: int, rg: int) -> _Features:
        pf = pq.ParquetFile(self._files[file])
        try:
            col = pf.read_row_group(rg, columns=["feature"])["feature"].combine_chunks()
        finally:
            pf.close()
        return _Features(col.values.to_numpy(zero_copy_only=False), col.offsets.to_numpy())

    def features(self, pos: int) -> np.ndarray:
        """``(R, F)`` float32 region features of image ``pos``."""
        if self._pid != os.getpid():  # a fresh cache in every (forked) process
            self._cache, self._pid = _RowGroupCache(self.cache_bytes), os.getpid()
        rows = []
        for fi, rg, r in self._loc[pos].tolist():
            rows.append(self._cache.get((fi, rg), lambda f=fi, g=rg: self._features_of(f, g))[r])
        return np.stack(rows).astype(np.float32)

    def sample(self, pos: int) -> dict[str, Any]:
        """Image ``pos``: ``region_feats`` (R, F), ``region_boxes`` (R, 5), ``region_class`` (R,) tag or
        None, ``tags`` [(tag, region position)]."""
        return {
            "region_feats": self.features(pos),
            "region_boxes": self._boxes[pos],
            "region_class": list(self._region_class[pos]),
            "tags": list(self._tags[pos]),
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"], state["_pid"] = None, -1
        return state

    def kept_regions(self, pos: int) -> tuple[list[str], np.ndarray]:
        """The labels and ``(R, 5)`` normalised boxes of image ``pos``'s kept regions, in sample order."""
        return list(self._labels[pos]), self._boxes[pos]

    def region_position(self, pos: int, region_idx: int) -> int | None:
        """Where stored region ``region_idx`` of image ``pos`` is in its sample (None: not kept)."""
        try:
            return self._region_idx[pos].index(int(region_idx))
        except ValueError:
            return None


class RegionImageDataset(Dataset):
    """Image-only region samples of an image index (``image_id``, ``image_key``), keyed by the sampler's
    ``(epoch, index)``: :meth:`RegionReader.sample` + ``image_key`` + ``sample_seed``."""

    def __init__(
        self, store: ShardStore | str | Path, index: pa.Table, cfg: RegionConfig | None = None, seed: int = 0
    ):
        store = _as_store(store)
        self.seed = int(seed)
        self.image_keys = index["image_key"].to_numpy().astype(np.int64)
        ids = index["image_id"].to_pylist()
        self._uniq = sorted(set(ids))
        where = {s: i for i, s in enumerate(self._uniq)}
        self._row_image = np.array([where[s] for s in ids], np.int64)
        self.reader = RegionReader(store, self._uniq, cfg or RegionConfig())

    def __len__(self) -> int:
        return len(self.image_keys)

    @property
    def image_ids(self) -> list[str]:
        """The distinct images of the index, sorted."""
        return list(self._uniq)

    def image_sample(self, index: int) -> dict[str, Any]:
        """The region part of row ``index`` (no seed)."""
        return self.reader.sample(int(self._row_image[index]))

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = _split_key(key, len(self))
        return {
            **self.image_sample(index),
            "image_key": int(self.image_keys[index]),
            "sample_seed": sample_seed(self.seed, epoch, index),
        }


class RegionPairDataset(RegionImageDataset):
    """Region samples of a pair index (``image_id``, ``text_id``, ``image_key``, ``text_key``): the image's
    regions and tags, the sentence, and its noun phrases linked to the image's regions (``phrase_links`` ⋈
    ``noun_phrases``; one link per phrase, the best-scoring one; a link to a region not kept is dropped).

    Only retrieved pairs have links (the links stage links each image to its retrieved sentences); known or
    random pairs get none, so their region-phrase objective has nothing to mask."""

    def __init__(
        self, store: ShardStore | str | Path, index: pa.Table, cfg: RegionConfig | None = None, seed: int = 0
    ):
        store = _as_store(store)
        super().__init__(store, index, cfg, seed)
        self.text_keys = index["text_key"].to_numpy().astype(np.int64)
        self._texts, self._row_text = _read_sentences(store, index["text_id"])
        pairs = set(zip(index["image_id"].to_pylist(), index["text_id"].to_pylist(), strict=True))
        texts = {t for _, t in pairs}
        spans: dict[tuple[str, int], tuple[int, int]] = {}
        nps = store.read_table(
            "noun_phrases", ["text_id", "phrase_idx", "start_char", "end_char"]
        ).to_pydict()
        for tid, idx, a, b in zip(*nps.values(), strict=True):
            if tid in texts:
                spans[(tid, idx)] = (a, b)
        links = store.read_table(
            "phrase_links", ["image_id", "text_id", "region_idx", "phrase_idx", "score", "mask_prob"]
        ).to_pydict()
        best: dict[tuple[str, str], dict[int, tuple[float, int, float]]] = {}
        for iid, tid, region, phrase, score, prob in zip(*links.values(), strict=True):
            if (iid, tid) not in pairs or (tid, phrase) not in spans:
                continue
            per = best.setdefault((iid, tid), {})
            old = per.get(phrase)
            # The best link of a phrase; ties to the lower region number (row order is not meaningful).
            if old is None or (score, -region) > (old[0], -old[1]):
                per[phrase] = (score, region, prob)
        where = {s: i for i, s in enumerate(self._uniq)}
        self._links: dict[tuple[int, str], list[tuple[int, int, int, float]]] = {}
        for (iid, tid), per in best.items():
            pos = where[iid]
            kept = []
            for phrase in sorted(per):
                score, region, prob = per[phrase]
                r = self.reader.region_position(pos, region)
                if r is not None:
                    kept.append((*spans[(tid, phrase)], r, float(prob)))
            self._links[(pos, tid)] = kept
        self._text_ids = index["text_id"].to_pylist()

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = _split_key(key, len(self))
        pos = int(self._row_image[index])
        return {
            **self.reader.sample(pos),
            "text": self._texts[int(self._row_text[index])].as_py(),
            "links": list(self._links.get((pos, self._text_ids[index]), [])),
            "image_key": int(self.image_keys[index]),
            "text_key": int(self.text_keys[index]),
            "sample_seed": sample_seed(self.seed, epoch, index),
        }


def _pad_stack(rows: list[np.ndarray], width: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
    """Stack ``(n_i, ...)`` arrays into ``(B, width, ...)``, padding with ``fill``."""
    tail = rows[0].shape[1:]
    out = torch.full((len(rows), width, *tail), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(np.asarray(r)).to(dtype)
    return out


class RegionCollator(_MaskedText):
    """Batches of :class:`RegionImageDataset` / :class:`RegionPairDataset` samples (see the module
    docstring for the keys). Sentences are tokenized and MLM-masked exactly as
    :class:`~vlp_core.data.collate.PretrainCollator` does (per-sample generators); the recipes draw region,
    tag and phrase masks from ``sample_seed``.

    Args:
        tokenizer, max_len, mlm_prob, whole_word: as :class:`~vlp_core.data.collate.PretrainCollator`.
        cfg: the tag-sequence limit (``max_tag_tokens``).
        max_target_pieces: wordpieces kept of a class tag or a linked phrase (the targets of region
            classification and p-MRTC).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_len: int = 30,
        mlm_prob: float = 0.15,
        whole_word: bool = False,
        cfg: RegionConfig | None = None,
        max_target_pieces: int = 6,
    ):
        super().__init__(tokenizer, max_len, mlm_prob, whole_word)
        self.cfg = cfg or RegionConfig()
        self.max_pieces = int(max_target_pieces)
        self.cls_id, self.sep_id = int(tokenizer.cls_token_id), int(tokenizer.sep_token_id)
        self._pieces: dict[str, list[int]] = {}

    def pieces(self, word: str) -> list[int]:
        """The wordpiece ids of ``word`` (no specials); cached."""
        if word not in self._pieces:
            self._pieces[word] = list(self.tokenizer(word, add_special_tokens=False)["input_ids"])
        return self._pieces[word]

    def _targets(self, words: list[list[str | None]]) -> torch.Tensor:
        """``(B, N, K)`` wordpieces of each word (None: no target), -1 padded."""
        ids = [[self.pieces(w)[: self.max_pieces] if w else [] for w in row] for row in words]
        n = max(1, max(len(r) for r in ids))
        k = max([1] + [len(p) for r in ids for p in r])
        out = torch.full((len(ids), n, k), -1, dtype=torch.long)
        for i, row in enumerate(ids):
            for j, p in enumerate(row):
                out[i, j, : len(p)] = torch.tensor(p, dtype=torch.long)
        return out

    def _tags(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = []
        for s in samples:
            ids, region, which = [self.cls_id], [-1], [-1]
            for t, (tag, r) in enumerate(s["tags"]):
                p = self.pieces(tag)
                if len(ids) + len(p) + 1 > self.cfg.max_tag_tokens:
                    break
                ids += p
                region += [r] * len(p)
                which += [t] * len(p)
            rows.append((ids + [self.sep_id], region + [-1], which + [-1]))
        width = max(len(r[0]) for r in rows)
        out = {k: torch.full((len(rows), width), v, dtype=torch.long)
               for k, v in (("tag_ids", self.pad_id), ("tag_mask", 0), ("tag_region", -1), ("tag_index", -1))}  # fmt: skip
        for i, (ids, region, which) in enumerate(rows):
            n = len(ids)
            out["tag_ids"][i, :n] = torch.tensor(ids)
            out["tag_mask"][i, :n] = 1
            out["tag_region"][i, :n] = torch.tensor(region)
            out["tag_index"][i, :n] = torch.tensor(which)
        return out

    def _links(self, samples: list[dict[str, Any]], length: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [s["text"] for s in samples], padding="max_length", truncation=True, max_length=length,
            return_offsets_mapping=True, return_tensors="np", return_token_type_ids=False,
        )  # fmt: skip
        offsets = enc["offset_mapping"]  # (B, L, 2); (0, 0) for specials and padding
        n_links = max(1, max(len(s["links"]) for s in samples))
        phrase_link = torch.full((len(samples), length), -1, dtype=torch.long)
        link_region = torch.full((len(samples), n_links), -1, dtype=torch.long)
        link_prob = torch.zeros((len(samples), n_links), dtype=torch.float32)
        phrases: list[list[str | None]] = []
        for i, s in enumerate(samples):
            a, b = offsets[i, :, 0], offsets[i, :, 1]
            row: list[str | None] = []
            for j, (start, end, region, prob) in enumerate(s["links"]):
                inside = (b > a) & (a < end) & (b > start)
                if not inside.any():  # the phrase was cut off by max_len
                    row.append(None)
                    continue
                phrase_link[i, torch.as_tensor(np.flatnonzero(inside))] = j
                link_region[i, j] = region
                link_prob[i, j] = prob
                row.append(s["text"][start:end])
            phrases.append(row + [None] * (n_links - len(row)))
        return {
            "phrase_link": phrase_link,
            "link_region": link_region,
            "link_prob": link_prob,
            "link_ids": self._targets(phrases),
        }

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        feats = [s["region_feats"] for s in samples]
        width = max(len(f) for f in feats)
        region_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for i, f in enumerate(feats):
            region_mask[i, : len(f)] = 1
        batch = {
            "region_feats": _pad_stack(feats, width, 0.0, torch.float32),
            "region_boxes": _pad_stack([s["region_boxes"] for s in samples], width, 0.0, torch.float32),
            "region_mask": region_mask,
            "region_class_ids": self._targets([s["region_class"] for s in samples]),
            **self._tags(samples),
            "image_key": torch.tensor([int(s["image_key"]) for s in samples], dtype=torch.int64),
            "sample_seed": torch.tensor([int(s["sample_seed"]) for s in samples], dtype=torch.int64),
        }
        if "text" in samples[0]:
            text, _ = self._encode(samples)
            batch |= text | self._links(samples, text["input_ids"].shape[1])
            batch["text_key"] = torch.tensor([int(s["text_key"]) for s in samples], dtype=torch.int64)
        if "question" in samples[0]:  # VQA
            enc = _tokenize(self.tokenizer, [s["question"] for s in samples], self.max_len)
            batch |= {
                "input_ids": enc["input_ids"].long(),
                "attention_mask": enc["attention_mask"].long(),
                "answer_scores": torch.stack([s["answer_scores"] for s in samples]).float(),
                "question_id": torch.tensor([int(s["question_id"]) for s in samples], dtype=torch.int64),
            }
        return batch


class RegionVQADataset(Dataset):
    """VQA samples with the image as its corpus regions: ``{**RegionReader.sample, "question",
    "answer_scores", "question_id", "image_key", "sample_seed"}``; batch them with :class:`RegionCollator`
    (questions become ``input_ids`` / ``attention_mask``, ``answer_scores`` and ``question_id`` are stacked).

    ``image_ids``: each record's store id (the content hash of its image file, as ingest computes it).

    Raises:
        KeyError: an image has no regions in the store (ingest the VQA images into the corpus).
    """

    def __init__(
        self,
        store: ShardStore | str | Path,
        records: list[Any],
        image_ids: list[str],
        vocab: Any,
        cfg: RegionConfig | None = None,
        seed: int = 0,
    ):
        self.records, self.vocab, self.seed = records, vocab, int(seed)
        uniq = sorted(set(image_ids))
        where = {s: i for i, s in enumerate(uniq)}
        self._row_image = np.array([where[s] for s in image_ids], np.int64)
        self.image_keys = stable_keys(image_ids)
        self.reader = RegionReader(_as_store(store), uniq, cfg or RegionConfig())

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = _split_key(key, len(self))
        rec = self.records[index]
        return {
            **self.reader.sample(int(self._row_image[index])),
            "question": rec.question,
            "answer_scores": self.vocab.scores(rec),
            "question_id": rec.question_id,
            "image_key": int(self.image_keys[index]),
            "sample_seed": sample_seed(self.seed, epoch, index),
        }


def region_feature_sample(
    store: ShardStore | str | Path, image_ids: Sequence[str], max_images: int = 4096
) -> torch.Tensor:
    """``(N, F)`` float32 features of every stored region of the first ``max_images`` of ``image_ids``
    (sorted, distinct): what the region embedding's standardisation is fitted on. A pure function of the
    store and the ids."""
    ids = sorted(set(image_ids))[:max_images]
    reader = RegionReader(_as_store(store), ids, RegionConfig(max_regions=1 << 15, max_tags=0))
    return torch.from_numpy(np.concatenate([reader.features(i) for i in range(len(ids))]))
