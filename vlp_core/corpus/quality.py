"""Random-pairing baselines for the corpus quality metrics (the SQL views give the measured values).

A retrieval that ignored the image would hit an image's own caption, or a sentence of its category, only by
chance; these are the exact expectations of that chance, to print beside the measured numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def random_alignment_at_k(n_own: Sequence[int], n_texts: int, k: int) -> float:
    """Mean over images of P(at least one of ``k`` sentences drawn without replacement from ``n_texts`` is
    one of the image's ``n_own`` captions) = 1 − C(N−c, k) / C(N, k)."""
    if n_texts <= 0 or len(n_own) == 0:
        return 0.0
    c = np.asarray(n_own, dtype=np.float64)[:, None]
    i = np.arange(min(k, n_texts), dtype=np.float64)[None, :]
    miss = np.clip((n_texts - c - i) / (n_texts - i), 0.0, 1.0).prod(axis=1)
    return float(np.mean(1.0 - miss))


def random_category_at_k(categories: Sequence[str], text_share: Mapping[str, float], k: int) -> float:
    """Mean over images of P(at least one of ``k`` random sentences is of the image's category), with
    ``text_share[c]`` the fraction of corpus sentences that belong to category ``c`` (draws treated as
    independent: the corpus is much larger than k)."""
    if len(categories) == 0:
        return 0.0
    p = np.array([text_share.get(c, 0.0) for c in categories], dtype=np.float64)
    return float(np.mean(1.0 - (1.0 - p) ** k))


def random_category_precision(categories: Sequence[str], text_share: Mapping[str, float]) -> float:
    """Expected share of same-category sentences among randomly retrieved ones."""
    if len(categories) == 0:
        return 0.0
    return float(np.mean([text_share.get(c, 0.0) for c in categories]))


def expected_cutmix_replacements(
    span_words: Sequence[Sequence[int]], p: float = 0.5, at_least_one: bool = True
) -> tuple[float, float]:
    """Exact expected (spans, words) VLMixer CMC replaces over sentences, for
    :func:`vlp_core.language.cutmix_choices`: ``span_words[s]`` lists the word count of each grounded span of
    sentence ``s``. Each span is chosen with probability ``p``; with ``at_least_one`` a sentence of ``n >= 1``
    spans whose coin flips chose none gets one uniformly, so each span is chosen with ``p + (1 - p)^n / n``.
    (The SQL view ``cmc_coverage`` computes the same with p = 0.5.)"""
    spans = words = 0.0
    for sw in span_words:
        n = len(sw)
        if n == 0:
            continue
        q = p + (1.0 - p) ** n / n if at_least_one else p
        spans += q * n
        words += q * float(sum(sw))
    return spans, words
