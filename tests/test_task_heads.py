"""The downstream heads against hand-computed values: candidate-box pooling, IoU, the referring accuracy,
NLVR2's two passes, and the multitask model's one copy of the shared backbone."""

from __future__ import annotations

import pytest
import torch

from vlp_core.models import BoxScorer, FusedClassifier, build_backbone
from vlp_core.models.backbones import backbone_config
from vlp_core.models.heads import box_iou, pool_cells, ref_accuracy


def test_pool_cells_means_the_cells_inside_and_falls_back_to_the_nearest():
    cells = torch.arange(4 * 3, dtype=torch.float32).view(1, 4, 3)  # a 2 x 2 grid, row-major
    boxes = torch.tensor(
        [
            [
                [0.0, 0.0, 1.0, 1.0],  # every centre: the mean of all four cells
                [0.0, 0.0, 1.0, 0.5],  # the top row (centres at y = 0.25)
                [0.6, 0.6, 0.7, 0.7],  # no centre inside: the nearest cell, bottom right
            ]
        ]
    )
    out = pool_cells(cells, boxes, (2, 2))
    assert torch.allclose(out[0, 0], cells[0].mean(0))
    assert torch.allclose(out[0, 1], cells[0, :2].mean(0))
    assert torch.equal(out[0, 2], cells[0, 3])
    with pytest.raises(ValueError, match="grid"):
        pool_cells(cells, boxes, (3, 3))


def test_box_iou_and_referring_accuracy():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([1.0 / 7.0]))
    assert torch.allclose(box_iou(a, a), torch.tensor([1.0]))
    boxes = torch.tensor([[[0, 0, 2, 2], [0, 0, 2, 1.9], [5, 5, 6, 6]]], dtype=torch.float32).repeat(3, 1, 1)
    target = torch.tensor([0, 0, 0])
    scores = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    # right box; a different candidate with IoU 0.95 > 0.5 with the target (counts, the RefCOCO rule); wrong
    assert torch.allclose(ref_accuracy(scores, boxes, target), torch.tensor(2 / 3))


@pytest.fixture(scope="module")
def albef_backbone():
    return build_backbone(backbone_config({"kind": "dual_stream"}, preset="tiny")).eval()


def test_nlvr2_head_concatenates_one_fused_pass_per_image(albef_backbone):
    torch.manual_seed(0)
    model = FusedClassifier(albef_backbone, 2, n_images=2).eval()
    px = torch.randn(2, 2, 3, 128, 128)
    ids, mask = torch.randint(1000, 2000, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        got = model.logits(px, ids, mask)
        left = albef_backbone.fuse(px[:, 0], ids, mask).pooled
        right = albef_backbone.fuse(px[:, 1], ids, mask).pooled
        want = model.head(torch.cat([left, right], -1))
    assert torch.allclose(got, want, atol=1e-6)
    # the order of the images matters (left and right are not interchangeable)
    with torch.no_grad():
        swapped = model.logits(px.flip(1), ids, mask)
    assert not torch.allclose(got, swapped)
    out = model(
        {"pixel_values": px, "input_ids": ids, "attention_mask": mask, "labels": torch.tensor([1, -1])}
    )
    # -1 labels are ignored: the loss is the cross-entropy of row 0 alone
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(got[:1], torch.tensor([1])), atol=1e-5)


def test_box_scorer_masks_padding_candidates_and_reads_cross_attention_free_tokens(albef_backbone):
    model = BoxScorer(albef_backbone).eval()
    assert not model.fused_image  # ALBEF's fusion outputs text states: candidates pool the image tokens
    px = torch.randn(1, 3, 128, 128)
    ids, mask = torch.randint(1000, 2000, (1, 5)), torch.ones(1, 5, dtype=torch.long)
    boxes = torch.tensor([[[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 0, 0]]])
    with torch.no_grad():
        s = model.scores(px, ids, mask, boxes, torch.tensor([[True, True, False]]))
    assert torch.isfinite(s[0, :2]).all() and s[0, 2] == float("-inf")


