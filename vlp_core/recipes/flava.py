"""FLAVA (Singh et al., 2022): one model pre-trained on image-only, text-only and paired data together.

Batches round-robin over the kinds (``mixing: round_robin``; ``weighted`` draws a kind per step with
``mix_weights``):

- ``image`` (every corpus image): MIM, block masking (~40 % of the cells), the masked cells predict codebook
  ids — the frozen ImageNet-grid k-means codebook of :mod:`vlp_core.models.targets`, a documented substitute
  for FLAVA's DALL-E dVAE (no package ships it offline; the target source is pluggable);
- ``text`` (every corpus sentence): MLM on the text encoder;
- ``pair`` (retrieved, known or mixed pairs, ``data.pairs``): global contrastive over the unimodal [CLS]
  vectors (features gathered with gradients, temperature clamped to [0.01, 1], i.e. logit scale <= ln 100),
  ITM with random caption swap (probability ``itm_swap_prob`` per sample, the partner drawn from the global
  batch; a partner that is a caption of the same image stays a match), and MMM: the masked image and the
  masked caption through the multimodal encoder, masked image cells predicting codes and masked words
  predicting words (on the true pairs only, as FLAVA scores MMM on positives).

All six losses have weight 1.0. World-size independence: masks and swaps are drawn per sample from its
seed, swap partners from a step-seeded generator over the gathered batch, and the masked-token means are
over global counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.backbones import FlavaBackbone
from vlp_core.models.targets import GridCodebookTargets
from vlp_core.models.text import MLMHead
from vlp_core.objectives import (
    ContrastiveLoss,
    ITMHead,
    MIMHead,
    Temperature,
    block_masks,
    global_mean_scale,
    masked_lm_loss,
    mim_loss,
    step_seed,
    swapped_texts,
)
from vlp_core.recipes.base import Recipe, RecipeConfig, Stage, register_recipe
from vlp_core.recipes.vlmo import MIM_SEED

__all__ = ["FLAVA", "FLAVAConfig"]


@dataclass
class FLAVAConfig(RecipeConfig):
    """FLAVA's objectives (``"base"``: FLAVA's; ``"tiny"``: embed 128, 64 codes).

    Args:
        embed_dim: contrastive projection width.
        temp_init, temp_min, temp_max: the learnable temperature and its clamp (FLAVA: logit scale <= ln 100).
        itc_weight, itm_weight, mlm_weight, mim_weight, mmm_text_weight, mmm_image_weight: loss weights.
        itm_swap_prob: probability that a pair's caption is swapped for another one (an ITM negative).
        mim_ratio: share of image cells masked (block masking), for MIM and MMM.
        codebook_size: k-means codes of the image targets.
        mixing: ``round_robin`` over image / text / pair batches or ``weighted`` by ``mix_weights``.
        mix_weights: batch kind -> weight (``weighted`` only).
        seed: swap partners and the codebook fit.
    """

    registry_name: ClassVar[str] = "flava"

    embed_dim: int = 512
    temp_init: float = 0.07
    temp_min: float = 0.01
    temp_max: float = 1.0
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    mim_weight: float = 1.0
    mmm_text_weight: float = 1.0
    mmm_image_weight: float = 1.0
    itm_swap_prob: float = 0.1
    mim_ratio: float = 0.4
    codebook_size: int = 1024
    mixing: str = "round_robin"
    mix_weights: dict[str, float] = field(default_factory=lambda: {"image": 1.0, "text": 1.0, "pair": 1.0})
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.loss_weights().values()) < 0:
            raise ValueError("loss weights must be >= 0")
        if not 0 <= self.itm_swap_prob < 1 or not 0 < self.mim_ratio < 1:
            raise ValueError("itm_swap_prob must be in [0, 1) and mim_ratio in (0, 1)")
        if self.mixing not in ("round_robin", "weighted"):
            raise ValueError(f"mixing must be round_robin or weighted, got {self.mixing!r}")


FLAVAConfig.PRESETS = {"base": FLAVAConfig, "tiny": lambda: FLAVAConfig(embed_dim=128, codebook_size=64)}


class FLAVA(Recipe):
    """FLAVA on a :class:`FlavaBackbone`; see the module docstring."""

    batch_kinds: ClassVar[tuple[str, ...]] = ("image", "text", "pair")
    retrieval_losses: ClassVar[tuple[str, ...]] = ("itc", "itm")
    machinery: ClassVar[tuple[str, ...]] = ("targets.",)

    def __init__(self, config: FLAVAConfig, backbone: FlavaBackbone) -> None:
        super().__init__()
        if not isinstance(backbone, FlavaBackbone):
            raise TypeError(f"FLAVA needs a flava backbone, got {type(backbone).__name__}")
        self.config = config
        self.backbone = backbone
        e = config.embed_dim
        self.image_proj = nn.Linear(backbone.image_width, e)
        self.text_proj = nn.Linear(backbone.text_width, e)
        self.itm_head = ITMHead(backbone.width)
        for lin in (self.image_proj, self.text_proj, self.itm_head.proj):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.temp = Temperature(config.temp_init, config.temp_min, config.temp_max)
        self.itc = ContrastiveLoss(gather_with_grad=True, local_loss=True)
        self.mim_head = MIMHead(backbone.image_width, config.codebook_size)
        self.mmm_image_head = MIMHead(backbone.width, config.codebook_size)
        text_cfg = backbone.text_encoder.config
        self.mmm_text_head = MLMHead(text_cfg, backbone.text_encoder.embeddings.word.weight)
        self.targets = GridCodebookTargets(backbone.image_grid[0], config.codebook_size)
        self._freeze_unused_()

    def _freeze_unused_(self) -> None:
        cfg = self.config
        heads = {
            "itc": [self.image_proj, self.text_proj, self.temp],
            "itm": [self.itm_head],
            "mim": [self.mim_head],
            "mmm_image": [self.mmm_image_head],
            "mmm_text": [self.mmm_text_head.dense, self.mmm_text_head.norm],
            "mlm": [self.backbone.mlm_head.dense, self.backbone.mlm_head.norm],
        }
        for loss, weight in cfg.loss_weights().items():
            if weight == 0:
                for module in heads[loss]:
                    for p in module.parameters():
                        p.requires_grad_(False)
        for loss, head in (("mmm_text", self.mmm_text_head), ("mlm", self.backbone.mlm_head)):
            if getattr(cfg, f"{loss}_weight") == 0:
                head.bias.requires_grad_(False)

    def stages(self, max_steps: int) -> list[Stage]:
        cfg = self.config
        return [Stage("main", None, self.batch_kinds, mixing=cfg.mixing, weights=dict(cfg.mix_weights))]

    def ddp_kwargs(self) -> dict[str, Any]:
        return {"find_unused_parameters": True}  # each batch kind trains its own heads

    @property
    def wants_image_targets(self) -> bool:
        return self.config.mim_weight > 0 or self.config.mmm_image_weight > 0

    def fit_targets_(self, pixel_values: torch.Tensor, *, seed: int) -> None:
        self.targets.fit_(pixel_values, seed=seed)

    def after_optimizer_step(self) -> None:
        self.temp.clamp_()

    # -- losses
    def _image_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        g = self.backbone.image_grid[0]
        seeds = batch["sample_seed"] ^ MIM_SEED
        return block_masks(seeds.cpu(), g, g, self.config.mim_ratio).to(batch["pixel_values"].device)

    def _masked_image_loss(self, head: nn.Module, cells: torch.Tensor, px: torch.Tensor, mask: torch.Tensor):
        """``cells`` (B, N, D) image states at the N grid positions -> MIM loss over the masked ones."""
        logits = head(cells[mask])
        targets = self.targets(px)[mask]
        loss = mim_loss(logits, targets) * global_mean_scale(mask.sum())
        return loss, (logits.argmax(-1) == targets).float().mean().detach()

    def _image(self, batch: dict[str, torch.Tensor]):
        px = batch["pixel_values"]
        mask = self._image_mask(batch)
        image = self.backbone.encode_image(px, mask=mask)
        loss, acc = self._masked_image_loss(self.mim_head, image.tokens[:, 1:], px, mask)
        return self.config.mim_weight * loss, {"loss_mim": loss.detach(), "mim_acc": acc}

    def _text(self, batch: dict[str, torch.Tensor]):
        labels = batch["mlm_labels"]
        selected = labels != -100
        text = self.backbone.encode_text(batch["mlm_input_ids"], batch["attention_mask"])
        loss = masked_lm_loss(self.backbone.mlm_head(text.hidden[selected]), labels[selected])
        return self.config.mlm_weight * loss, {"loss_mlm": loss.detach()}

    def _itm(self, batch: dict[str, torch.Tensor], image_tokens: torch.Tensor, step: int):
        """ITM on the batch with some captions swapped for others of the global batch."""
        seed = step_seed(self.config.seed, step, stream=1)
        ids, mask, labels = swapped_texts(batch, self.config.itm_swap_prob, seed)
        text = self.backbone.encode_text(ids, mask)
        logits = self.itm_logits(image_tokens, text.hidden, mask)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, acc.detach()

    def _pair(self, batch: dict[str, torch.Tensor], step: int):
        cfg, b = self.config, self.backbone
        px, ids, mask, keys = (
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["image_key"],
        )
        image = b.encode_image(px)
        total = image.tokens.new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        if cfg.itc_weight > 0:
            text = b.encode_text(ids, mask)
            img = F.normalize(self.image_proj(image.pooled), dim=-1)
            txt = F.normalize(self.text_proj(text.pooled), dim=-1)
            itc = self.itc(img, txt, self.temp(), ids=keys).loss
            total = total + cfg.itc_weight * itc
            metrics |= {"loss_itc": itc.detach(), "temp": self.temp().detach().clone()}
        if cfg.itm_weight > 0:
            itm, acc = self._itm(batch, image.tokens, step)
            total = total + cfg.itm_weight * itm
            metrics |= {"loss_itm": itm.detach(), "itm_acc": acc}
        if cfg.mmm_text_weight > 0 or cfg.mmm_image_weight > 0:
            img_mask = self._image_mask(batch)
            masked_image = b.encode_image(px, mask=img_mask)
            masked_text = b.encode_text(batch["mlm_input_ids"], mask)
            fused = b.encode_pair(masked_image, masked_text)
            if cfg.mmm_image_weight > 0:
                cells = fused.image[:, 1:]  # the grid positions after the image's global token
                loss, acc = self._masked_image_loss(self.mmm_image_head, cells, px, img_mask)
                total = total + cfg.mmm_image_weight * loss
                metrics |= {"loss_mmm_image": loss.detach(), "mmm_image_acc": acc}
            if cfg.mmm_text_weight > 0:
                labels = batch["mlm_labels"]
                selected = labels != -100
                loss = masked_lm_loss(self.mmm_text_head(fused.text[selected]), labels[selected])
                total = total + cfg.mmm_text_weight * loss
                metrics["loss_mmm_text"] = loss.detach()
        return total, metrics

    def losses(self, kind: str, batch: dict[str, torch.Tensor], step: int):
        """``image``: MIM; ``text``: MLM; ``pair``: contrastive + ITM + MMM (image and text)."""
        if kind == "image":
            return self._image(batch)
        if kind == "text":
            return self._text(batch)
        return self._pair(batch, step)


register_recipe(FLAVAConfig, FLAVA, "flava")
