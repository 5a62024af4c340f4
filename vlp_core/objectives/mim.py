"""Masked image modelling (MIM): blockwise patch masks, discrete patch targets, the MIM head and loss.

Shared by FLAVA (unimodal MIM and MMM-image, ~40 % block masking) and VLMo's vision stage (BEiT MIM).

Masks follow BEiT's blockwise masking (:func:`block_mask`). They are a pure function of a
``torch.Generator`` that the caller seeds per sample (:func:`block_masks`), so a sample's mask never depends
on the process, the worker or the rest of the batch.

Targets: FLAVA predicts the ids of the DALL-E dVAE and VLMo the ids of BEiT's tokenizer (itself the DALL-E
dVAE). No package ships either tokenizer offline, so the default target source here is a documented
substitute: :class:`KMeansCodebook`, a k-means codebook fitted once over patch features (e.g. of a frozen
vision encoder), whose nearest-centroid id is the target of each patch. The target source is pluggable: the
objective only needs an object satisfying :class:`MIMTargets` (``num_codes`` and ``assign(features) -> ids``),
so a real dVAE tokenizer can replace the codebook without touching the loss or the head.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KMeansCodebook", "MIMHead", "MIMTargets", "block_mask", "block_masks", "mim_loss"]

# Rows of features per chunk when computing distances, sized so a chunk's (rows, K) matrix stays ~16M entries.
_CHUNK_ENTRIES = 1 << 24


# ---------------------------------------------------------------- block masking


class _Uniform:
    """Uniform [0, 1) floats drawn from ``generator`` in chunks (one torch call per chunk, not per number)."""

    def __init__(self, generator: torch.Generator, chunk: int = 64) -> None:
        self.generator = generator
        self.chunk = chunk
        self.buf: list[float] = []

    def __call__(self) -> float:
        if not self.buf:
            self.buf = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist()[::-1]
        return self.buf.pop()

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in ``[low, high]`` (both inclusive)."""
        span = high - low + 1
        return low + min(int(self() * span), span - 1)


def _check_mask_args(height: int, width: int, ratio: float, min_block: int, max_aspect: float, tries: int):
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    if height < 1 or width < 1:
        raise ValueError(f"grid must be at least 1x1, got {height}x{width}")
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    if tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {tries}")


def block_mask(
    height: int,
    width: int,
    ratio: float,
    generator: torch.Generator,
    *,
    min_block: int = 2,
    max_aspect: float = 3.0,
    max_tries: int = 10,
) -> torch.Tensor:
    """BEiT-style blockwise mask of exactly ``round(ratio * height * width)`` patches of a patch grid.

    The procedure is BEiT's ``MaskingGenerator``: while fewer than the target are masked, draw a rectangle of
    area uniform in ``[min_block, remaining]`` (``remaining`` = patches still to mask) and log-uniform aspect
    ratio in ``[1 / max_aspect, max_aspect]``, place it uniformly on the grid, and accept it when it masks at
    least one new patch and at most ``remaining`` new ones. After ``max_tries`` rejected rectangles in a row
    the block phase stops. Two differences from BEiT, both to hit the count exactly:

    - BEiT may stop short of the target; here the shortfall is then topped up with single patches drawn
      uniformly (a ``torch.randperm`` from the same generator) among the unmasked ones.
    - No trimming is ever needed: a rectangle is only accepted if it adds at most ``remaining`` patches, so
      the count never overshoots.

    Rectangles may span the whole grid side (BEiT requires strictly smaller), so tiny grids such as 4x4 still
    get blocks. ``round`` is Python's (ties to even). Every random number comes from ``generator``: the mask
    is a pure function of the generator's state.

    Args:
        height, width: patch grid.
        ratio: fraction of patches to mask, in (0, 1) (FLAVA ~0.4; BEiT 75/196).
        generator: CPU generator, seeded by the caller (per sample).
        min_block: smallest rectangle area drawn (BEiT: 16 on 14x14; we default to 2 for small grids).
        max_aspect: largest aspect ratio of a rectangle (BEiT: 1 / 0.3).
        max_tries: rejected rectangles in a row before falling back to single patches.

    Returns:
        ``(height * width,)`` bool, row-major (patch ``i * width + j``), True = masked.

    Raises:
        ValueError: ``ratio`` not in (0, 1), or an invalid grid / block setting.
    """
    _check_mask_args(height, width, ratio, min_block, max_aspect, max_tries)
    target = round(ratio * height * width)
    mask = torch.zeros(height, width, dtype=torch.bool)
    rand = _Uniform(generator)
    log_lo, log_hi = -math.log(max_aspect), math.log(max_aspect)
    count = 0
    while count < target:
        remaining = target - count
        added = 0
        for _ in range(max_tries):
            low = min(min_block, remaining)
            area = low + (remaining - low) * rand()
            aspect = math.exp(log_lo + (log_hi - log_lo) * rand())
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if not (1 <= h <= height and 1 <= w <= width):
                continue
            top = rand.randint(0, height - h)
            left = rand.randint(0, width - w)
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= remaining:
                block.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    flat = mask.reshape(-1)
    if count < target:
        free = (~flat).nonzero().squeeze(1)
        pick = torch.randperm(free.numel(), generator=generator)[: target - count]
        flat[free[pick]] = True
    return flat