def test_multitask_model_holds_the_shared_backbone_once():
    from vlp_core.tasks.multitask import MultiTaskModel

    bb = build_backbone(backbone_config({"kind": "unit"}, preset="tiny"))
    models = {"snli_ve": FusedClassifier(bb, 3), "nlvr2": FusedClassifier(bb, 2, n_images=2)}
    mt = MultiTaskModel(bb, models)
    names = list(mt.state_dict())
    assert sum(n.startswith("backbone.") for n in names) == len(bb.state_dict())
    assert {n.split(".")[1] for n in names if n.startswith("heads.")} == {"snli_ve", "nlvr2"}
    n_params = sum(p.numel() for p in mt.parameters())
    assert n_params == sum(p.numel() for p in bb.parameters()) + sum(
        p.numel() for m in models.values() for p in m.head.parameters()
    )
    ids, mask = torch.randint(1000, 2000, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    batch = {"pixel_values": torch.randn(2, 3, 128, 128), "input_ids": ids, "attention_mask": mask,
             "labels": torch.tensor([0, 2])}  # fmt: skip
    out = mt(batch, kind="snli_ve")
    out.loss.backward()
    # the step's task trains its own queries only (UniT's per-task decoder queries)
    assert bb.queries["snli_ve"].grad is not None and bb.queries["nlvr2"].grad is None
    assert set(out.metrics) == {"snli_ve/loss_cls", "snli_ve/accuracy"}
    assert bb.task == bb.config.tasks[0]  # the context restores the selected task


def test_region_heads_score_candidate_regions_and_pass_each_image_alone():
    """A region backbone: candidate k is scored from the fused state of region ``cand_regions[k]`` plus its
    box (permuting the candidates permutes their scores), and NLVR2's two region sets are two passes."""
    from vlp_core.models.backbones.region_stream import RegionInputs

    bb = build_backbone(backbone_config({"kind": "region_stream"}, preset="tiny")).eval()
    torch.manual_seed(0)
    feats, boxes5 = torch.randn(1, 4, bb.config.region_dim), torch.rand(1, 4, 5)
    regions = RegionInputs(feats, boxes5, torch.ones(1, 4, dtype=torch.long))
    ids, mask = torch.randint(1000, 2000, (1, 5)), torch.ones(1, 5, dtype=torch.long)
    scorer = BoxScorer(bb).eval()
    assert scorer.regions and scorer.fused_image
    boxes = torch.tensor([[[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]])
    keep = torch.tensor([[True, True]])
    with torch.no_grad():
        s = scorer.scores(regions, ids, mask, boxes, keep, torch.tensor([[1, 2]]))
        swapped = scorer.scores(regions, ids, mask, boxes.flip(1), keep, torch.tensor([[2, 1]]))
        pair = bb.fuse(regions, ids, mask)
        r = scorer.cell_proj(pair.image[:, [1, 2]])
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).unsqueeze(-1)
        r = r + scorer.box_proj(torch.cat([boxes, area], -1))
        q = pair.pooled.unsqueeze(1).expand_as(r)
        want = scorer.head(torch.cat([r, q, r * q], -1)).squeeze(-1)
    assert torch.allclose(s, want, atol=1e-5) and torch.allclose(swapped, s.flip(1), atol=1e-5)
    with pytest.raises(ValueError, match="cand_regions"):
        scorer.scores(regions, ids, mask, boxes, keep)

    two = RegionInputs(torch.stack([feats, feats.flip(1)], 1), torch.stack([boxes5, boxes5], 1),
                       torch.ones(1, 2, 4, dtype=torch.long))  # fmt: skip
    clf = FusedClassifier(bb, 2, n_images=2).eval()
    with torch.no_grad():
        got = clf.logits(two, ids, mask)
        left, right = (bb.fuse(two[:, j], ids, mask).pooled for j in range(2))
        assert torch.allclose(got, clf.head(torch.cat([left, right], -1)), atol=1e-5)


def test_leaderboard_differences_to_no_pretraining_by_hand():
    """Each method against its own baseline (region methods against ``none:regions``): mean difference ±
    sqrt(s1²/n1 + s2²/n2), starred beyond two standard errors; variants and baselines get no row."""
    from flows.leaderboard import _delta_rows, baseline_of

    def row(method, task, mean, std, n, mode="-"):
        return {"method": method, "pairs_mode": mode, "task": task, "mean": mean, "std": std, "seeds": n}

    rows = [
        row("none", "vqa", 70.0, 3.0, 3), row("albef", "vqa", 76.0, 4.0, 3, "retrieved"),
        row("none:regions", "vqa", 40.0, 1.0, 2), row("mu-vla", "vqa", 41.0, 1.0, 2, "retrieved"),
        row("albef:text-only", "vqa", 30.0, 1.0, 3, "retrieved"),
    ]  # fmt: skip
    got = dict(_delta_rows(rows, ["vqa"]))
    assert set(got) == {"albef (retrieved) − none", "mu-vla (retrieved) − none:regions"}
    assert got["albef (retrieved) − none"] == [f"+6.0 ± {(16 / 3 + 9 / 3) ** 0.5:.1f} *"]  # 6 > 2 x 2.89
    assert got["mu-vla (retrieved) − none:regions"] == ["+1.0 ± 1.0"]  # 1 < 2 x 1.0: no star
    assert [baseline_of(m) for m in ("vlmixer", "flava", "unit", "unit:single", "none")] == [
        "none:regions", "none", None, None, None,
    ]  # fmt: skip
