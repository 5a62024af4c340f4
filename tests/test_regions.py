"""Region inputs and the region methods' parts: the store reader and collator, the region-stream backbone,
mask draws, the objectives against hand-computed values, and the passes of U-VisualBERT and µ-VLA on
crafted batches (which items they mask, what they predict, the curriculum's two weightings)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stores.shards import ShardStore
from vlp_core.data import PairsConfig, UnimodalConfig, build_image_index, build_pair_index, load_tokenizer
from vlp_core.data.cutmix import CutMixCollator, Gallery
from vlp_core.data.regions import (
    RegionCollator,
    RegionConfig,
    RegionImageDataset,
    RegionPairDataset,
    RegionReader,
    tag_regions,
)
from vlp_core.models import TextConfig
from vlp_core.models.backbones import RegionInputs, RegionStreamBackbone, RegionStreamConfig
from vlp_core.objectives import draw_masks, per_sample_mean, region_feature_loss, token_set_loss
from vlp_core.recipes import MuVLA, MuVLAConfig, UVisualBERT, UVisualBERTConfig, VLMixer, VLMixerConfig
from vlp_core.recipes.mu_vla import curriculum_loss


def tiny_backbone(region_dim: int = 8) -> RegionStreamBackbone:
    text = TextConfig(pretrained=None, num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                      vocab_size=200, dropout=0.0, attention_dropout=0.0)  # fmt: skip
    return RegionStreamBackbone(RegionStreamConfig(text=text, region_dim=region_dim, pooling="mean"))


def crafted_batch(n: int = 2, regions: int = 3, dim: int = 8) -> dict[str, torch.Tensor]:
    """Two images: row 0 with 3 regions and tags "a b" (region 1) and "c" (region 0); row 1 with 2 regions
    and one tag (region 1); sentences with one linked phrase each."""
    g = torch.Generator().manual_seed(0)
    return {
        "region_feats": torch.rand(n, regions, dim, generator=g),
        "region_boxes": torch.rand(n, regions, 5, generator=g),
        "region_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "region_class_ids": torch.tensor([[[30, -1], [20, 21], [-1, -1]], [[-1, -1], [40, -1], [-1, -1]]]),
        "tag_ids": torch.tensor([[101, 20, 21, 30, 102], [101, 40, 102, 0, 0]]),
        "tag_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "tag_region": torch.tensor([[-1, 1, 1, 0, -1], [-1, 1, -1, -1, -1]]),
        "tag_index": torch.tensor([[-1, 0, 0, 1, -1], [-1, 0, -1, -1, -1]]),
        "input_ids": torch.tensor([[101, 50, 51, 52, 102], [101, 60, 61, 102, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        "mlm_input_ids": torch.tensor([[101, 103, 51, 52, 102], [101, 60, 103, 102, 0]]),
        "mlm_labels": torch.tensor([[-100, 50, -100, -100, -100], [-100, -100, 61, -100, -100]]),
        "phrase_link": torch.tensor([[-1, 0, 0, -1, -1], [-1, -1, 0, -1, -1]]),
        "link_region": torch.tensor([[1], [1]]),
        "link_prob": torch.tensor([[1.0], [1.0]]),
        "link_ids": torch.tensor([[[50, 51]], [[61, -1]]]),
        "image_key": torch.tensor([7, 8]),
        "text_key": torch.tensor([17, 18]),
        "sample_seed": torch.tensor([1234, 5678]),
    }


# ----------------------------------------------------------------------------------------- objectives


def test_token_set_loss_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5], [1.0, 0.0, 0.0, 0.0]])
    targets = torch.tensor([[1, 2], [0, -1]])
    logz0 = math.log(math.exp(0) + math.exp(1) + math.exp(2) + math.exp(0.5))
    logz1 = math.log(math.e + 3)
    expected = [-((1 - logz0) + (2 - logz0)) / 2, -(1 - logz1)]
    assert token_set_loss(logits, targets).tolist() == pytest.approx(expected, rel=1e-6)


def test_region_feature_loss_and_per_sample_mean_by_hand():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 1.0]])
    losses = region_feature_loss(pred, target)
    assert losses.tolist() == pytest.approx([2.5, 1.0, 2.0])
    rows = torch.tensor([0, 0, 2])
    assert per_sample_mean(losses, rows, 3).tolist() == pytest.approx([1.75, 0.0, 2.0])


def test_draw_masks_depend_only_on_the_sample():
    seeds = torch.tensor([11, 22, 33])
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    m = draw_masks(seeds, valid, 0.5, salt=5)
    assert not (m & ~valid.bool()).any()
    # The same sample alone, in another batch position, with other padding: the same mask.
    alone = draw_masks(seeds[2:], valid[2:, :4], 0.5, salt=5)
    assert torch.equal(alone[0], m[2])
    wider = draw_masks(seeds[:1], torch.tensor([[1, 1, 1, 0, 0, 0]]), 0.5, salt=5)
    assert torch.equal(wider[0, :4], m[0])
    assert draw_masks(seeds, valid, 1.0, salt=5).equal(valid.bool())
    assert not draw_masks(seeds, valid, 0.0, salt=5).any()
    per_item = torch.tensor([[1.0, 0.0, 1.0, 1.0]] * 3)
    assert draw_masks(seeds, valid, per_item, salt=5).equal(valid.bool() & (per_item > 0))


def test_curriculum_per_sample_and_batch_mean_weightings_differ():
    """A crafted batch where the confident sample has the small loss: the paper's per-sample weighting and
    the reference code's batch-mean weighting give different losses."""
    losses = torch.tensor([1.0, 3.0])
    w = torch.tensor([0.9, 0.1])
    assert curriculum_loss(losses, None, "per_sample").item() == pytest.approx(2.0)  # first phase: plain mean
    per_sample = curriculum_loss(losses, w, "per_sample").item()
    batch_mean = curriculum_loss(losses, w, "batch_mean").item()
    assert per_sample == pytest.approx((0.9 * 1 + 0.1 * 3) / 2)  # 0.6
    assert batch_mean == pytest.approx(0.5 * 2.0)  # 1.0
    # The weights carry no gradient.
    w_grad = w.clone().requires_grad_(True)
    l_grad = losses.clone().requires_grad_(True)
    curriculum_loss(l_grad, w_grad, "per_sample").backward()
    assert w_grad.grad is None and l_grad.grad.tolist() == pytest.approx([0.45, 0.05])


