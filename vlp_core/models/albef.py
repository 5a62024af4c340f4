"""ALBEF (Li et al., 2021): align image and text before fusing them, with momentum distillation.

The model is a composition of the shared encoders (:mod:`vlp_core.models.encoders`) and the shared
objectives (:mod:`vlp_core.objectives`): ITC with momentum keys, queues and soft targets, ITM on hard
negatives, and MLM distilled from the momentum model.

Distributed behaviour. Every loss is written so that, with dropout 0, the loss averaged over ranks and the
gradient that DDP averages over ranks equal the single-process values on the concatenated global batch,
whatever the number of processes (given each rank holds its contiguous slice of the global batch, in rank
order, and the vision encoder's output per sample does not depend on the batch, i.e. frozen BatchNorm):

- ITC: local queries against the gathered momentum keys and the queue (``local_loss=True``); each query's
  loss only involves its own online features, so the per-rank mean averages to the global mean.
- ITM (``itm_negatives="global"``): the online image tokens, text states, masks and image keys are gathered
  from all ranks with gradient; every rank samples negatives for the whole global batch with the same
  ``torch.Generator`` seeded from (``seed``, step), then scores its own rows. The loss is normalised by the
  global number of valid rows, so the mean over ranks is the global mean.
- MLM: normalised by the global number of masked tokens likewise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.distributed import gather_features, rank, world_size
from vlp_core.models.encoders import (
    FusionConfig,
    FusionEncoder,
    ImageInputs,
    MLMHead,
    ModelOutput,
    TextConfig,
    TextEncoder,
    VisionConfig,
    VisionEncoder,
    build_text_stack,
    build_vision_encoder,
    pool_text,
)
from vlp_core.objectives import (
    ContrastiveLoss,
    FeatureQueue,
    HardNegatives,
    ITMHead,
    Temperature,
    alpha_ramp,
    build_itm_pairs,
    copy_params_,
    ema_update_,
    itm_loss,
    match_probability,
    mlm_distill_loss,
    momentum_copy,
    sample_hard_negatives,
)

__all__ = ["ALBEF", "ALBEFConfig", "Encoders", "build_encoders", "config_from_dict"]

# Parts that have a momentum twin (ALBEF's model_pairs: the "text encoder" there is BertForMaskedLM, i.e. the
# text layers, the fusion layers and the MLM head, which the momentum MLM targets need).
_MOMENTUM_PARTS = ("vision_encoder", "vision_proj", "text_encoder", "text_proj", "fusion", "mlm_head")
# State-dict prefixes that are training machinery, not weights to fine-tune from.
_NOT_PRETRAINED = ("momentum.", "image_queue.", "text_queue.")


def config_from_dict(base: Any, overrides: dict[str, Any]) -> Any:
    """A copy of dataclass ``base`` with ``overrides`` applied; nested dataclass fields take nested dicts.

    A nested dict may carry ``"preset"`` when its dataclass has a ``preset`` classmethod: the preset then
    replaces the base before the other keys apply. Unknown keys raise ``KeyError`` (typos must not pass
    silently). The result is rebuilt through the constructor, so ``__post_init__`` validation runs.
    """
    overrides = dict(overrides)
    if "preset" in overrides:
        if not hasattr(type(base), "preset"):
            raise KeyError(f"{type(base).__name__} has no presets")
        base = type(base).preset(overrides.pop("preset"))
    names = {f.name for f in dataclasses.fields(base)}
    values = {name: getattr(base, name) for name in names}
    for key, value in overrides.items():
        if key not in names:
            raise KeyError(f"{type(base).__name__} has no field {key!r} (fields: {sorted(names)})")
        current = values[key]
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            values[key] = config_from_dict(current, value)
        else:
            values[key] = value
    return type(base)(**values)


@dataclass
class ALBEFConfig:
    """ALBEF. The defaults are the ``"base"`` preset; :meth:`preset` also knows ``"tiny"``.

    Args:
        text, fusion, vision: the encoders (see their docstrings).
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
            are frozen (``requires_grad=False``; build the optimiser from trainable parameters).
        seed: seeds the ITM negative sampling together with the step.
        pooling: how a text (and a fused) sequence becomes one vector for the ITC projection and the ITM
            head: ``"cls"`` (ALBEF) or ``"mean"`` over the text tokens (the tiny preset: MiniLM's [CLS] state
            is nearly the same for every sentence, see :func:`pool_text`).
    """

    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
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
    pooling: str = "cls"

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.itm_negatives not in ("global", "local"):
            raise ValueError(f"itm_negatives must be 'global' or 'local', got {self.itm_negatives!r}")
        if not 0.0 <= self.momentum <= 1.0 or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"momentum and alpha must be in [0, 1], got {self.momentum}, {self.alpha}")
        if min(self.itc_weight, self.itm_weight, self.mlm_weight) < 0:
            raise ValueError("loss weights must be >= 0")

    @classmethod
    def preset(cls, name: str) -> ALBEFConfig:
        """``"base"``: BERT-base shape (fresh, 6 text + 6 fusion layers), ViT-B/16 at 256 px (random init),
        embed 256, queue 65,536. ``"tiny"``: packaged MiniLM split 3 text + 3 fusion layers (fusion from
        MiniLM layers 3-5, cross-attention fresh), EfficientNet-Lite0 grid at 128 px (4 x 4 + 1 tokens,
        projected to 384, frozen BatchNorm, ImageNet weights), embed 128, queue 1,024."""
        if name == "base":
            return cls()
        if name == "tiny":
            return cls(
                text=TextConfig(pretrained="minilm", num_layers=3),
                fusion=FusionConfig(num_layers=3),
                vision=VisionConfig(kind="cnn", image_size=128, width=384, pretrained=True, freeze_bn=True),
                embed_dim=128,
                queue_size=1024,
                pooling="mean",
            )
        raise KeyError(f"unknown ALBEF preset {name!r} (known: 'base', 'tiny')")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ALBEFConfig:
        """Build from a (nested) dict: ``{"preset": "tiny", "vision": {"image_size": 96}}``; without
        ``"preset"`` the overrides apply to the base preset. ``from_dict(c.to_dict()) == c``."""
        return config_from_dict(cls(), d)

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested dataclasses as dicts (what a run records beside its outputs)."""
        return dataclasses.asdict(self)


