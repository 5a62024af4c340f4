"""Image-text matching (ITM): hard-negative sampling, the fused-pass layout and the binary match head.

Hard negatives follow ALBEF: for every text one negative image, for every image one negative text, drawn
with ``multinomial(softmax(sim))`` so that similar (hard) pairs are picked more often. Two fixes over the
reference: the sampling is one batched ``torch.multinomial`` call (no ``.item()`` or Python loop over the
batch, hence no per-sample host sync), and rows whose softmax mass sat only on excluded entries still sample
uniformly among the admissible candidates thanks to a small additive epsilon (ALBEF issue #18).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ITMResult",
    "hard_negative_itm",
    "HardNegatives",
    "ITMHead",
    "ItmPairs",
    "build_itm_pairs",
    "itm_loss",
    "match_probability",
    "sample_hard_negatives",
    "swap_captions",
    "swapped_texts",
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


@dataclass
class ITMResult:
    """Loss (already scaled to its share of the global mean), accuracy over valid rows, and the logits."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


def hard_negative_itm(
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    image_inputs: torch.Tensor,
    text_inputs: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    image_query: torch.Tensor,
    text_query: torch.Tensor,
    image_key: torch.Tensor,
    text_key: torch.Tensor,
    temperature: torch.Tensor | float,
    ids: torch.Tensor,
    seed: int,
    negatives: str = "global",
    shared: bool = False,
) -> ITMResult:
    """ITM on ``[positives; text + hard negative image; hard negative text + image]`` for one local batch.

    Negatives are drawn from ``softmax(query . key / T)`` with same-``ids`` pairs masked (ALBEF draws the
    online features against the momentum features; VLMo online against online). Shared by every recipe
    with an ITM objective; the recipe supplies the fused scorer.

    ``negatives="global"``: image inputs, text inputs (padded to the longest length of any rank), masks,
    query/key features and ids are gathered from all ranks (inputs with their gradients when they require
    grad); every rank draws negatives for the whole global batch with one generator seeded by ``seed``
    (give every rank the same seed, e.g. :func:`step_seed` of the step), then scores its own ``3B`` rows. The
    loss is scaled by :func:`global_mean_scale` over valid rows, so the mean over ranks is the global mean
    and the result does not depend on the number of processes. ``"local"``: negatives from this rank's
    batch only (the reference implementations' per-GPU behaviour; give each rank its own seed).

    Args:
        score: ``(image_rows (N, ...), text_rows (N, L, ...), mask_rows (N, L)) -> (N, 2)`` match logits.
        image_inputs: ``(B, ...)`` what ``score`` takes on the image side (image tokens, or embeddings).
        text_inputs: ``(B, L, ...)`` what ``score`` takes on the text side; ``text_mask`` ``(B, L)``.
        image_query, text_query, image_key, text_key: ``(B, E)`` L2-normalised features for the draw.
        temperature: the ITC temperature (detached here).
        ids: ``(B,)`` int64 image ids; pairs of the same image are never negatives.
        seed: seed of the draw.
        shared: call ``score(distinct image rows, distinct text rows, their masks, image_index=,
            text_index=)`` (row i of the pass pairs ``image_index[i]`` with ``text_index[i]``) instead of
            on the gathered rows, so a scorer can compute what depends on one input alone once per input
            (every image and every text appears in three rows of the pass).
    """
    from vlp_core.distributed import gather_features, rank
    from vlp_core.models.layers import gather_rows
    from vlp_core.objectives.reduce import global_mean_scale

    temp = temperature.detach() if torch.is_tensor(temperature) else temperature
    batch = image_inputs.shape[0]
    feats = (image_query, text_query, image_key, text_key)
    if negatives == "local":
        gathered = [f.detach() for f in feats]
        ids_all, lo = ids, 0
        images_all, texts_all, masks_all = image_inputs, text_inputs, text_mask
    elif negatives == "global":
        length = text_inputs.shape[1]
        lengths = gather_features(torch.tensor([length], device=text_mask.device), with_grad=False)
        longest = int(lengths.max())
        if longest > length:  # all_gather needs one shape; the padding is masked out
            pad = [0, 0] * (text_inputs.dim() - 2) + [0, longest - length]
            text_inputs = F.pad(text_inputs, pad)
            text_mask = F.pad(text_mask, (0, longest - length))
        gathered = [gather_features(f.detach(), with_grad=False) for f in feats]
        ids_all = gather_features(ids, with_grad=False)
        lo = rank() * batch
        images_all = gather_features(image_inputs, with_grad=image_inputs.requires_grad)
        texts_all = gather_features(text_inputs, with_grad=text_inputs.requires_grad)
        masks_all = gather_features(text_mask, with_grad=False)
    else:
        raise ValueError(f"negatives must be 'global' or 'local', got {negatives!r}")
    iq, tq, ik, tk = gathered
    same = ids_all[:, None] == ids_all[None, :]
    gen = torch.Generator(device=iq.device).manual_seed(seed)
    neg = sample_hard_negatives(iq @ tk.t() / temp, tq @ ik.t() / temp, same, generator=gen)
    if negatives == "global":
        hi = lo + batch
        neg = HardNegatives(
            image_for_text=neg.image_for_text[lo:hi],
            text_for_image=neg.text_for_image[lo:hi],
            image_valid=neg.image_valid[lo:hi],
            text_valid=neg.text_valid[lo:hi],
            offset=lo,
        )
    pairs = build_itm_pairs(neg)
    if shared:
        images, image_index = torch.unique(pairs.image_idx, return_inverse=True)
        texts, text_index = torch.unique(pairs.text_idx, return_inverse=True)
        logits = score(gather_rows(images_all, images), gather_rows(texts_all, texts),
                       masks_all.index_select(0, texts), image_index=image_index,
                       text_index=text_index)  # fmt: skip
    else:
        im, tx = pairs.image_idx, pairs.text_idx
        logits = score(gather_rows(images_all, im), gather_rows(texts_all, tx), masks_all.index_select(0, tx))
    valid = pairs.labels != -100
    loss = itm_loss(logits, pairs.labels)
    if negatives == "global":
        loss = loss * global_mean_scale(valid.sum())
    correct = (logits.argmax(dim=1) == pairs.labels) & valid
    acc = correct.sum().float() / valid.sum().clamp(min=1)
    return ITMResult(loss=loss, accuracy=acc.detach(), logits=logits, labels=pairs.labels)


