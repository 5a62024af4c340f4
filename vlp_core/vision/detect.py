"""Object detectors that turn images into labelled regions (the tags and boxes of µ-VLA / VLMixer).

Two backends behind one :class:`Detector` protocol, chosen by name in :func:`build_detector`:

- ``"yolov3-tiny"`` (default, CPU, offline): the official darknet YOLOv3-tiny, COCO-80 labels, run by
  :mod:`vlp_core.vision.darknet` in PyTorch (OpenCV 5 dropped its Darknet importer). Weak: it finds about
  one clip-art image in eight at confidence 0.2, misses close-up subjects (skimage's ``chelsea`` cat scores
  0.06) — use it for the pipeline, not for results.
- ``"detectron2"`` (GPU cluster): any detectron2 config + weights, e.g. a Faster R-CNN trained on Visual
  Genome's 1,600 classes as VinVL / µ-VLA use. detectron2 is only importable in the GPU image (``docker/``).

Every detector returns, per image, detections sorted by descending score, with boxes in pixels of the image
it was given and labels passed through :func:`normalise_label`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torchvision
from PIL import Image

from vlp_core.precision import autocast, autocast_dtype, resolve
from vlp_core.vision.darknet import DarknetYolo

# Darknet / PASCAL VOC spellings → the words a caption would use. COCO's own names ("motorbike", "sofa",
# "hair drier") are kept as they are: they are real English words and what COCO captions say.
LABEL_ALIASES: dict[str, str] = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "tvmonitor": "tv monitor",
    "pottedplant": "potted plant",
}
_SPACES = re.compile(r"\s+")


def normalise_label(name: str) -> str:
    """A detector class name as a lower-case word or phrase: underscores → spaces, whitespace collapsed,
    then :data:`LABEL_ALIASES` applied to the whole name (``"diningtable"`` → ``"dining table"``)."""
    label = _SPACES.sub(" ", name.replace("_", " ")).strip().lower()
    return LABEL_ALIASES.get(label, label)


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected region.

    ``box``: (x1, y1, x2, y2) in pixels of the image given to the detector, 0 ≤ x1 ≤ x2 ≤ width;
    ``label``: normalised class name; ``score``: confidence in [0, 1]; ``class_id``: index into the
    detector's ``labels``.
    """

    box: tuple[float, float, float, float]
    label: str
    score: float
    class_id: int


def detection_boxes(detections: Sequence[Detection]) -> np.ndarray:
    """Boxes of ``detections`` as a (n, 4) float32 array of pixel (x1, y1, x2, y2)."""
    return np.asarray([d.box for d in detections], dtype=np.float32).reshape(-1, 4)


@runtime_checkable
class Detector(Protocol):
    """What the corpus builder needs from a detector."""

    name: str
    labels: list[str]  # the concept vocabulary: normalised class names, indexed by class_id

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        """One list of detections per image, sorted by descending score."""
        ...


def _rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


