"""Downstream task data from the store: the examples of a task's splits (``task_examples``), their images
(files under the dataset's image root, or the ``task_images`` table for the bundled tasks), the dataset the
fine-tuning tasks sample from and its collator.

Images are resized to the backbone's square input (aspect not kept, as ALBEF evaluates), so a box in pixels
of the original image maps to the input by dividing by the image's width and height: boxes leave the dataset
normalised to [0, 1] (``x1, y1, x2, y2``). Augmentation is a choice of the task (``augment: none | crop``);
``none`` is the default because the labels of counting, existence and referring examples depend on every
object in the image, which a random crop may cut away. Horizontal flips are never applied (left / right in
the text must keep their meaning).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from stores.shards import ShardStore
from vlp_core.data.examples import TaskExample
from vlp_core.data.sampler import sample_seed

__all__ = [
    "STORE_IMAGES",
    "ExampleCollator",
    "ExampleDataset",
    "ExamplePairDataset",
    "LabelVocab",
    "RegionExampleCollator",
    "RegionExampleDataset",
    "TaskImages",
    "dataset_version",
    "read_task_examples",
    "retrieval_groups",
    "task_splits",
]

#: ``image_root`` of examples whose images are rows of the ``task_images`` table.
STORE_IMAGES = "store:task_images"


def _filtered_parts(
    store: ShardStore, table: str, task: str, splits: Sequence[str] | None = None, columns: list[str] | None = None
):
    """The rows of ``task`` (and ``splits``) of a task table, one committed file at a time. The filter is
    pushed into the Parquet reader, so row groups whose statistics exclude the task (every other task's
    shards) are not read."""
    where: list[tuple[str, str, Any]] = [("task", "=", task)]
    if splits is not None:
        where.append(("split", "in", list(splits)))
    for f in store.committed_files(table):
        t = pq.read_table(f, filters=where, columns=columns)
        if t.num_rows:
            yield t


def _filtered(store: ShardStore, table: str, task: str, splits: Sequence[str] | None = None) -> pa.Table:
    parts = list(_filtered_parts(store, table, task, splits))
    return pa.concat_tables(parts) if parts else store.read_table(table).slice(0, 0)


def dataset_version(store: ShardStore, task: str) -> str:
    """A fingerprint of ``task``'s data in the store: a multiset hash of its examples (each row, every
    column) and of its stored images (name and bytes): the sum of the rows' 128-bit digests, so it depends
    on the content only, not on row order, shard boundaries or how the data was built. A rebuild that gives
    the same rows (the bundled tasks are deterministic) keeps it; any changed, added or removed example or
    image changes it. Streams one file at a time (memory: one shard). Images in folders outside the store
    are named (the ``image_root`` column) but not read.

    Raises:
        ValueError: when the store has no examples of ``task``.
    """
    import hashlib
    import json

    def digest(data: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "big")

    n_rows = n_images = rows_sum = images_sum = 0
    for part in _filtered_parts(store, "task_examples", task):
        for row in part.to_pylist():
            rows_sum += digest(json.dumps(row, sort_keys=True, default=str).encode())
            n_rows += 1
    if not n_rows:
        raise ValueError(
            f"task {task!r} has no examples in the store {store.root}: build the bundled tasks (prefect "
            "deployment run build-tasks/bundled, or vlp build-tasks) or import the dataset (vlp "
            "import-task ...)"
        )
    for part in _filtered_parts(store, "task_images", task, columns=["image", "png"]):
        for name, png in zip(part["image"].to_pylist(), part["png"].to_pylist(), strict=True):
            images_sum += digest(name.encode() + b"\0" + hashlib.blake2b(png, digest_size=16).digest())
            n_images += 1
    mod = 1 << 128
    return hashlib.blake2b(
        f"{n_rows}:{rows_sum % mod:x}:{n_images}:{images_sum % mod:x}".encode(), digest_size=16
    ).hexdigest()


def task_splits(store: ShardStore, task: str) -> dict[str, int]:
    """``{split: examples}`` of a task in the store (empty when the task is not there)."""
    counts: dict[str, int] = {}
    for part in _filtered_parts(store, "task_examples", task, columns=["split"]):
        for s in part["split"].to_pylist():
            counts[s] = counts.get(s, 0) + 1
    return dict(sorted(counts.items()))


def read_task_examples(
    store: ShardStore, task: str, splits: Sequence[str]
) -> tuple[list[TaskExample], list[str]]:
    """The examples of ``task``'s ``splits`` (ordered by split as given, then example id) and each one's
    image root.

    Raises:
        ValueError: when the task or a split has no examples, naming what the store has.
    """
    table = _filtered(store, "task_examples", task, splits)
    rows = table.to_pylist()
    order = {s: i for i, s in enumerate(splits)}
    rows.sort(key=lambda r: (order[r["split"]], r["example_id"]))
    have = {r["split"] for r in rows}
    missing = [s for s in splits if s not in have]
    if missing:
        known = task_splits(store, task)
        hint = (
            f"it has the splits {known}"
            if known
            else "build the bundled tasks (prefect deployment run build-tasks/bundled, or vlp build-tasks) "
            "or import the dataset (vlp import-task ...)"
        )
        raise ValueError(f"task {task!r} has no {missing} examples in the store {store.root}: {hint}")
    return [TaskExample.from_row(r) for r in rows], [r["image_root"] for r in rows]


class TaskImages:
    """Opens the images of task examples: ``(root, name)`` → PIL RGB. Roots are folders, or
    :data:`STORE_IMAGES` for the bundled tasks' images, which are read from the ``task_images`` table of
    ``task`` once per process (a few MB) when first needed."""

    def __init__(self, store: ShardStore, task: str):
        self.store, self.task = store, task
        self._stored: dict[str, bytes] | None = None
        self._ids: dict[tuple[str, str], str] = {}

    def _load_stored(self) -> dict[str, bytes]:
        if self._stored is None:
            t = _filtered(self.store, "task_images", self.task)
            self._stored = dict(zip(t["image"].to_pylist(), t["png"].to_pylist(), strict=True))
        return self._stored

    def data(self, root: str, name: str) -> bytes:
        """The image's file bytes (PNG for the bundled tasks)."""
        if root == STORE_IMAGES:
            data = self._load_stored().get(name)
            if data is None:
                raise KeyError(f"task {self.task!r}: image {name!r} is not in the task_images table")
            return data
        return (Path(name) if Path(name).is_absolute() else Path(root) / name).read_bytes()

    def image_id(self, root: str, name: str) -> str:
        """The image's store id: the content hash of its bytes, as ingest computes it (its regions are
        found by it); hashed once per image and instance (the training set and every evaluation split
        ask)."""
        from vlp_core.corpus.ingest import content_id

        key = (root, name)
        if key not in self._ids:
            self._ids[key] = content_id(self.data(root, name))
        return self._ids[key]

    def __call__(self, root: str, name: str):
        from PIL import Image

        if root == STORE_IMAGES:
            src: Any = io.BytesIO(self.data(root, name))
        else:
            src = Path(name) if Path(name).is_absolute() else Path(root) / name
        with Image.open(src) as im:
            return im.convert("RGB")

    def size(self, root: str, name: str) -> tuple[int, int]:
        """``(width, height)`` of an image (header only for files)."""
        from PIL import Image

        if root == STORE_IMAGES:
            with Image.open(io.BytesIO(self._load_stored()[name])) as im:
                return im.size
        with Image.open(Path(root) / name) as im:
            return im.size

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stored": None}  # each DataLoader worker reads its own copy


