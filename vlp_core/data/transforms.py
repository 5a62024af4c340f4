"""Image transforms (torchvision v2): PIL RGB image → ``(3, size, size)`` float32, normalised.

Every random choice of a v2 transform is drawn from torch's global RNG, which the datasets seed per sample
(under ``torch.random.fork_rng``), so a sample's augmentation is a function of its seed alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

__all__ = ["eval_transform", "train_transform"]

_BICUBIC = v2.InterpolationMode.BICUBIC


def train_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.5, 1.0),
    randaugment: bool = False,
    hflip: bool = True,
    randaugment_ops: int = 2,
    randaugment_magnitude: int = 7,
) -> v2.Compose:
    """ALBEF-style pre-training augmentation: RandomResizedCrop(``scale``) → horizontal flip → optional
    RandAugment(2, 7) → float in [0, 1] → Normalize(mean, std).

    ALBEF uses scale (0.2, 1); the default (0.5, 1) keeps more of each image, which suits small clip-art
    corpora whose object often fills the frame. ``hflip=False`` for tasks where left/right matters in the
    text.
    RandAugment runs on uint8 pixels, before the conversion to float.

    Returns:
        a callable mapping a PIL image (or uint8 ``(3, H, W)`` tensor) to float32 ``(3, size, size)``.
    """
    steps: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=scale, interpolation=_BICUBIC, antialias=True),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if randaugment:
        steps.append(v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Deterministic: resize to ``size`` × ``size`` (bicubic, aspect not kept, as ALBEF evaluates) →
    float in [0, 1] → Normalize(mean, std). Returns float32 ``(3, size, size)``."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((size, size), interpolation=_BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
