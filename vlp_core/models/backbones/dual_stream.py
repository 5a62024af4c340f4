"""Dual-stream backbone: an image encoder, a text encoder and cross-attention fusion layers (ALBEF)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from vlp_core.models.backbones.base import Backbone, BackboneConfig, register_backbone
from vlp_core.models.fusion import FusionConfig, build_text_stack
from vlp_core.models.outputs import ImageFeatures, PairFeatures, TextFeatures
from vlp_core.models.text import TextConfig, pool_text
from vlp_core.models.vision import CNNGridEncoder, VisionConfig, build_vision_encoder

__all__ = ["DualStreamBackbone", "DualStreamConfig"]


@dataclass
class DualStreamConfig(BackboneConfig):
    """Image encoder + text encoder + fusion layers with cross-attention to the image tokens.

    The defaults are the ``"base"`` preset (BERT-base shape, fresh, 6 text + 6 fusion layers; ViT-B/16 at
    256 px, random init). ``"tiny"``: the packaged MiniLM split 3 text + 3 fusion layers (fusion from MiniLM
    layers 3-5, cross-attention fresh), EfficientNet-Lite0 grid at 128 px (4 x 4 + 1 tokens, projected to
    384, frozen BatchNorm, ImageNet weights), mean pooling.

    Args:
        text, fusion, vision: the encoders (see their docstrings).
        pooling: how a text (and a fused) sequence becomes one vector: ``"cls"`` (ALBEF) or ``"mean"`` over
            the text tokens (the tiny preset: MiniLM's [CLS] state is nearly the same for every sentence,
            see :func:`pool_text`).
    """

    registry_kind: ClassVar[str] = "dual_stream"

    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    pooling: str = "cls"

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")


DualStreamConfig.PRESETS = {
    "base": DualStreamConfig,
    "tiny": lambda: DualStreamConfig(
        text=TextConfig(pretrained="minilm", num_layers=3),
        fusion=FusionConfig(num_layers=3),
        vision=VisionConfig(kind="cnn", image_size=128, width=384, pretrained=True, freeze_bn=True),
        pooling="mean",
    ),
}


class DualStreamBackbone(Backbone):
    """``vision_encoder`` + ``text_encoder`` + ``fusion`` (+ the tied ``mlm_head`` a recipe may use).

    The MLM head lives here because it is tied to the text encoder's word embeddings: a recipe that trains
    MLM reads :attr:`mlm_head`; one that does not simply never calls it (and freezes it).

    Attributes:
        init_report: parameter names per part that did not come from a checkpoint, for the run log.
    """

    fused_image_states: ClassVar[bool] = False  # the fusion's queries are the text tokens

    def __init__(self, config: DualStreamConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_encoder = build_vision_encoder(config.vision)
        text, fusion, head, fresh = build_text_stack(config.text, config.fusion, self.vision_encoder.width)
        self.text_encoder = text
        self.fusion = fusion
        self.mlm_head = head
        self.init_report = fresh
        self.width = self.text_width = text.width
        self.image_width = self.vision_encoder.width
        #: compute the top layer only at the positions a loss reads (:meth:`fuse_pooled`, :meth:`top_rows`,
        #: and a recipe's image pass that reads [CLS] alone: ``vision_encoder(..., global_only=True)``);
        #: ``False`` computes every position, as the reference code does: the same values up to float
        #: rounding, more work (kept for the step benchmark's before/after and the equality tests).
        self.prune_top_layer = True

    # -- interface
    def encode_image(self, pixel_values: torch.Tensor, *, mask: torch.Tensor | None = None) -> ImageFeatures:
        if mask is not None:
            raise NotImplementedError("the dual-stream backbone has no image mask token")
        tokens = self.vision_encoder(pixel_values)
        return ImageFeatures(tokens=tokens, pooled=tokens[:, 0])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        hidden = self.text_encoder(input_ids, attention_mask)
        return TextFeatures(hidden, attention_mask, pool_text(hidden, attention_mask, self.config.pooling))

    def fuse_states(
        self, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor
    ) -> PairFeatures:
        """Fusion on tensors: ``(N, 1+N_img, Dv), (N, L, H), (N, L)`` -> fused features."""
        fused = self.fusion(text_hidden, text_mask, image_tokens)
        return PairFeatures(
            hidden=fused, pooled=pool_text(fused, text_mask, self.config.pooling), text_slice=slice(None)
        )

    def encode_pair(self, image: ImageFeatures, text: TextFeatures) -> PairFeatures:
        return self.fuse_states(image.tokens, text.hidden, text.mask)

    def top_rows(self, n: int, device: torch.device) -> torch.Tensor | None:
        """``rows`` for the top layer of a stack of ``n`` sequences whose pooled vector alone is read: the
        [CLS] position of every row with ``"cls"`` pooling (``(n, 1)`` zeros), ``None`` (every position)
        otherwise."""
        if self.prune_top_layer and self.config.pooling == "cls":
            return torch.zeros(n, 1, dtype=torch.long, device=device)
        return None

    def fuse_pooled(
        self,
        image_tokens: torch.Tensor,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        image_index: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``fuse_states(...).pooled`` (N, H), the top fusion layer computed at [CLS] only when that is all
        the pooling reads (about a quarter of an ITM pass at 2 fusion layers). With ``image_index`` /
        ``text_index`` the inputs are distinct images / texts and row ``i`` pairs ``image_index[i]`` with
        ``text_index[i]`` (see :meth:`FusionEncoder.forward`)."""
        n = (text_index if text_index is not None else text_mask).shape[0]
        rows = self.top_rows(n, text_mask.device)
        fused = self.fusion(text_hidden, text_mask, image_tokens, rows=rows, text_index=text_index,
                            image_index=image_index)  # fmt: skip
        if rows is not None:
            return fused[:, 0]
        mask = text_mask if text_index is None else text_mask[text_index]
        return pool_text(fused, mask, self.config.pooling)

    # -- data / optimiser
    def image_input(self) -> nn.Module:
        return self.vision_encoder

    def param_roles(self) -> dict[str, list[nn.Module]]:
        roles = {
            "vision": [self.vision_encoder],
            "text": [self.text_encoder, self.mlm_head],
            "fusion": [self.fusion],
        }
        if isinstance(self.vision_encoder, CNNGridEncoder):
            roles["vision_pretrained"] = [self.vision_encoder.backbone]
        return roles


register_backbone(DualStreamConfig, DualStreamBackbone)
