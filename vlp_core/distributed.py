"""The project's one all-gather, plus rank helpers.

Every objective that needs features from other ranks (global contrastive, queues, global hard negatives) goes
through :func:`gather_features`, so the choice "do gradients flow through the gather?" is one flag, not a copy
of the collective in each loss.

All helpers degrade to the single-process answer when ``torch.distributed`` is unavailable or not initialised,
so library code and tests run unchanged on one CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

__all__ = ["gather_features", "is_distributed", "is_main", "rank", "world_size"]


def is_distributed() -> bool:
    """True when a process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank; 0 outside a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes in the default group; 1 outside a process group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes shared files."""
    return rank() == 0


def gather_features(t: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order.

    Args:
        t: ``(N, ...)`` local tensor; every rank must pass the same shape (all_gather needs it).
        with_grad: ``True`` gathers with ``torch.distributed.nn.functional.all_gather``: each rank's input
            receives the gradients that every rank's loss sends to its slot (summed), i.e. the exact gradient
            of the sum of the per-rank losses. ``False`` gathers without autograd and puts the local tensor
            back into its own slot, so only this rank's loss sends gradient to this rank's input (cheaper; the
            open_clip / VLMo default).

    Returns:
        ``(world_size * N, ...)``; ``t`` itself (same object) when not distributed or world size is 1.
    """
    n = world_size()
    if n == 1:
        return t
    if with_grad:
        return torch.cat(dist_fn.all_gather(t), dim=0)
    with torch.no_grad():
        parts = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(parts, t.contiguous())
    # The gathered copy of our own slot carries no graph; the original does.
    parts[rank()] = t
    return torch.cat(parts, dim=0)
