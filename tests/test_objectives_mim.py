"""Masked image modelling objectives (block masks, k-means targets, head, loss) and the contrastive row mask,
checked against values computed by hand, plus a two-process gloo run for the gathered row mask."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vlp_core.objectives import (
    ContrastiveLoss,
    KMeansCodebook,
    MIMHead,
    MIMTargets,
    block_mask,
    block_masks,
    mim_loss,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _has_2x2(mask: torch.Tensor, height: int, width: int) -> bool:
    m = mask.view(height, width)
    return bool((m[:-1, :-1] & m[1:, :-1] & m[:-1, 1:] & m[1:, 1:]).any())


# ---------------------------------------------------------------- block masks


@pytest.mark.parametrize(
    ("height", "width", "ratio", "count"),
    [(4, 4, 0.4, 6), (14, 14, 0.4, 78), (3, 3, 0.5, 4), (7, 5, 0.6, 21), (2, 2, 0.9, 4), (1, 8, 0.25, 2)],
)
def test_block_mask_exact_count(height, width, ratio, count):
    # round(): 0.4 * 16 = 6.4 -> 6; 0.4 * 196 = 78.4 -> 78; 0.5 * 9 = 4.5 -> 4 (ties to even); 0.6 * 35 = 21.
    for seed in range(25):
        mask = block_mask(height, width, ratio, _gen(seed))
        assert mask.shape == (height * width,) and mask.dtype == torch.bool
        assert int(mask.sum()) == count


def test_block_mask_deterministic_and_seed_dependent():
    a = block_mask(14, 14, 0.4, _gen(123))
    b = block_mask(14, 14, 0.4, _gen(123))
    assert torch.equal(a, b)
    masks = {tuple(block_mask(14, 14, 0.4, _gen(s)).tolist()) for s in range(10)}
    assert len(masks) == 10
    small = {tuple(block_mask(4, 4, 0.4, _gen(s)).tolist()) for s in range(10)}
    assert len(small) > 1
    # Pure function of the generator state: an advanced generator gives another (but reproducible) mask.
    g1, g2 = _gen(5), _gen(5)
    torch.rand(3, generator=g1)
    torch.rand(3, generator=g2)
    assert torch.equal(block_mask(14, 14, 0.4, g1), block_mask(14, 14, 0.4, g2))


def test_block_mask_has_rectangular_blocks():
    masks = [block_mask(14, 14, 0.4, _gen(s)) for s in range(5)]
    assert any(_has_2x2(m, 14, 14) for m in masks)
    # min_block larger than the target falls back to the target: a 4x4 grid still gets contiguous blocks.
    assert any(_has_2x2(block_mask(4, 4, 0.4, _gen(s)), 4, 4) for s in range(10))
    # With no room for any block (max_aspect=1 and a 1-row grid), the top-up with single patches is exact.
    assert int(block_mask(1, 9, 0.5, _gen(0), min_block=4, max_aspect=1.0).sum()) == 4


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_block_mask_ratio_errors(ratio):
    with pytest.raises(ValueError, match="ratio"):
        block_mask(4, 4, ratio, _gen(0))
    with pytest.raises(ValueError, match="ratio"):
        block_masks(torch.tensor([1, 2]), 4, 4, ratio)


def test_block_masks_rows_are_per_sample():
    seeds = torch.tensor([7, -3, 2**62, 7], dtype=torch.int64)
    masks = block_masks(seeds, 6, 6, 0.4, min_block=3)
    assert masks.shape == (4, 36) and masks.dtype == torch.bool
    assert masks.sum(dim=1).tolist() == [14] * 4
    for row, seed in zip(masks, seeds.tolist(), strict=True):
        assert torch.equal(row, block_mask(6, 6, 0.4, _gen(seed), min_block=3))
    # A sample's mask depends only on its seed, not on the batch around it.
    assert torch.equal(masks[0], masks[3])
    assert torch.equal(block_masks(seeds[1:3], 6, 6, 0.4, min_block=3), masks[1:3])
    assert block_masks(torch.zeros(0, dtype=torch.int64), 6, 6, 0.4).shape == (0, 36)


# ---------------------------------------------------------------- k-means codebook


def test_kmeans_two_clusters_by_hand():
    a = [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]]
    b = [[10.0, 10.0], [10.0, 11.0], [11.0, 10.0]]
    feats = torch.tensor(a + b)
    for seed in range(5):
        book = KMeansCodebook(2, 2).fit_(feats, seed=seed, normalize=False)
        centres = sorted(tuple(round(v, 6) for v in row) for row in book.codebook.tolist())
        assert centres == [(round(1 / 3, 6), round(1 / 3, 6)), (round(31 / 3, 6), round(31 / 3, 6))]
        ids = book.assign(feats)
        assert ids.dtype == torch.int64
        assert len(set(ids[:3].tolist())) == 1 and len(set(ids[3:].tolist())) == 1 and ids[0] != ids[3]
        assert torch.equal(book.assign(torch.tensor([[0.2, 0.2], [9.0, 12.0]])), ids[[0, 3]])


def _three_directions(n_per: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    gen = _gen(0)
    rows, labels = [], []
    for c in range(3):
        angle = 2 * math.pi * c / 3
        centre = torch.tensor([math.cos(angle), math.sin(angle), 0.0])
        # Different norms per point: spherical k-means must ignore them.
        scale = 1 + 4 * torch.rand(n_per, 1, generator=gen)
        rows.append(scale * (centre + 0.05 * torch.randn(n_per, 3, generator=gen)))
        labels += [c] * n_per
    return torch.cat(rows), torch.tensor(labels)


def test_kmeans_three_clusters_spherical_and_deterministic():
    feats, labels = _three_directions()
    book = KMeansCodebook(3, 3).fit_(feats, seed=11)
    ids = book.assign(feats)
    # The partition is recovered (up to renaming the codes).
    mapping = {int(c): int(i) for c, i in zip(labels, ids, strict=True)}
    assert len(mapping) == 3 and len(set(mapping.values())) == 3
    assert torch.equal(ids, torch.tensor([mapping[int(c)] for c in labels]))
    # Centroids are unit vectors along the true directions.
    assert torch.allclose(book.codebook.norm(dim=1), torch.ones(3), atol=1e-6)
    for c in range(3):
        angle = 2 * math.pi * c / 3
        assert float(book.codebook[mapping[c]] @ torch.tensor([math.cos(angle), math.sin(angle), 0.0])) > 0.99
    again = KMeansCodebook(3, 3).fit_(feats, seed=11)
    assert torch.equal(again.codebook, book.codebook)
    assert book.fitted.item() and book.spherical.item()


def test_kmeans_assign_shapes_errors_and_protocol():
    feats, _ = _three_directions(4)
    book = KMeansCodebook(3, 3)
    assert isinstance(book, MIMTargets) and book.num_codes == 3
    with pytest.raises(RuntimeError, match="before fit_"):
        book.assign(feats)
    with pytest.raises(ValueError, match="at least num_codes"):
        KMeansCodebook(20, 3).fit_(feats, seed=0)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        book.fit_(feats[:, :2], seed=0)
    book.fit_(feats, seed=0, iters=5)
    assert book.assign(feats.view(2, 6, 3)).shape == (2, 6)
    assert book.assign(feats[0]).shape == ()
    assert book.assign(feats.double()).dtype == torch.int64
    with pytest.raises(ValueError, match="dim 3"):
        book.assign(feats[:, :2])
    # Degenerate data (fewer distinct points than codes) neither crashes nor yields non-finite codes.
    dup = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]])
    degenerate = KMeansCodebook(3, 2).fit_(dup, seed=0, normalize=False)
    assert torch.isfinite(degenerate.codebook).all()
    assert set(degenerate.assign(dup).tolist()) <= {0, 1, 2}


def test_kmeans_state_dict_round_trip():
    feats, _ = _three_directions(5)
    parent = nn.Module()
    parent.targets = KMeansCodebook(3, 3).fit_(feats, seed=3, normalize=False)
    state = parent.state_dict()
    assert {"targets.codebook", "targets.fitted", "targets.spherical"} <= set(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    restored = nn.Module()
    restored.targets = KMeansCodebook(3, 3)
    restored.load_state_dict(torch.load(buf))
    assert torch.equal(restored.targets.codebook, parent.targets.codebook)
    assert not restored.targets.spherical.item()
    assert torch.equal(restored.targets.assign(feats), parent.targets.assign(feats))


# ---------------------------------------------------------------- head and loss


def test_mim_loss_by_hand_2x3():
    logits = torch.tensor(
        [
            [[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [0.0, 1.0, 0.0]],
            [[1.0, 1.0, 1.0], [3.0, -2.0, 0.0], [-1.0, 0.0, 2.0]],
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    targets = torch.tensor([[0, 2, 2], [1, 1, 2]])
    mask = torch.tensor([[True, False, True], [False, False, True]])

    def ce(row: list[float], t: int) -> float:
        return math.log(sum(math.exp(v) for v in row)) - row[t]

    expected = (
        ce([2.0, 0.0, -1.0], 0) + ce([0.0, 1.0, 0.0], 2) + ce([-1.0, 0.0, 2.0], 2)
    ) / 3  # = (0.1698 + 1.5514 + 0.1698) / 3
    loss = mim_loss(logits, targets, mask)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx((2 * (math.log(1 + math.exp(-2) + math.exp(-3))) + 1.551444713932) / 3)
    loss.backward()
    # Unmasked positions get no gradient.
    assert logits.grad[~mask].abs().sum().item() == 0 and logits.grad[mask].abs().sum().item() > 0
    # Already-selected layout: (M, K) with (M,) targets.
    selected = mim_loss(logits.detach()[mask], targets[mask])
    assert selected.item() == pytest.approx(expected, abs=1e-12)
    # Nothing masked: a graph-connected zero.
    logits.grad = None
    zero = mim_loss(logits, targets, torch.zeros(2, 3, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert logits.grad.abs().sum().item() == 0
    with pytest.raises(ValueError):
        mim_loss(logits, targets, mask[:, :2])


def test_mim_head_shape_and_init():
    torch.manual_seed(0)
    head = MIMHead(64, 10)
    out = head(torch.randn(2, 5, 64))
    assert out.shape == (2, 5, 10)
    assert head.dense.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert head.decoder.bias.abs().sum().item() == 0 and head.dense.bias.abs().sum().item() == 0
    assert torch.equal(head.norm.weight, torch.ones(64))
    assert isinstance(head.act, nn.GELU)


# ---------------------------------------------------------------- contrastive row mask


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _itc_inputs(batch: int = 5, dim: int = 4) -> dict[str, torch.Tensor]:
    gen = _gen(1)
    return {
        "img": torch.randn(batch, dim, generator=gen, dtype=torch.float64),
        "txt": torch.randn(batch, dim, generator=gen, dtype=torch.float64),
        "img_m": torch.randn(batch, dim, generator=gen, dtype=torch.float64),
        "txt_m": torch.randn(batch, dim, generator=gen, dtype=torch.float64),
        "iq": nn.functional.normalize(torch.randn(3, dim, generator=gen, dtype=torch.float64), dim=-1),
        "tq": nn.functional.normalize(torch.randn(3, dim, generator=gen, dtype=torch.float64), dim=-1),
        "ids": torch.tensor([4, 4, 1, 2, 1]),
        "queue_ids": torch.tensor([2, -1, 4]),
    }


_CASES = ["plain", "queue", "ids", "ids_queue", "distill", "distill_queue", "hard_momentum"]


def _kwargs(case: str, x: dict[str, torch.Tensor], rows: slice | torch.Tensor) -> dict[str, object]:
    kw: dict[str, object] = {}
    if "queue" in case:
        kw |= {"image_queue": x["iq"], "text_queue": x["tq"]}
    if case.startswith("ids"):
        kw["ids"] = x["ids"][rows]
        if "queue" in case:
            kw["queue_ids"] = x["queue_ids"]
    if case.startswith("distill") or case == "hard_momentum":
        kw |= {"image_feats_m": x["img_m"][rows], "text_feats_m": x["txt_m"][rows]}
    if case.startswith("distill"):
        kw["alpha"] = 0.4
    return kw


def test_itc_valid_by_hand():
    # The 2x2 example of tests/test_objectives.py plus an invalid third row that would otherwise dominate.
    img = _t([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    txt = _t([[1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    out = ContrastiveLoss()(img, txt, 0.5, valid=torch.tensor([True, True, False]))
    i2t = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2
    t2i = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-0.4))) / 2
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, abs=1e-12)
    # Invalid key columns are -inf in the valid rows.
    assert out.logits_i2t[:2, 2].tolist() == [float("-inf")] * 2
    assert torch.isfinite(out.logits_i2t[:, :2]).all()


@pytest.mark.parametrize("case", _CASES)
@pytest.mark.parametrize("local_loss", [False, True])
def test_itc_valid_equals_sliced_rows(case, local_loss):
    x = _itc_inputs()
    valid = torch.tensor([True, False, True, True, False])
    loss_fn = ContrastiveLoss(local_loss=local_loss)
    img, txt = x["img"].clone().requires_grad_(True), x["txt"].clone().requires_grad_(True)
    masked = loss_fn(img, txt, 0.3, valid=valid, **_kwargs(case, x, slice(None)))
    masked.loss.backward()

    img_s, txt_s = x["img"][valid].clone().requires_grad_(True), x["txt"][valid].clone().requires_grad_(True)
    sliced = loss_fn(img_s, txt_s, 0.3, **_kwargs(case, x, valid))
    sliced.loss.backward()
    for name in ("loss", "loss_i2t", "loss_t2i"):
        assert getattr(masked, name).item() == pytest.approx(getattr(sliced, name).item(), abs=1e-12), name
    # Invalid rows are neither queries nor keys: no gradient at all; valid rows get the sliced gradient.
    assert img.grad[~valid].abs().sum().item() == 0 and txt.grad[~valid].abs().sum().item() == 0
    torch.testing.assert_close(img.grad[valid], img_s.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(txt.grad[valid], txt_s.grad, rtol=0, atol=1e-12)
    keep = valid.nonzero().squeeze(1)
    torch.testing.assert_close(masked.logits_i2t[keep][:, keep], sliced.logits_i2t[:, : keep.numel()])


@pytest.mark.parametrize("case", _CASES)
def test_itc_valid_all_true_is_bit_identical(case):
    x = _itc_inputs()
    kw = _kwargs(case, x, slice(None))
    for local_loss in (False, True):
        loss_fn = ContrastiveLoss(local_loss=local_loss)
        ref = loss_fn(x["img"], x["txt"], torch.tensor(0.3, dtype=torch.float64), **kw)
        out = loss_fn(
            x["img"],
            x["txt"],
            torch.tensor(0.3, dtype=torch.float64),
            valid=torch.ones(5, dtype=torch.bool),
            **kw,
        )
        for name in ("loss", "loss_i2t", "loss_t2i", "logits_i2t", "logits_t2i"):
            assert torch.equal(getattr(out, name), getattr(ref, name)), (case, name)


@pytest.mark.parametrize("case", ["plain", "ids", "distill_queue"])
def test_itc_no_valid_row_is_graph_connected_zero(case):
    x = _itc_inputs()
    img, txt = x["img"].clone().requires_grad_(True), x["txt"].clone().requires_grad_(True)
    temp = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = ContrastiveLoss()(
        img, txt, temp, valid=torch.zeros(5, dtype=torch.bool), **_kwargs(case, x, slice(None))
    )
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    for t in (img, txt, temp):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum().item() == 0


def test_itc_valid_argument_checks():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="valid"):
        ContrastiveLoss()(x, x, 0.1, valid=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid"):
        ContrastiveLoss()(x, x, 0.1, valid=torch.ones(3))


# ---------------------------------------------------------------- two processes: the mask is gathered

_VALID = [[True, False, True], [False, True, True]]


def _dist_worker(rank_: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank_, world_size=world)
    try:
        x = _itc_inputs(batch=world * 3)
        rows = slice(rank_ * 3, (rank_ + 1) * 3)
        res = {}
        for gather_grad in (True, False):
            for case in ("plain", "distill_queue"):
                img = x["img"][rows].clone().requires_grad_(True)
                loss = ContrastiveLoss(gather_with_grad=gather_grad)(
                    img, x["txt"][rows], 0.3, valid=torch.tensor(_VALID[rank_]), **_kwargs(case, x, rows)
                ).loss
                loss.backward()
                res[f"{case}_{gather_grad}"] = (loss.detach(), img.grad.clone())
        torch.save(res, Path(out_dir) / f"rank{rank_}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_valid_mask_is_gathered(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    x = _itc_inputs(batch=world * 3)
    valid = torch.tensor(_VALID[0] + _VALID[1])
    for case in ("plain", "distill_queue"):
        img = x["img"][valid].clone().requires_grad_(True)
        ref = ContrastiveLoss()(img, x["txt"][valid], 0.3, **_kwargs(case, x, valid)).loss
        ref.backward()
        ref_grad = torch.zeros_like(x["img"])
        ref_grad[valid] = img.grad
        for r, res in enumerate(results):
            slot = slice(r * 3, (r + 1) * 3)
            for gather_grad in (True, False):
                loss, grad = res[f"{case}_{gather_grad}"]
                assert loss.item() == pytest.approx(ref.item(), abs=1e-12), (case, r)
                scale = world if gather_grad else 1
                torch.testing.assert_close(grad, scale * ref_grad[slot], rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", _CASES)
def test_masked_objectives_have_no_data_dependent_host_sync(case):
    # Meta tensors carry no data: any .item(), bool(), boolean indexing or loop over values would raise here.
    x = {k: v.to("meta") for k, v in _itc_inputs().items()}
    out = ContrastiveLoss()(
        x["img"],
        x["txt"],
        0.3,
        valid=torch.ones(5, dtype=torch.bool, device="meta"),
        **_kwargs(case, x, slice(None)),
    )
    assert out.loss.shape == () and out.loss.device.type == "meta"
    logits = torch.empty(2, 196, 32, device="meta")
    targets = torch.empty(2, 196, dtype=torch.long, device="meta")
    assert (
        mim_loss(logits, targets, torch.empty(2, 196, dtype=torch.bool, device="meta")).device.type == "meta"
    )
    book = KMeansCodebook(32, 8).fit_(torch.randn(64, 8, generator=_gen(0)), seed=0, iters=2).to("meta")
    assert book.assign(torch.empty(2, 196, 8, device="meta")).shape == (2, 196)
