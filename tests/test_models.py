"""Models: MiniLM loading against Hugging Face BERT, fusion layers, ALBEF's losses, momentum model, queues and
ITM sampling, config round-trips, the VQA loss by hand, frozen BatchNorm, and a real two-process gloo run that
must reproduce the single-process losses and gradients on the same global batch.

Sizes are tiny (64 px images, a 1 + 1 layer, 64-wide fresh text stack) wherever the weights are not the point.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlp_core.language.embed import default_model_path
from vlp_core.models import (
    BACKBONES,
    AnswerClassifier,
    CNNGridEncoder,
    DualStreamBackbone,
    DualStreamConfig,
    FusionConfig,
    FusionEncoder,
    TextConfig,
    TextEncoder,
    VisionConfig,
    ViTEncoder,
    build_text_stack,
    read_bert_checkpoint,
    vqa_loss,
)
from vlp_core.models.layers import (
    Dropout,
    Packing,
    TransformerLayer,
    gather_rows,
    key_mask,
    selected_rows,
    take_rows,
)
from vlp_core.objectives import mask_tokens, mlm_token_ids
from vlp_core.recipes import ALBEF, RECIPES, ALBEFConfig, build_recipe
from vlp_core.tasks import load_backbone_weights_

CAPTIONS = [
    "a red bus on a busy street",
    "a bus parked near the station",
    "two cats sleeping on a bed",
    "a cat on a sofa",
    "a tall tree in a green field",
    "the old stone bridge over a river",
    "a bowl of fresh fruit",
    "children playing football in the park",
]
IMAGE_KEY = [0, 0, 1, 1, 2, 3, 4, 5]  # captions 0-1 and 2-3 describe the same image


def tiny_backbone() -> DualStreamConfig:
    """Fresh 1 + 1 layer text stack 64 wide, EfficientNet-Lite0 grid at 64 px (2x2 + 1 tokens), dropout 0."""
    return DualStreamConfig(
        text=TextConfig(
            pretrained=None,
            num_layers=1,
            hidden_size=64,
            num_heads=4,
            intermediate_size=128,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        fusion=FusionConfig(num_layers=1),
        vision=VisionConfig(kind="cnn", image_size=64, width=48, pretrained=True, freeze_bn=True),
    )


def tiny_config() -> ALBEFConfig:
    return ALBEFConfig(embed_dim=32, queue_size=32, momentum=0.9)


def tiny_albef(config: ALBEFConfig | None = None, backbone: DualStreamConfig | None = None) -> ALBEF:
    return ALBEF(config or tiny_config(), DualStreamBackbone(backbone or tiny_backbone()))


def make_batch(tokenizer, image_size: int, n: int = 8) -> dict[str, torch.Tensor]:
    """The pre-training batch contract, built the way the collator does: per-sample seeded MLM masks."""
    rows = tokenizer(CAPTIONS[:n], truncation=True, max_length=30)["input_ids"]
    length = max(len(r) for r in rows)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    mlm_ids = torch.zeros(n, length, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    facts = mlm_token_ids(tokenizer)
    for i, row in enumerate(rows):
        row_t = torch.tensor(row)[None]
        gen = torch.Generator().manual_seed(1000 + i)
        masked, lab = mask_tokens(row_t, prob=0.3, generator=gen, **facts)
        ids[i, : len(row)] = row_t[0]
        mask[i, : len(row)] = 1
        mlm_ids[i, : len(row)] = masked[0]
        labels[i, : len(row)] = lab[0]
    gen = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.randn(n, 3, image_size, image_size, generator=gen),
        "input_ids": ids,
        "attention_mask": mask,
        "mlm_input_ids": mlm_ids,
        "mlm_labels": labels,
        "image_key": torch.tensor(IMAGE_KEY[:n]),
        "text_key": torch.arange(n),
        "sample_seed": torch.arange(1000, 1000 + n),
    }


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def model() -> ALBEF:
    torch.manual_seed(0)
    return tiny_albef().train()


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    b = make_batch(tokenizer, 64)
    assert (b["mlm_labels"] != -100).any()
    return b


def _online_named(m: ALBEF) -> dict[str, torch.nn.Parameter]:
    return dict(m._online().named_parameters())


# --------------------------------------------------------------------------------------------- encoders


def test_minilm_matches_hf_bert_and_splits_into_fusion(tokenizer):
    from transformers import BertModel

    path = default_model_path()
    enc = TextEncoder.from_config(TextConfig(pretrained="minilm", num_layers=6)).eval()
    assert enc.config.hidden_size == 384 and enc.config.num_heads == 12 and enc.config.vocab_size == 30522
    hf = BertModel.from_pretrained(path).eval()
    b = tokenizer(
        ["a cat on a mat", "two dogs play in the snow near a red house"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ours = enc(b["input_ids"], b["attention_mask"])
        ref = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    assert ours.shape == ref.shape == (2, b["input_ids"].shape[1], 384)
    real = b["attention_mask"].bool()
    assert (ours[real] - ref[real]).abs().max().item() < 1e-4
    assert not real.all() and torch.all(ours[~real] == 0)  # padding is not computed (packed tokens)
    enc.packed = False
    with torch.no_grad():
        assert (enc(b["input_ids"], b["attention_mask"]) - ref).abs().max().item() < 1e-4

    # 3 text + 3 fusion: fusion layer j starts as MiniLM layer 3 + j; only cross-attention and the MLM
    # transform (MiniLM has no MLM head) are fresh; the decoder is tied to the word embeddings.
    state = read_bert_checkpoint(path)
    assert (
        len(state) == 5 + 6 * 16
    )  # embeddings (4 tensors + LN bias) and 16 tensors per layer; pooler dropped
    text, fusion, head, fresh = build_text_stack(TextConfig("minilm", 3), FusionConfig(3), image_width=32)
    torch.testing.assert_close(
        fusion.layers[1].ffn.fc_in.weight, state["layers.4.ffn.fc_in.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(
        text.layers[2].self_attn.q.bias, state["layers.2.self_attn.q.bias"], rtol=0, atol=0
    )
    assert fresh["text"] == []
    assert fresh["fusion"] and all(".cross_attn" in n for n in fresh["fusion"])
    assert head.decoder.weight is text.embeddings.word.weight


def test_fusion_layer_shapes_and_cross_attention_used():
    torch.manual_seed(0)
    text_cfg = TextConfig(None, num_layers=1, hidden_size=32, num_heads=4, intermediate_size=64, dropout=0.0)
    fusion = FusionEncoder(text_cfg, FusionConfig(num_layers=2), image_width=24).eval()
    hidden = torch.randn(2, 7, 32)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    image = torch.randn(2, 5, 24)
    with torch.no_grad():
        out = fusion(hidden, mask, image)
        other_image = fusion(hidden, mask, image + torch.randn_like(image))
        # Padded positions are keys nobody attends to: changing them leaves the real tokens' outputs alone.
        other_pad = fusion(torch.cat([hidden[:, :4], torch.randn(2, 3, 32)], dim=1), mask, image)
    assert out.shape == (2, 7, 32)
    assert (out - other_image).abs().max() > 1e-3
    torch.testing.assert_close(out[1, :4], other_pad[1, :4], rtol=1e-5, atol=1e-5)


def test_top_layer_at_chosen_rows_equals_the_full_layer_there():
    """A layer asked for a few positions (``rows``) gives exactly the full layer's outputs at them: post-LN
    with cross-attention (fusion), pre-LN (ViT / VLMo), and a ragged selection through ``selected_rows``."""
    torch.manual_seed(0)
    x, image = torch.randn(3, 9, 32), torch.randn(3, 5, 24)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7])
    selected = torch.zeros(3, 9, dtype=torch.bool)
    selected[0, [1, 4, 8]] = True
    selected[1, 5] = True  # row 2: nothing selected
    rows, valid = selected_rows(selected)
    assert rows.shape == valid.shape == (3, 3) and valid.sum() == 4
    torch.testing.assert_close(take_rows(x, rows)[valid], x[selected])
    for norm_first, cross in ((False, 24), (True, None)):
        layer = TransformerLayer(32, 4, 64, 1e-12, 0.1, 0.1, cross_width=cross, norm_first=norm_first).eval()
        km = key_mask(mask)
        with torch.no_grad():
            full = layer(x, km, image if cross else None)
            at_rows = layer(x, km, image if cross else None, rows=rows)
        torch.testing.assert_close(at_rows[valid], full[selected], rtol=1e-5, atol=1e-5)
    text_cfg = TextConfig(None, num_layers=1, hidden_size=32, num_heads=4, intermediate_size=64, dropout=0.0)
    fusion = FusionEncoder(text_cfg, FusionConfig(num_layers=2), image_width=24).eval()
    cls = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(fusion(x, mask, image, rows=cls)[:, 0], fusion(x, mask, image)[:, 0])


def test_packing_round_trip_gather_and_filler_rows():
    """The packed layout holds the real tokens in row-major order, then filler rows (copies of token 0, up to
    the rounded row count) that unpacking drops and that get no gradient; a gathered packing lays out the
    tokens of the chosen sequences, repeats included."""
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    x = torch.randn(3, 5, 4, requires_grad=True)
    packing = Packing(mask)
    assert (packing.tokens, packing.rows) == (9, 15)  # 9 tokens rounded up to the step of 8, capped at 3 * 5
    packed = packing.pack(x)
    assert packed.shape == (15, 4)
    torch.testing.assert_close(packed[:9], x[mask.bool()])
    torch.testing.assert_close(packed[9:], x[0, 0].expand(6, 4))
    torch.testing.assert_close(packing.unpack(packed), x * mask[..., None])
    weight = torch.randn(3, 5, 4)
    (packing.unpack(packed) * weight).sum().backward()
    torch.testing.assert_close(x.grad, weight * mask[..., None])  # the fillers add nothing to token 0
    rows = torch.tensor([2, 0, 2])
    gathered = packing.gather(rows)
    assert gathered.tokens == 11 and gathered.rows == 15
    laid_out = gather_rows(packed, gathered.source_index)
    torch.testing.assert_close(laid_out[:11], x[rows][mask[rows].bool()])
    assert Packing(torch.ones(2, 3)).dense and Packing(torch.ones(2, 3)).rows == 6


@pytest.mark.parametrize("shape", ["cls-1-fusion-layer", "mean-2-fusion-layers", "vit-retrieval"])
def test_albef_pruned_top_layer_gives_the_full_computation(model, batch, shape):
    """ALBEF computes its top fusion layer only at [CLS] (ITM, ``cls`` pooling) and at the masked tokens
    (MLM), the momentum text encoder's top layer at [CLS] (ITC), in its ITM pass the first fusion layer's
    self-attention once per text and the cross-attention keys and values once per image, and every text and
    fusion layer on the real tokens only (packed): losses, metrics, gradients, momentum weights and queues
    equal the full computation (every position of every row, padding included, as the reference code
    does). Without MLM (retrieval) the momentum ViT's last block runs at [CLS] alone, as ITC reads."""
    if shape == "cls-1-fusion-layer":
        pruned = copy.deepcopy(model)
    elif shape == "vit-retrieval":
        torch.manual_seed(0)
        backbone = tiny_backbone()
        backbone.vision = VisionConfig(
            kind="vit", image_size=64, width=48, depth=2, num_heads=3, pretrained=False
        )
        backbone.fusion = FusionConfig(num_layers=2)
        config = tiny_config()
        config.mlm_weight = 0.0
        pruned = tiny_albef(config, backbone).train()
    else:
        torch.manual_seed(0)
        backbone = tiny_backbone()
        backbone.pooling, backbone.fusion = "mean", FusionConfig(num_layers=2)
        pruned = tiny_albef(backbone=backbone).train()
    full = copy.deepcopy(pruned)
    full.backbone.prune_top_layer = False
    padded = [m for m in full.modules() if isinstance(m, TextEncoder | FusionEncoder)]
    assert len(padded) == 4 and all(m.packed for m in padded)  # online and momentum text and fusion stacks
    for m in padded:
        m.packed = False
    outs = []
    for m in (pruned, full):
        out = m(batch, step=3, steps_per_epoch=10)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-6)
    for k in outs[1].metrics:
        torch.testing.assert_close(outs[0].metrics[k], outs[1].metrics[k], rtol=1e-5, atol=1e-6)
    grads = _grads(full)
    assert grads.keys() == _grads(pruned).keys()
    for name, g in _grads(pruned).items():
        torch.testing.assert_close(g, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(pruned.state_dict().items(), full.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("share", [True, False])
def test_itm_rows_of_one_text_share_its_self_attention_only_when_configured(share):
    """``FusionConfig.share_text_self_attention``: the ITM pass's rows of one text reuse the first fusion
    layer's self-attention, dropout masks included (shared), or gather the text to each row first and draw
    their own masks, as the official code's separate passes do. Only that sublayer's attention dropout is
    on here, and one text meets one image three times: the rows are equal exactly when shared. With no
    dropout both ways give the same rows."""
    torch.manual_seed(0)
    backbone = tiny_backbone()
    backbone.fusion = FusionConfig(num_layers=2, share_text_self_attention=share)
    model = tiny_albef(backbone=backbone).train()
    b = model.backbone
    for m in b.fusion.modules():
        if isinstance(m, Dropout | torch.nn.Dropout):
            m.p = 0.0
    b.fusion.layers[0].self_attn.attn_drop.p = 0.5
    torch.manual_seed(1)
    image = torch.randn(1, 5, b.vision_encoder.width)
    text = torch.randn(1, 6, b.fusion.text_config.hidden_size)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    three = torch.zeros(3, dtype=torch.long)
    pooled = b.fuse_pooled(image, text, mask, image_index=three, text_index=three)
    assert pooled.shape == (3, b.fusion.text_config.hidden_size)
    same = torch.equal(pooled[0], pooled[1]) and torch.equal(pooled[1], pooled[2])
    assert same == share
    if not share:
        assert not torch.allclose(pooled[0], pooled[1])
    b.fusion.layers[0].self_attn.attn_drop.p = 0.0
    other = copy.deepcopy(b)
    other.fusion.config.share_text_self_attention = not share
    for m in (b, other):
        torch.testing.assert_close(
            m.fuse_pooled(image, text, mask, image_index=three, text_index=three),
            b.fuse_states(image.expand(3, -1, -1), text.expand(3, -1, -1), mask.expand(3, -1)).pooled,
        )


def test_global_only_image_pass_equals_the_full_pass_at_cls():
    """``global_only`` gives the full pass's [CLS] token: a ViT computes its last block there alone (a block
    of a kind it does not know runs whole), the CNN grid its global token alone."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    vit = ViTEncoder(
        VisionConfig(kind="vit", image_size=64, width=48, depth=2, num_heads=3, pretrained=False)
    )
    cnn = CNNGridEncoder(VisionConfig(kind="cnn", image_size=64, width=32, pretrained=False))
    for enc in (vit.eval(), cnn.eval()):
        with torch.no_grad():
            cls = enc(x, global_only=True)
            assert cls.shape == (2, 1, enc.width)
            torch.testing.assert_close(cls, enc(x)[:, :1], rtol=1e-5, atol=1e-5)
    vit.backbone.blocks[-1].attn.q_norm = torch.nn.LayerNorm(16)  # not the plain block: run whole
    with torch.no_grad():
        torch.testing.assert_close(vit(x, global_only=True), vit(x)[:, :1])


def test_dropout_masks_keep_their_rate_and_expectation():
    """The CPU dropout keeps each element with probability ``1 - p`` (to 2^-16), scales the kept ones so the
    expectation is the input, follows the seed, and is torch's dropout in eval mode, at p = 0 and when off."""
    x = torch.ones(400_000)
    drop = Dropout(0.1).train()
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # over 6 standard errors
    assert torch.all(y[kept] == 65536 / round(0.9 * 65536))
    assert abs(y.mean().item() - 1.0) < 0.004
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    drop.train().fast = False
    torch.manual_seed(3)
    off = drop(x)
    torch.manual_seed(3)
    assert torch.equal(off, F.dropout(x, 0.1, training=True))


def test_cnn_frozen_bn_sample_alone_equals_sample_in_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 64, 64)
    frozen = CNNGridEncoder(VisionConfig(kind="cnn", image_size=64, width=32)).train()
    assert frozen.num_tokens == 1 + 2 * 2 and frozen.mean == (0.5,) * 3 and frozen.std == (0.5,) * 3
    with torch.no_grad():
        together = frozen(x)
        alone = frozen(x[2:3])
    assert together.shape == (4, 5, 32)
    torch.testing.assert_close(alone[0], together[2], rtol=1e-4, atol=1e-5)
    # The same check fails with batch statistics, so it tests what it claims to.
    live = copy.deepcopy(frozen)
    live.freeze_bn = False
    live.train()
    with torch.no_grad():
        assert (live(x)[2] - live(x[2:3])[0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ ALBEF


def test_albef_forward_backward(model, batch):
    m = copy.deepcopy(model)
    out = m(batch, step=3, steps_per_epoch=10)
    assert torch.isfinite(out.loss)
    assert {"loss_itc", "loss_itm", "loss_mlm", "alpha", "temp", "itm_acc"} <= set(out.metrics)
    parts = out.metrics["loss_itc"] + out.metrics["loss_itm"] + out.metrics["loss_mlm"]
    torch.testing.assert_close(out.loss.detach(), parts)
    assert math.isclose(out.metrics["alpha"].item(), 0.4 * 3 / 10, rel_tol=1e-6)
    assert all(not v.requires_grad and v.dim() == 0 for v in out.metrics.values())

    out.loss.backward()
    online = [(n, p) for n, p in m.named_parameters() if not n.startswith("momentum.")]
    missing = [n for n, p in online if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing
    assert m.temp.value.grad is not None
    momentum = list(m.momentum.parameters())
    assert momentum and all(not p.requires_grad and p.grad is None for p in momentum)
    # The MLM decoder is tied to the word embeddings in the online and in the momentum model.
    assert m.mlm_head.decoder.weight is m.text_encoder.embeddings.word.weight
    assert m.momentum["mlm_head"].decoder.weight is m.momentum["text_encoder"].embeddings.word.weight


def test_ema_and_queue_by_hand(model, batch):
    """One training forward moves every momentum parameter by the EMA step and enqueues its features."""
    m = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.momentum.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    before = {n: p.detach().clone() for n, p in m.momentum.named_parameters()}
    online = {n: p.detach().clone() for n, p in _online_named(m).items()}
    assert before.keys() == online.keys()
    n = batch["image_key"].shape[0]
    ptr0 = int(m.image_queue.ptr)
    queue0 = m.image_queue.feats.clone()

    m.eval()
    with torch.no_grad():
        m(batch, step=0, steps_per_epoch=10)
    # An eval forward leaves the momentum model and the queues alone.
    for name, p in m.momentum.named_parameters():
        assert torch.equal(p, before[name]), name
    assert int(m.image_queue.ptr) == ptr0 and torch.equal(m.image_queue.feats, queue0)

    m.train()
    with torch.no_grad():
        m(batch, step=0, steps_per_epoch=10)
        # The momentum model after the EMA step is what produced the enqueued features.
        mom_m = m.momentum
        img_m = F.normalize(
            mom_m["vision_proj"](mom_m["vision_encoder"](batch["pixel_values"])[:, 0]), dim=-1
        )
        txt_hidden = mom_m["text_encoder"](batch["input_ids"], batch["attention_mask"])
        txt_m = F.normalize(mom_m["text_proj"](txt_hidden[:, 0]), dim=-1)
    mom = m.config.momentum
    for name, p in m.momentum.named_parameters():
        torch.testing.assert_close(p, mom * before[name] + (1 - mom) * online[name], rtol=1e-5, atol=1e-6)

    slots = (ptr0 + torch.arange(n)) % m.config.queue_size
    for queue, feats in ((m.image_queue, img_m), (m.text_queue, txt_m)):
        assert int(queue.ptr) == (ptr0 + n) % m.config.queue_size
        assert torch.equal(queue.ids[slots], batch["image_key"])
        torch.testing.assert_close(queue.feats[:, slots].t(), feats, rtol=1e-5, atol=1e-6)


def test_itm_negatives_never_pick_a_same_image_pair(model):
    keys = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 4])
    gen = torch.Generator().manual_seed(0)
    # Pairs of one image are near-identical, so without the mask their mass would dominate every row.
    base = F.normalize(torch.randn(int(keys.max()) + 1, 16, generator=gen), dim=-1)
    feats = F.normalize(base[keys] + 0.01 * torch.randn(len(keys), 16, generator=gen), dim=-1)
    for step in range(30):
        neg = model.sample_itm_negatives(feats, feats, feats, feats, keys, model.itm_seed(step))
        assert bool(neg.image_valid.all()) and bool(neg.text_valid.all())
        assert bool((keys[neg.image_for_text] != keys).all())
        assert bool((keys[neg.text_for_image] != keys).all())


def test_global_itm_in_one_process_equals_local(model, batch):
    glob, loc = copy.deepcopy(model), copy.deepcopy(model)
    loc.config.itm_negatives = "local"
    assert glob.config.itm_negatives == "global"
    out_g = glob(batch, step=5, steps_per_epoch=10)
    out_l = loc(batch, step=5, steps_per_epoch=10)
    assert torch.equal(out_g.metrics["loss_itm"], out_l.metrics["loss_itm"])
    out_g.loss.backward()
    out_l.loss.backward()
    for (n, pg), (_, pl) in zip(glob.named_parameters(), loc.named_parameters(), strict=True):
        if pg.grad is not None:
            torch.testing.assert_close(pg.grad, pl.grad, rtol=0, atol=0, msg=n)


def test_retrieval_helpers_and_pretrained_state(model, batch):
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        tokens, img = m.image_embed(batch["pixel_values"])
        hidden, txt = m.text_embed(batch["input_ids"], batch["attention_mask"])
        scores = m.itm_scores(tokens, hidden, batch["attention_mask"])
    assert tokens.shape == (8, 5, 48) and hidden.shape[:2] == batch["input_ids"].shape
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(8))
    assert scores.shape == (8,) and bool(((scores >= 0) & (scores <= 1)).all())
    state = m.pretrained_state_dict()
    assert not any(k.startswith(("momentum.", "image_queue.", "text_queue.")) for k in state)
    assert "temp.value" in state and "itm_head.proj.weight" in state

    fresh = ALBEF(m.config, DualStreamBackbone(m.backbone.config))
    fresh.load_pretrained_state_dict({**state, "momentum.junk": torch.zeros(1)})
    for (n, p), q in zip(fresh._online().named_parameters(), fresh.momentum.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, m._online().get_parameter(n)), n
    with pytest.raises(KeyError):
        fresh.load_pretrained_state_dict(
            {k: v for k, v in state.items() if not k.startswith("backbone.fusion.")}
        )

    with torch.no_grad():
        m.temp.value.fill_(5.0)
    m.after_optimizer_step()
    assert m.temp.value.item() == pytest.approx(m.config.temp_max)


def test_vit_albef_tiny_retrieval_finetuning_step(batch):
    """A tiny random ViT backbone; mlm_weight 0 (retrieval fine-tuning) skips MLM and freezes its head, and
    every parameter left trainable gets a gradient (what DDP without find_unused_parameters needs)."""
    torch.manual_seed(0)
    cfg = tiny_backbone().to_dict()
    cfg["vision"] = {
        "kind": "vit",
        "image_size": 32,
        "width": 32,
        "patch_size": 16,
        "depth": 1,
        "num_heads": 2,
    }
    m = build_recipe("albef", {**tiny_config().to_dict(), "mlm_weight": 0.0}, cfg)
    assert m.vision_encoder.num_tokens == 1 + 4 and m.image_size == 32
    small = {**batch, "pixel_values": F.interpolate(batch["pixel_values"], size=32, mode="bilinear")}
    out = m(small, step=0, steps_per_epoch=1)
    assert torch.isfinite(out.loss) and "loss_mlm" not in out.metrics
    out.loss.backward()
    assert not m.mlm_head.dense.weight.requires_grad and m.mlm_head.decoder.weight.requires_grad
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []


def test_vit_by_timm_name_loads_weights_at_another_size(tmp_path: Path):
    import timm

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "vit.pt")
    cfg = VisionConfig(
        kind="vit",
        image_size=64,
        width=192,
        vit_name="vit_tiny_patch16_224",
        weights_path=str(tmp_path / "vit.pt"),
    )
    enc = ViTEncoder(cfg).eval()
    assert enc.num_tokens == 1 + 16 and enc.mean == tuple(src.pretrained_cfg["mean"])
    clip = VisionConfig(kind="vit", vit_name="vit_base_patch16_clip_224.openai").normalisation()
    assert clip[0] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    torch.testing.assert_close(enc.backbone.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 17, 192)


