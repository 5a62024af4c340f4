"""Dropout with cheaper random masks on CPUs.

``torch.nn.functional.dropout`` draws its CPU mask with ``bernoulli_``: one double from the Mersenne Twister
per element, serially, about 6 ns an element here. The text and fusion layers of a training step drop out
some 3 million elements (hidden states and attention probabilities), about 6 % of a reference-shape ALBEF
step. :func:`keep_mask` draws 16-bit uniforms instead, three from each 64-bit draw of the same generator
(``random_`` on int64 gives 63 random bits; the low 48 are used), about 1.3 ns an element with the compare.

The keep probability is ``1 - p`` rounded to a multiple of 2^-16 (for ``p = 0.1``: 0.899994 instead of 0.9)
and kept elements are scaled by the inverse of that rounded probability, so the output's expectation is the
input, exactly as with torch's dropout. Masks come from torch's default CPU generator, so ``manual_seed`` and
a saved RNG state reproduce them. On other devices (and with :attr:`Dropout.fast` off) this is torch's
dropout.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Dropout", "dropout", "keep_mask"]


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A mask shaped and typed like ``like`` (CPU): ``1 / q`` where kept, 0 where dropped, each element kept
    with probability ``q = round((1 - p) * 2^16) / 2^16`` (``0 < q < 1``; little-endian byte order, where the
    first three 16-bit lanes of an int64 are its low 48 bits)."""
    n = like.numel()
    words = torch.empty(-(-n // 3), dtype=torch.int64).random_()
    draws = words.view(torch.int16).view(-1, 4)[:, :3].reshape(-1)[:n].view(like.shape)  # uniform int16
    kept = round((1.0 - p) * 65536)
    return (draws < kept - 32768).to(like.dtype).mul_(65536.0 / kept)


def dropout(x: torch.Tensor, p: float, training: bool, fast: bool = True) -> torch.Tensor:
    """Dropout with rate ``p``: :func:`keep_mask` on a CPU when ``fast``; torch's dropout otherwise, and
    where ``1 - p`` is within 2^-17 of 0 or 1 (the mask's resolution)."""
    if not training or p == 0.0:
        return x
    kept = round((1.0 - p) * 65536)
    if not fast or x.device.type != "cpu" or not 0 < kept < 65536 or sys.byteorder != "little":
        return F.dropout(x, p, training=True)
    return x * keep_mask(x, p)


class Dropout(nn.Module):
    """:func:`dropout` as a module (a drop-in for ``nn.Dropout``; ``fast = False`` is torch's)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training, self.fast)

    def extra_repr(self) -> str:
        return f"p={self.p}, fast={self.fast}"
