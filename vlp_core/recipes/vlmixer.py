"""VLMixer (Wang et al., 2022; seed 000): unpaired pre-training by cross-modal CutMix, on the region
single-stream backbone. No code of the paper exists anywhere; this is our reading of its slides, every open
choice a named option below.

Batches round-robin over the kinds with weight > 0 in ``mix_weights`` (single-source batches):

- ``text`` (VALP, every corpus sentence): the **CMC** mixed view of the sentence (grounded words replaced by
  gallery patches of their concept, :mod:`vlp_core.data.cutmix`) and

  - **MLM on the mixed sentence**: 15 % of its words (never its patch tokens), 80/10/10, predicted through
    the MLM head;
  - **CMCL**, a contrastive loss between the sentence and its mixed view: both pooled (mean over tokens in
    the tiny preset), projected by one shared head, L2-normalised, InfoNCE in both directions over the
    global batch with temperature ``cmcl_temperature`` (0.07, fixed); only sentences that got a patch are
    anchors (a sentence without grounded words would be its own trivial positive); views of the same
    sentence (equal ``text_key``) are all positives.

- ``image`` (TAVP, every corpus image): tag-aided visual pre-training, the region-tag pass of
  :mod:`vlp_core.recipes.regions` (masked tags, masked region classification, feature regression; the
  slides say "masked tag / region modelling" and nothing more, so the masking is U-VisualBERT's).

Ablations (seed 000's order: TAVP alone < MLM < + CMC < all): ``cmc_prob: 0`` turns mixing off (MLM on the
plain sentence), ``cmcl_weight: 0`` drops CMCL, ``mix_weights: {image: 0}`` drops TAVP, ``{text: 0}``
trains TAVP alone. ``pair`` batches exist only for retrieval fine-tuning (ITM, weight 0 in pre-training).
Zero-shot retrieval ranks by the CMCL projection of the pooled image-only and text-only passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.backbones import RegionInputs, RegionStreamBackbone
from vlp_core.objectives import ContrastiveLoss
from vlp_core.recipes.base import Stage, register_recipe
from vlp_core.recipes.regions import RegionRecipe, RegionRecipeConfig, reduce_items

__all__ = ["VLMixer", "VLMixerConfig"]


@dataclass
class VLMixerConfig(RegionRecipeConfig):
    """VLMixer's objectives (module docstring; TAVP's masking and fine-tuning ITM fields:
    :class:`~vlp_core.recipes.regions.RegionRecipeConfig`).

    Args:
        mlm_weight: MLM on the mixed sentence. cmcl_weight: CMCL. tag_mlm_weight, mrc_weight, mrfr_weight:
            TAVP. itm_weight: random-swap ITM on pairs (0 in pre-training; retrieval fine-tuning).
        cmc_prob: per-grounded-word replacement probability (0.5; 0 = no mixing).
        cmc_at_least_one: a sentence with grounded words gets at least one patch.
        cmcl_temperature: CMCL's InfoNCE temperature (fixed).
        embed_dim: CMCL projection width.
        mixing, mix_weights: ``round_robin`` over the kinds with weight > 0, or ``weighted`` by the weights.
    """

    registry_name: ClassVar[str] = "vlmixer"

    mlm_weight: float = 1.0
    cmcl_weight: float = 1.0
    tag_mlm_weight: float = 1.0
    mrc_weight: float = 1.0
    mrfr_weight: float = 1.0
    itm_weight: float = 0.0
    cmc_prob: float = 0.5
    cmc_at_least_one: bool = True
    cmcl_temperature: float = 0.07
    embed_dim: int = 256
    mixing: str = "round_robin"
    mix_weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "image": 1.0})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.cmc_prob <= 1.0 or self.cmcl_temperature <= 0:
            raise ValueError("cmc_prob must be in [0, 1] and cmcl_temperature > 0")
        if set(self.mix_weights) - {"text", "image"} or not any(v > 0 for v in self.mix_weights.values()):
            raise ValueError(f"mix_weights {self.mix_weights}: text / image weights, one of them > 0")


VLMixerConfig.PRESETS = {"base": VLMixerConfig, "tiny": lambda: VLMixerConfig(embed_dim=128)}


class VLMixer(RegionRecipe):
    """VLMixer on the region stream; see the module docstring."""

    batch_kinds: ClassVar[tuple[str, ...]] = ("text", "image", "pair")

    def __init__(self, config: VLMixerConfig, backbone: RegionStreamBackbone) -> None:
        super().__init__()
        self.config = config
        self._init_region_heads(backbone)
        self.cmcl_proj = nn.Linear(backbone.width, config.embed_dim)
        nn.init.normal_(self.cmcl_proj.weight, std=0.02)
        nn.init.zeros_(self.cmcl_proj.bias)
        self.cmcl = ContrastiveLoss(gather_with_grad=True, local_loss=True)

    def stages(self, max_steps: int) -> list[Stage]:
        cfg = self.config
        kinds = tuple(k for k in ("text", "image") if cfg.mix_weights.get(k, 0) > 0)
        return [Stage("main", None, kinds, mixing=cfg.mixing, weights={k: cfg.mix_weights[k] for k in kinds})]

    def cutmix_options(self) -> dict[str, Any]:
        return {"prob": self.config.cmc_prob, "at_least_one": self.config.cmc_at_least_one}

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.cmcl_proj(pooled)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.cmcl_proj(pooled)

    def mixed_embeddings(self, batch: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        patches = RegionInputs(batch["mix_patch_feats"], batch["mix_patch_boxes"], batch["mix_is_patch"])
        return self.backbone.embed_words(ids, patches=patches)

    def _text(self, batch: dict[str, torch.Tensor]):
        cfg, b = self.config, self.backbone
        metrics: dict[str, torch.Tensor] = {
            "cmc_replaced": batch["n_replaced"].float().mean(),
            "cmc_mixed": batch["has_mix"].float().mean(),
        }
        total = batch["mix_patch_feats"].new_zeros(())
        if cfg.mlm_weight > 0:
            labels = batch["mix_mlm_labels"]
            selected = labels != -100
            hidden, _ = b.joint([(self.mixed_embeddings(batch, batch["mix_mlm_ids"]), batch["mix_mask"])])
            rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[selected]
            per_token = F.cross_entropy(
                b.mlm_head(hidden[selected]).float(), labels[selected], reduction="none"
            )
            loss, m = reduce_items({"mlm": (per_token, rows)}, {"mlm": cfg.mlm_weight})
            total, metrics = total + loss, metrics | m
        if cfg.cmcl_weight > 0:
            sent = b.encode_text(batch["input_ids"], batch["attention_mask"]).pooled
            mixed_h, mixed_mask = b.joint(
                [(self.mixed_embeddings(batch, batch["mix_ids"]), batch["mix_mask"])]
            )
            mixed = b.pool(mixed_h, mixed_mask)
            q = F.normalize(self.cmcl_proj(sent), dim=-1)
            k = F.normalize(self.cmcl_proj(mixed), dim=-1)
            out = self.cmcl(q, k, cfg.cmcl_temperature, ids=batch["text_key"], valid=batch["has_mix"])
            total = total + cfg.cmcl_weight * out.loss
            metrics["loss_cmcl"] = out.loss.detach()
        return total, metrics

    def losses(self, kind: str, batch: dict[str, torch.Tensor], step: int):
        if kind == "text":
            return self._text(batch)
        if kind == "image":
            return reduce_items(self.region_tag_items(batch), self.config.loss_weights())
        return self.pair_itm(batch, step)


register_recipe(VLMixerConfig, VLMixer, "region_stream")
