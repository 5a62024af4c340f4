"""VLMo (Bao et al., 2022): a Multiway transformer pre-trained stagewise.

1. ``vision`` stage, image-only batches: masked image modelling (block masks, ~40 % of the cells) against
   codebook targets — the frozen ImageNet-grid k-means codebook of :mod:`vlp_core.models.targets`, a
   documented substitute for BEiT's dVAE tokenizer (no package ships it offline; FLAVA's MIM uses the same
   targets). Trains the image embedding, the shared attention, the vision experts and (pre-LN) the final
   norm.
2. ``language`` stage, text-only batches: MLM (whole-word masking when ``data.whole_word_mask``), with the
   attention (and its norms), the vision and the VL experts frozen: trains the text embeddings, the language
   experts and the MLM head.
3. ``vl`` stage, paired batches: ITC with two heads (expert-path [CLS] and VL-path [CLS], separate
   temperatures, loss ``(itc + itc_vl) / 2``), ITM with global hard negatives, MLM on the fused pass (weight
   0.25). Everything trains.

Stage lengths are ``vision_steps`` and ``language_steps``; the VL stage takes the rest of ``max_steps``
(0 skips a stage). Fine-tuning: retrieval as a dual encoder (ITC only, ``retrieval_losses``), VQA as a
fusion encoder (the ``vqa`` task on the backbone's fused pass).

Choices where the paper is silent (all options): ITC gathers features with their gradients by default
(``itc_gather_grad``: exact world-size independence; VLMo's code gathers without, ``False``), ITM negatives
are drawn from the global batch by a step-seeded generator (``itm_negatives: global``; ``local`` is the
reference per-GPU draw), and the MIM / MLM / ITM means are over global counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.distributed import rank
from vlp_core.models.backbones import MultiwayBackbone
from vlp_core.models.outputs import ImageFeatures, PairFeatures, TextFeatures
from vlp_core.models.targets import GridCodebookTargets
from vlp_core.objectives import (
    ContrastiveLoss,
    ITMHead,
    MIMHead,
    Temperature,
    block_masks,
    global_mean_scale,
    hard_negative_itm,
    masked_lm_loss,
    mim_loss,
    step_seed,
)
from vlp_core.recipes.base import Recipe, RecipeConfig, Stage, register_recipe

__all__ = ["VLMo", "VLMoConfig"]

#: XOR-ed into a sample's seed for its image mask, so it is independent of its augmentation draw.
MIM_SEED = 0x5EED_1A6E


@dataclass
class VLMoConfig(RecipeConfig):
    """VLMo's objectives and stages (``"base"``: VLMo-Base's; ``"tiny"``: embed 128, 64 codes, 30 + 30 steps
    of vision and language stages).

    Args:
        embed_dim: ITC projection width.
        temp_init, temp_min, temp_max: the two learnable ITC temperatures (VLMo's logit scales, clamped).
        itc_gather_grad: gather ITC features with gradients (world-size independent) or without (VLMo).
        itm_negatives: ``"global"`` or ``"local"`` (see :func:`hard_negative_itm`).
        itc_weight, itm_weight, mlm_weight, mim_weight: loss weights (MLM 0.25 as in VLMo).
        vision_steps, language_steps: lengths of the vision and language stages (0 = skip).
        mim_ratio: share of image cells masked (block masking).
        codebook_size: k-means codes of the MIM targets.
        seed: ITM draws and the codebook fit.
    """

    registry_name: ClassVar[str] = "vlmo"

    embed_dim: int = 256
    temp_init: float = 0.07
    temp_min: float = 0.01
    temp_max: float = 0.5
    itc_gather_grad: bool = True
    itm_negatives: str = "global"
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 0.25
    mim_weight: float = 1.0
    vision_steps: int = 0
    language_steps: int = 0
    mim_ratio: float = 0.4
    codebook_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.itm_negatives not in ("global", "local"):
            raise ValueError(f"itm_negatives must be 'global' or 'local', got {self.itm_negatives!r}")
        if min(self.itc_weight, self.itm_weight, self.mlm_weight, self.mim_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.vision_steps < 0 or self.language_steps < 0:
            raise ValueError("stage lengths must be >= 0")
        if not 0 < self.mim_ratio < 1:
            raise ValueError(f"mim_ratio must be in (0, 1), got {self.mim_ratio}")


VLMoConfig.PRESETS = {
    "base": VLMoConfig,
    "tiny": lambda: VLMoConfig(embed_dim=128, codebook_size=64, vision_steps=30, language_steps=30),
}


class VLMo(Recipe):
    """VLMo on a :class:`MultiwayBackbone`; see the module docstring. Batch kinds: ``image`` (vision
    stage), ``text`` (language stage), ``pair`` (VL stage)."""

    batch_kinds: ClassVar[tuple[str, ...]] = ("image", "text", "pair")
    retrieval_losses: ClassVar[tuple[str, ...]] = ("itc",)
    machinery: ClassVar[tuple[str, ...]] = ("targets.",)

    def __init__(self, config: VLMoConfig, backbone: MultiwayBackbone) -> None:
        super().__init__()
        if not isinstance(backbone, MultiwayBackbone):
            raise TypeError(f"VLMo needs a multiway backbone, got {type(backbone).__name__}")
        self.config = config
        self.backbone = backbone
        width, e = backbone.width, config.embed_dim
        self.image_proj, self.text_proj = nn.Linear(width, e), nn.Linear(width, e)
        self.vl_image_proj, self.vl_text_proj = nn.Linear(width, e), nn.Linear(width, e)
        self.itm_head = ITMHead(width)
        for lin in (
            self.image_proj,
            self.text_proj,
            self.vl_image_proj,
            self.vl_text_proj,
            self.itm_head.proj,
        ):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.temp = Temperature(config.temp_init, config.temp_min, config.temp_max)
        self.temp_vl = Temperature(config.temp_init, config.temp_min, config.temp_max)
        self.itc = ContrastiveLoss(gather_with_grad=config.itc_gather_grad, local_loss=True)
        self.mim_head = MIMHead(width, config.codebook_size)
        self.targets = GridCodebookTargets(backbone.image_grid[0], config.codebook_size)
        self._freeze_unused_()

    def _freeze_unused_(self) -> None:
        cfg = self.config
        unused: list[nn.Module] = []
        if cfg.itc_weight == 0:
            unused += [
                self.image_proj,
                self.text_proj,
                self.vl_image_proj,
                self.vl_text_proj,
                self.temp,
                self.temp_vl,
            ]
        if cfg.itm_weight == 0:
            unused.append(self.itm_head)
            if cfg.mlm_weight == 0:  # no fused pass: the VL experts train through the VL ITC path only
                pass
        if cfg.mlm_weight == 0:
            head = self.backbone.mlm_head
            unused += [head.dense, head.norm]
            head.bias.requires_grad_(False)
        if cfg.mim_weight == 0:
            unused.append(self.mim_head)
        for module in unused:
            for p in module.parameters():
                p.requires_grad_(False)

    # -- stages
    def stages(self, max_steps: int) -> list[Stage]:
        cfg, b = self.config, self.backbone
        out = []
        if cfg.vision_steps:
            out.append(
                Stage(
                    "vision",
                    cfg.vision_steps,
                    ("image",),
                    trainable=lambda m: [
                        m.backbone.image_embed,
                        m.backbone.image_type,
                        m.backbone.mask_token,
                        *m.backbone.attention_modules(),
                        *m.backbone.experts("vision"),
                        m.backbone.stack.norm,  # pre-LN's final norm (post-LN: an Identity)
                        m.mim_head,
                    ],  # fmt: skip
                )
            )
        if cfg.language_steps:
            out.append(
                Stage(
                    "language",
                    cfg.language_steps,
                    ("text",),
                    trainable=lambda m: [
                        m.backbone.text_embeddings,
                        *m.backbone.experts("text"),
                        m.backbone.mlm_head,
                    ],
                )
            )
        del b
        out.append(Stage("vl", None, ("pair",), trainable=lambda m: [m.backbone, *m.heads()]))
        return out

    def heads(self) -> list[nn.Module]:
        """The VL stage's heads (not the MIM head, which only the vision stage trains)."""
        return [self.image_proj, self.text_proj, self.vl_image_proj, self.vl_text_proj, self.itm_head,
                self.temp, self.temp_vl]  # fmt: skip

    @property
    def wants_image_targets(self) -> bool:
        return self.config.mim_weight > 0 and self.config.vision_steps > 0

    def fit_targets_(self, pixel_values: torch.Tensor, *, seed: int) -> None:
        """Fit the MIM codebook (the pre-train task calls this with training images before step 0)."""
        self.targets.fit_(pixel_values, seed=seed)

    def after_optimizer_step(self) -> None:
        self.temp.clamp_()
        self.temp_vl.clamp_()

    # -- retrieval protocol: the fused pass starts from embeddings (dual encoder + ITM re-ranking)
    def image_pair_input(self, image: ImageFeatures) -> torch.Tensor:
        return image.embeddings

    def text_pair_input(self, text: TextFeatures) -> torch.Tensor:
        return text.embeddings

    def fuse_inputs(
        self, image_in: torch.Tensor, text_in: torch.Tensor, text_mask: torch.Tensor
    ) -> PairFeatures:
        return self.backbone.fuse_embeddings(image_in, text_in, text_mask)

    # -- losses per batch kind
    def _mim(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        px = batch["pixel_values"]
        g = self.backbone.image_grid[0]
        seeds = batch["sample_seed"] ^ MIM_SEED
        mask = block_masks(seeds.cpu(), g, g, self.config.mim_ratio).to(px.device)
        image = self.backbone.encode_image(px, mask=mask)
        logits = self.mim_head(image.tokens[:, 1:][mask])
        targets = self.targets(px)[mask]
        loss = mim_loss(logits, targets) * global_mean_scale(mask.sum())
        acc = (logits.argmax(-1) == targets).float().mean()
        return self.config.mim_weight * loss, {"loss_mim": loss.detach(), "mim_acc": acc.detach()}

    def _text_mlm(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["mlm_labels"]
        selected = labels != -100
        text = self.backbone.encode_text(batch["mlm_input_ids"], batch["attention_mask"], vl_path=False)
        loss = masked_lm_loss(self.backbone.mlm_head(text.hidden[selected]), labels[selected])
        return self.config.mlm_weight * loss, {"loss_mlm": loss.detach()}

    def _pair(
        self, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, b = self.config, self.backbone
        px, ids, mask, keys = (
            batch["pixel_values"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["image_key"],
        )
        image = b.encode_image(px)
        text = b.encode_text(ids, mask)
        img = F.normalize(self.image_proj(image.pooled), dim=-1)
        txt = F.normalize(self.text_proj(text.pooled), dim=-1)
        total = img.new_zeros(())
        metrics: dict[str, torch.Tensor] = {}
        if cfg.itc_weight > 0:
            vl_img = F.normalize(self.vl_image_proj(image.extra["vl_pooled"]), dim=-1)
            vl_txt = F.normalize(self.vl_text_proj(text.extra["vl_pooled"]), dim=-1)
            itc = self.itc(img, txt, self.temp(), ids=keys).loss
            itc_vl = self.itc(vl_img, vl_txt, self.temp_vl(), ids=keys).loss
            loss = 0.5 * (itc + itc_vl)
            total = total + cfg.itc_weight * loss
            metrics |= {
                "loss_itc": loss.detach(),
                "loss_itc_expert": itc.detach(),
                "loss_itc_vl": itc_vl.detach(),
            }
            metrics |= {"temp": self.temp().detach().clone(), "temp_vl": self.temp_vl().detach().clone()}
        if cfg.itm_weight > 0:
            local = cfg.itm_negatives == "local"
            itm = hard_negative_itm(
                self.itm_logits, image.embeddings, text.embeddings, mask,
                image_query=img, text_query=txt, image_key=img, text_key=txt, temperature=self.temp(),
                ids=keys, seed=step_seed(cfg.seed, step, rank() if local else 0), negatives=cfg.itm_negatives,
            )  # fmt: skip
            total = total + cfg.itm_weight * itm.loss
            metrics |= {"loss_itm": itm.loss.detach(), "itm_acc": itm.accuracy}
        if cfg.mlm_weight > 0:
            labels = batch["mlm_labels"]
            selected = labels != -100
            fused = b.fuse_embeddings(image.embeddings, b.embed_text(batch["mlm_input_ids"]), mask)
            loss = masked_lm_loss(b.mlm_head(fused.text[selected]), labels[selected])
            total = total + cfg.mlm_weight * loss
            metrics["loss_mlm"] = loss.detach()
        return total, metrics

    def losses(self, kind: str, batch: dict[str, torch.Tensor], step: int):
        """``image`` batches: MIM; ``text`` batches: text-only MLM; ``pair`` batches: ITC + ITM + MLM."""
        if kind == "image":
            return self._mim(batch)
        if kind == "text":
            return self._text_mlm(batch)
        return self._pair(batch, step)


register_recipe(VLMoConfig, VLMo, "multiway")
