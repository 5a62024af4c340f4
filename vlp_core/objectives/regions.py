"""Objectives on region inputs (µ-VLA, U-VisualBERT, VLMixer): per-sample mask draws, masked region
classification as a set of target wordpieces, region feature regression, and per-sample means.

Masks are drawn per sample from a generator seeded by its ``sample_seed`` (XOR a salt per draw), over
exactly the sample's own items (its valid regions, tags or links), so a mask never depends on the batch,
its padding, the rank or the process count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp_core.objectives.reduce import global_mean_scale

__all__ = [
    "draw_masks",
    "global_item_mean",
    "per_sample_mean",
    "region_feature_loss",
    "token_set_loss",
]

_SEED_MASK = (1 << 63) - 1


def draw_masks(
    sample_seed: torch.Tensor, valid: torch.Tensor, prob: float | torch.Tensor, salt: int
) -> torch.Tensor:
    """Which items of each row are masked: ``(B, N)`` bool.

    Row ``i`` draws ``u ~ U(0, 1)`` for its first ``n_i = valid[i].sum()`` items from
    ``torch.Generator().manual_seed(sample_seed[i] ^ salt)`` and masks item ``j`` when ``u_j < p_ij``
    (``prob``: one probability, or ``(B, N)`` per item). ``valid`` must be a prefix mask (items first,
    padding after), as every collated item list is.
    """
    valid = valid.bool()
    lengths = valid.sum(1).tolist()
    probs = prob if torch.is_tensor(prob) else torch.full(valid.shape, float(prob))
    probs = probs.detach().float().cpu()
    out = torch.zeros(valid.shape, dtype=torch.bool)
    for i, (seed, n) in enumerate(zip(sample_seed.tolist(), lengths, strict=True)):
        if n:
            gen = torch.Generator().manual_seed((int(seed) ^ salt) & _SEED_MASK)
            out[i, :n] = torch.rand(n, generator=gen) < probs[i, :n]
    return out.to(valid.device) & valid


def token_set_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row loss of predicting a *set* of wordpieces: ``-mean_k log softmax(logits)[targets_k]`` over the
    row's targets (``-1`` = padding), i.e. cross-entropy against a uniform distribution over the set.

    Masked region classification over a region's tag and p-MRTC over its linked phrase both use it: a tag
    or phrase of several wordpieces ("traffic light") spreads the target over its pieces.

    Args:
        logits: ``(M, V)``; targets: ``(M, K)`` int64, at least one non-negative entry per row.

    Returns:
        ``(M,)`` per-row losses.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    present = targets >= 0
    picked = logp.gather(1, targets.clamp(min=0)) * present
    return -picked.sum(1) / present.sum(1).clamp(min=1)


def region_feature_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Masked region feature regression, per row: the mean squared error over the feature dimensions
    (µ-VLA's L2 regression up to the constant 1/F). ``(M, F), (M, F) -> (M,)``."""
    return (pred.float() - target.float()).pow(2).mean(-1)


def global_item_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of per-item losses ``(M,)`` over all items of the global batch (this rank's share; a
    graph-connected 0 when there are none)."""
    scale = global_mean_scale(torch.tensor(values.numel(), device=values.device))
    if values.numel() == 0:
        return values.sum() * 0.0 * scale
    return values.mean() * scale


def per_sample_mean(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``(B,)`` mean of the per-item ``values`` (M,) of each row (``rows`` (M,) row index); 0 for a row
    without items."""
    total = values.new_zeros(n_rows).index_add(0, rows, values)
    count = values.new_zeros(n_rows).index_add(0, rows, torch.ones_like(values))
    return total / count.clamp(min=1)
