"""Multiway transformer (VLMo, Bao et al., 2022): one stack of shared self-attention layers whose
feed-forward is a modality expert: V-FFN for image tokens, L-FFN for text tokens and, in the top layers, a
VL-FFN for every token of an image-text input.

- Image-only pass: every layer with the vision expert. Text-only pass: every layer with the language expert.
  Both also run a *VL path*: the top ``vl_layers`` layers again from the same input, with the VL expert
  (VLMo's second ITC head reads it).
- Image-text pass over ``[text; image]`` embeddings: below the top layers each token goes to its own
  modality's expert; in the top ``vl_layers`` layers every token goes to the VL expert.

Image embeddings: EfficientNet-Lite0 grid cells (``vision.kind: cnn``, the CPU preset, ImageNet weights) or
ViT patch embeddings (``vision.kind: vit``; only ``patch_size`` / ``image_size`` are read, the transformer is
the shared stack). Choices where the paper is silent or out of reach here: the tiny preset's stack is the
packaged MiniLM (post-LN, 6 layers, VL experts in the top 2) with all three experts of a layer initialised
from that layer's MiniLM feed-forward (VLMo initialises from BEiT, which no offline package ships); ``base``
is VLMo-Base's shape (pre-LN, 12 layers, VL in layers 10-11, fresh).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlp_core.models.backbones.base import Backbone, BackboneConfig, register_backbone
from vlp_core.models.fusion import SingleStreamEncoder
from vlp_core.models.layers import FeedForward, MultiHeadAttention
from vlp_core.models.outputs import ImageFeatures, PairFeatures, TextFeatures
from vlp_core.models.text import (
    MLMHead,
    TextConfig,
    TextEmbeddings,
    pool_text,
    read_bert_checkpoint,
    require_layers,
)
from vlp_core.models.vision import CNNGridEncoder, PatchEmbedding, VisionConfig

__all__ = ["EXPERTS", "MultiwayBackbone", "MultiwayConfig"]

#: Expert names; bottom layers hold the first two, the top ``vl_layers`` all three.
EXPERTS = ("vision", "text", "vl")


@dataclass
class MultiwayConfig(BackboneConfig):
    """The Multiway transformer.

    Args:
        text: the shared stack's widths and text embeddings (``num_layers`` = layers of the whole stack);
            ``pretrained`` loads attention, norms and every expert of layer ``i`` from checkpoint layer ``i``.
        vision: the image embedding (``cnn``: EfficientNet-Lite0 grid projected to the stack width; ``vit``:
            patch embedding with ``patch_size``).
        vl_layers: top layers that hold the VL expert (VLMo-Base: 2 of 12).
        norm_first: pre-LN (VLMo) or post-LN (BERT / MiniLM weights).
        pooling: ``"cls"`` (VLMo) or ``"mean"`` over the text tokens (tiny: MiniLM's [CLS] collapses).
    """

    registry_kind: ClassVar[str] = "multiway"

    text: TextConfig = field(
        default_factory=lambda: TextConfig(pretrained=None, num_layers=12, dropout=0.0, attention_dropout=0.0)
    )
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(kind="vit", image_size=224, width=768))
    vl_layers: int = 2
    norm_first: bool = True
    pooling: str = "cls"

    def __post_init__(self) -> None:
        if not 0 < self.vl_layers <= self.text.num_layers:
            raise ValueError(f"vl_layers {self.vl_layers} outside [1, {self.text.num_layers}]")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")


MultiwayConfig.PRESETS = {
    "base": MultiwayConfig,
    "tiny": lambda: MultiwayConfig(
        text=TextConfig(pretrained="minilm", num_layers=6),
        vision=VisionConfig(kind="cnn", image_size=128, width=384, pretrained=True, freeze_bn=True),
        vl_layers=2,
        norm_first=False,
        pooling="mean",
    ),
}


class MultiwayBackbone(Backbone):
    """VLMo's Multiway transformer; see the module docstring.

    Modules: ``text_embeddings``, ``image_embed`` (grid or patch embedding), ``image_type`` (the image
    modality embedding; text tokens carry BERT's token-type 0), ``mask_token`` (masked image modelling),
    ``stack`` (the shared layers with experts) and the tied ``mlm_head``.
    """

    def __init__(self, config: MultiwayConfig) -> None:
        super().__init__()
        self.config = config
        text = config.text.resolved()
        hidden = text.hidden_size
        self.text_embeddings = TextEmbeddings(text)
        if config.vision.kind == "cnn":
            vcfg = config.vision
            self.image_embed: nn.Module = CNNGridEncoder(VisionConfig(**{**vcfg.__dict__, "width": hidden}))
        else:
            self.image_embed = PatchEmbedding(config.vision, hidden)
        self.image_type = nn.Parameter(torch.zeros(hidden))
        self.mask_token = nn.Parameter(torch.zeros(hidden))
        top = text.num_layers - config.vl_layers
        self.first_vl = top
        self.stack = SingleStreamEncoder(
            text.num_layers,
            hidden,
            text.num_heads,
            text.intermediate_size,
            text.layer_norm_eps,
            text.dropout,
            text.attention_dropout,
            experts=EXPERTS[:2],
            expert_layers={i: EXPERTS for i in range(top, text.num_layers)},
            norm_first=config.norm_first,
        )
        self.mlm_head = MLMHead(text, self.text_embeddings.word.weight)
        nn.init.normal_(self.image_type, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.init_report = {"loaded": self._load_pretrained_(text)}
        self.width = self.text_width = self.image_width = hidden

    def _load_pretrained_(self, text: TextConfig) -> list[str]:
        """Text embeddings, attention, norms and every expert of each layer from the text checkpoint."""
        ckpt = text.checkpoint_dir()
        if ckpt is None:
            return []
        state = read_bert_checkpoint(ckpt)
        own = self.state_dict()
        picked: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            targets = []
            if name.startswith("embeddings."):
                targets = ["text_embeddings." + name[len("embeddings.") :]]
            elif name.startswith("mlm."):
                targets = ["mlm_head." + name[len("mlm.") :]]
            elif name.startswith("layers."):
                idx, rest = name[len("layers.") :].split(".", 1)
                if rest.startswith("ffn."):
                    names = EXPERTS if int(idx) >= self.first_vl else EXPERTS[:2]
                    targets = [f"stack.layers.{idx}.ffn.experts.{e}.{rest[4:]}" for e in names]
                else:
                    targets = [f"stack.layers.{idx}.{rest}"]
            for t in targets:
                if t in own and own[t].shape == tensor.shape:
                    picked[t] = tensor
        require_layers(state, len(self.stack.layers), "stack")
        self.load_state_dict(picked, strict=False)
        return sorted(picked)

    # -- embeddings
    def embed_image(self, pixel_values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, 1 + N, H)`` input embeddings (masked cells -> ``mask_token``)."""
        return self.image_embed(pixel_values, mask, self.mask_token) + self.image_type

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_embeddings(input_ids)

    def _unimodal(self, x: torch.Tensor, mask: torch.Tensor | None, expert: str):
        """The expert path over all layers, and the VL path over the top layers from the same input."""
        below = self.stack(x, mask, expert, end=self.first_vl)
        out = self.stack(below, mask, expert, start=self.first_vl)
        vl = self.stack(below, mask, "vl", start=self.first_vl)
        return out, vl

    # -- interface
    def encode_image(
        self, pixel_values: torch.Tensor, *, mask: torch.Tensor | None = None, vl_path: bool | None = None
    ) -> ImageFeatures:
        """Image-only pass; the VL path runs unless ``vl_path=False`` (default: not for masked inputs)."""
        emb = self.embed_image(pixel_values, mask)
        if vl_path is False or (vl_path is None and mask is not None):
            out = self.stack(emb, None, "vision")
            return ImageFeatures(tokens=out, pooled=out[:, 0], embeddings=emb)
        out, vl = self._unimodal(emb, None, "vision")
        return ImageFeatures(tokens=out, pooled=out[:, 0], embeddings=emb, extra={"vl_pooled": vl[:, 0]})

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, vl_path: bool = True
    ) -> TextFeatures:
        """Text-only pass; ``vl_path=False`` skips the VL-expert path (a text-only MLM batch needs none)."""
        emb = self.embed_text(input_ids)
        how = self.config.pooling
        if not vl_path:
            out = self.stack(emb, attention_mask, "text")
            return TextFeatures(out, attention_mask, pool_text(out, attention_mask, how), embeddings=emb)
        out, vl = self._unimodal(emb, attention_mask, "text")
        return TextFeatures(
            hidden=out,
            mask=attention_mask,
            pooled=pool_text(out, attention_mask, how),
            embeddings=emb,
            extra={"vl_pooled": pool_text(vl, attention_mask, how)},
        )

    def fuse_embeddings(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor
    ) -> PairFeatures:
        """The image-text pass over ``[text; image]`` embeddings: ``(N, 1+Ni, H), (N, L, H), (N, L)``."""
        length = text_emb.shape[1]
        x = torch.cat([text_emb, image_emb], dim=1)
        mask = torch.cat([text_mask, text_mask.new_ones(image_emb.shape[:2])], dim=1)
        route = torch.full(mask.shape, EXPERTS.index("vision"), dtype=torch.long, device=x.device)
        route[:, :length] = EXPERTS.index("text")
        routes = [route] * self.first_vl + ["vl"] * (len(self.stack.layers) - self.first_vl)
        hidden = self.stack(x, mask, routes)
        text = slice(0, length)
        pooled = pool_text(hidden[:, text], text_mask, self.config.pooling)
        return PairFeatures(hidden=hidden, pooled=pooled, text_slice=text, image_slice=slice(length, None))

    def encode_pair(self, image: ImageFeatures, text: TextFeatures) -> PairFeatures:
        if image.embeddings is None or text.embeddings is None:
            raise ValueError("the Multiway pair pass starts from embeddings; encode with this backbone")
        return self.fuse_embeddings(image.embeddings, text.embeddings, text.mask)

    def fuse(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> PairFeatures:
        return self.fuse_embeddings(
            self.embed_image(pixel_values), self.embed_text(input_ids), attention_mask
        )

    # -- structure
    def attention_modules(self) -> list[nn.Module]:
        """Every shared self-attention block with its norm (what VLMo's language stage freezes)."""
        out: list[nn.Module] = []
        for layer in self.stack.layers:
            out += [layer.self_attn, layer.self_attn_norm]
        return out

    def experts(self, name: str) -> list[FeedForward]:
        """The ``name`` expert of every layer that has one."""
        return [layer.ffn.experts[name] for layer in self.stack.layers if name in layer.ffn.experts]

    def image_input(self) -> nn.Module:
        return self.image_embed

    def param_roles(self) -> dict[str, list[nn.Module]]:
        roles = {
            "vision": [self.image_embed, *self.experts("vision")],
            "text": [self.text_embeddings, self.mlm_head, *self.experts("text")],
            "fusion": [*self.experts("vl")],
            "attention": [m for m in self.stack.modules() if isinstance(m, MultiHeadAttention)],
        }
        if isinstance(self.image_embed, CNNGridEncoder):
            roles["vision_pretrained"] = [self.image_embed.backbone]
        return roles

    def ddp_kwargs(self) -> dict[str, Any]:
        # An image-only batch leaves the language expert without gradient, and so on.
        return {"find_unused_parameters": True}


register_backbone(MultiwayConfig, MultiwayBackbone)