# ----------------------------------------------------------------------------------------------- configs


def test_config_round_trip_and_overrides():
    for name in ("tiny", "base"):
        cfg = ALBEFConfig.preset(name)
        assert ALBEFConfig.from_dict(cfg.to_dict()) == cfg
        bcfg = DualStreamConfig.preset(name)
        assert DualStreamConfig.from_dict(bcfg.to_dict()) == bcfg
    tiny, tiny_b = ALBEFConfig.preset("tiny"), DualStreamConfig.preset("tiny")
    assert (tiny_b.text.pretrained, tiny_b.text.num_layers, tiny_b.fusion.num_layers) == ("minilm", 3, 3)
    assert (tiny_b.vision.kind, tiny_b.vision.image_size, tiny.embed_dim, tiny.queue_size) == (
        "cnn",
        128,
        128,
        1024,
    )
    base, base_b = ALBEFConfig.preset("base"), DualStreamConfig.preset("base")
    assert (base_b.vision.kind, base_b.vision.image_size, base.embed_dim, base.queue_size) == (
        "vit",
        256,
        256,
        65536,
    )

    over_b = DualStreamConfig.from_dict({"preset": "tiny", "vision": {"image_size": 96}})
    over = ALBEFConfig.from_dict({"preset": "tiny", "itm_negatives": "local"})
    assert over_b.vision.image_size == 96 and over.itm_negatives == "local"
    assert over_b.vision.width == tiny_b.vision.width and over_b.text == tiny_b.text
    with pytest.raises(KeyError):
        DualStreamConfig.from_dict({"vision": {"imagesize": 96}})
    with pytest.raises(ValueError):
        ALBEFConfig.from_dict({"itm_negatives": "everywhere"})
    with pytest.raises(ValueError):
        TextConfig(pretrained="minilm", hidden_size=768).resolved()  # contradicts the checkpoint
    assert {"dual_stream", "multiway", "flava"} <= set(BACKBONES) and "albef" in RECIPES


