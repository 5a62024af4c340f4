"""Backbones: what the network is. A registry of kinds, each a typed config and a module.

Every backbone implements :class:`Backbone`: ``encode_image``, ``encode_text``, ``encode_pair`` (and
``fuse`` from raw inputs) returning the typed features of :mod:`vlp_core.models.outputs`. Recipes (how a
backbone is pre-trained) and tasks (what it is fine-tuned for) only talk to this interface, so any task runs
on any backbone.

Known kinds:

- ``dual_stream`` (:class:`DualStreamBackbone`): image encoder + text encoder + cross-attention fusion
  layers (ALBEF).
- ``multiway`` (:class:`MultiwayBackbone`): one shared-attention stack with vision / language /
  vision-language experts (VLMo).
- ``flava`` (:class:`FlavaBackbone`): image encoder, text encoder and a single-stream multimodal encoder
  over ``[CLS_M; image; text]`` (FLAVA).
- ``region_stream`` (:class:`RegionStreamBackbone`): one BERT stack over ``[CLS] words [SEP] regions`` with
  the corpus's region features, tags carrying their region's box (µ-VLA, U-VisualBERT, VLMixer).
- ``unit`` (:class:`UniTBackbone`): image encoder, text encoder and one decoder shared by every task, with
  per-task queries (UniT).
"""

from vlp_core.models.backbones.base import (
    BACKBONES,
    Backbone,
    BackboneConfig,
    OnBackbone,
    backbone_config,
    build_backbone,
    register_backbone,
)
from vlp_core.models.backbones.dual_stream import DualStreamBackbone, DualStreamConfig
from vlp_core.models.backbones.flava import FlavaBackbone, FlavaConfig
from vlp_core.models.backbones.multiway import MultiwayBackbone, MultiwayConfig
from vlp_core.models.backbones.region_stream import (
    RegionEmbedding,
    RegionInputs,
    RegionStreamBackbone,
    RegionStreamConfig,
)
from vlp_core.models.backbones.unit import UniTBackbone, UniTConfig

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneConfig",
    "DualStreamBackbone",
    "DualStreamConfig",
    "FlavaBackbone",
    "FlavaConfig",
    "MultiwayBackbone",
    "MultiwayConfig",
    "OnBackbone",
    "RegionEmbedding",
    "RegionInputs",
    "RegionStreamBackbone",
    "RegionStreamConfig",
    "UniTBackbone",
    "UniTConfig",
    "backbone_config",
    "build_backbone",
    "register_backbone",
]
