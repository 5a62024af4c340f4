"""Downstream task examples in one shape, whatever the dataset: what the readers of the real formats
(:mod:`vlp_core.data.formats`) and the bundled scene tasks (:mod:`vlp_core.data.scenes`) produce, what the
``task_examples`` table stores and what the fine-tuning tasks read.

One :class:`TaskExample` is one scored unit:

========================  ==============================================================================
dataset shape             fields used
========================  ==============================================================================
image pair + statement    ``images`` (left, right), ``text``, ``label`` ``"true"`` / ``"false"`` (NLVR2)
image + hypothesis        ``images`` (premise), ``text``, ``label`` ``entailment`` / ``neutral`` /
                          ``contradiction`` (SNLI-VE)
referring expression      ``images`` (one), ``text``, ``boxes`` (candidates), ``target`` (RefCOCO+)
question                  ``images`` (one), ``text``, ``label`` = the answer (GQA)
caption                   ``images`` (one), ``text``, ``group`` = the image's key (Karpathy retrieval)
========================  ==============================================================================

A bad input record never stops a reader: it becomes a :class:`TaskReject` (source, the record's id, a short
machine-readable ``reason`` and a human ``detail``), stored as a row of the ``rejects`` table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENTAILMENT_LABELS", "NLVR2_LABELS", "ReadResult", "TaskExample", "TaskReject"]

#: the label set of the NLVR2-shaped tasks, in class order.
NLVR2_LABELS = ("false", "true")
#: the label set of the SNLI-VE-shaped tasks, in class order.
ENTAILMENT_LABELS = ("contradiction", "neutral", "entailment")


@dataclass(frozen=True)
class TaskExample:
    """One example of a downstream task.

    Attributes:
        task: the dataset's name (``nlvr2``, ``snli-ve``, ``refcoco+``, ``gqa``, ``coco-karpathy``,
            ``flickr30k-karpathy``, or a bundled task's name).
        split: the dataset's own split name (``train``, ``dev``, ``test1``, ``val``, ``testA``, ...).
        example_id: the dataset's id of the example, unique within (task, split).
        images: image references, each a path relative to the dataset's image root (absolute paths are
            kept as they are). NLVR2 has two (left, right); every other shape one.
        text: the statement, hypothesis, expression, question or caption.
        label: the class label or answer (``None`` where the shape has none, or the split is unlabelled).
        boxes: candidate boxes (pixels ``x1, y1, x2, y2`` in ``images[0]``), referring expressions only.
        target: the index of the referred box in ``boxes``.
        group: what examples share: the image key of a caption (retrieval), the ref id of an expression.
        meta: anything else the dataset says, as strings (question types, categories, image size, ...).
    """

    task: str
    split: str
    example_id: str
    images: tuple[str, ...]
    text: str
    label: str | None = None
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    target: int | None = None
    group: str | None = None
    meta: dict[str, str] = field(default_factory=dict, hash=False, compare=True)

    def row(self) -> dict[str, Any]:
        """The example as a ``task_examples`` row (``meta`` as sorted JSON)."""
        return {
            "task": self.task,
            "split": self.split,
            "example_id": self.example_id,
            "images": list(self.images),
            "text": self.text,
            "label": self.label,
            "boxes": [list(b) for b in self.boxes],
            "target": self.target,
            "group": self.group,
            "meta": json.dumps(self.meta, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TaskExample:
        return cls(
            task=row["task"],
            split=row["split"],
            example_id=row["example_id"],
            images=tuple(row["images"]),
            text=row["text"],
            label=row.get("label"),
            boxes=tuple(tuple(float(x) for x in b) for b in (row.get("boxes") or ())),
            target=row.get("target"),
            group=row.get("group"),
            meta=json.loads(row.get("meta") or "{}"),
        )


@dataclass(frozen=True)
class TaskReject:
    """A record a reader could not use: ``reason`` is a short key (``missing_field``, ``bad_label``,
    ``bad_json``, ``bad_box``, ...), ``detail`` says what was wrong in words."""

    source: str
    input_id: str
    reason: str
    detail: str


@dataclass
class ReadResult:
    """What a reader returns: the good examples (in file order) and the rejects."""

    examples: list[TaskExample] = field(default_factory=list)
    rejects: list[TaskReject] = field(default_factory=list)

    def reject(self, source: str, input_id: Any, reason: str, detail: str) -> None:
        self.rejects.append(TaskReject(source, str(input_id), reason, detail))