# --------------------------------------------------------------------------------------------------- VQA


def test_vqa_loss_equals_hand_computed_bce():
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, -2.0, 0.5]])
    scores = torch.tensor([[0.0, 1.0, 0.3], [0.0, 0.0, 0.0]])

    def bce(x: float, y: float) -> float:
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))

    rows = [
        sum(bce(x, y) for x, y in zip(lr, sr, strict=True))
        for lr, sr in zip(logits.tolist(), scores.tolist(), strict=True)
    ]
    assert vqa_loss(logits, scores).item() == pytest.approx(sum(rows) / 2, rel=1e-6)


def test_vqa_classifier_from_pretrained_albef(model, batch, tmp_path: Path):
    ckpt = tmp_path / "albef.pt"
    torch.save({"model": model.pretrained_state_dict()}, ckpt)
    backbone = DualStreamBackbone(tiny_backbone())
    load_backbone_weights_(backbone, str(ckpt))
    vqa = AnswerClassifier(backbone, 5)
    for part in ("vision_encoder", "text_encoder", "fusion"):
        for (n, p), q in zip(
            getattr(vqa.backbone, part).state_dict().items(),
            getattr(model, part).state_dict().values(),
            strict=True,
        ):
            assert torch.equal(p, q), f"{part}.{n}"
    scores = torch.zeros(8, 5)
    scores[0, 1], scores[1, 1], scores[2, 3] = 1.0, 0.3, 0.6
    vqa_batch = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")} | {
        "answer_scores": scores
    }
    out = vqa(vqa_batch)
    assert out.logits.shape == (8, 5)
    torch.testing.assert_close(out.loss, vqa_loss(out.logits, scores))
    out.loss.backward()
    assert vqa.head[-1].weight.grad is not None
    assert vqa.backbone.fusion.layers[0].cross_attn.q.weight.grad is not None