class YoloV3TinyDetector:
    """Darknet YOLOv3(-tiny) on CPU or CUDA.

    Pre-processing matches ``cv2.dnn.blobFromImage(img, 1/255, (S, S), swapRB=True, crop=False)``: a plain
    bilinear resize to ``input_size``² (no letterbox, aspect not kept), RGB scaled to [0, 1]. Its outputs were
    checked against OpenCV 4.14's Darknet importer on the same files (identical objectness to 1e-6).
    Post-processing: score = objectness × class probability; each candidate box keeps only its best class
    (one label per region, as in OpenCV's YOLO sample; darknet itself may emit several); boxes with
    score ≥ ``conf_threshold`` go through per-class NMS at IoU ``nms_threshold``; boxes are mapped back to the
    original image's pixels and clipped to it.

    Thread safety: the network is read-only after loading and ``detect`` runs under
    ``torch.inference_mode``, so one instance may be shared by a thread pool (each thread's forward pass uses
    torch's intra-op threads: with many workers, ``torch.set_num_threads(1)`` avoids oversubscription).

    ``channels_last`` (default True): weights and input batches in NHWC memory order, about 1.1x faster on
    CPU at 416 px (batch 16); outputs equal NCHW's up to float rounding (relative |Δ| about 2e-6).
    ``precision`` (:mod:`vlp_core.precision`, default ``"auto"``) sets autocast for the convolutions; the
    convolutions that feed the YOLO heads and the box decoding run in float32 (:class:`DarknetYolo`).
    """

    name = "yolov3-tiny"

    def __init__(
        self,
        cfg: str | Path,
        weights: str | Path,
        names: str | Path,
        conf_threshold: float = 0.2,
        nms_threshold: float = 0.45,
        input_size: int = 416,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        channels_last: bool = True,
        precision: str = "auto",
    ):
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = DarknetYolo.from_files(cfg, weights).to(self.device, memory_format=self.memory_format)
        self.precision = resolve(precision, self.device)
        self._amp_dtype = autocast_dtype(self.precision, self.device)
        raw = [line.strip() for line in Path(names).read_text().splitlines() if line.strip()]
        if len(raw) != self.model.num_classes:
            raise ValueError(f"{names}: {len(raw)} names for a {self.model.num_classes}-class network")
        self.labels = [normalise_label(n) for n in raw]
        self.conf_threshold, self.nms_threshold = conf_threshold, nms_threshold
        self.input_size, self.batch_size = input_size, batch_size

    @classmethod
    def from_dir(cls, path: str | Path, **options) -> YoloV3TinyDetector:
        """Load ``yolov3-tiny.cfg``, ``yolov3-tiny.weights`` and ``coco.names`` from ``path``
        (``DataLayout.yolo``, filled by ``vlp fetch``)."""
        path = Path(path)
        files = [path / "yolov3-tiny.cfg", path / "yolov3-tiny.weights", path / "coco.names"]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"YOLOv3-tiny files missing: {missing} (run `vlp fetch`)")
        return cls(*files, **options)

    def _blob(self, images: Sequence[Image.Image]) -> torch.Tensor:
        s = self.input_size
        arrs = [cv2.resize(_rgb_array(im), (s, s), interpolation=cv2.INTER_LINEAR) for im in images]
        x = torch.from_numpy(np.stack(arrs)).to(self.device).permute(0, 3, 1, 2)
        return x.float().div_(255.0).contiguous(memory_format=self.memory_format)

    def _postprocess(self, rows: torch.Tensor, width: int, height: int) -> list[Detection]:
        """``rows`` (N, 5 + C) decoded network output for one image → detections in its pixels."""
        scores, classes = (rows[:, 4:5] * rows[:, 5:]).max(dim=1)
        keep = scores >= self.conf_threshold
        if not keep.any():
            return []
        rows, scores, classes = rows[keep], scores[keep], classes[keep]
        sx, sy = width / self.input_size, height / self.input_size
        cx, cy, w, h = rows[:, 0] * sx, rows[:, 1] * sy, rows[:, 2] * sx, rows[:, 3] * sy
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        kept = torchvision.ops.batched_nms(boxes, scores, classes, self.nms_threshold)  # sorted by score
        boxes, scores, classes = boxes[kept].tolist(), scores[kept].tolist(), classes[kept].tolist()
        return [
            Detection(tuple(b), self.labels[c], s, c) for b, s, c in zip(boxes, scores, classes, strict=True)
        ]

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        """Detect objects in ``images`` (any size, any PIL mode), ``batch_size`` images per forward pass."""
        out: list[list[Detection]] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                with autocast(self._amp_dtype, self.device):
                    rows = self.model(self._blob(chunk)).float().cpu()
                out.extend(self._postprocess(r, *im.size) for r, im in zip(rows, chunk, strict=True))
        return out


