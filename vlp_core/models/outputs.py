"""What backbones and models return: typed features per modality and the trainer's output contract."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ImageFeatures", "ModelOutput", "PairFeatures", "TextFeatures"]


@dataclass
class ModelOutput:
    """What every model's ``forward`` returns to the trainer."""

    loss: torch.Tensor  # scalar, what the trainer back-propagates
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached 0-d tensors to log
    logits: torch.Tensor | None = None  # task logits where there are any, e.g. VQA (B, A)


@dataclass
class ImageFeatures:
    """An image batch encoded by a backbone.

    Attributes:
        tokens: ``(B, N, D)`` output tokens of the image-only pass, global token first.
        pooled: ``(B, D)`` one vector per image (what an ITC projection reads).
        embeddings: ``(B, N, D)`` the input embeddings of the shared stack, for single-stream backbones whose
            pair pass starts from embeddings (VLMo); ``None`` otherwise.
        extra: backbone-specific extras (e.g. VLMo's VL-expert path pooled vector ``"vl_pooled"``).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    embeddings: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TextFeatures:
    """A text batch encoded by a backbone: ``hidden (B, L, H)``, ``mask (B, L)``, ``pooled (B, H)``;
    ``embeddings`` / ``extra`` as in :class:`ImageFeatures`."""

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    embeddings: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PairFeatures:
    """An image-text batch fused by a backbone.

    Attributes:
        hidden: ``(B, L, H)`` fused states; ``text_slice`` / ``image_slice`` say where each modality's tokens
            are along dim 1 (cross-attention fusion: text only).
        pooled: ``(B, H)`` the fused vector an ITM / VQA head reads.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor
    text_slice: slice
    image_slice: slice | None = None

    @property
    def text(self) -> torch.Tensor:
        return self.hidden[:, self.text_slice]

    @property
    def image(self) -> torch.Tensor | None:
        return None if self.image_slice is None else self.hidden[:, self.image_slice]
