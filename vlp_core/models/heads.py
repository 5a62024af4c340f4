"""Task heads over any backbone: answer classification (VQA), classification over one or several images
(SNLI-VE, GQA, NLVR2) and candidate-box scoring (referring expressions).

VQA as answer classification over the fused vector (the UNITER / ALBEF-classifier formulation): ALBEF's
paper generates answers with a decoder; classification over a fixed answer vocabulary with soft VQA scores is
the common, cheaper alternative (UNITER, VisualBERT, LXMERT) and what this head does, on any backbone
(:meth:`Backbone.fuse`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.backbones import Backbone, OnBackbone, RegionInputs
from vlp_core.models.outputs import ModelOutput

__all__ = [
    "AnswerClassifier",
    "BoxScorer",
    "FusedClassifier",
    "accuracy",
    "box_iou",
    "mlp_head",
    "pool_cells",
    "ref_accuracy",
    "ref_hits",
    "vqa_loss",
    "vqa_score",
]


def vqa_loss(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits against soft scores, summed over answers and averaged over the batch.

    ``sum_a BCE(logits[b, a], scores[b, a])`` averaged over ``b``: UNITER's ``bce(reduction="none").mean() *
    num_answers``. A mean over answers as well would shrink the loss (and its gradient) by ~3,000 for the
    usual vocabulary. Rows of all-zero scores (answer outside the vocabulary) still count as negatives.

    Args:
        logits: ``(B, A)``.
        scores: ``(B, A)`` soft scores in [0, 1] (``min(count / 3, 1)``).
    """
    bce = F.binary_cross_entropy_with_logits(logits, scores.to(logits.dtype), reduction="sum")
    return bce / logits.shape[0]


