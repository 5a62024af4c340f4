"""Random-pairing baselines of the corpus quality report, against hand-computed values."""

from __future__ import annotations

import math

from vlp_core.corpus.quality import random_alignment_at_k, random_category_at_k, random_category_precision


def test_random_alignment_matches_combinatorics():
    assert math.isclose(random_alignment_at_k([1], 10, 1), 0.1)
    assert math.isclose(random_alignment_at_k([2], 10, 3), 1 - math.comb(8, 3) / math.comb(10, 3))  # 0.5333
    # mean over images; k larger than the corpus → certain hit
    assert math.isclose(random_alignment_at_k([1, 2], 10, 3), (0.3 + (1 - 56 / 120)) / 2)
    assert random_alignment_at_k([1], 3, 5) == 1.0
    assert random_alignment_at_k([], 10, 5) == 0.0


def test_random_category():
    share = {"animals": 0.2, "food": 0.5}
    assert math.isclose(random_category_at_k(["animals"], share, 2), 1 - 0.8**2)
    assert math.isclose(random_category_at_k(["animals", "food", "unknown"], share, 1), (0.2 + 0.5 + 0) / 3)
    assert math.isclose(random_category_precision(["animals", "food"], share), 0.35)