class LabelVocab:
    """Class labels in class order: a fixed label set (NLVR2, SNLI-VE) or, for answers, the most frequent
    training answers (GQA), ties broken alphabetically. Labels outside it map to -1 (scored wrong)."""

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self._index = {a: i for i, a in enumerate(self.labels)}
        if len(self._index) != len(self.labels):
            raise ValueError("duplicate labels")

    @classmethod
    def from_answers(cls, answers: Sequence[str], top_k: int) -> LabelVocab:
        counts: dict[str, int] = {}
        for a in answers:
            counts[a] = counts.get(a, 0) + 1
        return cls(sorted(counts, key=lambda a: (-counts[a], a))[:top_k])

    def __len__(self) -> int:
        return len(self.labels)

    def index(self, label: str | None) -> int:
        return self._index.get(label, -1) if label is not None else -1

    def coverage(self, labels: Sequence[str | None]) -> float:
        """Fraction of labelled examples whose label is in the vocabulary (the accuracy ceiling)."""
        known = [x for x in labels if x is not None]
        return sum(x in self._index for x in known) / max(1, len(known))


class ExampleDataset(Dataset):
    """Map-style samples of task examples, keyed by the sampler's ``(epoch, index)`` (or a plain index).

    Returns ``{"pixel_values": (n_images, 3, S, S) float32, "text": str, "label": int (-1 when unknown),
    "boxes": (K, 4) float32 normalised to [0, 1], "target": int (-1 when none), "index": int,
    "sample_seed": int}``; ``transform`` runs under the per-sample seed (as in
    :class:`~vlp_core.data.pairs.PairDataset`), each image of a pair with its own seed.

    ``blind``: ``"text"`` replaces every image by a uniform grey one of the same size (only the text
    informs the model), ``"image"`` every text by the empty string (only the image does); the
    single-modality baselines that show a task needs both.
    """

    def __init__(
        self,
        examples: list[TaskExample],
        roots: list[str],
        images: TaskImages,
        transform: Callable[[Any], torch.Tensor],
        labels: LabelVocab | None = None,
        seed: int = 0,
        blind: str = "none",
    ):
        if blind not in ("none", "text", "image"):
            raise ValueError(f"blind must be none, text or image, got {blind!r}")
        self.blind = blind
        if len(examples) != len(roots):
            raise ValueError(f"{len(examples)} examples but {len(roots)} image roots")
        self.examples, self.roots = examples, roots
        self.images, self.transform, self.labels = images, transform, labels
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        from PIL import Image

        epoch, index = key if isinstance(key, tuple) else (0, key)
        ex, root = self.examples[int(index)], self.roots[int(index)]
        seed = sample_seed(self.seed, epoch, int(index))
        pixels, size = [], None
        for j, name in enumerate(ex.images):
            try:
                image = self.images(root, name)
            except Exception as exc:
                raise RuntimeError(f"{ex.task} {ex.split} {ex.example_id}: image {name!r}: {exc}") from exc
            size = size or image.size
            if self.blind == "text":
                image = Image.new("RGB", image.size, (128, 128, 128))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 7919 * j)
                pixels.append(self.transform(image))
        boxes = torch.zeros((len(ex.boxes), 4), dtype=torch.float32)
        if ex.boxes:
            w, h = size
            boxes = torch.tensor(ex.boxes, dtype=torch.float32) / torch.tensor([w, h, w, h])
            boxes = boxes.clamp_(0.0, 1.0)
        return {
            "pixel_values": torch.stack(pixels),
            "text": "" if self.blind == "image" else ex.text,
            "label": self.labels.index(ex.label) if self.labels is not None else -1,
            "boxes": boxes,
            "target": -1 if ex.target is None else int(ex.target),
            "index": int(index),
            "sample_seed": seed,
        }