def vqa_score(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Mean soft score of the top answer (the VQA accuracy of the batch, over answers in the vocabulary)."""
    return scores.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()


def mlp_head(width: int, out: int, hidden: int | None = None, dropout: float = 0.0) -> nn.Sequential:
    """UNITER's head: ``Linear(width, h) -> GELU -> LayerNorm -> Dropout -> Linear(h, out)``, h = 2 width."""
    hidden = hidden or 2 * width
    head = nn.Sequential(
        nn.Linear(width, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12), nn.Dropout(dropout),
        nn.Linear(hidden, out),
    )  # fmt: skip
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


class AnswerClassifier(OnBackbone, nn.Module):
    """Answer classifier: image + question fused by ``backbone``, MLP head on the fused vector, soft BCE.

    The backbone's modules are shared, not copied: fine-tuning trains them in place.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_answers: int,
        *,
        head_hidden: int | None = None,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_answers < 1:
            raise ValueError(f"num_answers must be positive, got {num_answers}")
        self.backbone = backbone
        self.head = mlp_head(backbone.width, num_answers, head_hidden, head_dropout)
        self.num_answers = num_answers

    def logits(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Images (``(B, 3, S, S)`` pixels or regions), question ``(B, L)`` ids and mask -> ``(B, A)``
        answer logits."""
        return self.head(self.backbone.fuse(pixel_values, input_ids, attention_mask).pooled)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        step: int = 0,
        steps_per_epoch: int = 1,
        kind: str = "pair",
        stage: str | None = None,
    ) -> ModelOutput:
        """Loss :func:`vqa_loss` on ``batch["answer_scores"]`` (B, A); metrics ``loss_vqa``, ``vqa_score``."""
        logits = self.logits(self.image_batch(batch), batch["input_ids"], batch["attention_mask"])
        scores = batch["answer_scores"]
        loss = vqa_loss(logits, scores)
        metrics = {"loss_vqa": loss.detach(), "vqa_score": vqa_score(logits.detach(), scores)}
        return ModelOutput(loss=loss, metrics=metrics, logits=logits)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose arg-max is the label; rows labelled -1 (unknown label) count as wrong."""
    return (logits.argmax(dim=-1) == labels).float().mean()


class FusedClassifier(OnBackbone, nn.Module):
    """Classification on the fused image-text vector of any backbone, over one image or several.

    With one image per example (SNLI-VE, GQA as answer classification) the head reads
    ``backbone.fuse(image, text).pooled``. With ``n_images`` > 1 (NLVR2: left and right) the text is fused
    with each image in its own pass and the pooled vectors are concatenated before the head, the
    formulation of UNITER's and ALBEF's NLVR2 classifiers without their extra cross-image layers (ALBEF adds
    a second cross-attention per fusion layer pre-trained for it; this head adds nothing to the backbone, so
    every backbone fine-tunes the same way). Loss: cross-entropy, rows labelled -1 ignored.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        n_images: int = 1,
        head_hidden: int | None = None,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2 or n_images < 1:
            raise ValueError(f"need >= 2 classes and >= 1 image, got {num_classes}, {n_images}")
        self.backbone, self.num_classes, self.n_images = backbone, num_classes, n_images
        width = backbone.width * n_images
        self.head = mlp_head(width, num_classes, head_hidden or 2 * backbone.width, head_dropout)

    def logits(
        self, pixel_values: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B, 3, S, S)`` (one image) or ``(B, n, 3, S, S)`` pixels, or regions shaped alike (``(B, R, F)``
        / ``(B, n, R, F)`` features, see :class:`~vlp_core.models.backbones.region_stream.RegionInputs`),
        text ``(B, L)`` -> ``(B, C)``."""
        return self.head(self.pooled(pixel_values, input_ids, attention_mask))

    def pooled(
        self, pixel_values: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """What the head reads: the fused pooled vector, or one per image concatenated ``(B, n * width)``."""
        if self.n_images == 1:
            return self.backbone.fuse(pixel_values, input_ids, attention_mask).pooled
        per_example = (pixel_values.feats if isinstance(pixel_values, RegionInputs) else pixel_values).shape[
            1
        ]
        if per_example != self.n_images:
            raise ValueError(f"expected {self.n_images} images per example, got {per_example}")
        pooled = [
            self.backbone.fuse(pixel_values[:, j], input_ids, attention_mask).pooled
            for j in range(self.n_images)
        ]
        return torch.cat(pooled, dim=-1)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        step: int = 0,
        steps_per_epoch: int = 1,
        kind: str = "pair",
        stage: str | None = None,
    ) -> ModelOutput:
        logits = self.logits(self.image_batch(batch), batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels, ignore_index=-1)
        metrics = {"loss_cls": loss.detach(), "accuracy": accuracy(logits.detach(), labels)}
        return ModelOutput(loss=loss, metrics=metrics, logits=logits)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of boxes ``(..., 4)`` ``x1, y1, x2, y2`` (any common scale)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1) + (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area - inter).clamp(min=1e-9)


def pool_cells(cells: torch.Tensor, boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Candidate-box pooling over a grid of image tokens: the mean of the cells whose centre lies inside
    each box, or the cell nearest the box centre when none does (a box smaller than a cell).

    Args:
        cells: ``(B, R*C, D)`` grid tokens in row-major order.
        boxes: ``(B, K, 4)`` normalised ``x1, y1, x2, y2``.
        grid: ``(R, C)``.
    Returns:
        ``(B, K, D)``.
    """
    rows, cols = grid
    if cells.shape[1] != rows * cols:
        raise ValueError(f"{cells.shape[1]} image tokens do not form a {rows}x{cols} grid")
    ys = (torch.arange(rows, device=cells.device, dtype=boxes.dtype) + 0.5) / rows
    xs = (torch.arange(cols, device=cells.device, dtype=boxes.dtype) + 0.5) / cols
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = cx.reshape(1, 1, -1), cy.reshape(1, 1, -1)
    x1, y1, x2, y2 = (boxes[..., i : i + 1] for i in range(4))
    inside = (cx >= x1) & (cx <= x2) & (cy >= y1) & (cy <= y2)  # (B, K, N)
    dist = (cx - (x1 + x2) / 2) ** 2 + (cy - (y1 + y2) / 2) ** 2
    nearest = F.one_hot(dist.argmin(-1), rows * cols).bool()
    weights = torch.where(inside.any(-1, keepdim=True), inside, nearest).to(cells.dtype)
    weights = weights / weights.sum(-1, keepdim=True)
    return weights @ cells


