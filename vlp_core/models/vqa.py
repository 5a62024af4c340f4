"""VQA as answer classification over the fused [CLS] (the UNITER / ALBEF-classifier formulation).

ALBEF's paper generates answers with a decoder; classification over a fixed answer vocabulary with soft VQA
scores is the common, cheaper alternative (UNITER, VisualBERT, LXMERT) and what this model does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.albef import ALBEF, ALBEFConfig, Encoders, build_encoders, config_from_dict
from vlp_core.models.encoders import ImageInputs, ModelOutput, pool_text

__all__ = ["VQAClassifier", "VQAConfig", "load_backbone_state_", "vqa_loss", "vqa_score"]

_BACKBONE_PARTS = ("vision_encoder", "text_encoder", "fusion")


def vqa_loss(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits against soft scores, summed over answers and averaged over the batch.

    ``sum_a BCE(logits[b, a], scores[b, a])`` averaged over ``b``: UNITER's ``bce(reduction="none").mean() *
    num_answers``. A mean over answers as well would shrink the loss (and its gradient) by ~3,000 for the
    usual vocabulary. Rows of all-zero scores (answer outside the vocabulary) still count as negatives.

    Args:
        logits: ``(B, A)``.
        scores: ``(B, A)`` soft scores in [0, 1] (``min(count / 3, 1)``).

    Returns:
        Scalar.
    """
    bce = F.binary_cross_entropy_with_logits(logits, scores.to(logits.dtype), reduction="sum")
    return bce / logits.shape[0]


def vqa_score(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Mean soft score of the top answer (the VQA accuracy of the batch, over answers in the vocabulary)."""
    return scores.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()


@dataclass
class VQAConfig:
    """VQA classifier on an ALBEF backbone.

    Args:
        backbone: the ALBEF config whose encoders are built (a nested dict may carry ``"preset"``).
        num_answers: answer vocabulary size A.
        head_hidden: hidden width of the MLP head; ``None`` = twice the text width (UNITER).
        head_dropout: dropout before the head's output layer.
        pretrained: a checkpoint file with ALBEF weights (``ALBEF.pretrained_state_dict()``, or any state dict
            of an ALBEF, optionally wrapped as ``{"model": ...}``); ``None`` starts from the backbone's own
            initialisation (e.g. MiniLM + ImageNet).
    """

    backbone: ALBEFConfig = field(default_factory=ALBEFConfig)
    num_answers: int = 3129
    head_hidden: int | None = None
    head_dropout: float = 0.0
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.num_answers < 1:
            raise ValueError(f"num_answers must be positive, got {self.num_answers}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQAConfig:
        return config_from_dict(cls(), d)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def _unwrap_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    # DDP and torch.compile wrappers prefix every name.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_backbone_state_(encoders: Encoders | nn.Module, state: dict[str, torch.Tensor] | str | Path) -> None:
    """Load the vision, text and fusion encoders from an ALBEF state dict (or a checkpoint file), strictly.

    Other entries (projections, heads, momentum model, queues) are ignored.
    """
    if not isinstance(state, dict):
        state = torch.load(state, map_location="cpu", weights_only=True)
    state = _unwrap_state(state)
    for part in _BACKBONE_PARTS:
        prefix = part + "."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise KeyError(f"the checkpoint has no {part} weights")
        getattr(encoders, part).load_state_dict(sub, strict=True)


class VQAClassifier(ImageInputs, nn.Module):
    """Answer classifier: image + question through the ALBEF encoders, MLP head on the fused [CLS].

    Head: ``Linear(H, h) -> GELU -> LayerNorm -> Dropout -> Linear(h, A)`` (UNITER's VQA head).

    Args:
        backbone: an :class:`ALBEF` (its online encoders are shared, not copied: fine-tuning trains them in
            place) or :class:`Encoders`.
        num_answers: A.
        head_hidden: ``None`` = ``2 * H``.
        head_dropout: dropout before the output layer.
        pooling: ``"cls"`` or ``"mean"`` over the fused question tokens (:func:`pool_text`; the backbone
            config's choice when built with :meth:`from_config`).
    """

    def __init__(
        self,
        backbone: ALBEF | Encoders,
        num_answers: int,
        *,
        head_hidden: int | None = None,
        head_dropout: float = 0.0,
        pooling: str = "cls",
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.vision_encoder = backbone.vision_encoder
        self.text_encoder = backbone.text_encoder
        self.fusion = backbone.fusion
        width = self.text_encoder.width
        hidden = head_hidden or 2 * width
        self.head = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden, eps=1e-12),
            nn.Dropout(head_dropout),
            nn.Linear(hidden, num_answers),
        )
        for m in self.head:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.num_answers = num_answers

    @classmethod
    def from_config(cls, cfg: VQAConfig) -> VQAClassifier:
        """Build the backbone's encoders (no momentum model, no queues) and load ``cfg.pretrained`` if set."""
        encoders, _, _ = build_encoders(cfg.backbone)
        if cfg.pretrained is not None:
            load_backbone_state_(encoders, cfg.pretrained)
        return cls(
            encoders,
            cfg.num_answers,
            head_hidden=cfg.head_hidden,
            head_dropout=cfg.head_dropout,
            pooling=cfg.backbone.pooling,
        )

    def logits(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B, 3, S, S)``, question ``(B, L)`` ids and mask -> ``(B, A)`` answer logits."""
        image = self.vision_encoder(pixel_values)
        text = self.text_encoder(input_ids, attention_mask)
        fused = self.fusion(text, attention_mask, image)
        return self.head(pool_text(fused, attention_mask, self.pooling))

    def forward(
        self, batch: dict[str, torch.Tensor], *, step: int = 0, steps_per_epoch: int = 1
    ) -> ModelOutput:
        """Loss :func:`vqa_loss` on ``batch["answer_scores"]`` (B, A); metrics ``loss_vqa``, ``vqa_score``.

        ``step`` / ``steps_per_epoch`` are accepted for the trainer's common call and unused.
        """
        logits = self.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        scores = batch["answer_scores"]
        loss = vqa_loss(logits, scores)
        metrics = {"loss_vqa": loss.detach(), "vqa_score": vqa_score(logits.detach(), scores)}
        return ModelOutput(loss=loss, metrics=metrics, logits=logits)