# ------------------------------------------------------------------------------- two processes vs one


def _grads(m: ALBEF) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _trim(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop trailing all-padding columns, as a collator padding to this rank's own longest caption would."""
    length = int(b["attention_mask"].sum(dim=1).max())
    return {
        k: v[:, :length] if k in ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels") else v
        for k, v in b.items()
    }


def _dist_worker(rank_: int, world: int, init_file: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank_, world_size=world)
    try:
        saved = torch.load(Path(tmp) / "setup.pt", weights_only=False)
        m = ALBEF(saved["config"], DualStreamBackbone(saved["backbone"])).train()
        m.load_state_dict(saved["state"])
        full = saved["batch"]
        per = full["image_key"].shape[0] // world
        local = _trim({k: v[rank_ * per : (rank_ + 1) * per] for k, v in full.items()})
        out = m(local, step=7, steps_per_epoch=10)
        out.loss.backward()
        grads = _grads(m)
        for g in grads.values():  # what DDP does: average the gradients over ranks
            dist.all_reduce(g)
            g /= world
        metrics = {k: v.clone() for k, v in out.metrics.items() if k.startswith("loss")}
        for v in metrics.values():
            dist.all_reduce(v)
            v /= world
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        if rank_ == 0:
            queue = (m.image_queue.feats.clone(), m.image_queue.ids.clone(), m.text_queue.feats.clone())
            torch.save(
                {"loss": loss / world, "metrics": metrics, "grads": grads, "queue": queue},
                Path(tmp) / "dist.pt",
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process(model, batch, tmp_path: Path):
    state = model.state_dict()
    saved = {"config": model.config, "backbone": model.backbone.config, "state": state, "batch": batch}
    torch.save(saved, tmp_path / "setup.pt")
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    res = torch.load(tmp_path / "dist.pt", weights_only=False)

    single = copy.deepcopy(model)
    out = single(batch, step=7, steps_per_epoch=10)
    out.loss.backward()
    for k, v in res["metrics"].items():
        torch.testing.assert_close(v, out.metrics[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(res["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
    ref = _grads(single)
    assert res["grads"].keys() == ref.keys()
    for n, g in ref.items():
        # Element-wise relative checks fail on near-zero entries; compare against the tensor's scale.
        err = (res["grads"][n] - g).abs().max().item()
        assert err <= 1e-5 * g.abs().max().item() + 1e-8, (n, err)
    torch.testing.assert_close(res["queue"][0], single.image_queue.feats, rtol=1e-4, atol=1e-5)
    assert torch.equal(res["queue"][1], single.image_queue.ids)
    torch.testing.assert_close(res["queue"][2], single.text_queue.feats, rtol=1e-4, atol=1e-5)