def block_masks(seeds: torch.Tensor, height: int, width: int, ratio: float, **kw: Any) -> torch.Tensor:
    """One :func:`block_mask` per row, row ``b`` from ``torch.Generator().manual_seed(int(seeds[b]))``.

    Args:
        seeds: ``(B,)`` int64 per-sample seeds, used as given (e.g. the batch's ``sample_seed`` XOR a constant
            chosen by the caller so the mask stream differs from the augmentation stream).
        height, width, ratio, **kw: as in :func:`block_mask`.

    Returns:
        ``(B, height * width)`` bool on the CPU.
    """
    _check_mask_args(
        height, width, ratio, kw.get("min_block", 2), kw.get("max_aspect", 3.0), kw.get("max_tries", 10)
    )
    if seeds.dim() != 1:
        raise ValueError(f"seeds must be 1-D (B,), got shape {tuple(seeds.shape)}")
    rows = [
        block_mask(height, width, ratio, torch.Generator().manual_seed(int(seed)), **kw)
        for seed in seeds.tolist()
    ]
    if not rows:
        return torch.zeros(0, height * width, dtype=torch.bool)
    return torch.stack(rows)


# ---------------------------------------------------------------- targets


@runtime_checkable
class MIMTargets(Protocol):
    """A source of discrete MIM targets: maps patch features (or pixels) to code ids in ``[0, num_codes)``.

    :class:`KMeansCodebook` implements it; a dVAE / BEiT tokenizer wrapper would too.
    """

    @property
    def num_codes(self) -> int: ...

    def assign(self, features: torch.Tensor) -> torch.Tensor: ...


