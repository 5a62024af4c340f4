"""Objectives checked against values computed by hand (plain ``math`` on small explicit tensors), plus a real
two-process gloo run for the distributed gather and the contrastive loss."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vlp_core.distributed import gather_features, is_main, rank, world_size
from vlp_core.objectives import (
    ContrastiveLoss,
    FeatureQueue,
    HardNegatives,
    ITMHead,
    Temperature,
    alpha_ramp,
    build_itm_pairs,
    copy_params_,
    ema_update_,
    itm_loss,
    mask_tokens,
    match_probability,
    mlm_distill_loss,
    mlm_token_ids,
    momentum_copy,
    sample_hard_negatives,
)

# ---------------------------------------------------------------- plain-Python references (no torch)


def _lse(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _softmax(xs: list[float]) -> list[float]:
    z = _lse(xs)
    return [math.exp(x - z) for x in xs]


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _soft_ce(logits: list[float], targets: list[float]) -> float:
    z = _lse(logits)
    return -sum(t * (x - z) for x, t in zip(logits, targets, strict=True))


def _ref_itc(img, txt, temp, *, img_m=None, txt_m=None, img_queue=(), txt_queue=(), alpha=0.0):
    """ALBEF-style ITC written out with math: queries online, keys momentum (or online) + queue."""
    img, txt = [_unit(v) for v in img], [_unit(v) for v in txt]
    img_keys = [_unit(v) for v in img_m] if img_m else img
    txt_keys = [_unit(v) for v in txt_m] if txt_m else txt
    img_keys, txt_keys = img_keys + list(img_queue), txt_keys + list(txt_queue)
    losses = []
    for queries, keys, m_queries in ((img, txt_keys, img_m), (txt, img_keys, txt_m)):
        total = 0.0
        for i, q in enumerate(queries):
            logits = [_dot(q, k) / temp for k in keys]
            targets = [1.0 if j == i else 0.0 for j in range(len(keys))]
            if alpha > 0:
                soft = _softmax([_dot(_unit(m_queries[i]), k) / temp for k in keys])
                targets = [alpha * s + (1 - alpha) * t for s, t in zip(soft, targets, strict=True)]
            total += _soft_ce(logits, targets)
        losses.append(total / len(queries))
    return (losses[0] + losses[1]) / 2


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- contrastive


def test_itc_symmetric_2x2_by_hand():
    img = _t([[1.0, 0.0], [0.0, 1.0]])
    txt = _t([[1.0, 0.0], [0.6, 0.8]])
    # sim = [[1, .6], [0, .8]] / 0.5 -> i2t rows [2, 1.2], [0, 1.6]; t2i rows [2, 0], [1.2, 1.6]
    i2t = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    t2i = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-0.4))) / 2
    out = ContrastiveLoss()(img, txt, 0.5)
    assert out.loss_i2t.item() == pytest.approx(i2t, abs=1e-9)
    assert out.loss_t2i.item() == pytest.approx(t2i, abs=1e-9)
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-9)
    torch.testing.assert_close(out.logits_i2t, _t([[2.0, 1.2], [0.0, 1.6]]))
    # Features are L2-normalised inside: scaling them changes nothing.
    scaled = ContrastiveLoss()(3 * img, 7 * txt, torch.tensor(0.5, dtype=torch.float64))
    assert scaled.loss.item() == pytest.approx(out.loss.item(), abs=1e-9)


def test_itc_soft_targets_with_alpha_by_hand():
    img, txt = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]]
    img_m, txt_m = [[0.8, 0.6], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]
    alpha, temp = 0.4, 0.5
    loss = ContrastiveLoss()(
        _t(img), _t(txt), temp, image_feats_m=_t(img_m), text_feats_m=_t(txt_m), alpha=alpha
    ).loss

    # Written out: online queries against momentum keys, targets from momentum queries against the same keys.
    # i2t logits  [2, 0], [0, 2];        momentum sims [1.6, 1.2], [0, 2]
    # t2i logits  [1.6, 0], [1.92, 1.6]; momentum sims [1.6, 0], [1.2, 2]
    def mix(sims: list[float], pos: int) -> list[float]:
        return [alpha * p + (1 - alpha) * (j == pos) for j, p in enumerate(_softmax(sims))]

    i2t = (_soft_ce([2.0, 0.0], mix([1.6, 1.2], 0)) + _soft_ce([0.0, 2.0], mix([0.0, 2.0], 1))) / 2
    t2i = (_soft_ce([1.6, 0.0], mix([1.6, 0.0], 0)) + _soft_ce([1.92, 1.6], mix([1.2, 2.0], 1))) / 2
    assert loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-9)
    expected = _ref_itc(img, txt, temp, img_m=img_m, txt_m=txt_m, alpha=alpha)
    assert expected == pytest.approx((i2t + t2i) / 2, abs=1e-12)
    # alpha = 0 with momentum keys is plain CE against the momentum keys.
    hard = ContrastiveLoss()(_t(img), _t(txt), temp, image_feats_m=_t(img_m), text_feats_m=_t(txt_m)).loss
    assert hard.item() == pytest.approx(_ref_itc(img, txt, temp, img_m=img_m, txt_m=txt_m), abs=1e-9)
    assert hard.item() != pytest.approx(expected, abs=1e-6)


def test_itc_with_queue_keys_by_hand():
    img, txt = [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]]
    iq, tq = [[0.0, -1.0], [0.6, -0.8]], [[-1.0, 0.0], [0.8, 0.6]]
    out = ContrastiveLoss()(_t(img), _t(txt), 0.1, image_queue=_t(iq), text_queue=_t(tq))
    assert out.logits_i2t.shape == (2, 4)
    # First image query: logits [1, .6, -1, .8] / 0.1, positive = column 0.
    row0 = [10.0, 6.0, -10.0, 8.0]
    assert out.logits_i2t[0].tolist() == pytest.approx(row0)
    assert out.loss.item() == pytest.approx(_ref_itc(img, txt, 0.1, img_queue=iq, txt_queue=tq), abs=1e-9)
    soft = ContrastiveLoss()(
        _t(img),
        _t(txt),
        0.1,
        image_feats_m=_t(img),
        text_feats_m=_t(txt),
        image_queue=_t(iq),
        text_queue=_t(tq),
        alpha=0.3,
    ).loss
    ref = _ref_itc(img, txt, 0.1, img_m=img, txt_m=txt, img_queue=iq, txt_queue=tq, alpha=0.3)
    assert soft.item() == pytest.approx(ref, abs=1e-9)


def test_itc_shared_ids_are_all_positives():
    img = _t([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = _t([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    ids = torch.tensor([7, 7, 9])
    out = ContrastiveLoss()(img, txt, 1.0, ids=ids)
    # Image 0 has positives texts 0 and 1 (same id): target [.5, .5, 0] over logits [1, 0, .6].
    row0 = -(0.5 * (1.0 - _lse([1.0, 0.0, 0.6])) + 0.5 * (0.0 - _lse([1.0, 0.0, 0.6])))
    row1 = -(0.5 * (0.0 - _lse([0.0, 1.0, 0.8])) + 0.5 * (1.0 - _lse([0.0, 1.0, 0.8])))
    row2 = -(1.0 - _lse([0.6, 0.8, 1.0]))
    # The matrix is symmetric, so t2i equals i2t.
    assert out.loss.item() == pytest.approx((row0 + row1 + row2) / 3, abs=1e-9)
    with pytest.raises(ValueError, match="queue_ids"):
        ContrastiveLoss()(img, txt, 1.0, ids=ids, image_queue=img, text_queue=txt)


def test_itc_argument_checks():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="momentum"):
        ContrastiveLoss()(x, x, 0.1, alpha=0.4)
    with pytest.raises(ValueError, match="both momentum"):
        ContrastiveLoss()(x, x, 0.1, image_feats_m=x)
    with pytest.raises(ValueError, match="both queues"):
        ContrastiveLoss()(x, x, 0.1, image_queue=x)


def test_temperature_init_clamp_and_grad():
    temp = Temperature()
    assert isinstance(temp.value, nn.Parameter)
    assert temp().item() == pytest.approx(0.07)
    with torch.no_grad():
        temp.value.fill_(3.0)
    temp.clamp_()
    assert temp().item() == pytest.approx(0.5)
    with torch.no_grad():
        temp.value.fill_(-1.0)
    temp.clamp_()
    assert temp().item() == pytest.approx(0.001)
    temp.value.data.fill_(0.07)
    ContrastiveLoss()(torch.randn(4, 8), torch.randn(4, 8), temp()).loss.backward()
    assert temp.value.grad is not None and temp.value.grad.abs().item() > 0
    fixed = Temperature(0.07, learnable=False)
    assert list(fixed.parameters()) == [] and "value" in fixed.state_dict()
    with pytest.raises(ValueError):
        Temperature(init=1.0)


def test_queue_wraps_around_and_checkpoints():
    queue = FeatureQueue(dim=2, size=4)
    assert queue.feats.norm(dim=0).tolist() == pytest.approx([1.0] * 4)
    assert queue.ids.tolist() == [-1] * 4
    queue.enqueue(torch.tensor([[3.0, 4.0], [0.0, 2.0]]), ids=torch.tensor([10, 11]))
    assert queue.ptr.item() == 2
    torch.testing.assert_close(queue.keys()[:2], torch.tensor([[0.6, 0.8], [0.0, 1.0]]))  # stored normalised
    queue.enqueue(torch.tensor([[1.0, 0.0], [0.0, -1.0]]), ids=torch.tensor([12, 13]))
    assert queue.ptr.item() == 0  # wrapped
    queue.enqueue(torch.tensor([[-2.0, 0.0], [0.0, 5.0]]), ids=torch.tensor([14, 15]))
    assert queue.ptr.item() == 2
    torch.testing.assert_close(queue.keys(), torch.tensor([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0]]))
    assert queue.ids.tolist() == [14, 15, 12, 13]
    assert queue.keys().shape == (4, 2) and not queue.keys().requires_grad

    restored = FeatureQueue(dim=2, size=4)
    restored.load_state_dict(queue.state_dict())
    assert restored.ptr.item() == 2 and torch.equal(restored.feats, queue.feats)

    with pytest.raises(ValueError, match="multiple"):
        queue.enqueue(torch.randn(3, 2))
    # Features with grad are stored detached.
    src = torch.randn(2, 2, requires_grad=True)
    queue.enqueue(src)
    assert not queue.feats.requires_grad and queue.ids[2:].tolist() == [-1, -1]


# ---------------------------------------------------------------- ITM


def test_hard_negatives_never_positive_or_same_image():
    gen = torch.Generator().manual_seed(0)
    batch = 1000
    sim_i2t, sim_t2i = torch.randn(batch, batch, generator=gen), torch.randn(batch, batch, generator=gen)
    # Large similarity on the diagonal: the positive would dominate if it were not masked.
    sim_i2t.diagonal().add_(50.0)
    sim_t2i.diagonal().add_(50.0)
    image_of = torch.arange(batch) // 5  # five captions per image
    same = image_of[:, None] == image_of[None, :]
    start = time.perf_counter()
    neg = sample_hard_negatives(sim_i2t, sim_t2i, same_mask=same, generator=gen)
    assert time.perf_counter() - start < 2.0
    rows = torch.arange(batch)
    for idx in (neg.image_for_text, neg.text_for_image):
        assert idx.shape == (batch,)
        assert not (idx == rows).any()
        assert not same[rows, idx].any()
    assert neg.image_valid.all() and neg.text_valid.all()


def _ring_sim(batch: int, row_values: list[float]) -> torch.Tensor:
    """``(batch, batch)`` similarities: row b holds ``row_values[k]`` at column ``(b + k) % batch``, -inf
    elsewhere, so every row has the same structure relative to its positive (column b)."""
    sim = torch.full((batch, batch), float("-inf"))
    rows = torch.arange(batch)
    for k, v in enumerate(row_values):
        sim[rows, (rows + k) % batch] = v
    return sim


def test_hard_negatives_zero_mass_rows_sample_uniformly():
    batch = 900
    rows = torch.arange(batch)
    # Only columns b+1..b+3 are admissible for row b (the rest are "same image").
    same = torch.ones(batch, batch, dtype=torch.bool)
    for k in (1, 2, 3):
        same[rows, (rows + k) % batch] = False
    gen = torch.Generator().manual_seed(1)
    # All softmax mass on the positive, then all entries -inf (softmax is NaN): both must fall back to the
    # epsilon, i.e. uniform over the admissible columns (300 expected each).
    for sim in (_ring_sim(batch, [0.0]), torch.full((batch, batch), float("-inf"))):
        neg = sample_hard_negatives(sim, sim, same_mask=same, generator=gen)
        assert neg.image_valid.all() and neg.text_valid.all()
        for idx in (neg.image_for_text, neg.text_for_image):
            rel = (idx - rows) % batch
            counts = torch.bincount(rel, minlength=batch)
            assert counts[0] == 0 and counts[4:].sum() == 0
            assert all(220 < c < 380 for c in counts[1:4].tolist()), counts[:4]


def test_hard_negatives_follow_softmax():
    # Relative to its positive, each row scores [0, 0, ln 3] (softmax 1/5, 1/5, 3/5; -inf elsewhere).
    batch = 2000
    sim = _ring_sim(batch, [0.0, 0.0, math.log(3.0)])
    eps = 1e-4
    # The epsilon is added to every admissible column, the 1997 at -inf included.
    w1, w2, w_rest = 1 / 5 + eps, 3 / 5 + eps, (batch - 3) * eps
    total = w1 + w2 + w_rest
    gen = torch.Generator().manual_seed(2)
    neg = sample_hard_negatives(sim, sim, generator=gen, eps=eps)
    rel = (neg.image_for_text - torch.arange(batch)) % batch
    assert (rel != 0).all()
    assert (rel == 2).float().mean().item() == pytest.approx(w2 / total, abs=0.04)
    assert (rel == 1).float().mean().item() == pytest.approx(w1 / total, abs=0.03)
    assert (rel > 2).float().mean().item() == pytest.approx(w_rest / total, abs=0.03)


def test_hard_negatives_have_no_data_dependent_host_sync():
    # Meta tensors carry no data: any .item(), bool() or Python loop over values would raise here.
    sim = torch.empty(64, 128, device="meta")
    same = torch.empty(64, 128, dtype=torch.bool, device="meta")
    neg = sample_hard_negatives(sim, sim, same_mask=same, offset=64)
    assert neg.image_for_text.shape == (64,) and neg.image_for_text.device.type == "meta"
    pairs = build_itm_pairs(neg)
    assert pairs.labels.shape == (192,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for sync debug mode")
def test_hard_negatives_no_cuda_sync():
    sim = torch.randn(256, 256, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        neg = sample_hard_negatives(sim, sim.t())
        build_itm_pairs(neg)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_batch_of_one_and_all_same_image_are_flagged_invalid():
    neg = sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))
    assert not neg.image_valid.any() and not neg.text_valid.any()
    assert build_itm_pairs(neg).labels.tolist() == [1, -100, -100]
    same = torch.ones(3, 3, dtype=torch.bool)
    same[2, :2] = False
    same[:2, 2] = False
    neg = sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), same_mask=same)
    assert neg.image_valid.tolist() == [True, True, True]
    same = torch.ones(3, 3, dtype=torch.bool)
    neg = sample_hard_negatives(torch.zeros(3, 3), torch.zeros(3, 3), same_mask=same)
    assert neg.image_valid.tolist() == [False] * 3


def test_itm_layout_and_loss_by_hand():
    neg = HardNegatives(
        image_for_text=torch.tensor([2, 0, 1]),
        text_for_image=torch.tensor([1, 2, 0]),
        image_valid=torch.tensor([True, True, False]),
        text_valid=torch.tensor([True, True, True]),
    )
    pairs = build_itm_pairs(neg)
    assert pairs.text_idx.tolist() == [0, 1, 2, 0, 1, 2, 1, 2, 0]
    assert pairs.image_idx.tolist() == [0, 1, 2, 2, 0, 1, 0, 1, 2]
    assert pairs.labels.tolist() == [1, 1, 1, 0, 0, -100, 0, 0, 0]
    shifted = build_itm_pairs(
        HardNegatives(neg.image_for_text, neg.text_for_image, neg.image_valid, neg.text_valid, offset=3)
    )
    assert shifted.text_idx[:3].tolist() == [3, 4, 5]

    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [5.0, 1.0]])
    labels = torch.tensor([1, 0, -100])
    expected = (-math.log(3 / 4) - math.log(1 / 4)) / 2
    assert itm_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert match_probability(logits)[:2].tolist() == pytest.approx([0.75, 0.75])
    head = ITMHead(8)
    assert head(torch.randn(5, 8)).shape == (5, 2)


# ---------------------------------------------------------------- MLM

SPECIAL = {"pad": 0, "cls": 1, "sep": 2, "mask": 3}
VOCAB = 500


def _batch(gen: torch.Generator, rows: int, length: int) -> torch.Tensor:
    ids = torch.randint(4, VOCAB, (rows, length), generator=gen)
    ids[:, 0] = SPECIAL["cls"]
    lengths = torch.randint(length // 2, length, (rows,), generator=gen)
    cols = torch.arange(length)
    ids[cols[None, :] == lengths[:, None]] = SPECIAL["sep"]
    ids[cols[None, :] > lengths[:, None]] = SPECIAL["pad"]
    return ids


def test_mask_tokens_statistics():
    gen = torch.Generator().manual_seed(0)
    ids = _batch(gen, 512, 128)
    masked, labels = mask_tokens(
        ids, vocab_size=VOCAB, mask_token_id=SPECIAL["mask"], special_ids=SPECIAL.values(), generator=gen
    )
    special = ids < 4
    selected = labels != -100
    assert not (selected & special).any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    assert selected.sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    n_sel = selected.sum().item()
    to_mask = (masked == SPECIAL["mask"]) & selected
    unchanged = (masked == ids) & selected
    randomised = selected & ~to_mask & ~unchanged
    assert to_mask.sum().item() / n_sel == pytest.approx(0.8, abs=0.02)
    # A random draw may equal the original token (1 in 496): it counts as unchanged here.
    assert randomised.sum().item() / n_sel == pytest.approx(0.1, abs=0.015)
    assert unchanged.sum().item() / n_sel == pytest.approx(0.1, abs=0.015)
    assert (masked[randomised] >= 4).all() and (masked[randomised] < VOCAB).all()

    again, _ = mask_tokens(
        ids,
        vocab_size=VOCAB,
        mask_token_id=3,
        special_ids=SPECIAL.values(),
        generator=torch.Generator().manual_seed(5),
    )
    same, _ = mask_tokens(
        ids,
        vocab_size=VOCAB,
        mask_token_id=3,
        special_ids=SPECIAL.values(),
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(again, same)


def test_mask_tokens_extra_protected_positions_and_tokenizer_ids():
    ids = torch.full((4, 50), 7)
    protect = torch.zeros(4, 50, dtype=torch.bool)
    protect[:, :25] = True
    _, labels = mask_tokens(ids, vocab_size=VOCAB, mask_token_id=3, prob=1.0, special_mask=protect)
    assert (labels[:, :25] == -100).all() and (labels[:, 25:] == 7).all()

    class FakeTokenizer:
        mask_token_id = 103
        all_special_ids = [0, 100, 101, 102, 103]

        def __len__(self) -> int:
            return 30522

    assert mlm_token_ids(FakeTokenizer()) == {
        "vocab_size": 30522,
        "mask_token_id": 103,
        "special_ids": (0, 100, 101, 102, 103),
    }


def test_whole_word_masking_masks_pieces_together():
    gen = torch.Generator().manual_seed(3)
    rows, length = 256, 40
    ids = torch.randint(4, VOCAB, (rows, length), generator=gen)
    ids[:, 0], ids[:, -1] = SPECIAL["cls"], SPECIAL["sep"]
    # Words of 1-3 pieces between [CLS] and [SEP]; -1 on the specials.
    word_ids = torch.full((rows, length), -1)
    for r in range(rows):
        pos, word = 1, 0
        while pos < length - 1:
            span = int(torch.randint(1, 4, (1,), generator=gen))
            word_ids[r, pos : min(pos + span, length - 1)] = word
            pos, word = pos + span, word + 1
    masked, labels = mask_tokens(
        ids,
        vocab_size=VOCAB,
        mask_token_id=3,
        special_ids=SPECIAL.values(),
        generator=gen,
        whole_word_ids=word_ids,
    )
    selected = labels != -100
    assert not selected[:, 0].any() and not selected[:, -1].any()
    n_words = n_selected_words = 0
    for r in range(rows):
        for w in word_ids[r].unique().tolist():
            if w < 0:
                continue
            flags = selected[r, word_ids[r] == w]
            assert flags.all() or not flags.any()
            n_words += 1
            n_selected_words += int(flags.all())
    assert n_selected_words / n_words == pytest.approx(0.15, abs=0.02)
    with pytest.raises(ValueError, match="within the row"):
        mask_tokens(ids, vocab_size=VOCAB, mask_token_id=3, whole_word_ids=torch.full_like(ids, length))


def test_mlm_distill_loss_by_hand():
    # One sequence of 3 positions over a vocabulary of 3; position 0 is not masked.
    logits = torch.tensor([[[9.0, 9.0, 9.0], [1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]]])
    labels = torch.tensor([[-100, 2, 0]])
    momentum = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0]]])
    ce = (-(3.0 - _lse([1.0, 2.0, 3.0])) + math.log(4.0)) / 2
    soft1 = _soft_ce([1.0, 2.0, 3.0], [1 / 3] * 3)
    soft2 = _soft_ce([0.0, 0.0, math.log(2.0)], [3 / 5, 1 / 5, 1 / 5])
    soft = (soft1 + soft2) / 2
    assert mlm_distill_loss(logits, labels).item() == pytest.approx(ce, abs=1e-6)
    assert mlm_distill_loss(logits, labels, momentum, alpha=0.0).item() == pytest.approx(ce, abs=1e-6)
    assert mlm_distill_loss(logits, labels, momentum, alpha=1.0).item() == pytest.approx(soft, abs=1e-6)
    mixed = mlm_distill_loss(logits, labels, momentum, alpha=0.4).item()
    assert mixed == pytest.approx(0.6 * ce + 0.4 * soft, abs=1e-6)
    # Flattened (N, V) inputs give the same; no masked token gives 0, not NaN.
    assert mlm_distill_loss(logits[0], labels[0]).item() == pytest.approx(ce, abs=1e-6)
    assert mlm_distill_loss(logits, torch.full_like(labels, -100), momentum, alpha=0.4).item() == 0.0
    with pytest.raises(ValueError):
        mlm_distill_loss(logits, labels, alpha=0.4)


# ---------------------------------------------------------------- momentum / ramp


def test_ema_update_values_and_frozen_copy():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    source = [torch.tensor([3.0, -2.0], requires_grad=True), torch.tensor([[10.0]])]
    ema_update_(target, source, momentum=0.9)
    assert target[0].tolist() == pytest.approx([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2])
    assert target[1].item() == pytest.approx(1.0)

    online = nn.Linear(3, 2)
    shadow = momentum_copy(online)
    assert all(not p.requires_grad for p in shadow.parameters())
    assert all(p.requires_grad for p in online.parameters())
    before = shadow.weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    ema_update_(shadow, online, momentum=0.995)
    assert torch.allclose(shadow.weight, before + 0.005, atol=1e-6)

    other = nn.Linear(3, 2)
    copy_params_(other, online)
    assert torch.equal(other.weight, online.weight) and not other.weight.requires_grad
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(3, 2), nn.Linear(2, 3))


def test_alpha_ramp_values():
    assert alpha_ramp(0, 100) == 0.0
    assert alpha_ramp(50, 100) == pytest.approx(0.2)
    assert alpha_ramp(100, 100) == pytest.approx(0.4)
    assert alpha_ramp(10_000, 100) == pytest.approx(0.4)
    assert alpha_ramp(100, 100, ramp_epochs=2) == pytest.approx(0.2)  # LAVIS
    assert alpha_ramp(0, 100, alpha=0.3, ramp_epochs=0) == pytest.approx(0.3)


# ---------------------------------------------------------------- distributed (2 processes, gloo)

_B, _D = 2, 3


def _full_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    names = ("img", "txt", "img_m", "txt_m", "img_q", "txt_q")
    sizes = (2 * _B,) * 4 + (4, 4)
    return {
        n: torch.randn(s, _D, generator=gen, dtype=torch.float64) for n, s in zip(names, sizes, strict=True)
    }


def _itc_cases(full, lo, hi):
    """(name, kwargs) variants of the loss, on the slice [lo, hi) of the full batch."""
    q = {
        "image_queue": nn.functional.normalize(full["img_q"], dim=-1),
        "text_queue": nn.functional.normalize(full["txt_q"], dim=-1),
    }
    mom = {"image_feats_m": full["img_m"][lo:hi], "text_feats_m": full["txt_m"][lo:hi]}
    return [("plain", {}), ("queue", q), ("distill", {**mom, **q, "alpha": 0.4})]


def _dist_worker(rank_: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank_, world_size=world)
    try:
        res: dict[str, object] = {"rank": rank(), "world": world_size(), "main": is_main()}
        weight = torch.arange(world * _B * _D, dtype=torch.float64).reshape(world * _B, _D)
        for with_grad in (True, False):
            x = torch.full((_B, _D), float(rank_ + 1), dtype=torch.float64, requires_grad=True)
            gathered = gather_features(x, with_grad=with_grad)
            (gathered * weight).sum().backward()
            res[f"gathered_{with_grad}"] = gathered.detach()
            res[f"grad_{with_grad}"] = x.grad.clone()

        full = _full_batch()
        lo, hi = rank_ * _B, (rank_ + 1) * _B
        for name, kwargs in _itc_cases(full, lo, hi):
            for gather_grad in (True, False):
                for local in (True, False):
                    img = full["img"][lo:hi].clone().requires_grad_(True)
                    txt = full["txt"][lo:hi].clone().requires_grad_(True)
                    loss_fn = ContrastiveLoss(gather_with_grad=gather_grad, local_loss=local)
                    loss = loss_fn(img, txt, 0.1, **kwargs).loss
                    loss.backward()
                    res[f"{name}_{gather_grad}_{local}"] = (loss.detach(), img.grad.clone(), txt.grad.clone())

        torch.manual_seed(0)  # same initial queue on both ranks
        queue = FeatureQueue(_D, 4 * _B)
        queue.enqueue(full["img"][lo:hi], ids=torch.arange(lo, hi))
        res["queue"] = (queue.feats.clone(), queue.ids.clone(), queue.ptr.clone())
        try:
            FeatureQueue(_D, 3 * _B).enqueue(full["img"][lo:hi])  # 6 is not a multiple of 4
            res["queue_error"] = False
        except ValueError:
            res["queue_error"] = True
        torch.save(res, Path(out_dir) / f"rank{rank_}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gather_and_contrastive(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    weight = torch.arange(world * _B * _D, dtype=torch.float64).reshape(world * _B, _D)
    expected_gather = torch.cat([torch.full((_B, _D), 1.0), torch.full((_B, _D), 2.0)]).double()
    full = _full_batch()

    # Single-process references on the concatenated batch.
    refs = {}
    for name, kwargs in _itc_cases(full, 0, world * _B):
        img, txt = full["img"].clone().requires_grad_(True), full["txt"].clone().requires_grad_(True)
        loss = ContrastiveLoss()(img, txt, 0.1, **kwargs).loss
        loss.backward()
        refs[name] = (loss.detach(), img.grad, txt.grad)

    local_losses = {}
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["main"]) == (r, world, r == 0)
        slot = slice(r * _B, (r + 1) * _B)
        for with_grad in (True, False):
            assert torch.equal(res[f"gathered_{with_grad}"], expected_gather)
        # With grad: both ranks' losses reach this input (summed); without: only the local loss does.
        assert torch.equal(res["grad_True"], world * weight[slot])
        assert torch.equal(res["grad_False"], weight[slot])

        for name, (ref_loss, ref_img_grad, ref_txt_grad) in refs.items():
            for gather_grad in (True, False):
                loss, img_grad, txt_grad = res[f"{name}_{gather_grad}_False"]
                assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12), name
                # Every rank computes the full loss; gathered copies of other ranks either send their
                # (identical) gradient back (with grad: world x) or none (without: exactly the local part).
                scale = world if gather_grad else 1
                assert torch.allclose(img_grad, scale * ref_img_grad[slot], atol=1e-12), name
                assert torch.allclose(txt_grad, scale * ref_txt_grad[slot], atol=1e-12), name
                local_losses.setdefault((name, gather_grad), []).append(res[f"{name}_{gather_grad}_True"])

    for (name, gather_grad), parts in local_losses.items():
        ref_loss, ref_img_grad, _ = refs[name]
        # Equal local batches: the mean of the local losses is the global loss.
        assert sum(p[0].item() for p in parts) / world == pytest.approx(ref_loss.item(), abs=1e-12), name
        if gather_grad:
            # Sum of local losses = world * global loss, and the gather sends every gradient home.
            img_grad = torch.cat([p[1] for p in parts])
            assert torch.allclose(img_grad, world * ref_img_grad, atol=1e-12), name

    feats, ids, ptr = results[0]["queue"]
    for res in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(res["queue"], (feats, ids, ptr), strict=True))
    assert ptr.item() == world * _B
    assert torch.allclose(feats[:, : world * _B].t(), nn.functional.normalize(full["img"], dim=-1).float())
    assert ids[: world * _B].tolist() == list(range(world * _B))
    assert all(res["queue_error"] for res in results)