class BoxScorer(OnBackbone, nn.Module):
    """Referring expressions: score every candidate box for the expression; the highest wins.

    Candidate features on a grid backbone come from **candidate-box pooling** over its image tokens
    (:func:`pool_cells`): the fused image states where the backbone's fusion produces them (single-stream
    VLMo and FLAVA: already conditioned on the expression), else the image encoder's tokens (ALBEF's
    cross-attention fusion outputs text states only). A region backbone scores the candidates as regions
    of their own (the task-regions stage adds them to the image's regions; ``cand_regions`` says which):
    the candidate's fused region state, as UNITER and VisualBERT do on RefCOCO+. Each candidate ``r`` (plus
    an embedding of its box ``x1, y1, x2, y2, area``) is projected to the fused width and scored with the
    fused vector ``q`` by an MLP over ``[r, q, r * q]``. Loss: cross-entropy over the candidates; a
    prediction is correct when its box has IoU > 0.5 with the target's (the RefCOCO protocol).
    """

    def __init__(self, backbone: Backbone, *, head_hidden: int | None = None, head_dropout: float = 0.0):
        super().__init__()
        self.regions = backbone.image_input_kind == "regions"
        if not self.regions and backbone.image_grid is None:
            raise ValueError(
                f"{type(backbone).__name__}: candidate-box pooling needs a grid of image tokens, or regions"
            )
        self.backbone = backbone
        width = backbone.width
        self.fused_image = backbone.fused_image_states or self.regions
        cell_width = width if self.fused_image else backbone.image_width
        self.cell_proj = nn.Linear(cell_width, width)
        self.box_proj = nn.Linear(5, width)
        self.head = mlp_head(3 * width, 1, head_hidden or 2 * width, head_dropout)

    def scores(
        self,
        pixel_values: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        boxes: torch.Tensor,
        box_mask: torch.Tensor,
        cand_regions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(B, K)`` candidate scores (padding candidates at -inf); ``cand_regions`` ``(B, K)``: each
        candidate's region position (region backbones)."""
        if self.regions:
            if cand_regions is None:
                raise ValueError("a region backbone scores candidate regions: the batch needs cand_regions")
            pair = self.backbone.fuse(pixel_values, input_ids, attention_mask)
            states = pair.image
            idx = cand_regions.clamp(min=0).unsqueeze(-1).expand(-1, -1, states.shape[-1])
            feats = states.gather(1, idx)
        else:
            image = self.backbone.encode_image(pixel_values)
            pair = self.backbone.encode_pair(image, self.backbone.encode_text(input_ids, attention_mask))
            tokens = pair.image if self.fused_image else image.tokens
            cells = tokens[:, 1:]  # the global token first, then the grid
            feats = pool_cells(cells.float(), boxes.float(), self.backbone.image_grid).to(tokens.dtype)
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).unsqueeze(-1)
        r = self.cell_proj(feats) + self.box_proj(torch.cat([boxes, area], -1).to(feats.dtype))
        q = pair.pooled.unsqueeze(1).expand_as(r)
        s = self.head(torch.cat([r, q, r * q], dim=-1)).squeeze(-1).float()
        return s.masked_fill(~box_mask, float("-inf"))

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        step: int = 0,
        steps_per_epoch: int = 1,
        kind: str = "pair",
        stage: str | None = None,
    ) -> ModelOutput:
        s = self.scores(
            self.image_batch(batch), batch["input_ids"], batch["attention_mask"], batch["boxes"],
            batch["box_mask"], batch.get("cand_regions"),
        )  # fmt: skip
        target = batch["target"]
        loss = F.cross_entropy(s, target)
        hit = ref_accuracy(s.detach(), batch["boxes"], target)
        metrics = {"loss_ref": loss.detach(), "ref_accuracy": hit}
        return ModelOutput(loss=loss, metrics=metrics, logits=s)


def ref_hits(scores: torch.Tensor, boxes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: whether each row's best-scored box has IoU > 0.5 with its target box."""
    rows = torch.arange(len(target), device=boxes.device)
    pred = boxes[rows, scores.argmax(-1)]
    return box_iou(pred, boxes[rows, target]) > 0.5


def ref_accuracy(scores: torch.Tensor, boxes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose best-scored box has IoU > 0.5 with the target box."""
    return ref_hits(scores, boxes, target).float().mean()
