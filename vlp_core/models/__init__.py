"""Image-text networks: shared layers and encoders, backbones (what a network is) and task heads.

- :mod:`.layers`: attention, feed-forward and modality experts, the transformer layer.
- :mod:`.text`, :mod:`.vision`, :mod:`.fusion`: encoders (MiniLM / BERT text, EfficientNet-Lite0 grid or
  ViT images, cross-attention fusion and the single-stream encoder).
- :mod:`.backbones`: the registry of backbones (``dual_stream``, ``multiway``, ``flava``).
- :mod:`.heads`: task heads over any backbone.

How a backbone is pre-trained lives in :mod:`vlp_core.recipes`; what it is fine-tuned for in
:mod:`vlp_core.tasks`.
"""

from vlp_core.models.backbones import (
    BACKBONES,
    Backbone,
    BackboneConfig,
    DualStreamBackbone,
    DualStreamConfig,
    FlavaBackbone,
    FlavaConfig,
    MultiwayBackbone,
    MultiwayConfig,
    backbone_config,
    build_backbone,
    register_backbone,
)
from vlp_core.models.configs import config_from_dict
from vlp_core.models.fusion import FusionConfig, FusionEncoder, SingleStreamEncoder, build_text_stack
from vlp_core.models.heads import (
    AnswerClassifier,
    BoxScorer,
    FusedClassifier,
    mlp_head,
    vqa_loss,
    vqa_score,
)
from vlp_core.models.layers import FeedForward, ModalityExperts, TransformerLayer
from vlp_core.models.outputs import ImageFeatures, ModelOutput, PairFeatures, TextFeatures
from vlp_core.models.text import MLMHead, TextConfig, TextEncoder, pool_text, read_bert_checkpoint
from vlp_core.models.vision import (
    CNNGridEncoder,
    VisionConfig,
    VisionEncoder,
    ViTEncoder,
    build_vision_encoder,
)

__all__ = [
    "BACKBONES",
    "AnswerClassifier",
    "BoxScorer",
    "FusedClassifier",
    "Backbone",
    "BackboneConfig",
    "CNNGridEncoder",
    "DualStreamBackbone",
    "DualStreamConfig",
    "FeedForward",
    "FlavaBackbone",
    "FlavaConfig",
    "FusionConfig",
    "FusionEncoder",
    "ImageFeatures",
    "MLMHead",
    "ModalityExperts",
    "ModelOutput",
    "MultiwayBackbone",
    "MultiwayConfig",
    "PairFeatures",
    "SingleStreamEncoder",
    "TextConfig",
    "TextEncoder",
    "TextFeatures",
    "TransformerLayer",
    "ViTEncoder",
    "VisionConfig",
    "VisionEncoder",
    "backbone_config",
    "build_backbone",
    "register_backbone",
    "build_text_stack",
    "build_vision_encoder",
    "config_from_dict",
    "mlp_head",
    "pool_text",
    "read_bert_checkpoint",
    "vqa_loss",
    "vqa_score",
]
