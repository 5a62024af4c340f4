"""Targets for masked image modelling: a frozen image tokenizer.

BEiT (VLMo) and FLAVA predict the discrete codes of a DALL-E dVAE, which no package ships offline. The
substitute here: the frozen ImageNet EfficientNet-Lite0 grid features of each image cell (the packaged
weights), quantised by a k-means codebook fitted on the training images (:class:`KMeansCodebook`). Any
module with ``fit_`` / ``forward(pixels) -> (B, cells) ids`` and ``num_codes`` can replace it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.objectives import KMeansCodebook

__all__ = ["GridCodebookTargets"]


class GridCodebookTargets(nn.Module):
    """Codebook ids of a ``grid x grid`` image: frozen EfficientNet-Lite0 cells (1,280-d, stride 32, the
    input resized to ``32 * grid`` px) assigned to the nearest of ``num_codes`` k-means centroids.

    The encoder is frozen and always in eval mode; the codebook is a buffer, so it is checkpointed.
    """

    def __init__(self, grid: int, num_codes: int) -> None:
        super().__init__()
        from vlp_core.vision.features import load_efficientnet_lite0

        self.grid = int(grid)
        self.encoder = load_efficientnet_lite0(None)
        self.encoder.reset_classifier(0)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.codebook = KMeansCodebook(num_codes, self.encoder.num_features)
        self.eval()

    @property
    def num_codes(self) -> int:
        return self.codebook.num_codes

    def train(self, mode: bool = True) -> GridCodebookTargets:
        return super().train(False)  # a tokenizer, never trained: BatchNorm keeps its statistics

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, grid * grid, 1280)``."""
        side = 32 * self.grid
        if pixel_values.shape[-1] != side or pixel_values.shape[-2] != side:
            pixel_values = F.interpolate(
                pixel_values, size=(side, side), mode="bilinear", align_corners=False
            )
        fmap = self.encoder.forward_features(pixel_values.float())
        return fmap.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def fit_(self, pixel_values: torch.Tensor, *, seed: int, batch_size: int = 64) -> GridCodebookTargets:
        """Fit the codebook on the cells of ``(N, 3, S, S)`` images (deterministic given them and seed)."""
        device = next(self.encoder.parameters()).device
        feats = torch.cat([self.features(px.to(device)).cpu() for px in pixel_values.split(batch_size)])
        self.codebook.fit_(feats.reshape(-1, feats.shape[-1]), seed=seed)
        return self

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, grid * grid)`` int64 code ids."""
        return self.codebook.assign(self.features(pixel_values))
