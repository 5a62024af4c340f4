"""Recipes: how a backbone is pre-trained (objectives and weights, batch kinds, stages), one per method.

A method is a registered recipe plus its default backbone kind. Adding one means a new module here that
defines a config (a :class:`RecipeConfig` dataclass with presets), a :class:`Recipe` and a
``register_recipe`` call, imported below; nothing in the trainer changes.

- ``albef`` (:class:`ALBEF`, dual-stream): ITC with momentum distillation and queues, ITM on global hard
  negatives, MLM distilled from the momentum model.
- ``vlmo`` (:class:`VLMo`, multiway): stagewise vision (MIM) -> language (MLM, attention and vision experts
  frozen) -> vision-language (two-head ITC, ITM on global hard negatives, MLM 0.25).
- ``flava`` (:class:`FLAVA`, flava): MIM, MLM, global contrastive, MMM and ITM, round-robin over image-only,
  text-only and paired batches.
- ``u-visualbert`` (:class:`UVisualBERT`, region_stream): round-robin over image-only batches (regions +
  tags: masked tags, masked region classification and feature regression) and text-only MLM; no ITM.
- ``mu-vla`` (:class:`MuVLA`, region_stream): region-tag, region-phrase (p-MRTC) and image-sentence (ITM +
  MLM) alignment on retrieved pairs, with the match-probability curriculum.
- ``vlmixer`` (:class:`VLMixer`, region_stream): cross-modal CutMix on text-only batches (MLM on the mixed
  sentence, CMCL between a sentence and its mixed view) and tag-aided visual pre-training on image-only
  batches.
- ``unit`` (:class:`UniT`, unit): no corpus objective; trained jointly on a task mix by the ``multitask``
  task.
"""

from vlp_core.recipes.albef import ALBEF, ALBEFConfig
from vlp_core.recipes.base import (
    RECIPES,
    Recipe,
    RecipeConfig,
    Stage,
    build_recipe,
    default_backbone_kind,
    recipe_config,
    register_recipe,
)
from vlp_core.recipes.flava import FLAVA, FLAVAConfig
from vlp_core.recipes.mu_vla import MuVLA, MuVLAConfig
from vlp_core.recipes.regions import RegionRecipe, UVisualBERT, UVisualBERTConfig
from vlp_core.recipes.unit import UniT, UniTRecipeConfig
from vlp_core.recipes.vlmixer import VLMixer, VLMixerConfig
from vlp_core.recipes.vlmo import VLMo, VLMoConfig

__all__ = [
    "ALBEF",
    "FLAVA",
    "RECIPES",
    "ALBEFConfig",
    "FLAVAConfig",
    "MuVLA",
    "MuVLAConfig",
    "Recipe",
    "RecipeConfig",
    "RegionRecipe",
    "Stage",
    "UVisualBERT",
    "UVisualBERTConfig",
    "UniT",
    "UniTRecipeConfig",
    "VLMixer",
    "VLMixerConfig",
    "VLMo",
    "VLMoConfig",
    "build_recipe",
    "default_backbone_kind",
    "recipe_config",
    "register_recipe",
]
