"""ALBEF (Li et al., 2021): align image and text before fusing them, with momentum distillation.

A composition of shared parts on a :class:`DualStreamBackbone`: ITC with momentum keys, queues and soft
targets (:class:`ContrastiveLoss`, :class:`FeatureQueue`, :class:`MomentumTwin`), ITM on hard negatives
(:func:`hard_negative_itm`), and MLM distilled from the momentum model (:func:`mlm_distill_loss`).

Distributed behaviour. Every loss is written so that, with dropout 0, the loss averaged over ranks and the
gradient that DDP averages over ranks equal the single-process values on the concatenated global batch,
whatever the number of processes (given each rank holds its contiguous slice of the global batch, in rank
order, and the vision encoder's output per sample does not depend on the batch, i.e. frozen BatchNorm):

- ITC: local queries against the gathered momentum keys and the queue (``local_loss=True``); each query's
  loss only involves its own online features, so the per-rank mean averages to the global mean.
- ITM (``itm_negatives="global"``): see :func:`hard_negative_itm`.
- MLM: normalised by the global number of masked tokens (:func:`global_mean_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.distributed import rank
from vlp_core.models.backbones import DualStreamBackbone
from vlp_core.models.layers import selected_rows
from vlp_core.models.outputs import ModelOutput
from vlp_core.models.text import pool_text
from vlp_core.objectives import (
    ContrastiveLoss,
    FeatureQueue,
    HardNegatives,
    ITMHead,
    MomentumTwin,
    Temperature,
    alpha_ramp,
    global_mean_scale,
    hard_negative_itm,
    mlm_distill_loss,
    sample_hard_negatives,
    step_seed,
)
from vlp_core.recipes.base import Recipe, RecipeConfig, register_recipe

__all__ = ["ALBEF", "ALBEFConfig"]

# State-dict prefixes that are training machinery, not weights to fine-tune from.
_NOT_PRETRAINED = ("momentum.", "image_queue.", "text_queue.")


@dataclass
class ALBEFConfig(RecipeConfig):
    """ALBEF's objectives. The defaults are the ``"base"`` preset; ``"tiny"`` has embed 128, queue 1,024.

    Args:
        embed_dim: ITC projection width E.
        queue_size: momentum feature queue length; a multiple of the global batch size.
        momentum: EMA coefficient of the momentum model.
        alpha: final distillation weight (ITC soft targets and MLM soft targets).
        alpha_ramp_epochs: alpha ramps linearly from 0 over this many epochs (ALBEF 1, LAVIS 2; 0 = no ramp).
        distill: use momentum soft targets at all (``False`` = alpha 0; momentum keys and queues stay).
        temp_init, temp_min, temp_max: learnable ITC temperature, clamped after every optimiser step.
        itm_negatives: ``"global"`` (negatives from the whole global batch, identical for any number of
            processes) or ``"local"`` (from this rank's batch only, as the reference code does per GPU).
        itc_weight, itm_weight, mlm_weight: loss weights; a part with weight 0 is skipped (e.g. retrieval
            fine-tuning sets ``mlm_weight=0`` and no MLM pass runs) and the parameters only it would train
            are frozen (``requires_grad=False``; the optimiser is built from trainable parameters).
        seed: seeds the ITM negative sampling together with the step.
    """

    registry_name: ClassVar[str] = "albef"

    embed_dim: int = 256
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    alpha_ramp_epochs: float = 1.0
    distill: bool = True
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    itm_negatives: str = "global"
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.itm_negatives not in ("global", "local"):
            raise ValueError(f"itm_negatives must be 'global' or 'local', got {self.itm_negatives!r}")
        if not 0.0 <= self.momentum <= 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"momentum and alpha must be in [0, 1], got {self.momentum}, {self.alpha}")
        if min(self.itc_weight, self.itm_weight, self.mlm_weight) < 0:
            raise ValueError("loss weights must be >= 0")


ALBEFConfig.PRESETS = {"base": ALBEFConfig, "tiny": lambda: ALBEFConfig(embed_dim=128, queue_size=1024)}


class ALBEF(Recipe):
    """ALBEF pre-training (ITC + ITM + MLM, momentum distillation) on a dual-stream backbone.

    Inputs follow the project's pre-training batch contract (``pixel_values``, ``input_ids``,
    ``attention_mask``, ``mlm_input_ids``, ``mlm_labels``, ``image_key``; see the data package). Image keys
    are the ITC ids (all captions of one image are positives) and mask same-image ITM negatives; they must be
    ``>= 0`` because -1 marks empty queue slots.

    A forward in training mode first updates the momentum model (EMA), then runs it, and finally enqueues its
    features with the image keys. In eval mode the losses are computed without touching the momentum model
    or the queues. The momentum modules follow the online model's train/eval mode (dropout included, as in
    the reference).
    """

    retrieval_losses: ClassVar[tuple[str, ...]] = ("itc", "itm")

    def __init__(self, config: ALBEFConfig, backbone: DualStreamBackbone) -> None:
        super().__init__()
        if not isinstance(backbone, DualStreamBackbone):
            raise TypeError(f"ALBEF needs a dual_stream backbone, got {type(backbone).__name__}")
        self.config = config
        self.backbone = backbone
        self.vision_proj = nn.Linear(backbone.image_width, config.embed_dim)
        self.text_proj = nn.Linear(backbone.text_width, config.embed_dim)
        self.itm_head = ITMHead(backbone.width)
        for lin in (self.vision_proj, self.text_proj, self.itm_head.proj):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.temp = Temperature(config.temp_init, config.temp_min, config.temp_max)
        self.itc = ContrastiveLoss(gather_with_grad=False, local_loss=True)
        # ALBEF's model_pairs: the "text encoder" there is BertForMaskedLM, i.e. the text layers, the fusion
        # layers and the MLM head, which the momentum MLM targets need.
        self.momentum = MomentumTwin(self._online(), config.momentum)
        self.image_queue = FeatureQueue(config.embed_dim, config.queue_size)
        self.text_queue = FeatureQueue(config.embed_dim, config.queue_size)
        self.init_report = {**backbone.init_report, "heads": ["vision_proj", "text_proj", "itm_head"]}
        self._freeze_unused_()

    # -- the parts (short names for the backbone's modules)
    @property
    def vision_encoder(self) -> nn.Module:
        return self.backbone.vision_encoder

    @property
    def text_encoder(self) -> nn.Module:
        return self.backbone.text_encoder

    @property
    def fusion(self) -> nn.Module:
        return self.backbone.fusion

    @property
    def mlm_head(self) -> nn.Module:
        return self.backbone.mlm_head

    def _online(self) -> nn.ModuleDict:
        """The online twins of the momentum parts, in order (parameters pair up one to one)."""
        b = self.backbone
        return nn.ModuleDict(
            {
                "vision_encoder": b.vision_encoder,
                "vision_proj": self.vision_proj,
                "text_encoder": b.text_encoder,
                "text_proj": self.text_proj,
                "fusion": b.fusion,
                "mlm_head": b.mlm_head,
            }
        )

    def _freeze_unused_(self) -> None:
        """Freeze the parameters that no loss reaches when a loss weight is 0 (e.g. the MLM head in retrieval
        fine-tuning), so they neither decay in the optimiser nor need DDP's ``find_unused_parameters``."""
        cfg = self.config
        unused: list[nn.Module | nn.Parameter] = []
        if cfg.mlm_weight == 0:
            # Not the decoder: it is the word embedding matrix, which the text encoder uses.
            unused += [self.mlm_head.dense, self.mlm_head.norm, self.mlm_head.bias]
        if cfg.itm_weight == 0:
            unused.append(self.itm_head)
            if cfg.mlm_weight == 0:
                unused.append(self.fusion)
        if cfg.itc_weight == 0:
            unused += [self.vision_proj, self.text_proj, self.temp]
        for item in unused:
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            for p in params:
                p.requires_grad_(False)

    # --------------------------------------------------------------------------------- retrieval helpers

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(pooled)

    def fuse_pooled(
        self,
        image_in: torch.Tensor,
        text_in: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        image_index: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.backbone.fuse_pooled(
            image_in, text_in, text_mask, image_index=image_index, text_index=text_index
        )

    def pretrained_state_dict(self) -> dict[str, torch.Tensor]:
        """Online weights only (no momentum model, no queues): what fine-tuning starts from."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_NOT_PRETRAINED)}

    def load_pretrained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load online weights (e.g. :meth:`pretrained_state_dict` of a pre-training run), strictly.

        Momentum and queue entries in ``state`` are ignored; the momentum model restarts as a copy of the
        loaded online weights and the queues keep their fresh state, as ALBEF's fine-tuning does.
        """
        online = {k: v for k, v in state.items() if not k.startswith(_NOT_PRETRAINED)}
        missing, unexpected = self.load_state_dict(online, strict=False)
        missing = [k for k in missing if not k.startswith(_NOT_PRETRAINED)]
        if missing or unexpected:
            raise KeyError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.sync_momentum_()

    @torch.no_grad()
    def sync_momentum_(self) -> None:
        """Set the momentum model to a copy of the online weights (keeps it frozen)."""
        self.momentum.sync_(self._online())

    # ------------------------------------------------------------------------------------------ training

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``momentum <- m * momentum + (1 - m) * online`` for every momentum parameter."""
        self.momentum.update_(self._online())

    def after_optimizer_step(self) -> None:
        """Clamp the temperature into its range (call after every optimiser step)."""
        self.temp.clamp_()

    def itm_seed(self, step: int, rank_: int = 0) -> int:
        """Seed of the ITM negative sampling at ``step`` (``rank_`` only matters for local negatives)."""
        return step_seed(self.config.seed, step, rank_)

    def sample_itm_negatives(
        self,
        image_feats: torch.Tensor,
        text_feats: torch.Tensor,
        image_feats_m: torch.Tensor,
        text_feats_m: torch.Tensor,
        image_key: torch.Tensor,
        seed: int,
    ) -> HardNegatives:
        """One negative text per image and one negative image per text among ``n`` pairs.

        Drawn from ``softmax(online query . momentum key / T)``: as in ALBEF, the online features of the
        batch against its momentum features. Pairs of the same image (equal ``image_key``) are never drawn.
        Shapes: feats ``(n, E)`` L2-normalised, ``image_key (n,)``; ``seed`` seeds the draw.
        """
        temp = self.temp().detach()
        sim_i2t = image_feats.detach() @ text_feats_m.t() / temp
        sim_t2i = text_feats.detach() @ image_feats_m.t() / temp
        same = image_key[:, None] == image_key[None, :]
        gen = torch.Generator(device=sim_i2t.device).manual_seed(seed)
        return sample_hard_negatives(sim_i2t, sim_t2i, same, generator=gen)

    def _mlm(
        self,
        batch: dict[str, torch.Tensor],
        image_tokens: torch.Tensor,
        image_tokens_m: torch.Tensor,
        alpha: float,
    ) -> torch.Tensor:
        """Masked LM conditioned on the image, distilled from the momentum model on the same masked input.

        Only masked positions go through the vocabulary head (``(M, V)`` logits instead of ``(B, L, V)``).
        """
        ids, mask, labels = batch["mlm_input_ids"], batch["attention_mask"], batch["mlm_labels"]
        selected = labels != -100
        rows, valid = selected_rows(selected) if self.backbone.prune_top_layer else (None, selected)
        # with rows, the top fusion layer computes the masked positions only: hidden[valid] == full[selected]
        hidden = self.fusion(self.text_encoder(ids, mask), mask, image_tokens, rows=rows)
        logits = self.mlm_head(hidden[valid])
        logits_m = None
        if alpha > 0:
            with torch.no_grad():
                m = self.momentum
                hidden_m = m["fusion"](m["text_encoder"](ids, mask), mask, image_tokens_m, rows=rows)
                logits_m = m["mlm_head"](hidden_m[valid])
        loss = mlm_distill_loss(logits, labels[selected], logits_m, alpha)
        return loss * global_mean_scale(selected.sum())

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        step: int,
        steps_per_epoch: int,
        kind: str = "pair",
        stage: str | None = None,
    ) -> ModelOutput:
        """Losses for one (local) paired batch.

        Args:
            batch: the pre-training batch (see the class docstring).
            step: global optimisation step from 0 (alpha ramp, ITM sampling seed).
            steps_per_epoch: optimisation steps per epoch (alpha ramp).
            kind, stage: ALBEF consumes ``"pair"`` batches only, in one stage.

        Returns:
            :class:`ModelOutput` with ``loss = itc_weight * ITC + itm_weight * ITM + mlm_weight * MLM`` and
            metrics ``loss_itc``, ``loss_itm``, ``loss_mlm`` (the parts that run), ``alpha``, ``temp``,
            ``itm_acc``.
        """
        if kind != "pair":
            raise ValueError(f"ALBEF trains on paired batches, got a {kind!r} batch")
        cfg = self.config
        pixel_values = batch["pixel_values"]
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        image_key = batch["image_key"]
        alpha = alpha_ramp(step, steps_per_epoch, cfg.alpha, cfg.alpha_ramp_epochs) if cfg.distill else 0.0
        temp = self.temp()

        image_tokens, image_feat = self.image_embed(pixel_values)
        text_hidden, text_feat = self.text_embed(input_ids, attention_mask)

        with torch.no_grad():
            if self.training:
                self.momentum_update()
            m = self.momentum
            # the momentum image tokens feed the MLM distillation; ITC alone reads their [CLS]
            tokens_read = cfg.mlm_weight > 0 and alpha > 0
            global_only = not tokens_read and self.backbone.prune_top_layer
            image_tokens_m = m["vision_encoder"](pixel_values, global_only=global_only)
            image_feat_m = F.normalize(m["vision_proj"](image_tokens_m[:, 0]), dim=-1)
            # only the pooled vector is read: the top layer at [CLS] alone when that is the pooling
            rows = self.backbone.top_rows(attention_mask.shape[0], attention_mask.device)
            text_hidden_m = m["text_encoder"](input_ids, attention_mask, rows=rows)
            pooled_m = pool_text(text_hidden_m, attention_mask, self.backbone.config.pooling)
            text_feat_m = F.normalize(m["text_proj"](pooled_m), dim=-1)

        metrics: dict[str, torch.Tensor] = {}
        total = image_feat.new_zeros(())
        if cfg.itc_weight > 0:
            itc = self.itc(
                image_feat,
                text_feat,
                temp,
                image_feats_m=image_feat_m,
                text_feats_m=text_feat_m,
                image_queue=self.image_queue.keys(),
                text_queue=self.text_queue.keys(),
                alpha=alpha,
                ids=image_key,
                queue_ids=self.image_queue.ids,
            )
            total = total + cfg.itc_weight * itc.loss
            metrics["loss_itc"] = itc.loss.detach()
        if cfg.itm_weight > 0:
            local = cfg.itm_negatives == "local"
            itm = hard_negative_itm(
                self.itm_logits,
                image_tokens,
                text_hidden,
                attention_mask,
                image_query=image_feat,
                text_query=text_feat,
                image_key=image_feat_m,
                text_key=text_feat_m,
                temperature=temp,
                ids=image_key,
                seed=self.itm_seed(step, rank() if local else 0),
                negatives=cfg.itm_negatives,
                shared=self.backbone.prune_top_layer,
            )
            total = total + cfg.itm_weight * itm.loss
            metrics["loss_itm"] = itm.loss.detach()
            metrics["itm_acc"] = itm.accuracy
        if cfg.mlm_weight > 0:
            loss_mlm = self._mlm(batch, image_tokens, image_tokens_m, alpha)
            total = total + cfg.mlm_weight * loss_mlm
            metrics["loss_mlm"] = loss_mlm.detach()
        metrics["alpha"] = torch.tensor(alpha, device=total.device)
        metrics["temp"] = temp.detach().clone()

        if self.training:
            self.image_queue.enqueue(image_feat_m, ids=image_key)
            self.text_queue.enqueue(text_feat_m, ids=image_key)
        return ModelOutput(loss=total, metrics=metrics)

    def extra_repr(self) -> str:
        c = self.config
        return f"embed_dim={c.embed_dim}, queue={c.queue_size}, itm_negatives={c.itm_negatives!r}"


register_recipe(ALBEFConfig, ALBEF, "dual_stream")