def detectron2_to_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    score_threshold: float = 0.0,
) -> list[Detection]:
    """Convert detectron2 ``Instances`` fields to detections.

    ``boxes`` (n, 4) pixel (x1, y1, x2, y2) as in ``instances.pred_boxes.tensor``; ``scores`` (n,) in [0, 1];
    ``classes`` (n,) integer ids into ``class_names`` (normalised with :func:`normalise_label`). Detections
    with score < ``score_threshold`` are dropped; the rest are returned by descending score (stable).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    classes = np.asarray(classes).reshape(-1).astype(np.int64)
    if not len(boxes) == len(scores) == len(classes):
        raise ValueError(f"length mismatch: {len(boxes)} boxes, {len(scores)} scores, {len(classes)} classes")
    if len(classes) and (classes.min() < 0 or classes.max() >= len(class_names)):
        raise ValueError(f"class id out of range for {len(class_names)} class names")
    labels = [normalise_label(n) for n in class_names]
    order = np.argsort(-scores, kind="stable")
    return [
        Detection(tuple(float(v) for v in boxes[i]), labels[classes[i]], float(scores[i]), int(classes[i]))
        for i in order
        if scores[i] >= score_threshold
    ]


class Detectron2Detector:
    """A detectron2 model (Faster R-CNN style; e.g. a Visual Genome detector for VinVL-like tags) on GPU.

    ``config_file``: a detectron2 YAML config; ``weights``: its checkpoint; ``class_names``: one name per
    output class (e.g. Visual Genome's 1,600), in class-id order. Test-time resizing is the config's
    ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``; boxes come back in the given image's pixels.
    """

    name = "detectron2"

    def __init__(
        self,
        config_file: str | Path,
        weights: str | Path,
        class_names: Sequence[str],
        score_threshold: float = 0.2,
        device: str | None = None,
        batch_size: int = 8,
    ):
        try:
            import detectron2.data.transforms as T
            from detectron2.checkpoint import DetectionCheckpointer
            from detectron2.config import get_cfg
            from detectron2.modeling import build_model
        except ImportError as exc:
            raise ImportError(
                "detectron2 is not installed: use the GPU image in docker/ (docker/Dockerfile.gpu builds "
                "it), or the default 'yolov3-tiny' detector"
            ) from exc
        cfg = get_cfg()
        cfg.merge_from_file(str(config_file))
        cfg.MODEL.WEIGHTS = str(weights)
        cfg.MODEL.DEVICE = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
        num_classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        if num_classes != len(class_names):
            raise ValueError(
                f"config has {num_classes} classes but {len(class_names)} class names were given"
            )
        self._model = build_model(cfg).eval()
        DetectionCheckpointer(self._model).load(cfg.MODEL.WEIGHTS)
        self._resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self._bgr = cfg.INPUT.FORMAT == "BGR"
        self.class_names = list(class_names)
        self.labels = [normalise_label(n) for n in class_names]
        self.score_threshold, self.batch_size = score_threshold, batch_size

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        out: list[list[Detection]] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                inputs = []
                for im in images[start : start + self.batch_size]:
                    arr = _rgb_array(im)
                    arr = arr[:, :, ::-1] if self._bgr else arr
                    resized = self._resize.get_transform(arr).apply_image(arr)
                    tensor = torch.as_tensor(
                        np.ascontiguousarray(resized.transpose(2, 0, 1)), dtype=torch.float32
                    )
                    inputs.append({"image": tensor, "height": arr.shape[0], "width": arr.shape[1]})
                for result in self._model(inputs):
                    inst = result["instances"].to("cpu")
                    out.append(
                        detectron2_to_detections(
                            inst.pred_boxes.tensor.numpy(),
                            inst.scores.numpy(),
                            inst.pred_classes.numpy(),
                            self.class_names,
                            self.score_threshold,
                        )
                    )
        return out


def _yolo(path: str | Path | None = None, **options) -> YoloV3TinyDetector:
    if path is None:
        from vlp_core.paths import DataLayout

        path = DataLayout.default().yolo
    return YoloV3TinyDetector.from_dir(path, **options)


DETECTORS: dict[str, Callable[..., Detector]] = {"yolov3-tiny": _yolo, "detectron2": Detectron2Detector}


def build_detector(kind: str = "yolov3-tiny", **options) -> Detector:
    """A detector by name. ``"yolov3-tiny"``: options ``path`` (folder with cfg / weights / coco.names,
    default ``DataLayout.default().yolo``) plus :class:`YoloV3TinyDetector` keywords; ``"detectron2"``:
    :class:`Detectron2Detector` keywords."""
    try:
        factory = DETECTORS[kind]
    except KeyError:
        raise ValueError(f"unknown detector {kind!r}; choose from {sorted(DETECTORS)}") from None
    return factory(**options)
