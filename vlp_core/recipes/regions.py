"""What the region methods share (µ-VLA, U-VisualBERT, VLMixer): a recipe base on the region single-stream
backbone with the region-tag pass, text MLM, random-swap ITM and the retrieval protocol; and U-VisualBERT.

**The region-tag pass** (U-VisualBERT's image-only objective, µ-VLA's R-T, VLMixer's TAVP): input
``[CLS] tags [SEP] regions``, each tag wordpiece carrying its region's box. Regions are masked with
``region_mask_prob`` (feature zeroed, box kept, as UNITER); a tag is masked with ``tag_mask_prob``, or with
``tag_mask_prob_region_masked`` when the region it names is masked (U-VisualBERT: 0.15 / 0.9; so a masked
region's tag rarely gives its class away). Masked tag wordpieces become ``[MASK]``. Losses per masked item:

- ``tag_mlm``: the tag wordpiece, through the MLM head;
- ``mrc``: masked region classification. Our choice: the target is the region's *class tag as wordpieces*
  of the BERT vocabulary, predicted through the MLM head (uniform over the tag's pieces,
  :func:`~vlp_core.objectives.token_set_loss`), the same way µ-VLA's p-MRTC predicts a phrase. The papers
  classify over the detector's fixed classes; this corpus tags with two taggers (COCO detector labels and
  ImageNet classes for the whole image), so the class set is open, and wordpieces give one store-independent
  label space. A region without a class tag (region 0 of an image with no ImageNet tag) has no MRC target;
- ``mrfr``: the masked region's input feature (standardised, as the embedding sees it), regressed from its
  output state (mean squared error).

**Retrieval protocol.** A single-stream model has no dual encoder: zero-shot and fine-tuned retrieval score
*every* (image, text) pair with the match head when the recipe has one (``itm_weight`` > 0 or trained),
i.e. ``N_images × N_texts`` fused passes per direction; candidates are not pre-filtered (at corpus scale one
would pre-filter with a dual encoder). The "ITC" numbers of these recipes are the cosine of the pooled
unimodal outputs (VLMixer: through its CMCL projection), reported for completeness.

**U-VisualBERT** (Li et al., 2021): round-robin over single-source batches, image-only (the region-tag pass
on every corpus image) and text-only (MLM on every corpus sentence); no ITM in pre-training (``itm_weight``
is 0; it exists so retrieval fine-tuning can train a match head on pairs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.backbones import RegionInputs, RegionStreamBackbone
from vlp_core.objectives import (
    ITMHead,
    draw_masks,
    global_item_mean,
    region_feature_loss,
    step_seed,
    swapped_texts,
    token_set_loss,
)
from vlp_core.recipes.base import Recipe, RecipeConfig, Stage, register_recipe

__all__ = ["ItemLosses", "RegionRecipe", "RegionRecipeConfig", "UVisualBERT", "UVisualBERTConfig"]

#: salts XOR-ed into a sample's seed, one per draw.
REGION_SALT = 0x5EED_0001
TAG_SALT = 0x5EED_0002
#: BERT uncased [MASK] (the packaged tokenizer's).
MASK_TOKEN_ID = 103

#: per-item losses of one pass: name -> (values (M,), the batch row of each item (M,)).
ItemLosses = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RegionRecipeConfig(RecipeConfig):
    """What every region recipe's config has: the region-tag pass's masking and random-swap ITM.

    Args:
        region_mask_prob, tag_mask_prob, tag_mask_prob_region_masked: the region-tag pass's masking
            (U-VisualBERT's 0.15 / 0.15 / 0.9).
        itm_swap_prob: probability that a pair's sentence is swapped for a random one of the global batch (an
            ITM negative).
        seed: ITM swap partners.
    """

    region_mask_prob: float = 0.15
    tag_mask_prob: float = 0.15
    tag_mask_prob_region_masked: float = 0.9
    itm_swap_prob: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.loss_weights().values(), default=0.0) < 0:
            raise ValueError("loss weights must be >= 0")
        for name in ("region_mask_prob", "tag_mask_prob", "tag_mask_prob_region_masked", "itm_swap_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")


class RegionRecipe(Recipe):
    """Base of the recipes on :class:`~vlp_core.models.backbones.RegionStreamBackbone`: the region feature
    regression head, an optional ITM head, the region-tag pass, text MLM, random-swap ITM and the
    retrieval protocol (see the module docstring). The MLM head is the backbone's (tied)."""

    machinery: ClassVar[tuple[str, ...]] = ()
    retrieval_losses: ClassVar[tuple[str, ...]] = ("itm",)

    def _init_region_heads(self, backbone: RegionStreamBackbone) -> None:
        if not isinstance(backbone, RegionStreamBackbone):
            raise TypeError(
                f"{type(self).__name__} needs a region_stream backbone, got {type(backbone).__name__}"
            )
        self.backbone = backbone
        h = backbone.width
        self.region_head = nn.Sequential(
            nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=1e-12), nn.Linear(h, backbone.config.region_dim)
        )
        self.itm_head = ITMHead(h)
        for lin in (self.region_head[0], self.region_head[3], self.itm_head.proj):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def ddp_kwargs(self) -> dict[str, Any]:
        return {"find_unused_parameters": True}  # batch kinds train different heads

    # -- inputs
    @staticmethod
    def regions(batch: dict[str, torch.Tensor], masked: torch.Tensor | None = None) -> RegionInputs:
        """The batch's regions; ``masked`` (B, R) bool zeroes those features (boxes stay)."""
        feats = batch["region_feats"]
        if masked is not None:
            feats = feats.masked_fill(masked[..., None], 0.0)
        return RegionInputs(feats, batch["region_boxes"], batch["region_mask"])

    def tag_embeddings(self, batch: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """``[CLS] tags [SEP]`` embeddings, each tag wordpiece with its region's box."""
        where = batch["tag_region"]
        boxes = batch["region_boxes"].gather(1, where.clamp(min=0)[..., None].expand(-1, -1, 5))
        return self.backbone.embed_words(ids, boxes=boxes, box_mask=where >= 0)

    # -- passes
    def region_tag_pass(
        self,
        batch: dict[str, torch.Tensor],
        region_prob: float,
        tag_prob: float,
        tag_prob_region_masked: float,
    ) -> ItemLosses:
        """The region-tag pass (module docstring): per-item ``tag_mlm``, ``mrc`` and ``mrfr`` losses."""
        b = self.backbone
        seeds = batch["sample_seed"]
        region_masked = draw_masks(seeds, batch["region_mask"], region_prob, REGION_SALT)
        tag_index, tag_region = batch["tag_index"], batch["tag_region"]
        n_tags = int(tag_index.max()) + 1 if tag_index.numel() else 0
        tag_of = torch.arange(max(n_tags, 1), device=tag_index.device)
        # For each tag: its region (from its first wordpiece) and whether it exists in the row.
        first = (tag_index[:, None, :] == tag_of[None, :, None]).float().argmax(-1)
        exists = (tag_index[:, None, :] == tag_of[None, :, None]).any(-1)
        region_of_tag = tag_region.gather(1, first)
        region_hit = region_masked.gather(1, region_of_tag.clamp(min=0)) & exists
        prob = torch.where(region_hit, tag_prob_region_masked, tag_prob).float()
        tag_masked = draw_masks(seeds, exists, prob, TAG_SALT)
        piece_masked = tag_masked.gather(1, tag_index.clamp(min=0)) & (tag_index >= 0)
        ids = batch["tag_ids"].masked_fill(piece_masked, MASK_TOKEN_ID)
        hidden, _ = b.joint(
            [
                (self.tag_embeddings(batch, ids), batch["tag_mask"]),
                (b.embed_regions(self.regions(batch, region_masked)), batch["region_mask"]),
            ]
        )
        t = ids.shape[1]
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        tag_rows = rows.expand_as(ids)[piece_masked]
        tag_mlm = F.cross_entropy(
            b.mlm_head(hidden[:, :t][piece_masked]).float(), batch["tag_ids"][piece_masked], reduction="none"
        )
        region_h = hidden[:, t:][region_masked]
        region_rows = rows.expand_as(region_masked)[region_masked]
        # The target is the standardised feature (the embedding's input), not the raw one whose common
        # component would make the regression nearly free.
        target = b.region_embed.standardize(batch["region_feats"][region_masked])
        mrfr = region_feature_loss(self.region_head(region_h), target)
        targets = batch["region_class_ids"][region_masked]
        has = (targets >= 0).any(1)
        mrc = token_set_loss(b.mlm_head(region_h[has]), targets[has])
        return {
            "tag_mlm": (tag_mlm, tag_rows),
            "mrc": (mrc, region_rows[has]),
            "mrfr": (mrfr, region_rows),
        }

    def region_tag_items(self, batch: dict[str, torch.Tensor]) -> ItemLosses:
        """:meth:`region_tag_pass` with the config's masking."""
        cfg = self.config
        return self.region_tag_pass(
            batch, cfg.region_mask_prob, cfg.tag_mask_prob, cfg.tag_mask_prob_region_masked
        )

    def pair_itm(
        self, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The ``pair`` batches of recipes whose pre-training has none (retrieval fine-tuning): weighted
        random-swap ITM and its metrics."""
        cfg = self.config
        per_row, labels, logits = self.swap_itm(batch, cfg.itm_swap_prob, cfg.seed, step)
        itm = per_row.mean()
        acc = (logits.argmax(-1) == labels).float().mean().detach()
        return cfg.itm_weight * itm, {"loss_itm": itm.detach(), "itm_acc": acc}

    def text_mlm(self, batch: dict[str, torch.Tensor], regions: RegionInputs | None = None) -> ItemLosses:
        """MLM on the collator's masked sentence, alone or with ``regions`` (µ-VLA's I-S MLM)."""
        b = self.backbone
        labels = batch["mlm_labels"]
        selected = labels != -100
        parts = [(b.embed_words(batch["mlm_input_ids"]), batch["attention_mask"])]
        if regions is not None:
            parts.append((b.embed_regions(regions), regions.mask))
        hidden, _ = b.joint(parts)
        logits = b.mlm_head(hidden[:, : labels.shape[1]][selected])
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[selected]
        return {"mlm": (F.cross_entropy(logits.float(), labels[selected], reduction="none"), rows)}

    def swap_itm(
        self, batch: dict[str, torch.Tensor], prob: float, seed: int, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITM with each caption swapped for a random one of the global batch with probability ``prob``:
        ``(per-row loss (B,), labels (B,), logits (B, 2))``."""
        ids, mask, labels = swapped_texts(batch, prob, step_seed(seed, step, stream=1))
        logits = self.itm_logits(self.image_pair_input_regions(self.regions(batch)), ids, mask)
        return F.cross_entropy(logits.float(), labels, reduction="none"), labels, logits

    # -- retrieval protocol: the pair input is the region embeddings with their mask as a last channel
    def image_pair_input_regions(self, regions: RegionInputs) -> torch.Tensor:
        emb = self.backbone.embed_regions(regions)
        return torch.cat([emb, regions.mask[..., None].to(emb.dtype)], dim=-1)

    def image_pair_input(self, image: Any) -> torch.Tensor:
        return torch.cat(
            [image.embeddings, image.extra["mask"][..., None].to(image.embeddings.dtype)], dim=-1
        )

    def text_pair_input(self, text: Any) -> torch.Tensor:
        return text.embeddings

    def fuse_inputs(self, image_in: torch.Tensor, text_in: torch.Tensor, text_mask: torch.Tensor):
        """``image_in`` (N, R, H + 1): region embeddings and their mask; ``text_in``: word ids (N, L) or
        word embeddings (N, L, H)."""
        emb, mask = image_in[..., :-1], image_in[..., -1].long()
        words = self.backbone.embed_words(text_in) if text_in.dim() == 2 else text_in
        return self.backbone.fuse_embeddings(emb, mask, words, text_mask)

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    @property
    def has_match_head(self) -> bool:
        return self.config.itm_weight > 0

    @property
    def scores_all_pairs(self) -> bool:
        """Retrieval ranks every pair with the match head (no dual encoder to pre-filter candidates)."""
        return True


def reduce_items(
    losses: ItemLosses, weights: dict[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_k weight_k * global mean of item losses k`` and the detached means to log."""
    total, metrics = None, {}
    for name, (values, _) in losses.items():
        mean = global_item_mean(values)
        metrics[f"loss_{name}"] = mean.detach()
        term = weights.get(name, 1.0) * mean
        total = term if total is None else total + term
    return total, metrics


@dataclass
class UVisualBERTConfig(RegionRecipeConfig):
    """U-VisualBERT's objectives (see the module docstring; masking and ITM fields:
    :class:`RegionRecipeConfig`).

    Args:
        mlm_weight: text-only MLM. tag_mlm_weight, mrc_weight, mrfr_weight: the region-tag pass.
        itm_weight: random-swap ITM on pairs; 0 in pre-training (U-VisualBERT has none), retrieval
            fine-tuning turns it on.
        mixing, mix_weights: ``round_robin`` over image-only and text-only batches, or ``weighted``.
    """

    registry_name: ClassVar[str] = "u-visualbert"

    mlm_weight: float = 1.0
    tag_mlm_weight: float = 1.0
    mrc_weight: float = 1.0
    mrfr_weight: float = 1.0
    itm_weight: float = 0.0
    mixing: str = "round_robin"
    mix_weights: dict[str, float] = field(default_factory=lambda: {"image": 1.0, "text": 1.0})


UVisualBERTConfig.PRESETS = {"base": UVisualBERTConfig, "tiny": UVisualBERTConfig}


class UVisualBERT(RegionRecipe):
    """U-VisualBERT on the region stream; see the module docstring."""

    batch_kinds: ClassVar[tuple[str, ...]] = ("image", "text", "pair")

    def __init__(self, config: UVisualBERTConfig, backbone: RegionStreamBackbone) -> None:
        super().__init__()
        self.config = config
        self._init_region_heads(backbone)

    def stages(self, max_steps: int) -> list[Stage]:
        cfg = self.config
        return [Stage("main", None, ("image", "text"), mixing=cfg.mixing, weights=dict(cfg.mix_weights))]

    def losses(self, kind: str, batch: dict[str, torch.Tensor], step: int):
        if kind == "image":
            return reduce_items(self.region_tag_items(batch), self.config.loss_weights())
        if kind == "text":
            return reduce_items(self.text_mlm(batch), self.config.loss_weights())
        return self.pair_itm(batch, step)


register_recipe(UVisualBERTConfig, UVisualBERT, "region_stream")
