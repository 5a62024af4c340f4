"""A distributed, exactly resumable sampler and the per-sample seeds that make data independent of processes.

The sampler yields keys ``(epoch, index)``, never bare indices: the dataset derives each sample's seed from
``(seed, epoch, index)`` (:func:`sample_seed`), so augmentation and MLM masks are a function of the sample
alone, not of the rank, the DataLoader worker or the batch it lands in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ResumableSampler", "sample_seed"]

_SEED_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 63-bit seed for sample ``index`` of ``epoch`` (BLAKE2b of the three integers).

    Stable across processes, machines and Python versions (unlike ``hash``), and non-negative so it fits an
    int64 tensor and ``torch.manual_seed``.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


class ResumableSampler(Sampler[tuple[int, int]]):
    """Per-epoch global permutation, cut into global batches, each split contiguously across ranks.

    Global batch ``g`` of an epoch is ``perm[g*GB:(g+1)*GB]`` of a permutation seeded by ``(seed, epoch)``;
    rank ``r`` takes its slice ``[r*B:(r+1)*B]`` with ``B = GB / world_size``. Which samples form a global
    batch therefore depends only on ``(n, global_batch, seed, epoch)``: a run may resume on a different
    number of processes and still see the same global batches.

    Use it as ``DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, drop_last=True)``.

    Resume: the trainer calls :meth:`advance` once per consumed batch (the sampler cannot count this itself,
    because a DataLoader draws keys ahead of the training loop to prefetch), saves :meth:`state_dict` in the
    checkpoint and restores it with :meth:`load_state_dict`; the next ``__iter__`` then starts at batch
    ``batches_done`` of the saved epoch and yields exactly what the uninterrupted run would have yielded.
    :meth:`set_epoch` with a *different* epoch resets ``batches_done`` to 0; with the same epoch (the usual
    ``for epoch in range(start_epoch, ...): sampler.set_epoch(epoch)`` after a resume) it keeps it.

    ``drop_last=False`` keeps the last partial global batch and fills it up to ``global_batch`` by wrapping
    around to the start of the epoch's permutation (as ``DistributedSampler`` pads), so every rank gets full
    batches of the same size and every rank takes the same number of steps.

    Args:
        n: number of samples in the dataset.
        global_batch: samples per optimizer step over all ranks; must be divisible by ``world_size``.
        rank, world_size: this process and the number of processes.
        seed: base seed of the permutations.
        drop_last: drop the last partial global batch (default) or pad it as above.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ):
        if n <= 0 or global_batch <= 0 or world_size <= 0:
            raise ValueError(f"n={n}, global_batch={global_batch}, world_size={world_size} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        if global_batch % world_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
        if drop_last and n < global_batch:
            raise ValueError(f"{n} samples make no full global batch of {global_batch} (drop_last=True)")
        self.n = int(n)
        self.global_batch = int(global_batch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.local_batch = self.global_batch // self.world_size
        self.epoch = 0
        self.batches_done = 0

    @property
    def batches_per_epoch(self) -> int:
        """Global batches (= optimizer steps) per epoch."""
        full, rest = divmod(self.n, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def __len__(self) -> int:
        """Keys this rank yields in a whole epoch (``batches_per_epoch * local_batch``)."""
        return self.batches_per_epoch * self.local_batch

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of ``range(n)`` (int64), the same on every rank."""
        rng = np.random.default_rng(sample_seed(self.seed, epoch, -1))
        return rng.permutation(self.n)

    def global_batch_indices(self, epoch: int, batch: int, perm: np.ndarray | None = None) -> np.ndarray:
        """Dataset indices of global batch ``batch`` of ``epoch``: ``(global_batch,)`` int64 (padded by
        wrap-around if it is the partial last batch with ``drop_last=False``)."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} outside [0, {self.batches_per_epoch})")
        perm = self.permutation(epoch) if perm is None else perm
        positions = np.arange(batch * self.global_batch, (batch + 1) * self.global_batch) % self.n
        return perm[positions]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.batches_done
        perm = self.permutation(epoch)
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for g in range(start, self.batches_per_epoch):
            for i in self.global_batch_indices(epoch, g, perm)[lo:hi]:
                yield epoch, int(i)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next ``__iter__`` walks; a new epoch starts at batch 0."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.batches_done = 0

    def advance(self, n_batches: int = 1) -> None:
        """Record that the training loop consumed ``n_batches`` more batches of the current epoch."""
        done = self.batches_done + int(n_batches)
        if n_batches < 0 or done > self.batches_per_epoch:
            raise ValueError(f"advance({n_batches}) past the epoch: {done} > {self.batches_per_epoch}")
        self.batches_done = done

    def state_dict(self) -> dict[str, Any]:
        """``{epoch, batches_done}`` plus what must match on resume (n, global_batch, seed, drop_last)."""
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "n": self.n,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``epoch`` and ``batches_done``. A different dataset size, global batch, seed or drop_last
        would silently change which samples follow, so they raise; a different ``world_size`` is fine."""
        for key in ("n", "global_batch", "seed", "drop_last"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: sampler {key}={getattr(self, key)!r}, state has {state[key]!r}"
                )
        batches_done = int(state["batches_done"])
        if not 0 <= batches_done <= self.batches_per_epoch:
            raise ValueError(f"batches_done={batches_done} outside [0, {self.batches_per_epoch}]")
        self.epoch = int(state["epoch"])
        self.batches_done = batches_done
