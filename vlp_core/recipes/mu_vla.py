"""µ-VLA (Zhou et al., 2022; seed 001): unsupervised pre-training on weakly aligned (retrieved) pairs with a
multi-granular alignment curriculum, on the region single-stream backbone.

Every ``pair`` batch (an image, one of its retrieved sentences, the sentence's noun phrases linked to the
image's regions) trains three granularities:

- **R-T, region-tag**: the region-tag pass (:mod:`vlp_core.recipes.regions`): MLM on tags, masked region
  classification, region feature regression.
- **R-P, region-phrase**: input ``[CLS] sentence [SEP] regions``. One modality per sample (a fair coin from
  the sample's seed): on the text side each linked phrase is masked whole with its link's mask probability
  (the corpus's ``phrase_links.mask_prob`` = 0.15 × similarity, the reference code's rule) and its
  wordpieces are predicted (MLM); on the vision side each link's region is masked with that probability and
  predicts the linked phrase's wordpieces through the MLM head (**p-MRTC**). Only linked phrases and linked
  regions are ever masked. Pairs without links (known or random pairs) contribute nothing here.
- **I-S, image-sentence**: ITM with the retrieved sentence as the positive and, with probability
  ``itm_swap_prob`` = 0.5, a random sentence of the global batch as the negative; MLM on the sentence with
  the regions in view.

**Curriculum.** Before epoch ``curriculum_epochs`` (m = 1 in the paper) ``L = R-T + R-P + I-S``; from then
on ``L = R-T + w · (R-P + I-S)`` with ``w`` the model's own detached match probability of the (unswapped)
pair. ``curriculum_weighting: per_sample`` (the paper) weights each sample's R-P + I-S by its own ``w_i``;
``batch_mean`` is what the reference code computes (its "no-reduce" loss still used ``reduction='mean'``):
the batch-mean loss times the batch-mean ``w``. R-P and I-S are per-sample means (each sample's masked items
averaged, then the samples), so the two weightings are comparable; R-T is a mean over the global batch's
masked items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from vlp_core.distributed import gather_features
from vlp_core.models.backbones import RegionStreamBackbone
from vlp_core.models.outputs import ModelOutput
from vlp_core.objectives import draw_masks, match_probability, per_sample_mean, token_set_loss
from vlp_core.recipes.base import register_recipe
from vlp_core.recipes.regions import MASK_TOKEN_ID, RegionRecipe, RegionRecipeConfig, reduce_items

__all__ = ["MuVLA", "MuVLAConfig", "curriculum_loss"]

SIDE_SALT = 0x5EED_0003
LINK_SALT = 0x5EED_0004


@dataclass
class MuVLAConfig(RegionRecipeConfig):
    """µ-VLA's objectives and curriculum (module docstring; masking and ITM fields:
    :class:`~vlp_core.recipes.regions.RegionRecipeConfig`, R-T masked as U-VisualBERT's).

    Args:
        tag_mlm_weight, mrc_weight, mrfr_weight: R-T. rp_mlm_weight, rp_mrtc_weight: R-P.
        itm_weight, mlm_weight: I-S.
        link_mask_scale: multiplies each link's stored mask probability (1.0 = the corpus's 0.15 × score).
        curriculum_epochs: m; the weighted phase starts at epoch m (fractions allowed; 0 = from the start).
        curriculum_weighting: ``per_sample`` (the paper) or ``batch_mean`` (the reference code).
    """

    registry_name: ClassVar[str] = "mu-vla"

    tag_mlm_weight: float = 1.0
    mrc_weight: float = 1.0
    mrfr_weight: float = 1.0
    rp_mlm_weight: float = 1.0
    rp_mrtc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    link_mask_scale: float = 1.0
    curriculum_epochs: float = 1.0
    curriculum_weighting: str = "per_sample"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.curriculum_weighting not in ("per_sample", "batch_mean"):
            raise ValueError(
                f"curriculum_weighting must be per_sample or batch_mean, got {self.curriculum_weighting!r}"
            )
        if self.curriculum_epochs < 0 or self.link_mask_scale < 0:
            raise ValueError("curriculum_epochs and link_mask_scale must be >= 0")

    def finetune_overrides(self) -> dict[str, float]:
        """Fine-tuning trains its losses unweighted: the curriculum never starts."""
        return {"curriculum_epochs": float("inf")}


#: tiny: the quick start's 150 steps are about one epoch of retrieved pairs, so the weighted phase starts
#: half-way through to be seen at all.
MuVLAConfig.PRESETS = {"base": MuVLAConfig, "tiny": lambda: MuVLAConfig(curriculum_epochs=0.5)}


def curriculum_loss(per_sample: torch.Tensor, match_prob: torch.Tensor | None, how: str) -> torch.Tensor:
    """The weighted phase's ``w · (R-P + I-S)`` from per-sample losses ``(B,)`` and detached match
    probabilities ``(B,)`` (``None``: the first phase, weight 1).

    ``per_sample``: ``mean_i(w_i l_i)``. ``batch_mean``: ``mean_i(w_i) · mean_i(l_i)``, the means over the
    global batch (the match probabilities are gathered from every rank)."""
    if match_prob is None:
        return per_sample.mean()
    w = match_prob.detach().float()
    if how == "per_sample":
        return (w * per_sample).mean()
    return gather_features(w, with_grad=False).mean() * per_sample.mean()


class MuVLA(RegionRecipe):
    """µ-VLA on the region stream; see the module docstring."""

    batch_kinds: ClassVar[tuple[str, ...]] = ("pair",)

    def __init__(self, config: MuVLAConfig, backbone: RegionStreamBackbone) -> None:
        super().__init__()
        self.config = config
        self._init_region_heads(backbone)

    def region_phrase_pass(
        self, batch: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """R-P (module docstring): per-item ``rp_mlm`` (masked phrase wordpieces) and ``rp_mrtc`` (masked
        linked regions predicting their phrase's wordpieces)."""
        b, cfg = self.backbone, self.config
        seeds = batch["sample_seed"]
        link_region, link_ids = batch["link_region"], batch["link_ids"]
        n = link_region.shape[0]
        linked = link_region >= 0
        vision = draw_masks(seeds, torch.ones(n, 1, dtype=torch.bool), 0.5, SIDE_SALT)[:, 0].to(linked.device)
        # Links are a prefix of each row (the collator packs them), as draw_masks wants.
        prob = (batch["link_prob"] * cfg.link_mask_scale).clamp(max=1.0)
        link_masked = draw_masks(seeds, linked, prob, LINK_SALT)
        text_links = link_masked & ~vision[:, None]
        vision_links = link_masked & vision[:, None]
        # Text side: every wordpiece of a masked phrase.
        phrase_link = batch["phrase_link"]
        piece = text_links.gather(1, phrase_link.clamp(min=0)) & (phrase_link >= 0)
        ids = batch["input_ids"].masked_fill(piece, MASK_TOKEN_ID)
        # Vision side: the regions of the masked links.
        region_masked = torch.zeros_like(batch["region_mask"], dtype=torch.bool)
        rows = torch.arange(n, device=linked.device)[:, None].expand_as(link_region)
        region_masked[rows[vision_links], link_region[vision_links]] = True
        hidden, _ = b.joint(
            [
                (b.embed_words(ids), batch["attention_mask"]),
                (b.embed_regions(self.regions(batch, region_masked)), batch["region_mask"]),
            ]
        )
        length = ids.shape[1]
        text_rows = torch.arange(n, device=ids.device)[:, None].expand_as(ids)[piece]
        rp_mlm = F.cross_entropy(
            b.mlm_head(hidden[:, :length][piece]).float(), batch["input_ids"][piece], reduction="none"
        )
        region_h = hidden[:, length:][rows[vision_links], link_region[vision_links]]
        rp_mrtc = token_set_loss(b.mlm_head(region_h), link_ids[vision_links])
        return {"rp_mlm": (rp_mlm, text_rows), "rp_mrtc": (rp_mrtc, rows[vision_links])}

    def match_probability(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's match probability of each (unswapped) pair, ``(B,)``, without gradient."""
        with torch.no_grad():
            image_in = self.image_pair_input_regions(self.regions(batch))
            return match_probability(self.itm_logits(image_in, batch["input_ids"], batch["attention_mask"]))

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        step: int,
        steps_per_epoch: int,
        kind: str = "pair",
        stage: str | None = None,
    ) -> ModelOutput:
        if kind != "pair":
            raise ValueError(f"µ-VLA has only pair batches, got {kind!r}")
        cfg = self.config
        weights = cfg.loss_weights()
        n = batch["input_ids"].shape[0]
        loss = batch["region_feats"].new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        if weights["tag_mlm"] or weights["mrc"] or weights["mrfr"]:
            loss, metrics = reduce_items(self.region_tag_items(batch), weights)
        items = {}
        if weights["rp_mlm"] or weights["rp_mrtc"]:
            items |= self.region_phrase_pass(batch)
        if weights["mlm"]:
            items |= self.text_mlm(batch, self.regions(batch))
        per_sample = batch["region_feats"].new_zeros(n)
        for name, (values, rows) in items.items():
            mean = per_sample_mean(values, rows, n)
            per_sample = per_sample + weights[name] * mean
            metrics[f"loss_{name}"] = mean.mean().detach()
        if weights["itm"]:
            itm_rows, labels, logits = self.swap_itm(batch, cfg.itm_swap_prob, cfg.seed, step)
            per_sample = per_sample + cfg.itm_weight * itm_rows
            metrics |= {
                "loss_itm": itm_rows.mean().detach(),
                "itm_acc": (logits.argmax(-1) == labels).float().mean().detach(),
            }
        epoch = step / max(1, steps_per_epoch)
        weighted = epoch >= cfg.curriculum_epochs
        w = self.match_probability(batch) if weighted else None
        if w is not None:
            metrics["curriculum_w"] = w.mean()
        loss = loss + curriculum_loss(per_sample, w, cfg.curriculum_weighting)
        return ModelOutput(loss=loss, metrics=metrics)


register_recipe(MuVLAConfig, MuVLA, "region_stream")
