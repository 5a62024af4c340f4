"""Vision: object detection (region boxes + concept labels), region features and image-level tags.

- :mod:`~vlp_core.vision.detect`: the :class:`Detector` protocol, YOLOv3-tiny (CPU default) and detectron2
  (GPU cluster) backends, label normalisation.
- :mod:`~vlp_core.vision.darknet`: darknet ``.cfg`` / ``.weights`` as a PyTorch module.
- :mod:`~vlp_core.vision.features`: 5-d box geometry, EfficientNet-Lite0 / timm backbones, RoIAlign region
  features and ImageNet tags.
"""

from vlp_core.vision.detect import (
    Detection,
    Detector,
    Detectron2Detector,
    YoloV3TinyDetector,
    build_detector,
    detection_boxes,
    detectron2_to_detections,
    normalise_label,
)
from vlp_core.vision.features import (
    ImageFeatures,
    RegionFeatureExtractor,
    box5,
    imagenet_tags,
    load_efficientnet_lite0,
    timm_model,
    whole_image_box,
)

__all__ = [
    "Detection",
    "Detector",
    "Detectron2Detector",
    "ImageFeatures",
    "RegionFeatureExtractor",
    "YoloV3TinyDetector",
    "box5",
    "build_detector",
    "detection_boxes",
    "detectron2_to_detections",
    "imagenet_tags",
    "load_efficientnet_lite0",
    "normalise_label",
    "timm_model",
    "whole_image_box",
]
