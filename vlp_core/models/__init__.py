"""Image-text models: shared encoders, methods composed from the shared objectives, and a builder registry.

``build_model(method, config_dict)`` is how the trainer and the flows get a model from a resolved config:

- ``"albef"``: :class:`ALBEF` from an :class:`ALBEFConfig` dict (``{"preset": "tiny", ...}``).
- ``"vqa"``: :class:`VQAClassifier` from a :class:`VQAConfig` dict (``{"backbone": {"preset": "tiny"},
  "num_answers": 3129, "pretrained": "<checkpoint>"}``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from vlp_core.models.albef import ALBEF, ALBEFConfig, Encoders, build_encoders, config_from_dict
from vlp_core.models.encoders import (
    CNNGridEncoder,
    FusionConfig,
    FusionEncoder,
    MLMHead,
    ModelOutput,
    TextConfig,
    TextEncoder,
    TransformerLayer,
    VisionConfig,
    VisionEncoder,
    ViTEncoder,
    build_text_stack,
    build_vision_encoder,
    read_bert_checkpoint,
)
from vlp_core.models.vqa import VQAClassifier, VQAConfig, load_backbone_state_, vqa_loss, vqa_score

__all__ = [
    "ALBEF",
    "ALBEFConfig",
    "CNNGridEncoder",
    "Encoders",
    "FusionConfig",
    "FusionEncoder",
    "MLMHead",
    "MODELS",
    "ModelOutput",
    "TextConfig",
    "TextEncoder",
    "TransformerLayer",
    "VQAClassifier",
    "VQAConfig",
    "ViTEncoder",
    "VisionConfig",
    "VisionEncoder",
    "build_encoders",
    "build_model",
    "build_text_stack",
    "build_vision_encoder",
    "config_from_dict",
    "load_backbone_state_",
    "read_bert_checkpoint",
    "register_model",
    "vqa_loss",
    "vqa_score",
]

#: method name -> builder taking the method's config dict.
MODELS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "albef": lambda cfg: ALBEF(ALBEFConfig.from_dict(cfg)),
    "vqa": lambda cfg: VQAClassifier.from_config(VQAConfig.from_dict(cfg)),
}


def register_model(name: str, builder: Callable[[dict[str, Any]], nn.Module]) -> None:
    """Add a method to :data:`MODELS` (a second registration of one name is an error)."""
    if name in MODELS:
        raise KeyError(f"model {name!r} is already registered")
    MODELS[name] = builder


def build_model(method: str, config: dict[str, Any] | None = None) -> nn.Module:
    """The model of ``method`` from its (nested) config dict; ``{}`` / ``None`` = the method's defaults."""
    try:
        builder = MODELS[method]
    except KeyError:
        raise KeyError(f"unknown model {method!r} (known: {sorted(MODELS)})") from None
    return builder(dict(config or {}))
