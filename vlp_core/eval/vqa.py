"""VQA accuracy with soft scores: the score of the predicted answer, averaged over questions."""

from __future__ import annotations

import torch

__all__ = ["vqa_accuracy"]


def vqa_accuracy(logits: torch.Tensor, answer_scores: torch.Tensor) -> float:
    """Mean of ``answer_scores[i, argmax logits[i]]``: the VQA score (``min(#humans/3, 1)`` per answer).

    With one ground-truth answer per question (easy-VQA) this is plain accuracy. Questions whose answers are
    all outside the vocabulary count as 0, as in the official evaluation.

    Args:
        logits: ``(N, A)`` answer scores.
        answer_scores: ``(N, A)`` soft targets in [0, 1].
    """
    if logits.shape != answer_scores.shape:
        raise ValueError(f"shape mismatch {tuple(logits.shape)} vs {tuple(answer_scores.shape)}")
    pred = logits.argmax(dim=1, keepdim=True)
    return answer_scores.gather(1, pred).float().mean().item()
