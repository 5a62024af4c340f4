"""FLAVA's backbone (Singh et al., 2022): an image encoder, a text encoder and a multimodal encoder, a
single-stream transformer over ``[CLS_M; image hidden; text hidden]`` (each projected to its width).

Choices where the paper is out of reach here: the tiny preset's image encoder is the EfficientNet-Lite0 grid
(ImageNet weights) followed by ``image_layers`` fresh transformer layers (masked grid cells are replaced by a
mask token before those layers); its text encoder is MiniLM layers 0-2 and its multimodal encoder is
initialised from MiniLM layers 3-5 (as the tiny ALBEF's fusion). ``base`` is FLAVA's shape (ViT-B/16, a
12-layer text encoder, a 6-layer multimodal encoder, all fresh).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from vlp_core.models.backbones.base import Backbone, BackboneConfig, register_backbone
from vlp_core.models.backbones.towers import UnimodalTowers
from vlp_core.models.fusion import SingleStreamEncoder
from vlp_core.models.outputs import ImageFeatures, PairFeatures, TextFeatures
from vlp_core.models.text import MLMHead, TextConfig, load_part_, read_bert_checkpoint
from vlp_core.models.vision import CNNGridEncoder, VisionConfig

__all__ = ["FlavaBackbone", "FlavaConfig"]


@dataclass
class FlavaConfig(BackboneConfig):
    """FLAVA's three encoders.

    Args:
        text: the text encoder (its widths are also the multimodal encoder's).
        vision: the image encoder (``cnn`` grid or timm ``vit``).
        image_layers: transformer layers after a CNN grid encoder (0 for ViT, which has its own).
        multimodal_layers: layers of the multimodal encoder.
        multimodal_from_pretrained: initialise multimodal layer ``j`` from text checkpoint layer
            ``text.num_layers + j`` where it exists.
        pooling: text pooling, ``"cls"`` (FLAVA) or ``"mean"`` (tiny: MiniLM's [CLS] collapses). The
            multimodal vector is always its ``CLS_M`` state.
    """

    registry_kind: ClassVar[str] = "flava"

    text: TextConfig = field(default_factory=lambda: TextConfig(pretrained=None, num_layers=12))
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(kind="vit", image_size=224, width=768))
    image_layers: int = 0
    multimodal_layers: int = 6
    multimodal_from_pretrained: bool = True
    pooling: str = "cls"

    def __post_init__(self) -> None:
        if self.multimodal_layers < 1 or self.image_layers < 0:
            raise ValueError("multimodal_layers must be >= 1 and image_layers >= 0")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")


FlavaConfig.PRESETS = {
    "base": FlavaConfig,
    "tiny": lambda: FlavaConfig(
        text=TextConfig(pretrained="minilm", num_layers=3),
        vision=VisionConfig(kind="cnn", image_size=128, width=384, pretrained=True, freeze_bn=True),
        image_layers=2,
        multimodal_layers=3,
        pooling="mean",
    ),
}


class FlavaBackbone(UnimodalTowers, Backbone):
    """``vision_encoder`` (+ ``image_layers``), ``text_encoder``, ``multimodal`` (with ``cls_m``,
    ``image_to_mm``, ``text_to_mm``), the image ``mask_token`` and the tied ``mlm_head``."""

    def __init__(self, config: FlavaConfig) -> None:
        super().__init__()
        self.config = config
        vw, text = self._build_towers(config)
        hidden = text.hidden_size
        self.mask_token = nn.Parameter(torch.zeros(vw))
        self.image_to_mm = nn.Linear(vw, hidden)
        self.text_to_mm = nn.Linear(hidden, hidden)
        self.cls_m = nn.Parameter(torch.zeros(1, 1, hidden))
        self.multimodal = SingleStreamEncoder(
            config.multimodal_layers,
            hidden,
            text.num_heads,
            text.intermediate_size,
            text.layer_norm_eps,
            text.dropout,
            text.attention_dropout,
        )
        self.mlm_head = MLMHead(text, self.text_encoder.embeddings.word.weight)
        for p in (self.mask_token, self.cls_m):
            nn.init.normal_(p, std=0.02)
        for lin in (self.image_to_mm, self.text_to_mm):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.init_report = self._load_pretrained_(text)
        self.width = self.text_width = hidden
        self.image_width = vw

    def _load_pretrained_(self, text: TextConfig) -> dict[str, list[str]]:
        ckpt = text.checkpoint_dir()
        if ckpt is None:
            return {}
        state = read_bert_checkpoint(ckpt)
        fresh = {"text": self.text_encoder.load_bert_(state)}
        fresh["mlm_head"] = load_part_(
            self.mlm_head, {k: v for k, v in state.items() if k.startswith("mlm.")}, {"mlm.": ""}
        )
        if self.config.multimodal_from_pretrained:
            renames = {}
            for j in range(self.config.multimodal_layers):
                src = f"layers.{text.num_layers + j}."
                if any(k.startswith(src) for k in state):
                    renames[src] = f"layers.{j}."
            fresh["multimodal"] = load_part_(self.multimodal, state, renames)
        return fresh

    # -- interface
    def fuse_states(
        self, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor
    ) -> PairFeatures:
        """The multimodal encoder over ``[CLS_M; image; text]`` from ``(N, Ni, Dv), (N, L, H), (N, L)``."""
        n, ni = image_tokens.shape[:2]
        x = torch.cat(
            [self.cls_m.expand(n, -1, -1), self.image_to_mm(image_tokens), self.text_to_mm(text_hidden)],
            dim=1,
        )
        mask = torch.cat([text_mask.new_ones(n, 1 + ni), text_mask], dim=1)
        hidden = self.multimodal(x, mask)
        return PairFeatures(
            hidden=hidden, pooled=hidden[:, 0], text_slice=slice(1 + ni, None), image_slice=slice(1, 1 + ni)
        )

    def encode_pair(self, image: ImageFeatures, text: TextFeatures) -> PairFeatures:
        return self.fuse_states(image.tokens, text.hidden, text.mask)

    # -- data / optimiser
    def image_input(self) -> nn.Module:
        return self.vision_encoder

    def param_roles(self) -> dict[str, list[nn.Module]]:
        roles = {
            "vision": [self.vision_encoder, self.image_layers],
            "text": [self.text_encoder, self.mlm_head],
            "fusion": [self.multimodal, self.image_to_mm, self.text_to_mm],
        }
        if isinstance(self.vision_encoder, CNNGridEncoder):
            roles["vision_pretrained"] = [self.vision_encoder.backbone]
        return roles


register_backbone(FlavaConfig, FlavaBackbone)
