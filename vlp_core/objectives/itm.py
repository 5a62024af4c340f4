"""Image-text matching (ITM): hard-negative sampling, the fused-pass layout and the binary match head.

Hard negatives follow ALBEF: for every text one negative image, for every image one negative text, drawn
with ``multinomial(softmax(sim))`` so that similar (hard) pairs are picked more often. Two fixes over the
reference: the sampling is one batched ``torch.multinomial`` call (no ``.item()`` or Python loop over the
batch, hence no per-sample host sync), and rows whose softmax mass sat only on excluded entries still sample
uniformly among the admissible candidates thanks to a small additive epsilon (ALBEF issue #18).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HardNegatives",
    "ITMHead",
    "ItmPairs",
    "build_itm_pairs",
    "itm_loss",
    "match_probability",
    "sample_hard_negatives",
]


@dataclass
class HardNegatives:
    """Sampled negatives for a local batch of ``B`` pairs; indices are candidate columns of the similarity.

    ``*_valid`` is False for a row that had no admissible candidate at all (e.g. a batch of one, or every
    other pair is of the same image); its index is then arbitrary and :func:`build_itm_pairs` gives it label
    -100.
    """

    image_for_text: torch.Tensor  # (B,) int64, negative image for text b
    text_for_image: torch.Tensor  # (B,) int64, negative text for image b
    image_valid: torch.Tensor  # (B,) bool
    text_valid: torch.Tensor  # (B,) bool
    offset: int = 0  # column of the positive of row b is b + offset


def _sample_rows(
    sim: torch.Tensor, exclude: torch.Tensor, eps: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per row from ``softmax(sim) + eps`` restricted to non-excluded columns. Shapes ``(B, N)``."""
    weights = F.softmax(sim.float(), dim=1)
    # A row of all -inf gives NaN; treat it as zero mass so the epsilon alone decides (uniform).
    weights = torch.nan_to_num(weights, nan=0.0) + eps
    weights = weights.masked_fill(exclude, 0.0)
    valid = (~exclude).any(dim=1)
    # Rows with nothing admissible would make multinomial raise; give them any index and flag them instead.
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(weights, 1, generator=generator).squeeze(1), valid


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    same_mask: torch.Tensor | None = None,
    *,
    offset: int = 0,
    eps: float = 1e-4,
    generator: torch.Generator | None = None,
) -> HardNegatives:
    """Draw one hard negative text per image and one hard negative image per text.

    Args:
        sim_i2t: ``(B, N)`` similarities of image b (row) to candidate text n (column); any scale (logits or
            cosine), only the softmax matters. ``N = B`` for in-batch negatives; ``N = world_size * B`` for
            global negatives over gathered candidates (VLMo), with ``offset = rank * B``.
        sim_t2i: ``(B, N)`` similarities of text b to candidate image n.
        same_mask: optional ``(B, N)`` bool, True where candidate n shows the same image as pair b (several
            captions per image); these are excluded like the positive. It is applied to both directions.
        offset: the positive of row b is column ``b + offset``.
        eps: added to the softmax probabilities before excluding entries (ALBEF issue #18).
        generator: optional RNG for reproducible draws (on the device of the similarities).

    Returns:
        :class:`HardNegatives` with ``(B,)`` index tensors into the N candidates.
    """
    if sim_i2t.shape != sim_t2i.shape or sim_i2t.dim() != 2:
        shapes = f"{tuple(sim_i2t.shape)}, {tuple(sim_t2i.shape)}"
        raise ValueError(f"need two (B, N) similarity matrices of one shape, got {shapes}")
    batch, n_cand = sim_i2t.shape
    rows = torch.arange(batch, device=sim_i2t.device) + offset
    exclude = torch.arange(n_cand, device=sim_i2t.device)[None, :] == rows[:, None]
    if same_mask is not None:
        exclude = exclude | same_mask.to(device=sim_i2t.device, dtype=torch.bool)
    text_for_image, text_valid = _sample_rows(sim_i2t, exclude, eps, generator)
    image_for_text, image_valid = _sample_rows(sim_t2i, exclude, eps, generator)
    return HardNegatives(
        image_for_text=image_for_text,
        text_for_image=text_for_image,
        image_valid=image_valid,
        text_valid=text_valid,
        offset=offset,
    )


@dataclass
class ItmPairs:
    """Index layout of ALBEF's fused pass, ``3B`` rows: ``[positives; text + neg image; neg text + image]``.

    Index the text-side tensors (embeddings, attention masks) with ``text_idx`` and the image-side tensors
    with ``image_idx``, run the fusion encoder once on the result, and score with ``labels``.
    """

    text_idx: torch.Tensor  # (3B,) int64
    image_idx: torch.Tensor  # (3B,) int64
    labels: torch.Tensor  # (3B,) int64: 1 for B positives, 0 for 2B negatives, -100 for invalid negatives


def build_itm_pairs(negatives: HardNegatives) -> ItmPairs:
    """Lay out positives and the sampled negatives for one fused pass (labels ``[1]*B + [0]*2B``).

    Indices are in the candidate space of the similarities given to :func:`sample_hard_negatives` (the local
    batch when ``offset`` is 0, the gathered batch otherwise).
    """
    device = negatives.image_for_text.device
    batch = negatives.image_for_text.shape[0]
    pos = torch.arange(batch, device=device) + negatives.offset
    ones = torch.ones(batch, dtype=torch.long, device=device)
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    ignore = torch.full_like(zeros, -100)
    labels = torch.cat(
        [
            ones,
            torch.where(negatives.image_valid, zeros, ignore),
            torch.where(negatives.text_valid, zeros, ignore),
        ]
    )
    return ItmPairs(
        text_idx=torch.cat([pos, pos, negatives.text_for_image]),
        image_idx=torch.cat([pos, negatives.image_for_text, pos]),
        labels=labels,
    )


class ITMHead(nn.Module):
    """Binary match head on the fused [CLS]: ``(N, hidden) -> (N, 2)`` logits (index 1 = match)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.proj(cls)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``(N, 2)`` match logits against ``(N,)`` labels in {0, 1}; -100 is ignored."""
    return F.cross_entropy(logits, labels, ignore_index=-100)


def match_probability(logits: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` logits -> ``(N,)`` probability of a match (the ITM score used to re-rank retrieval)."""
    return F.softmax(logits.float(), dim=-1)[:, 1]
