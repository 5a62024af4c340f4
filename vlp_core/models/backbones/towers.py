"""The unimodal towers FLAVA and UniT share: an image encoder (the configured vision encoder, then
``image_layers`` transformer layers over its tokens, as FLAVA's image encoder and UniT's image encoder put
on a CNN grid) and a text encoder (BERT / MiniLM layers, pooled by ``config.pooling``)."""

from __future__ import annotations

from typing import Any

import torch

from vlp_core.models.fusion import SingleStreamEncoder
from vlp_core.models.outputs import ImageFeatures, TextFeatures
from vlp_core.models.text import TextEncoder, pool_text
from vlp_core.models.vision import build_vision_encoder

__all__ = ["UnimodalTowers"]


class UnimodalTowers:
    """Mixin of a :class:`~vlp_core.models.backbones.Backbone` (an ``nn.Module``) whose config has
    ``vision``, ``text``, ``image_layers`` and ``pooling``: builds ``vision_encoder``, ``text_encoder`` and
    ``image_layers`` (tokens-wide, a head per 64 dims, 4x feed-forward, the text's dropouts) and provides
    ``encode_image`` / ``encode_text``. A backbone with an image ``mask_token`` parameter supports masked
    images (masked cells replaced by it, before the image layers)."""

    def _build_towers(self, config: Any) -> tuple[int, Any]:
        """Build the towers; returns the image token width and the text encoder's (resolved) config."""
        self.vision_encoder = build_vision_encoder(config.vision)
        vw = self.vision_encoder.width
        self.text_encoder = TextEncoder(config.text)
        text = self.text_encoder.config
        self.image_layers = SingleStreamEncoder(
            config.image_layers, vw, max(1, vw // 64), 4 * vw, 1e-12, text.dropout, text.attention_dropout
        )
        return vw, text

    def encode_image(self, pixel_values: torch.Tensor, *, mask: torch.Tensor | None = None) -> ImageFeatures:
        mask_token = getattr(self, "mask_token", None)
        if mask is not None and mask_token is None:
            raise NotImplementedError(f"{type(self).__name__} has no image mask token")
        tokens = self.vision_encoder(pixel_values, mask, mask_token)
        if len(self.image_layers.layers):
            tokens = self.image_layers(tokens, None)
        return ImageFeatures(tokens=tokens, pooled=tokens[:, 0])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        hidden = self.text_encoder(input_ids, attention_mask)
        return TextFeatures(hidden, attention_mask, pool_text(hidden, attention_mask, self.config.pooling))