class ExampleCollator:
    """Tokenise the texts (truncated to ``max_len``), stack the images (``pixel_values`` ``(B, 3, S, S)`` for
    one image per example, ``(B, n, 3, S, S)`` for more), labels ``(B,)``, and pad the candidate boxes to
    ``boxes (B, K, 4)`` with ``box_mask (B, K)``."""

    def __init__(self, tokenizer: Any, max_len: int = 30):
        self.tokenizer, self.max_len = tokenizer, int(max_len)

    def text_and_targets(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Everything but the images: ``input_ids``, ``attention_mask``, ``labels``, ``boxes``,
        ``box_mask``, ``target``, ``index``, ``sample_seed``."""
        enc = self.tokenizer(
            [s["text"] for s in samples],
            padding="longest",
            truncation=True,
            max_length=self.max_len,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        k = max((len(s["boxes"]) for s in samples), default=0)
        boxes = torch.zeros((len(samples), k, 4), dtype=torch.float32)
        box_mask = torch.zeros((len(samples), k), dtype=torch.bool)
        for i, s in enumerate(samples):
            n = len(s["boxes"])
            boxes[i, :n], box_mask[i, :n] = s["boxes"], True
        return {
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "boxes": boxes,
            "box_mask": box_mask,
            "target": torch.tensor([s["target"] for s in samples], dtype=torch.int64),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            "sample_seed": torch.tensor([s["sample_seed"] for s in samples], dtype=torch.int64),
        }

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([s["pixel_values"] for s in samples]).float()
        if pixels.shape[1] == 1:
            pixels = pixels[:, 0]
        return {"pixel_values": pixels, **self.text_and_targets(samples)}


class RegionExampleDataset(Dataset):
    """Task examples with their images as stored regions, for region backbones: the samples of
    :class:`ExampleDataset` with, instead of ``pixel_values``, ``regions``: one
    :meth:`~vlp_core.data.regions.RegionReader.sample` per image, and ``cand_regions`` ``(K,)``: where each
    candidate box is among the first image's regions (the task-regions stage stores a referring task's
    candidates as annotated regions; matched by their normalised corners).

    ``cfg`` (a :class:`~vlp_core.data.regions.RegionConfig`) keeps at least every candidate.
    ``blind``: ``"text"`` keeps the whole-image region and the candidates with zero features (the text
    and, for referring tasks, the candidates' geometry, as grey pixels leave the pixel models); ``"image"``
    empties the texts.

    Raises:
        ValueError: an image has no regions (the task-regions stage has not covered the task), or a
            candidate box is not one of its image's regions.
    """

    def __init__(
        self,
        store: ShardStore,
        examples: list[TaskExample],
        roots: list[str],
        images: TaskImages,
        cfg: Any,
        labels: LabelVocab | None = None,
        seed: int = 0,
        blind: str = "none",
    ):
        from dataclasses import replace

        from vlp_core.data.regions import RegionReader

        most = max((len(e.boxes) for e in examples), default=0)
        cfg = replace(cfg, max_regions=max(cfg.max_regions, 1 + most))  # every candidate is kept
        if blind not in ("none", "text", "image"):
            raise ValueError(f"blind must be none, text or image, got {blind!r}")
        self.examples, self.labels, self.seed, self.blind = examples, labels, int(seed), blind
        ids: dict[tuple[str, str], str] = {}
        for ex, root in zip(examples, roots, strict=True):
            for name in ex.images:
                if (root, name) not in ids:
                    ids[(root, name)] = images.image_id(root, name)
        self.image_ids = sorted(set(ids.values()))
        where = {s: i for i, s in enumerate(self.image_ids)}
        self._pos = [[where[ids[(r, n)]] for n in ex.images] for ex, r in zip(examples, roots, strict=True)]
        try:
            task = examples[0].task if examples else None
            self.reader = RegionReader(store, self.image_ids, cfg, prefer_source=task)
        except KeyError as exc:
            raise ValueError(
                f"task {task!r}: its images have no regions in the store ({exc}); make them with prefect "
                "deployment run task-regions/regions (or build-tasks with regions=true)"
            ) from None
        self._cands: list[list[int]] = []
        self._boxes: list[torch.Tensor] = []  # the candidates, normalised as ExampleDataset has them
        for ex, root, pos in zip(examples, roots, self._pos, strict=True):
            if not ex.boxes:
                self._cands.append([])
                self._boxes.append(torch.zeros((0, 4), dtype=torch.float32))
                continue
            w, h = images.size(root, ex.images[0])
            boxes = (torch.tensor(ex.boxes, dtype=torch.float32) / torch.tensor([w, h, w, h])).clamp_(0, 1)
            self._boxes.append(boxes)
            self._cands.append(self._candidates(ex, pos[0], boxes.numpy()))

    def _candidates(self, ex: TaskExample, pos: int, boxes: np.ndarray) -> list[int]:
        labels, stored5 = self.reader.kept_regions(pos)
        stored = stored5[:, :4]
        out = []
        for b, want in zip(ex.boxes, boxes, strict=True):
            close = np.abs(stored - want).max(axis=1) < 2e-3
            hit = [i for i, lab in enumerate(labels) if lab == "candidate" and close[i]]
            if not hit:
                raise ValueError(
                    f"{ex.task} {ex.split} {ex.example_id}: candidate box {b} is not among its image's "
                    f"{len(stored)} kept regions: rebuild the task regions, or raise task.regions.max_regions"
                )
            out.append(hit[0])
        return out

    def __len__(self) -> int:
        return len(self.examples)

    def _regions(self, pos: int, cands: list[int]) -> dict[str, Any]:
        s = self.reader.sample(pos)
        if self.blind != "text":
            return s
        keep = [0, *cands]
        return {
            "region_feats": np.zeros((len(keep), s["region_feats"].shape[1]), np.float32),
            "region_boxes": s["region_boxes"][keep],
            "region_class": [None] * len(keep),  # nothing of the image, not even its tags
            "tags": [],
        }

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        ex, index = self.examples[int(index)], int(index)
        cands = self._cands[index]
        regions = [self._regions(p, cands if j == 0 else []) for j, p in enumerate(self._pos[index])]
        if self.blind == "text":
            cands = list(range(1, len(cands) + 1))  # the kept candidates follow the whole image
        return {
            "regions": regions,
            "text": "" if self.blind == "image" else ex.text,
            "label": self.labels.index(ex.label) if self.labels is not None else -1,
            "boxes": self._boxes[index],
            "cand_regions": torch.tensor(cands, dtype=torch.int64),
            "target": -1 if ex.target is None else int(ex.target),
            "index": index,
            "sample_seed": sample_seed(self.seed, epoch, index),
        }


class RegionExampleCollator(ExampleCollator):
    """:class:`ExampleCollator` for :class:`RegionExampleDataset`: the regions padded to the batch's most,
    ``region_feats`` ``(B, R, F)`` / ``region_boxes`` ``(B, R, 5)`` / ``region_mask`` ``(B, R)`` for one
    image per example, ``(B, n, R, ...)`` for more; ``cand_regions`` ``(B, K)``, -1 padded."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = len(samples[0]["regions"])
        r = max(len(g["region_feats"]) for s in samples for g in s["regions"])
        f = samples[0]["regions"][0]["region_feats"].shape[1]
        feats = torch.zeros((len(samples), n, r, f), dtype=torch.float32)
        boxes5 = torch.zeros((len(samples), n, r, 5), dtype=torch.float32)
        mask = torch.zeros((len(samples), n, r), dtype=torch.long)
        for i, s in enumerate(samples):
            for j, g in enumerate(s["regions"]):
                k = len(g["region_feats"])
                feats[i, j, :k] = torch.from_numpy(np.asarray(g["region_feats"], np.float32))
                boxes5[i, j, :k] = torch.from_numpy(np.asarray(g["region_boxes"], np.float32))
                mask[i, j, :k] = 1
        if n == 1:
            feats, boxes5, mask = feats[:, 0], boxes5[:, 0], mask[:, 0]
        k = max((len(s["cand_regions"]) for s in samples), default=0)
        cands = torch.full((len(samples), k), -1, dtype=torch.int64)
        for i, s in enumerate(samples):
            cands[i, : len(s["cand_regions"])] = s["cand_regions"]
        regions = {"region_feats": feats, "region_boxes": boxes5, "region_mask": mask, "cand_regions": cands}
        return {**self.text_and_targets(samples), **regions}


class ExamplePairDataset(Dataset):
    """Captions of a retrieval task as pre-training-shaped pairs (what :class:`~vlp_core.data.PretrainCollator`
    takes): ``{"pixel_values": (3, S, S), "text", "image_key": the caption's image (group) number,
    "text_key": the example's number, "sample_seed"}``. Captions of one image share its ``image_key``, so
    contrastive losses treat them as positives of each other (ALBEF's ``idx``). Over a
    :class:`RegionExampleDataset` the image is its regions instead (what
    :class:`~vlp_core.data.regions.RegionCollator` takes: the region sample, no phrase links)."""

    def __init__(self, examples: ExampleDataset | RegionExampleDataset):
        self.examples = examples
        groups = sorted({e.group or e.images[0] for e in examples.examples})
        index = {g: i for i, g in enumerate(groups)}
        self.image_keys = [index[e.group or e.images[0]] for e in examples.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        s = self.examples[key]
        image = {"pixel_values": s["pixel_values"][0]} if "pixel_values" in s else {**s["regions"][0], "links": []}
        return {
            **image,
            "text": s["text"],
            "image_key": self.image_keys[s["index"]],
            "text_key": s["index"],
            "sample_seed": s["sample_seed"],
        }


def retrieval_groups(examples: list[TaskExample]) -> tuple[list[int], list[int]]:
    """The retrieval set of caption examples: ``(image number of each caption, the first caption of each
    image)``; images are the captions' groups in order of first appearance."""
    number: dict[str, int] = {}
    first: list[int] = []
    image_of = []
    for i, e in enumerate(examples):
        g = e.group or e.images[0]
        if g not in number:
            number[g] = len(first)
            first.append(i)
        image_of.append(number[g])
    return image_of, first