def _sq_dist_argmin(
    x: torch.Tensor, centroids: torch.Tensor, spherical: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row of ``x`` ``(N, D)``: ``(ids (N,) int64, squared distance (N,))``.

    ``spherical`` assumes unit rows on both sides and ranks by cosine (``d^2 = 2 - 2 cos``). Ties go to the
    lowest centroid id. Computed in chunks of rows to bound memory.
    """
    num_codes = centroids.shape[0]
    chunk = max(1, _CHUNK_ENTRIES // max(num_codes, 1))
    c_sq = None if spherical else (centroids * centroids).sum(dim=1)
    ids, dists = [], []
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk]
        dot = xb @ centroids.t()
        if spherical:
            d2 = (2 - 2 * dot).clamp_(min=0)
        else:
            d2 = ((xb * xb).sum(dim=1, keepdim=True) - 2 * dot + c_sq).clamp_(min=0)
        best = d2.argmin(dim=1)
        ids.append(best)
        dists.append(d2.gather(1, best[:, None]).squeeze(1))
    if not ids:
        return torch.zeros(0, dtype=torch.long, device=x.device), x.new_zeros(0)
    return torch.cat(ids), torch.cat(dists)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: first centre uniform, each next one with probability proportional to ``D(x)^2``.

    Sampling is ``searchsorted`` over the cumulative weights with one uniform draw per centre (deterministic,
    no category limit); when every point already coincides with a centre the draw is uniform.
    """
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = ((x - x[chosen[0]]) ** 2).sum(dim=1)
    for _ in range(1, k):
        u = float(torch.rand(1, generator=generator, dtype=torch.float64))
        cum = torch.cumsum(closest, dim=0)
        total = float(cum[-1])
        if total > 0:
            idx = int(torch.searchsorted(cum, torch.tensor([u * total], dtype=cum.dtype), right=True))
            idx = min(idx, n - 1)
        else:
            idx = min(int(u * n), n - 1)
        chosen.append(idx)
        closest = torch.minimum(closest, ((x - x[idx]) ** 2).sum(dim=1))
    return x[chosen].clone()


class KMeansCodebook(nn.Module):
    """``num_codes`` centroids of dimension ``dim`` whose nearest-centroid ids are MIM targets.

    The documented substitute for FLAVA's DALL-E dVAE / VLMo's BEiT tokenizer targets (see the module
    docstring). Fit once with :meth:`fit_` on a sample of patch features, then :meth:`assign` each patch.

    Buffers (all in ``state_dict``, so the codebook travels with checkpoints):
        codebook: ``(num_codes, dim)`` float32 centroids (unit rows when fitted with ``normalize=True``).
        fitted: 0-d bool.
        spherical: 0-d bool, whether assignment is by cosine (set by :meth:`fit_`).
    """

    def __init__(self, num_codes: int, dim: int) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got {num_codes}, {dim}")
        self.register_buffer("codebook", torch.zeros(num_codes, dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("spherical", torch.ones((), dtype=torch.bool))
        # Host copies of the two flags, so assign() never syncs with the device to read them.
        self._is_fitted = False
        self._is_spherical = True

    @property
    def num_codes(self) -> int:
        return self.codebook.shape[0]

    @property
    def dim(self) -> int:
        return self.codebook.shape[1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_fitted = bool(self.fitted)
        self._is_spherical = bool(self.spherical)

    @torch.no_grad()
    def fit_(
        self, features: torch.Tensor, *, seed: int, iters: int = 20, normalize: bool = True
    ) -> KMeansCodebook:
        """Fit the centroids by k-means, in place; returns ``self``.

        k-means++ seeding from ``torch.Generator().manual_seed(seed)``, then at most ``iters`` Lloyd
        iterations (stopping early once the assignment no longer changes), all in float64 on the CPU, so the
        result is deterministic given ``features`` and ``seed``. A cluster left empty by an update is
        re-seeded with the point farthest from its centre (several empties take the farthest points in order;
        ties go to the lower index). ``normalize=True`` is spherical k-means: features and centroids are
        L2-normalised and assignment is by cosine, here and in :meth:`assign`.

        Args:
            features: ``(N, dim)`` sample of patch features, ``N >= num_codes``.
            seed: seed of the k-means++ draws.
            iters: maximum Lloyd iterations (>= 0; 0 keeps the k-means++ centres).
            normalize: spherical (cosine) k-means.

        Raises:
            ValueError: wrong shape, ``N < num_codes``, or non-finite features.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {tuple(features.shape)}")
        n, k = features.shape[0], self.num_codes
        if n < k:
            raise ValueError(f"k-means needs at least num_codes={k} features, got {n}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        x = features.detach().to("cpu", torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        if normalize:
            x = F.normalize(x, dim=1)
        generator = torch.Generator().manual_seed(int(seed))
        centroids = _kmeans_pp(x, k, generator)
        ids: torch.Tensor | None = None
        for _ in range(iters):
            new_ids, d2 = _sq_dist_argmin(x, centroids, normalize)
            if ids is not None and torch.equal(new_ids, ids):
                break
            ids = new_ids
            counts = torch.bincount(ids, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, ids, x)
            updated = sums / counts.clamp(min=1).to(x.dtype)[:, None]
            empty = (counts == 0).nonzero().squeeze(1)
            if empty.numel():
                farthest = torch.argsort(d2, descending=True, stable=True)[: empty.numel()]
                updated[empty] = x[farthest]
            centroids = F.normalize(updated, dim=1) if normalize else updated
        self.codebook.copy_(centroids.to(self.codebook.dtype))
        self.fitted.fill_(True)
        self.spherical.fill_(normalize)
        self._is_fitted = True
        self._is_spherical = normalize
        return self

    @torch.no_grad()
    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Nearest-centroid ids of ``features`` ``(..., dim)`` -> ``(...)`` int64 on ``features.device``.

        Computed in float32 on the codebook's device; no gradient.

        Raises:
            RuntimeError: the codebook has not been fitted (nor loaded from a fitted checkpoint).
            ValueError: the last dimension is not ``dim``.
        """
        if not self._is_fitted:
            raise RuntimeError(
                "KMeansCodebook.assign called before fit_ (or before loading a fitted codebook)"
            )
        if features.shape[-1] != self.dim:
            raise ValueError(f"features must end in dim {self.dim}, got {tuple(features.shape)}")
        lead = features.shape[:-1]
        x = features.detach().reshape(-1, self.dim).to(self.codebook.device, torch.float32)
        centroids = self.codebook.float()
        if self._is_spherical:
            x = F.normalize(x, dim=1)
        ids, _ = _sq_dist_argmin(x, centroids, self._is_spherical)
        return ids.reshape(lead).to(features.device)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, dim={self.dim}, fitted={self._is_fitted}"


# ---------------------------------------------------------------- head and loss


class MIMHead(nn.Module):
    """Patch hidden states -> code logits: ``Linear(width, width) -> GELU -> LayerNorm -> Linear(width, K)``.

    BERT-style initialisation: linear weights N(0, 0.02), biases 0, LayerNorm weight 1 and bias 0.
    """

    def __init__(self, width: int, num_codes: int, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.decoder = nn.Linear(width, num_codes)
        for linear in (self.dense, self.decoder):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., width)`` -> ``(..., num_codes)``."""
        return self.decoder(self.norm(self.act(self.dense(hidden))))


def mim_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of code logits against target ids, averaged over the masked patches only.

    Two layouts:

    - ``logits (B, N, K)``, ``targets (B, N)`` int64, ``mask (B, N)`` bool: every patch is scored, only masked
      ones count (no boolean indexing, hence no host sync).
    - already selected ``logits (M, K)`` and ``targets (M,)`` with ``mask=None``: every row counts.

    Targets equal to -100 are ignored as well. With no counted position the loss is a graph-connected 0 (the
    sum over nothing divided by 1), not NaN.

    Returns:
        Scalar.
    """
    num_codes = logits.shape[-1]
    if mask is None:
        if logits.shape[:-1] != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
        labels = targets.reshape(-1)
    else:
        if logits.shape[:-1] != targets.shape or mask.shape != targets.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and mask {tuple(mask.shape)} "
                "do not match"
            )
        labels = targets.masked_fill(~mask.bool(), -100).reshape(-1)
    flat = logits.reshape(-1, num_codes)
    count = (labels != -100).sum().clamp(min=1)
    return F.cross_entropy(flat, labels, ignore_index=-100, reduction="sum") / count
