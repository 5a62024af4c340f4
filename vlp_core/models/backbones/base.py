"""The backbone interface and its registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from vlp_core.models.configs import PresetConfig
from vlp_core.models.outputs import ImageFeatures, PairFeatures, TextFeatures

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneConfig",
    "OnBackbone",
    "backbone_config",
    "build_backbone",
    "register_backbone",
]


class BackboneConfig(PresetConfig):
    """Base of backbone configs (dataclasses); ``registry_kind`` is the registry key."""

    registry_kind: ClassVar[str] = ""


class Backbone(nn.Module):
    """What a network is, independent of how it is trained.

    Subclasses set :attr:`config` and implement the four ``encode`` calls. Either modality may be absent in
    a batch: image-only batches call :meth:`encode_image` alone, text-only batches :meth:`encode_text`.

    Attributes:
        width: the width of :attr:`PairFeatures.pooled` (what a VQA / ITM head reads).
        text_width, image_width: widths of :attr:`TextFeatures.pooled` / :attr:`ImageFeatures.pooled`.
    """

    config: Any
    width: int
    text_width: int
    image_width: int
    #: what the image side reads: ``"pixels"`` (transformed images) or ``"regions"`` (the corpus's region
    #: features and boxes, :class:`~vlp_core.models.backbones.region_stream.RegionInputs`).
    image_input_kind: ClassVar[str] = "pixels"
    #: whether :meth:`encode_pair` returns image states conditioned on the text (``PairFeatures.image``, of
    #: width :attr:`width`): single-stream fusion does, cross-attention fusion of text over image does not.
    fused_image_states: ClassVar[bool] = True

    # -- the interface
    def encode_image(self, pixel_values: torch.Tensor, *, mask: torch.Tensor | None = None) -> ImageFeatures:
        """``(B, 3, S, S)`` -> image-only features; ``mask`` (B, N) bool replaces those image tokens by a
        learned mask token (masked image modelling) where the backbone supports it."""
        raise NotImplementedError

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        raise NotImplementedError

    def encode_pair(self, image: ImageFeatures, text: TextFeatures) -> PairFeatures:
        """Fuse already-encoded image and text features (rows pair up one to one)."""
        raise NotImplementedError

    def fuse(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> PairFeatures:
        """Fused features straight from raw inputs (VQA, NLVR2): the cheapest path of the backbone."""
        return self.encode_pair(self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask))

    # -- the task (backbones with task-specific parts, e.g. UniT's per-task queries)
    def use_task(self, task: str) -> None:
        """Select the task-specific parts for ``task`` (a no-op for backbones without any)."""

    @contextmanager
    def task_context(self, task: str) -> Iterator[None]:
        """Run with ``task``'s parts inside the block (a multitask model, per batch)."""
        yield

    # -- what data, optimiser and DDP need to know
    def image_input(self) -> nn.Module:
        """The module that takes the pixels: it knows ``image_size``, ``mean``, ``std`` (and ``grid``)."""
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        return self.image_input().image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.image_input().mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.image_input().std

    @property
    def image_grid(self) -> tuple[int, int] | None:
        """``(rows, cols)`` of the image tokens after the global token (masked image modelling), if any."""
        grid = getattr(self.image_input(), "grid", None)
        return (grid, grid) if grid else None

    def param_roles(self) -> dict[str, list[nn.Module]]:
        """Named groups of modules for per-group learning rates (``optim.lr_mult``), chosen structurally.

        Every backbone has ``"vision"`` (the image side), ``"text"`` and ``"fusion"``; an ImageNet CNN
        inside the image side is also ``"vision_pretrained"``. A module may be in several roles; the most
        specific (the one listed last) wins.
        """
        return {}

    def ddp_kwargs(self) -> dict[str, Any]:
        """Arguments the trainer gives ``DistributedDataParallel`` (e.g. ``find_unused_parameters`` when some
        parameters get no gradient in some batches, as modality experts do)."""
        return {}


class OnBackbone:
    """Mixin for models built around ``self.backbone`` (recipes, task models): the image facts the data
    side needs, the backbone's roles and DDP arguments."""

    backbone: Backbone

    @property
    def image_input_kind(self) -> str:
        return self.backbone.image_input_kind

    def image_batch(self, batch: dict[str, Any]) -> Any:
        """What the backbone's image side takes from a collated batch: ``pixel_values``, or the regions
        (:class:`~vlp_core.models.backbones.region_stream.RegionInputs`) for a region backbone."""
        if self.image_input_kind == "regions":
            from vlp_core.models.backbones.region_stream import RegionInputs

            return RegionInputs.from_batch(batch)
        return batch["pixel_values"]

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.backbone.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.backbone.image_std

    def param_roles(self) -> dict[str, list[nn.Module]]:
        """Named module groups for ``optim.lr_mult``: the backbone's roles (heads belong to none)."""
        return self.backbone.param_roles()

    def ddp_kwargs(self) -> dict[str, Any]:
        return self.backbone.ddp_kwargs()


#: kind -> (config class, backbone class).
BACKBONES: dict[str, tuple[type[BackboneConfig], Callable[[Any], Backbone]]] = {}


def register_backbone(config_cls: type[BackboneConfig], builder: Callable[[Any], Backbone]) -> None:
    """Register a backbone kind under ``config_cls.registry_kind`` (twice is an error)."""
    kind = config_cls.registry_kind
    if not kind or kind in BACKBONES:
        raise KeyError(f"backbone kind {kind!r} is empty or already registered")
    BACKBONES[kind] = (config_cls, builder)


def backbone_config(d: dict[str, Any] | BackboneConfig, *, preset: str | None = None) -> BackboneConfig:
    """A typed backbone config from ``{"kind": ..., **overrides}`` over ``preset`` (or the class defaults).

    Raises ``KeyError`` for an unknown kind or field and ``ValueError`` for an invalid value, naming them.
    """
    if isinstance(d, BackboneConfig):
        return d
    d = dict(d)
    kind = d.get("kind")
    if kind not in BACKBONES:
        raise KeyError(f"unknown backbone kind {kind!r} (known: {sorted(BACKBONES)})")
    cls = BACKBONES[kind][0]
    if preset is not None and "preset" not in d:
        d["preset"] = preset
    return cls.from_dict(d)


def build_backbone(cfg: BackboneConfig | dict[str, Any]) -> Backbone:
    cfg = backbone_config(cfg)
    return BACKBONES[cfg.registry_kind][1](cfg)