class Encoders(NamedTuple):
    """The encoders a downstream model fine-tunes (what :class:`VQAClassifier` takes)."""

    vision_encoder: VisionEncoder
    text_encoder: TextEncoder
    fusion: FusionEncoder


def build_encoders(cfg: ALBEFConfig) -> tuple[Encoders, MLMHead, dict[str, list[str]]]:
    """Vision, text and fusion encoders plus the tied MLM head; the third item lists fresh parameters."""
    vision = build_vision_encoder(cfg.vision)
    text, fusion, head, fresh = build_text_stack(cfg.text, cfg.fusion, vision.width)
    return Encoders(vision, text, fusion), head, fresh


def _global_mean_scale(count: torch.Tensor) -> torch.Tensor:
    """Factor turning a mean over this rank's ``count`` items into its share of the global mean.

    ``local_mean * count * W / global_count``: averaged over the W ranks (as DDP averages gradients) this is
    the mean over all items of the global batch. Exactly 1.0 in a single process.
    """
    count = count.detach().float().clamp(min=1).reshape(1)
    total = gather_features(count, with_grad=False).sum().clamp(min=1)
    return count[0] * world_size() / total


class ALBEF(ImageInputs, nn.Module):
    """ALBEF pre-training model (ITC + ITM + MLM, momentum distillation).

    Inputs follow the project's pre-training batch contract (``pixel_values``, ``input_ids``,
    ``attention_mask``, ``mlm_input_ids``, ``mlm_labels``, ``image_key``; see the data package). Image keys
    are the ITC ids (all captions of one image are positives) and mask same-image ITM negatives; they must be
    ``>= 0`` because -1 marks empty queue slots.

    A forward in training mode first updates the momentum model (EMA), then runs it, and finally enqueues its
    features with the image keys. In eval mode the losses are computed without touching the momentum model
    or the queues. The momentum modules follow the online model's train/eval mode (dropout included, as in
    the reference).

    Attributes:
        init_report: parameter names per part that did not come from a checkpoint, for the run log.
    """

    def __init__(self, config: ALBEFConfig) -> None:
        super().__init__()
        self.config = config
        encoders, head, fresh = build_encoders(config)
        self.vision_encoder = encoders.vision_encoder
        self.text_encoder = encoders.text_encoder
        self.fusion = encoders.fusion
        self.mlm_head = head
        width_v, width_t = self.vision_encoder.width, self.text_encoder.width
        self.vision_proj = nn.Linear(width_v, config.embed_dim)
        self.text_proj = nn.Linear(width_t, config.embed_dim)
        self.itm_head = ITMHead(width_t)
        for lin in (self.vision_proj, self.text_proj, self.itm_head.proj):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.temp = Temperature(config.temp_init, config.temp_min, config.temp_max)
        self.itc = ContrastiveLoss(gather_with_grad=False, local_loss=True)
        # One deep copy of all parts together keeps the MLM decoder tied to the momentum word embeddings.
        self.momentum = momentum_copy(self._online())
        self.image_queue = FeatureQueue(config.embed_dim, config.queue_size)
        self.text_queue = FeatureQueue(config.embed_dim, config.queue_size)
        self.init_report = {**fresh, "heads": ["vision_proj", "text_proj", "itm_head"]}
        self._freeze_unused_()

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

    def _online(self) -> nn.ModuleDict:
        """The online twins of the momentum parts, in the same order (parameters pair up one to one)."""
        return nn.ModuleDict({name: getattr(self, name) for name in _MOMENTUM_PARTS})

    # --------------------------------------------------------------------------------- retrieval helpers

    def image_embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, S, S)`` -> ``(tokens (B, 1+N, Dv), feats (B, E) L2-normalised)``."""
        tokens = self.vision_encoder(pixel_values)
        return tokens, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def text_embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L)`` ids and mask -> ``(hidden (B, L, H), feats (B, E) L2-normalised)``."""
        hidden = self.text_encoder(input_ids, attention_mask)
        return hidden, F.normalize(
            self.text_proj(pool_text(hidden, attention_mask, self.config.pooling)), dim=-1
        )

    def itm_logits(
        self, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Fused pass on paired rows: ``(N, 1+N_img, Dv), (N, L, H), (N, L)`` -> ``(N, 2)`` match logits."""
        fused = self.fusion(text_hidden, text_mask, image_tokens)
        return self.itm_head(pool_text(fused, text_mask, self.config.pooling))

    def itm_scores(
        self, image_tokens: torch.Tensor, text_hidden: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Match probability of each row pair (row i image with row i text): ``(N,)`` in [0, 1]."""
        return match_probability(self.itm_logits(image_tokens, text_hidden, text_mask))

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
        copy_params_(self.momentum, self._online())

    # ------------------------------------------------------------------------------------------ training

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``momentum <- m * momentum + (1 - m) * online`` for every momentum parameter."""
        ema_update_(self.momentum, self._online(), self.config.momentum)

    def after_optimizer_step(self) -> None:
        """Clamp the temperature into its range (call after every optimiser step)."""
        self.temp.clamp_()

    def itm_seed(self, step: int, rank_: int = 0) -> int:
        """Seed of the ITM negative sampling at ``step`` (``rank_`` only matters for local negatives)."""
        # Large odd multipliers spread (seed, step, rank) over the 63-bit range.
        mixed = self.config.seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank_ * 0x94D049BB133111EB
        return mixed % (2**63 - 1)

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

    def _itm(
        self,
        image_tokens: torch.Tensor,
        text_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        feats: dict[str, torch.Tensor],
        image_key: torch.Tensor,
        step: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM loss and accuracy (over valid rows) on ``[positives; text + neg image; neg text + image]``."""
        batch = image_tokens.shape[0]
        n_world = world_size()
        if self.config.itm_negatives == "local":
            neg = self.sample_itm_negatives(
                feats["image"],
                feats["text"],
                feats["image_m"],
                feats["text_m"],
                image_key,
                self.itm_seed(step, rank()),
            )
            pairs = build_itm_pairs(neg)
            tokens_all, hidden_all, mask_all = image_tokens, text_hidden, attention_mask
            scale = None
        else:
            # Pad the text to the longest batch of any rank: all_gather needs one shape; padding is masked.
            length = text_hidden.shape[1]
            if n_world > 1:
                lengths = gather_features(torch.tensor([length], device=text_hidden.device), with_grad=False)
                longest = int(lengths.max())
                if longest > length:
                    text_hidden = F.pad(text_hidden, (0, 0, 0, longest - length))
                    attention_mask = F.pad(attention_mask, (0, longest - length))
            gathered = {k: gather_features(v.detach(), with_grad=False) for k, v in feats.items()}
            key_all = gather_features(image_key, with_grad=False)
            neg = self.sample_itm_negatives(
                gathered["image"],
                gathered["text"],
                gathered["image_m"],
                gathered["text_m"],
                key_all,
                self.itm_seed(step),
            )
            lo, hi = rank() * batch, (rank() + 1) * batch
            mine = HardNegatives(
                image_for_text=neg.image_for_text[lo:hi],
                text_for_image=neg.text_for_image[lo:hi],
                image_valid=neg.image_valid[lo:hi],
                text_valid=neg.text_valid[lo:hi],
                offset=lo,
            )
            pairs = build_itm_pairs(mine)
            tokens_all = gather_features(image_tokens, with_grad=True)
            hidden_all = gather_features(text_hidden, with_grad=True)
            mask_all = gather_features(attention_mask, with_grad=False)
            scale = _global_mean_scale((pairs.labels != -100).sum())
        logits = self.itm_logits(
            tokens_all[pairs.image_idx], hidden_all[pairs.text_idx], mask_all[pairs.text_idx]
        )
        loss = itm_loss(logits, pairs.labels)
        if scale is not None:
            loss = loss * scale
        valid = pairs.labels != -100
        correct = (logits.argmax(dim=1) == pairs.labels) & valid
        acc = correct.sum().float() / valid.sum().clamp(min=1)
        return loss, acc.detach()

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
        hidden = self.fusion(self.text_encoder(ids, mask), mask, image_tokens)
        logits = self.mlm_head(hidden[selected])
        logits_m = None
        if alpha > 0:
            with torch.no_grad():
                m = self.momentum
                hidden_m = m["fusion"](m["text_encoder"](ids, mask), mask, image_tokens_m)
                logits_m = m["mlm_head"](hidden_m[selected])
        loss = mlm_distill_loss(logits, labels[selected], logits_m, alpha)
        return loss * _global_mean_scale(selected.sum())

    def forward(self, batch: dict[str, torch.Tensor], *, step: int, steps_per_epoch: int) -> ModelOutput:
        """Losses for one (local) batch.

        Args:
            batch: the pre-training batch (see the class docstring).
            step: global optimisation step from 0 (alpha ramp, ITM sampling seed).
            steps_per_epoch: optimisation steps per epoch (alpha ramp).

        Returns:
            :class:`ModelOutput` with ``loss = itc_weight * ITC + itm_weight * ITM + mlm_weight * MLM`` and
            metrics ``loss_itc``, ``loss_itm``, ``loss_mlm`` (the parts that run), ``alpha``, ``temp``,
            ``itm_acc``.
        """
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
            image_tokens_m = m["vision_encoder"](pixel_values)
            image_feat_m = F.normalize(m["vision_proj"](image_tokens_m[:, 0]), dim=-1)
            text_hidden_m = m["text_encoder"](input_ids, attention_mask)
            pooled_m = pool_text(text_hidden_m, attention_mask, cfg.pooling)
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
            feats = {"image": image_feat, "text": text_feat, "image_m": image_feat_m, "text_m": text_feat_m}
            loss_itm, acc = self._itm(image_tokens, text_hidden, attention_mask, feats, image_key, step)
            total = total + cfg.itm_weight * loss_itm
            metrics["loss_itm"] = loss_itm.detach()
            metrics["itm_acc"] = acc
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