# ------------------------------------------------------------------------------------------- backbone


def test_region_stream_loads_minilm_and_places_patch_tokens():
    from vlp_core.language.embed import default_model_path
    from vlp_core.models import read_bert_checkpoint

    torch.manual_seed(0)  # the inputs below are random; without a seed they depend on the tests run before
    b = RegionStreamBackbone(RegionStreamConfig.preset("tiny"))
    state = read_bert_checkpoint(default_model_path())
    assert torch.equal(b.text_embeddings.word.weight, state["embeddings.word.weight"])
    assert torch.equal(b.stack.layers[5].ffn.fc_in.weight, state["layers.5.ffn.fc_in.weight"])
    b.eval()
    ids = torch.tensor([[101, 2000, 3000, 102]])
    patches = RegionInputs(torch.rand(1, 4, 1280), torch.rand(1, 4, 5), torch.tensor([[0, 0, 1, 0]]))
    plain = b.embed_words(ids)
    mixed = b.embed_words(ids, patches=patches)
    assert torch.equal(mixed[:, [0, 1, 3]], plain[:, [0, 1, 3]])
    r = b.region_embed
    pos = b.text_embeddings.position.weight[2]
    expected = r.norm(r.project(patches.feats[0, 2], patches.boxes[0, 2]) + r.modality + pos)
    # the batch's projection and the single vector's round differently; LayerNorm scales that up
    torch.testing.assert_close(mixed[0, 2], expected, rtol=1e-5, atol=1e-5)
    # Tags carry their region's box; the joint pass masks padded regions out.
    boxed = b.embed_words(ids, boxes=torch.rand(1, 4, 5), box_mask=torch.tensor([[0, 1, 1, 0]]))
    assert torch.equal(boxed[:, [0, 3]], plain[:, [0, 3]]) and not torch.equal(boxed[:, 1], plain[:, 1])
    regions = RegionInputs(torch.rand(2, 3, 1280), torch.rand(2, 3, 5), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    ids2, m2 = ids.expand(2, 4), torch.ones(2, 4, dtype=torch.long)
    out = b.fuse(regions, ids2, m2)
    changed = RegionInputs(regions.feats.clone(), regions.boxes, regions.mask)
    changed.feats[1, 2] += 5.0  # a padded region: invisible
    assert torch.allclose(b.fuse(changed, ids2, m2).pooled[1], out.pooled[1], atol=1e-6)


# ------------------------------------------------------------------------------------------- passes


def test_region_tag_pass_masks_tags_of_masked_regions_and_predicts_their_class_pieces():
    recipe = UVisualBERT(UVisualBERTConfig(), tiny_backbone())
    batch = crafted_batch()
    # Every region masked, tags only when their region is: every tag is masked.
    items = recipe.region_tag_pass(batch, 1.0, 0.0, 1.0)
    tag_vals, tag_rows = items["tag_mlm"]
    assert tag_rows.tolist() == [0, 0, 0, 1]  # the 4 tag wordpieces (a two-piece tag masks whole)
    assert len(items["mrfr"][0]) == 5  # every valid region regresses its feature
    assert items["mrc"][1].tolist() == [0, 0, 1]  # regions with a class tag: (0, 0), (0, 1), (1, 1)
    # No region masked and tags masked only with a masked region: nothing on the tag side either.
    items = recipe.region_tag_pass(batch, 0.0, 0.0, 1.0)
    assert all(len(v) == 0 for v, _ in items.values())
    # The MRC loss of a masked region is the token-set loss of its class pieces through the MLM head.
    recipe.eval()
    items = recipe.region_tag_pass(batch, 1.0, 0.0, 0.0)
    b = recipe.backbone
    feats = batch["region_feats"].masked_fill(batch["region_mask"][..., None].bool(), 0.0)
    hidden, _ = b.joint(
        [
            (recipe.tag_embeddings(batch, batch["tag_ids"]), batch["tag_mask"]),
            (b.embed_regions(RegionInputs(feats, batch["region_boxes"], batch["region_mask"])),
             batch["region_mask"]),
        ]
    )  # fmt: skip
    h = hidden[1, 5 + 1]  # row 1, region 1 (after the 5 tag positions)
    expected = token_set_loss(b.mlm_head(h[None]), torch.tensor([[40, -1]]))
    assert items["mrc"][0][-1].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mu_vla_region_phrase_masks_only_linked_phrases_or_regions_one_side_per_sample():
    recipe = MuVLA(MuVLAConfig(), tiny_backbone())
    batch = crafted_batch()
    items = recipe.region_phrase_pass(batch)  # link probability 1: every link is masked
    text_rows = items["rp_mlm"][1].tolist()
    vision_rows = items["rp_mrtc"][1].tolist()
    # Each sample masks on exactly one side: its phrase pieces (2 / 1 of them) or its linked region.
    for row, pieces in ((0, 2), (1, 1)):
        assert (text_rows.count(row), vision_rows.count(row)) in ((pieces, 0), (0, 1))
    # With no links nothing is masked.
    none = dict(batch, link_region=torch.full((2, 1), -1), phrase_link=torch.full((2, 5), -1))
    assert all(len(v) == 0 for v, _ in recipe.region_phrase_pass(none).values())


def test_mu_vla_forward_switches_to_the_weighted_phase_at_epoch_m():
    torch.manual_seed(0)
    recipe = MuVLA(MuVLAConfig(curriculum_epochs=2.0), tiny_backbone())
    recipe.eval()
    batch = crafted_batch()
    assert "curriculum_w" not in recipe(batch, step=7, steps_per_epoch=4).metrics  # epoch 1.75 < m
    plain = recipe(batch, step=8, steps_per_epoch=4)
    assert "curriculum_w" in plain.metrics  # epoch 2 = m: weighted from here on
    recipe.config.curriculum_epochs = 100.0
    unweighted = recipe(batch, step=8, steps_per_epoch=4)  # the same step and draws, weight 1
    w = plain.metrics["curriculum_w"].item()
    assert 0.0 < w < 1.0
    assert plain.loss.item() < unweighted.loss.item()  # w < 1 scales R-P + I-S down
    plain.loss.backward()
    assert recipe.itm_head.proj.weight.grad is not None  # the ITM head trains in the weighted phase


# --------------------------------------------------------------------------------------- store and data


@pytest.fixture(scope="module")
def store(train_corpus) -> ShardStore:
    return ShardStore(train_corpus.store)


def test_tag_regions_by_hand():
    labels = ["image", "dog", "cat", "dog"]
    scores = [1.0, 0.5, 0.7, 0.9]
    got = tag_regions(["dog", "cat", "tabby", "bird"], ["detector", "detector", "imagenet", "detector"],
                      labels, scores)  # fmt: skip
    assert got == [3, 2, 0, 0]  # best "dog" box; image-level and unmatched tags name the whole image


def test_region_reader_matches_the_regions_table(store):
    rows = store.read_table("regions", ["image_id", "region_idx", "label", "box5", "feature"]).to_pylist()
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append(r)
    ids = sorted(by_image)[:20]
    reader = RegionReader(store, ids, RegionConfig(max_regions=2))
    for pos, iid in enumerate(ids):
        kept = sorted(by_image[iid], key=lambda r: r["region_idx"])[:2]
        sample = reader.sample(pos)
        assert sample["region_feats"].shape == (len(kept), 1280)
        expected = np.stack([np.asarray(r["feature"], np.float16) for r in kept]).astype(np.float32)
        assert np.array_equal(sample["region_feats"], expected)
        assert np.allclose(sample["region_boxes"], np.stack([r["box5"] for r in kept]))
        assert sample["region_class"][1:] == [r["label"] for r in kept][1:]
        assert all(0 <= r < len(kept) for _, r in sample["tags"])
    with pytest.raises(KeyError, match="no regions"):
        RegionReader(store, ["not-an-image"], RegionConfig())


def test_an_image_with_regions_from_two_stages_takes_one_list_whole(tmp_path):
    """The same image made by two stages (say a COCO image of the Karpathy split and of RefCOCO+, whose
    regions also hold its candidates): the reader takes every region from one of them, the preferred
    source's when given, never a mix."""
    import pyarrow as pa

    from stores.schemas import schema_of

    two = ShardStore(tmp_path / "store")

    def commit(source: str, labels: list[str]) -> None:
        rows = [
            {"image_id": "img", "region_idx": i, "label": lab, "score": 1.0, "box": [0, 0, 8, 8],
             "box5": [0, 0, 1, 1, 1], "detector": source, "feature": np.full(4, i, np.float16)}
            for i, lab in enumerate(labels)
        ]  # fmt: skip
        table = pa.Table.from_pylist(rows, schema=schema_of("regions"))
        two.commit("task_regions", source, "s", "sig", [("img", "0")], {"regions": table})

    commit("a-karpathy", ["image", "dog", "cat"])
    commit("b-refs", ["image", "candidate", "candidate", "candidate", "dog"])
    cfg = RegionConfig(max_regions=10, max_tags=0)
    assert RegionReader(two, ["img"], cfg).sample(0)["region_class"][1:] == ["dog", "cat"]
    preferred = RegionReader(two, ["img"], cfg, prefer_source="b-refs").sample(0)
    assert preferred["region_class"][1:] == ["candidate", "candidate", "candidate", "dog"]
    assert preferred["region_feats"][:, 0].tolist() == [0, 1, 2, 3, 4]


def test_region_datasets_and_collator_on_the_store(store):
    tokenizer = load_tokenizer()
    collate = RegionCollator(tokenizer, max_len=30)
    pairs = RegionPairDataset(store, build_pair_index(store, PairsConfig(mode="retrieved")))
    samples = [pairs[(0, i)] for i in range(len(pairs))]
    again = pairs[(0, 3)]  # the same key: the same sample
    assert again["text"] == samples[3]["text"] and again["links"] == samples[3]["links"]
    assert np.array_equal(again["region_feats"], samples[3]["region_feats"])
    linked = [s for s in samples if s["links"]]
    assert linked, "the links stage linked no phrase"
    batch = collate(linked[:8])
    for i, s in enumerate(linked[:8]):
        for j, (start, end, region, prob) in enumerate(s["links"]):
            pieces = batch["input_ids"][i][batch["phrase_link"][i] == j]
            if len(pieces):  # not cut off by max_len
                phrase = s["text"][start:end].lower().replace(" ", "")
                assert tokenizer.decode(pieces).replace(" ", "") in phrase
                assert batch["link_region"][i, j] == region
                assert batch["link_prob"][i, j] == pytest.approx(prob)
        assert batch["region_mask"][i].sum() == len(s["region_feats"])
        n_tags = len(s["tags"])
        assert int(batch["tag_index"][i].max()) + 1 <= n_tags
    images = RegionImageDataset(store, build_image_index(store, UnimodalConfig()))
    b = collate([images[(0, i)] for i in range(6)])
    assert "input_ids" not in b and b["region_feats"].shape[-1] == 1280
    assert (b["tag_ids"][:, 0] == tokenizer.cls_token_id).all()


# ------------------------------------------------------------------------------------------- VLMixer


def small_gallery(dim: int = 8) -> Gallery:
    g = np.random.default_rng(0)
    return Gallery(
        feats={"traffic light": g.random((3, dim), np.float32), "dog": g.random((2, dim), np.float32)},
        boxes={"traffic light": g.random((3, 5), np.float32), "dog": g.random((2, 5), np.float32)},
    )


def test_cutmix_replaces_a_whole_word_by_one_patch_and_never_masks_patches():
    tokenizer = load_tokenizer()
    gallery = small_gallery()
    collate = CutMixCollator(tokenizer, gallery, max_len=30, prob=1.0)
    text = "a dog waits at the traffic lights"
    grounded = [(2, 5, "dog"), (19, 33, "traffic light"), (0, 1, "unknown concept")]
    sample = {"text": text, "text_key": 1, "sample_seed": 42, "grounded": grounded}
    b = collate([sample, {**sample, "sample_seed": 43}])
    words = tokenizer(text)["input_ids"]
    row = b["mix_ids"][0][b["mix_mask"][0].bool()].tolist()
    # [CLS] a dog waits at the traffic lights [SEP]: "traffic lights" (2 words) -> one patch token,
    # "dog" -> one; the rest unchanged, in order.
    assert len(words) == 9 and len(row) == 8
    assert row == [words[0], words[1], tokenizer.unk_token_id, *words[3:6], tokenizer.unk_token_id, words[8]]
    assert b["mix_is_patch"][0].sum() == 2 and b["n_replaced"].tolist() == [2, 2]
    patch_rows = b["mix_patch_feats"][0][b["mix_is_patch"][0].bool()]
    for feat in patch_rows:
        assert any(np.allclose(feat.numpy(), f) for fs in gallery.feats.values() for f in fs)
    assert (b["mix_mlm_labels"][b["mix_is_patch"].bool()] == -100).all()
    again = collate([sample])
    assert torch.equal(again["mix_ids"][0], b["mix_ids"][0][: again["mix_ids"].shape[1]])
    assert torch.equal(again["mix_patch_feats"][0], b["mix_patch_feats"][0][: again["mix_ids"].shape[1]])
    # p = 0: no mixing (the "MLM only" ablation); p = 0.5 with at_least_one: at least one patch.
    plain = CutMixCollator(tokenizer, gallery, prob=0.0)([sample])
    assert not plain["has_mix"].any() and plain["mix_ids"].tolist() == [words]
    some = CutMixCollator(tokenizer, gallery, prob=0.5)([{**sample, "sample_seed": s} for s in range(20)])
    assert (some["n_replaced"] >= 1).all() and (some["n_replaced"] <= 2).all()


def test_vlmixer_text_batch_trains_mixed_mlm_and_cmcl_only_on_mixed_sentences():
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    gallery = small_gallery()
    text = RegionStreamBackbone(RegionStreamConfig(
        text=TextConfig(pretrained=None, num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                        dropout=0.0, attention_dropout=0.0), region_dim=8))  # fmt: skip
    recipe = VLMixer(VLMixerConfig(embed_dim=16), text)
    samples = [
        {"text": "a dog runs", "text_key": 1, "sample_seed": 1, "grounded": [(2, 5, "dog")]},
        {"text": "markets fell today", "text_key": 2, "sample_seed": 2, "grounded": []},
        {
            "text": "the traffic light is red",
            "text_key": 3,
            "sample_seed": 3,
            "grounded": [(4, 17, "traffic light")],
        },
    ]
    batch = CutMixCollator(tokenizer, gallery, prob=1.0)(samples)
    assert batch["has_mix"].tolist() == [True, False, True]
    out = recipe(batch, step=0, steps_per_epoch=10, kind="text")
    assert {"loss_mlm", "loss_cmcl", "cmc_mixed"} <= set(out.metrics)
    out.loss.backward()
    assert (
        recipe.cmcl_proj.weight.grad is not None and recipe.backbone.region_embed.feat.weight.grad is not None
    )
    # The stages follow mix_weights: TAVP alone draws image batches only.
    alone = VLMixer(VLMixerConfig(mix_weights={"text": 0.0, "image": 1.0}), text)
    assert alone.stages(10)[0].kinds == ("image",)
    with pytest.raises(ValueError, match="mix_weights"):
        VLMixerConfig(mix_weights={"text": 0.0, "image": 0.0})


def test_region_feature_standardisation_is_fitted_once_and_travels_with_the_weights():
    from vlp_core.tasks.base import fit_region_stats_

    b = tiny_backbone(region_dim=3)
    emb = b.region_embed
    f = torch.tensor([[1.0, 2.0, 5.0], [3.0, 2.0, 7.0]])
    assert torch.equal(emb.standardize(f), f) and b.needs_feature_stats  # identity until fitted
    emb.fit_stats_(f)
    assert emb.feat_mean.tolist() == [2.0, 2.0, 6.0]
    assert emb.feat_std.tolist() == pytest.approx(
        [math.sqrt(2), 1e-3, math.sqrt(2)]
    )  # a constant dim: clamped
    assert emb.standardize(f)[:, 0].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])
    assert not b.needs_feature_stats
    assert fit_region_stats_(b, None, ["never read"]) == {}  # fitted: nothing is read
    fresh = tiny_backbone(region_dim=3)
    fresh.load_state_dict(b.state_dict())  # a run's weights carry the fitted statistics
    assert not fresh.needs_feature_stats and torch.equal(fresh.region_embed.feat_std, emb.feat_std)
    none = RegionStreamBackbone(RegionStreamConfig(text=b.config.text, region_dim=3, feature_norm="none"))
    assert not none.needs_feature_stats
