"""World-size independence helpers every objective shares: global-count means and step-seeded draws."""

from __future__ import annotations

import torch

from vlp_core.distributed import gather_features, world_size

__all__ = ["global_mean_scale", "step_seed"]


def global_mean_scale(count: torch.Tensor) -> torch.Tensor:
    """Factor turning a mean over this rank's ``count`` items into its share of the global mean.

    ``local_mean * count * W / global_count``: averaged over the W ranks (as DDP averages gradients) this is
    the mean over all items of the global batch. Exactly 1.0 in a single process (with at least one item);
    0 on a rank without items, whose local loss must then be a graph-connected 0, not NaN. Every rank must
    call it (it is a collective), whatever its count. Use it for every loss whose items are unevenly spread
    over ranks (masked tokens, valid ITM rows).
    """
    count = count.detach().float().reshape(1)
    total = gather_features(count, with_grad=False).sum().clamp(min=1)
    return count[0] * world_size() / total


def step_seed(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    """A 63-bit seed for a random draw at ``step`` (``rank`` only for per-rank draws, ``stream`` to separate
    draws of one step): the same on every rank for the same arguments, so global draws agree."""
    # Large odd multipliers spread the integers over the 63-bit range.
    mixed = (
        seed * 0x9E3779B97F4A7C15
        + step * 0xBF58476D1CE4E5B9
        + rank * 0x94D049BB133111EB
        + stream * 0xD6E8FEB86659FD93
    )
    return mixed % (2**63 - 1)
