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

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from stores.shards import ShardStore, stable_hash
from vlp_core.data.examples import TaskExample
from vlp_core.data.sampler import sample_seed

__all__ = [
    "STORE_IMAGES",
    "ExampleCollator",
    "ExampleDataset",
    "ExamplePairDataset",
    "LabelVocab",
    "TaskImages",
    "dataset_version",
    "read_task_examples",
    "retrieval_groups",
    "task_splits",
]

#: ``image_root`` of examples whose images are rows of the ``task_images`` table.
STORE_IMAGES = "store:task_images"


def _filtered(store: ShardStore, table: str, task: str, splits: Sequence[str] | None = None) -> pa.Table:
    parts = []
    for f in store.committed_files(table):
        t = pq.read_table(f)
        mask = pc.equal(t["task"], task)
        if splits is not None:
            mask = pc.and_(mask, pc.is_in(t["split"], pa.array(list(splits), pa.string())))
        t = t.filter(mask)
        if t.num_rows:
            parts.append(t)
    return pa.concat_tables(parts) if parts else store.read_table(table).slice(0, 0)


def dataset_version(store: ShardStore, task: str) -> str:
    """A fingerprint of ``task``'s examples in the store: the hash of the committed shards that hold them. A
    shard's name hashes its stage, source, signature (parameters and generator / reader code) and units
    (input file sizes and times for imports), so a rebuilt or re-imported dataset gets a new version and an
    unchanged one keeps it. Images in folders outside the store are not part of it.

    Raises:
        ValueError: when the store has no examples of ``task``.
    """
    files = []
    for f in store.committed_files("task_examples"):
        t = pq.read_table(f, columns=["task"])
        if pc.any(pc.equal(t["task"], task)).as_py():
            files.append(f.relative_to(store.root).as_posix())
    if not files:
        raise ValueError(
            f"task {task!r} has no examples in the store {store.root}: build the bundled tasks (prefect "
            "deployment run build-tasks/bundled, or vlp build-tasks) or import the dataset (vlp import-task ...)"
        )
    return stable_hash(files)


def task_splits(store: ShardStore, task: str) -> dict[str, int]:
    """``{split: examples}`` of a task in the store (empty when the task is not there)."""
    counts: dict[str, int] = {}
    for f in store.committed_files("task_examples"):
        t = pq.read_table(f, columns=["task", "split"])
        for s in t.filter(pc.equal(t["task"], task))["split"].to_pylist():
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

    def _load_stored(self) -> dict[str, bytes]:
        if self._stored is None:
            t = _filtered(self.store, "task_images", self.task)
            self._stored = dict(zip(t["image"].to_pylist(), t["png"].to_pylist(), strict=True))
        return self._stored

    def __call__(self, root: str, name: str):
        from PIL import Image

        if root == STORE_IMAGES:
            data = self._load_stored().get(name)
            if data is None:
                raise KeyError(f"task {self.task!r}: image {name!r} is not in the task_images table")
            src: Any = io.BytesIO(data)
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

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [s["text"] for s in samples],
            padding="longest",
            truncation=True,
            max_length=self.max_len,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        pixels = torch.stack([s["pixel_values"] for s in samples]).float()
        if pixels.shape[1] == 1:
            pixels = pixels[:, 0]
        k = max((len(s["boxes"]) for s in samples), default=0)
        boxes = torch.zeros((len(samples), k, 4), dtype=torch.float32)
        box_mask = torch.zeros((len(samples), k), dtype=torch.bool)
        for i, s in enumerate(samples):
            n = len(s["boxes"])
            boxes[i, :n], box_mask[i, :n] = s["boxes"], True
        return {
            "pixel_values": pixels,
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
            "boxes": boxes,
            "box_mask": box_mask,
            "target": torch.tensor([s["target"] for s in samples], dtype=torch.int64),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
            "sample_seed": torch.tensor([s["sample_seed"] for s in samples], dtype=torch.int64),
        }


class ExamplePairDataset(Dataset):
    """Captions of a retrieval task as pre-training-shaped pairs (what :class:`~vlp_core.data.PretrainCollator`
    takes): ``{"pixel_values": (3, S, S), "text", "image_key": the caption's image (group) number,
    "text_key": the example's number, "sample_seed"}``. Captions of one image share its ``image_key``, so
    contrastive losses treat them as positives of each other (ALBEF's ``idx``)."""

    def __init__(self, examples: ExampleDataset):
        self.examples = examples
        groups = sorted({e.group or e.images[0] for e in examples.examples})
        index = {g: i for i, g in enumerate(groups)}
        self.image_keys = [index[e.group or e.images[0]] for e in examples.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        s = self.examples[key]
        return {
            "pixel_values": s["pixel_values"][0],
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
