"""The recipe interface (how a backbone is pre-trained), stages, and the recipe registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.backbones import Backbone, BackboneConfig, OnBackbone, build_backbone
from vlp_core.models.configs import PresetConfig
from vlp_core.models.layers import gather_rows
from vlp_core.models.outputs import ImageFeatures, ModelOutput, PairFeatures, TextFeatures
from vlp_core.objectives import match_probability

__all__ = [
    "default_backbone_kind",
    "RECIPES",
    "Recipe",
    "RecipeConfig",
    "Stage",
    "build_recipe",
    "recipe_config",
    "register_recipe",
]


@dataclass
class Stage:
    """One stage of pre-training: which batch kinds it draws, how, for how long, and what trains.

    Attributes:
        name: shown in logs and recorded in checkpoints.
        steps: optimiser steps; ``None`` = the rest of ``max_steps`` (only the last stage).
        kinds: batch kinds drawn in this stage (``"pair"``, ``"image"``, ``"text"``, ...).
        mixing: ``"round_robin"`` (kinds in turn, one per step) or ``"weighted"`` (a kind per step drawn
            with ``weights`` from a generator seeded by the step, so every rank draws the same).
        weights: kind -> sampling weight for ``"weighted"``.
        trainable: model -> the modules (or parameters) that train in this stage, chosen structurally (by
            module, never by parameter-name patterns); ``None`` = everything. The rest keeps
            ``requires_grad=False`` for the stage and the optimiser holds only the trainable parameters.
    """

    name: str
    steps: int | None
    kinds: tuple[str, ...] = ("pair",)
    mixing: str = "round_robin"
    weights: dict[str, float] = field(default_factory=dict)
    trainable: Callable[[nn.Module], list[nn.Module | nn.Parameter]] | None = None

    def __post_init__(self) -> None:
        if self.mixing not in ("round_robin", "weighted"):
            raise ValueError(
                f"stage {self.name}: mixing must be round_robin or weighted, got {self.mixing!r}"
            )
        if not self.kinds:
            raise ValueError(f"stage {self.name} draws no batch kind")
        if self.mixing == "weighted":
            missing = set(self.kinds) - set(self.weights)
            if (
                missing
                or any(self.weights[k] < 0 for k in self.kinds)
                or not sum(self.weights[k] for k in self.kinds)
            ):
                raise ValueError(f"stage {self.name}: weights {self.weights} do not cover kinds {self.kinds}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"stage {self.name}: steps must be >= 1, got {self.steps}")


class RecipeConfig(PresetConfig):
    """Base of recipe configs (dataclasses). ``registry_name`` is the registry key; fields named
    ``<loss>_weight`` are the loss weights (a task may zero the ones it does not train)."""

    registry_name: ClassVar[str] = ""

    def finetune_overrides(self) -> dict[str, Any]:
        """Fields a fine-tuning task sets besides the loss weights (e.g. µ-VLA's curriculum off)."""
        return {}

    def loss_weights(self) -> dict[str, float]:
        return {
            f.name[: -len("_weight")]: getattr(self, f.name)
            for f in fields(self)
            if f.name.endswith("_weight")
        }  # type: ignore[arg-type]


class Recipe(OnBackbone, nn.Module):
    """How a backbone is pre-trained: heads, objectives, batch kinds and stages around ``self.backbone``.

    A recipe's ``forward(batch, *, step, steps_per_epoch, kind="pair", stage=None)`` returns a
    :class:`ModelOutput`; the trainer calls it with the batch kind and stage name it drew. Retrieval
    evaluation uses :meth:`image_embed`, :meth:`text_embed` and (if the recipe has an ``itm_head``)
    :meth:`itm_scores`; a recipe adapts them through the small hooks ``project_image`` / ``project_text``,
    ``image_pair_input`` / ``text_pair_input`` and ``fuse_inputs``.

    Attributes:
        backbone: the :class:`Backbone` (fine-tuning tasks load ``backbone.*`` weights from a run).
        batch_kinds: the batch kinds the recipe consumes.
    """

    config: Any
    backbone: Backbone
    batch_kinds: ClassVar[tuple[str, ...]] = ("pair",)
    #: the losses retrieval fine-tuning trains by default (the task may name others).
    retrieval_losses: ClassVar[tuple[str, ...]] = ("itc",)
    #: state-dict prefixes that are training machinery (momentum twins, queues, MIM targets), not weights.
    machinery: ClassVar[tuple[str, ...]] = ()

    # -- stages and training hooks
    def stages(self, max_steps: int) -> list[Stage]:
        """The recipe's stages (default: one stage over every step, drawing :attr:`batch_kinds` in turn)."""
        return [Stage("main", None, kinds=self.batch_kinds)]

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step (e.g. clamp a temperature)."""

    # -- fine-tuning hand-off
    def pretrained_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights worth starting from: everything but training machinery (:attr:`machinery`)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.machinery)}

    def load_pretrained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the weights of a run of the same recipe, strictly (machinery entries are ignored)."""
        online = {k: v for k, v in state.items() if not k.startswith(self.machinery)}
        missing, unexpected = self.load_state_dict(online, strict=False)
        missing = [k for k in missing if not k.startswith(self.machinery)]
        if missing or unexpected:
            raise KeyError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

    # -- retrieval protocol (zero-shot and fine-tuned retrieval evaluation, ITM hard negatives)
    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        """The ITC projection of an image's pooled vector (default: ``self.image_proj``)."""
        return self.image_proj(pooled)

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.text_proj(pooled)

    def image_pair_input(self, image: ImageFeatures) -> torch.Tensor:
        """What the fused pass of :meth:`itm_logits` takes on the image side (default: the image-only
        output tokens; a single-stream backbone's recipe returns the embeddings)."""
        return image.tokens

    def text_pair_input(self, text: TextFeatures) -> torch.Tensor:
        return text.hidden

    def fuse_inputs(
        self, image_in: torch.Tensor, text_in: torch.Tensor, text_mask: torch.Tensor
    ) -> PairFeatures:
        """The fused pass from :meth:`image_pair_input` / :meth:`text_pair_input` rows."""
        return self.backbone.fuse_states(image_in, text_in, text_mask)

    def image_embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, S, S)`` -> ``(pair input (B, N, D), ITC features (B, E) L2-normalised)``."""
        image = self.backbone.encode_image(pixel_values)
        return self.image_pair_input(image), F.normalize(self.project_image(image.pooled), dim=-1)

    def text_embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L)`` ids and mask -> ``(pair input (B, L, H), ITC features (B, E) L2-normalised)``."""
        text = self.backbone.encode_text(input_ids, attention_mask)
        return self.text_pair_input(text), F.normalize(self.project_text(text.pooled), dim=-1)

    def itm_logits(
        self,
        image_in: torch.Tensor,
        text_in: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        image_index: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fused pass on paired rows (row i image with row i text) -> ``(N, 2)`` match logits; with
        ``image_index`` / ``text_index``, row i pairs ``image_in[image_index[i]]`` with
        ``text_in[text_index[i]]`` (distinct inputs, each scored several times: ITM)."""
        return self.itm_head(
            self.fuse_pooled(image_in, text_in, text_mask, image_index=image_index, text_index=text_index)
        )

    def fuse_pooled(
        self,
        image_in: torch.Tensor,
        text_in: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        image_index: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The pooled vector of :meth:`fuse_inputs` (what ITM reads), the inputs gathered by the indices
        first; a recipe whose backbone computes it for less overrides this."""
        if image_index is not None:
            image_in = gather_rows(image_in, image_index)
        if text_index is not None:
            text_in, text_mask = gather_rows(text_in, text_index), text_mask.index_select(0, text_index)
        return self.fuse_inputs(image_in, text_in, text_mask).pooled

    def itm_scores(
        self, image_in: torch.Tensor, text_in: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """Match probability of each row pair: ``(N,)`` in [0, 1] (re-ranks retrieval; needs ``itm_head``)."""
        return match_probability(self.itm_logits(image_in, text_in, text_mask))

    def cutmix_options(self) -> dict[str, Any] | None:
        """Keyword arguments of :class:`~vlp_core.data.cutmix.CutMixCollator` when the recipe's text-only
        batches carry cross-modal CutMix views (VLMixer), else ``None`` (plain text batches)."""
        return None

    @property
    def has_match_head(self) -> bool:
        """Whether :meth:`itm_scores` means something (an ITM head that trains), so retrieval re-ranks."""
        return getattr(self, "itm_head", None) is not None

    @property
    def wants_image_targets(self) -> bool:
        """Whether the recipe trains masked image modelling, so the task must fit its targets (see
        :meth:`fit_targets_`) before step 0."""
        return False

    def fit_targets_(self, pixel_values: torch.Tensor, *, seed: int) -> None:
        """Fit the masked-image-modelling targets on ``(N, 3, S, S)`` training images."""
        raise NotImplementedError(f"{type(self).__name__} has no image targets")

    def losses(
        self, kind: str, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(weighted loss, metrics)`` of one ``kind`` batch (one of :attr:`batch_kinds`)."""
        raise NotImplementedError

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        step: int,
        steps_per_epoch: int,
        kind: str = "pair",
        stage: str | None = None,
    ) -> ModelOutput:
        """The losses of one (local) batch of ``kind``; a recipe that needs ``steps_per_epoch`` or
        ``stage`` (ALBEF's alpha ramp) overrides this instead of :meth:`losses`."""
        if kind not in self.batch_kinds:
            raise ValueError(f"{type(self).__name__} has no {kind!r} batches ({', '.join(self.batch_kinds)})")
        loss, metrics = self.losses(kind, batch, step)
        return ModelOutput(loss=loss, metrics=metrics)


@dataclass
class _Entry:
    config: type[RecipeConfig]
    recipe: type[Recipe]
    backbone_kind: str


#: recipe (method) name -> its config class, recipe class and default backbone kind.
RECIPES: dict[str, _Entry] = {}


def register_recipe(config_cls: type[RecipeConfig], recipe_cls: type[Recipe], backbone_kind: str) -> None:
    name = config_cls.registry_name
    if not name or name in RECIPES:
        raise KeyError(f"recipe {name!r} is empty or already registered")
    RECIPES[name] = _Entry(config_cls, recipe_cls, backbone_kind)


def _entry(name: str) -> _Entry:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r} (known: {sorted(RECIPES)})") from None


def recipe_config(name: str, overrides: dict[str, Any] | None = None, *, preset: str | None = None) -> Any:
    """The typed config of recipe ``name``: ``preset`` (or defaults) + nested ``overrides``."""
    d = dict(overrides or {})
    if preset is not None and "preset" not in d:
        d["preset"] = preset
    return _entry(name).config.from_dict(d)


def default_backbone_kind(name: str) -> str:
    return _entry(name).backbone_kind


def build_recipe(name: str, config: Any, backbone: Backbone | BackboneConfig | dict[str, Any]) -> Recipe:
    """Recipe ``name`` with its typed ``config`` around ``backbone`` (built when given a config)."""
    entry = _entry(name)
    if not isinstance(backbone, Backbone):
        backbone = build_backbone(backbone)
    if not isinstance(config, entry.config):
        config = entry.config.from_dict(config)
    return entry.recipe(config, backbone)
