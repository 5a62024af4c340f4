"""Task heads over any backbone: answer classification (VQA) on the fused vector.

VQA as answer classification over the fused vector (the UNITER / ALBEF-classifier formulation): ALBEF's
paper generates answers with a decoder; classification over a fixed answer vocabulary with soft VQA scores is
the common, cheaper alternative (UNITER, VisualBERT, LXMERT) and what this head does, on any backbone
(:meth:`Backbone.fuse`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.backbones import Backbone, OnBackbone
from vlp_core.models.outputs import ModelOutput

__all__ = ["AnswerClassifier", "mlp_head", "vqa_loss", "vqa_score"]


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