#: XOR-ed into a sample's seed for its ITM swap draw.
ITM_SEED = 0x1735_3A9C


def swap_captions(
    sample_seed: torch.Tensor, prob: float, global_batch: int, offset: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which local rows get another caption, and whose: ``(swap (B,) bool, partner (B,) global row)``.

    Row ``i`` (global index ``offset + i``) swaps when a generator seeded by its sample seed draws below
    ``prob``; its partner is another row of the global batch drawn by a generator seeded by ``seed`` (the
    same on every rank). Both are functions of the samples and the step only, never of the process count.
    """
    n = sample_seed.shape[0]
    swap = torch.tensor(
        [
            torch.rand((), generator=torch.Generator().manual_seed(int(s) ^ ITM_SEED)).item() < prob
            for s in sample_seed
        ]
    )
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, max(2, global_batch), (global_batch,), generator=gen)[offset : offset + n]
    partner = (torch.arange(offset, offset + n) + shift) % global_batch
    return swap, partner


def swapped_texts(
    batch: dict[str, torch.Tensor], prob: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's captions with some swapped for others of the global batch (ITM negatives by random swap:
    FLAVA p = 0.1, µ-VLA p = 0.5): ``(input_ids, attention_mask, labels)``, the texts padded to the longest
    of any rank, ``labels`` 1 = match. A partner that is a caption of the same image (equal ``image_key``)
    stays a match. Reads ``input_ids``, ``attention_mask``, ``image_key`` and ``sample_seed``; ``seed`` must
    be the same on every rank (e.g. :func:`step_seed` of the step)."""
    from vlp_core.distributed import gather_features, rank

    ids, mask, keys = batch["input_ids"], batch["attention_mask"], batch["image_key"]
    n = ids.shape[0]
    lengths = gather_features(torch.tensor([ids.shape[1]], device=ids.device), with_grad=False)
    longest = int(lengths.max())
    ids_p, mask_p = F.pad(ids, (0, longest - ids.shape[1])), F.pad(mask, (0, longest - ids.shape[1]))
    all_ids, all_mask = gather_features(ids_p, with_grad=False), gather_features(mask_p, with_grad=False)
    all_keys = gather_features(keys, with_grad=False)
    swap, partner = swap_captions(batch["sample_seed"].cpu(), prob, all_ids.shape[0], rank() * n, seed)
    swap, partner = swap.to(ids.device), partner.to(ids.device)
    new_ids = torch.where(swap[:, None], all_ids[partner], ids_p)
    new_mask = torch.where(swap[:, None], all_mask[partner], mask_p)
    labels = (~swap | (all_keys[partner] == keys)).long()
    return new_ids, new_mask, labels
