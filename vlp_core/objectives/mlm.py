"""Masked language modelling: BERT-style token masking and the (momentum-distilled) MLM loss."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from vlp_core.objectives.reduce import global_mean_scale

__all__ = ["mask_tokens", "masked_lm_loss", "mlm_distill_loss", "mlm_token_ids"]


def mlm_token_ids(tokenizer: Any) -> dict[str, Any]:
    """The id facts :func:`mask_tokens` needs, read from a Hugging Face-like tokenizer.

    Returns:
        ``{"vocab_size", "mask_token_id", "special_ids"}``, to splat into :func:`mask_tokens`.
        ``len(tokenizer)`` is used as the vocabulary size so that added tokens count.
    """
    return {
        "vocab_size": len(tokenizer),
        "mask_token_id": int(tokenizer.mask_token_id),
        "special_ids": tuple(int(i) for i in tokenizer.all_special_ids),
    }


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    special_ids: Iterable[int] = (),
    prob: float = 0.15,
    generator: torch.Generator | None = None,
    whole_word_ids: torch.Tensor | None = None,
    special_mask: torch.Tensor | None = None,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select tokens for MLM and corrupt them; of the selected: 80 % [MASK], 10 % random, 10 % unchanged.

    Args:
        input_ids: ``(B, L)`` int64 token ids (padding included).
        vocab_size: size of the vocabulary random replacements are drawn from.
        mask_token_id: id of ``[MASK]``.
        special_ids: ids never selected ([CLS], [SEP], [PAD], ...), and never used as random replacements.
        prob: selection probability per token, or per word with ``whole_word_ids``.
        generator: optional RNG on ``input_ids``' device, for reproducible masks.
        whole_word_ids: optional ``(B, L)`` int64 word index of each token within its row (``0 <= id < L``, as
            from a fast tokenizer's ``word_ids()``), -1 for tokens outside any word. Words are selected as a
            whole: all of a word's wordpieces are selected together. The 80/10/10 corruption is then drawn per
            wordpiece, as in Google's BERT whole-word masking (the papers do not say otherwise).
        special_mask: optional ``(B, L)`` bool, extra positions never selected (e.g. image or tag tokens).
        mask_frac, random_frac: corruption split of the selected tokens; the rest stay unchanged.

    Returns:
        ``(masked_ids, labels)``, both ``(B, L)`` int64: ``labels`` holds the original id at selected
        positions and -100 everywhere else.
    """
    if not 0.0 <= prob <= 1.0 or mask_frac < 0 or random_frac < 0 or mask_frac + random_frac > 1:
        raise ValueError(f"bad masking probabilities: prob={prob}, mask={mask_frac}, random={random_frac}")
    device = input_ids.device
    shape = input_ids.shape
    special_list = sorted({int(i) for i in special_ids})
    specials = torch.tensor(special_list, dtype=input_ids.dtype, device=device)
    protected = torch.isin(input_ids, specials)
    if special_mask is not None:
        protected = protected | special_mask.to(device=device, dtype=torch.bool)

    if whole_word_ids is None:
        selected = torch.rand(shape, generator=generator, device=device) < prob
    else:
        word_ids = whole_word_ids.to(device=device, dtype=torch.long)
        if word_ids.shape != shape:
            raise ValueError(f"whole_word_ids shape {tuple(word_ids.shape)} != input_ids {tuple(shape)}")
        if bool((word_ids >= shape[-1]).any()):
            raise ValueError("whole_word_ids must index words within the row (0 <= id < L)")
        # One draw per possible word index of each row; every piece of a word reads its word's draw.
        word_selected = torch.rand(shape, generator=generator, device=device) < prob
        selected = word_selected.gather(-1, word_ids.clamp(min=0)) & (word_ids >= 0)
    selected = selected & ~protected

    draw = torch.rand(shape, generator=generator, device=device)
    to_mask = selected & (draw < mask_frac)
    to_random = selected & (draw >= mask_frac) & (draw < mask_frac + random_frac)

    # Random replacements come from the ordinary vocabulary: a [PAD] or [CLS] in mid-sentence teaches nothing.
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    excluded = [i for i in [*special_list, mask_token_id] if 0 <= i < vocab_size]
    if excluded:
        allowed[excluded] = False
    allowed_ids = allowed.nonzero().squeeze(1).to(input_ids.dtype)
    random_ids = allowed_ids[torch.randint(len(allowed_ids), shape, generator=generator, device=device)]

    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    return masked, labels


def mlm_distill_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    momentum_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE(logits, labels) + alpha * softCE(logits, softmax(momentum_logits))``, masked tokens.

    Both terms are means over the positions with ``labels != -100``; the soft term is ALBEF's distillation
    from the momentum model run on the same masked input. With no masked position the loss is 0 (not NaN), so
    a batch without masks does not poison the step.

    Args:
        logits: ``(..., V)`` prediction scores, e.g. ``(B, L, V)`` or ``(N, V)``.
        labels: ``(...)`` int64 targets, -100 where not masked.
        momentum_logits: ``(..., V)`` momentum-model scores; needed when ``alpha > 0`` (treated as constants).
        alpha: distillation weight in [0, 1].

    Returns:
        Scalar loss.
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    masked = flat_labels != -100
    # Divide by the count as a tensor: boolean indexing would force a host sync.
    count = masked.sum().clamp(min=1)
    ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum") / count
    if alpha == 0:
        return ce
    if momentum_logits is None:
        raise ValueError("alpha > 0 needs momentum_logits")
    soft_targets = F.softmax(momentum_logits.detach().reshape(-1, vocab), dim=-1)
    soft_per_token = -(soft_targets * F.log_softmax(flat_logits, dim=-1)).sum(dim=-1)
    soft = (soft_per_token * masked).sum() / count
    return (1 - alpha) * ce + alpha * soft


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over already-selected ``(M, V)`` logits and ``(M,)`` labels, as its share of the global
    mean over masked tokens (a graph-connected 0 when nothing is masked anywhere)."""
    # Every rank joins the collective in global_mean_scale, also one without masked tokens.
    scale = global_mean_scale(torch.tensor(labels.numel(), device=labels.device))
    if labels.numel() == 0:
        return logits.sum() * 0.0 * scale
    return F.cross_entropy(logits.float(), labels) * scale
