"""The v2 training backend's method pieces: the shared layers (modality experts, pre-/post-LN, the
single-stream encoder), the Multiway (VLMo) and FLAVA backbones, the shared objectives (global-count scale,
step seeds, hard-negative ITM, momentum twin, masked-LM loss, caption swaps) and the VLMo and FLAVA recipes.

Values are checked against hand computations (plain ``math`` on explicit tensors) or against the parts
recomposed by hand; routing and layouts are checked through forward hooks on the real modules. Every model is
tiny and fresh (2 layers, 32 wide, 32 px ViT patches or a 64 px EfficientNet grid) except the one test that
loads the packaged MiniLM into the Multiway tiny preset.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.data import load_tokenizer
from vlp_core.language.embed import default_model_path
from vlp_core.models import TextConfig, VisionConfig, read_bert_checkpoint
from vlp_core.models.backbones import FlavaBackbone, FlavaConfig, MultiwayBackbone, MultiwayConfig
from vlp_core.models.fusion import SingleStreamEncoder
from vlp_core.models.layers import (
    FeedForward,
    ModalityExperts,
    MultiHeadAttention,
    TransformerLayer,
    key_mask,
)
from vlp_core.objectives import (
    ContrastiveLoss,
    MomentumTwin,
    block_masks,
    global_mean_scale,
    hard_negative_itm,
    mask_tokens,
    masked_lm_loss,
    mlm_token_ids,
    step_seed,
    swap_captions,
)
from vlp_core.recipes import FLAVA, FLAVAConfig, VLMo, VLMoConfig
from vlp_core.recipes.vlmo import MIM_SEED

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


def tiny_text(num_layers: int = 2) -> TextConfig:
    return TextConfig(
        pretrained=None,
        num_layers=num_layers,
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        dropout=0.0,
        attention_dropout=0.0,
    )


def tiny_vit() -> VisionConfig:
    """32 px, patch 16: a 2 x 2 grid (+ [CLS]); one 32-wide block where a ViT encoder is built."""
    return VisionConfig(kind="vit", image_size=32, patch_size=16, width=32, depth=1, num_heads=4)


def tiny_cnn() -> VisionConfig:
    """EfficientNet-Lite0 grid at 64 px: 2 x 2 cells + the global token, frozen BatchNorm."""
    return VisionConfig(kind="cnn", image_size=64, width=32, pretrained=True, freeze_bn=True)


def tiny_multiway(norm_first: bool = True) -> MultiwayBackbone:
    return MultiwayBackbone(
        MultiwayConfig(text=tiny_text(), vision=tiny_vit(), vl_layers=1, norm_first=norm_first)
    )


def make_batch(tokenizer, image_size: int, n: int = 8) -> dict[str, torch.Tensor]:
    """The pre-training batch contract, built as the collator does: per-sample seeded MLM masks."""
    rows = tokenizer(CAPTIONS[:n], truncation=True, max_length=30)["input_ids"]
    length = max(len(r) for r in rows)
    ids = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    mlm_ids = torch.zeros(n, length, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    facts = mlm_token_ids(tokenizer)
    for i, row in enumerate(rows):
        row_t = torch.tensor(row)[None]
        masked, lab = mask_tokens(row_t, prob=0.3, generator=torch.Generator().manual_seed(1000 + i), **facts)
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


def randomize_(module: nn.Module, seed: int, std: float = 0.3) -> nn.Module:
    """Every parameter (LayerNorm affines included) to N(0 or 1, std): nothing is an identity by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                base = 1.0 if isinstance(m, nn.LayerNorm) and name == "weight" else 0.0
                p.copy_(base + std * torch.randn(p.shape, generator=gen))
    return module


def param_ids(items) -> set[int]:
    out: set[int] = set()
    for item in items:
        params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
        out |= {id(p) for p in params}
    return out


@contextlib.contextmanager
def swapped(obj: nn.Module, **attrs):
    """Temporarily replace attributes (submodules included: pytest's monkeypatch deletes a submodule on undo,
    since it is not in the instance ``__dict__``)."""
    old = {name: getattr(obj, name) for name in attrs}
    try:
        for name, value in attrs.items():
            setattr(obj, name, value)
        yield obj
    finally:
        for name, value in old.items():
            setattr(obj, name, value)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def texts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(CAPTIONS[2:5], padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # a padded row, so the masks matter
    return enc["input_ids"], enc["attention_mask"]


# ============================================================================================ layers


def test_modality_experts_route_tensor_equals_each_expert_alone():
    torch.manual_seed(0)
    names = ("vision", "text", "vl")
    moe = randomize_(ModalityExperts(names, 8, 16, 1e-5, 0.0, norm_first=True), seed=1)
    x = torch.randn(2, 5, 8, requires_grad=True)
    route = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 1, 0]])  # no token for "vl"
    out = moe(x, route)
    with torch.no_grad():
        for b in range(2):
            for pos in range(5):
                alone = moe.experts[names[route[b, pos]]](x[b, pos][None, None])[0, 0]
                close(out[b, pos], alone)
        # A name routes every token to that expert; the experts really differ.
        for name in names:
            close(moe(x, name), moe.experts[name](x))
        assert (moe(x, "vision") - moe(x, "text")).abs().max() > 0.1
    out.sum().backward()
    # Experts are position-wise: only the experts that received tokens get a gradient.
    assert all(p.grad is None for p in moe.experts["vl"].parameters())
    assert all(p.grad is not None for n in ("vision", "text") for p in moe.experts[n].parameters())
    with pytest.raises(ValueError):
        moe(x, route[:, :4])
    with pytest.raises(KeyError):
        moe(x, "audio")


# A 1 x 2 x 4 input through a 4 -> 2 -> 4 feed-forward with hand-set weights.
_X = [[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]]
_W_IN = [[0.5, -0.25, 1.0, 0.0], [-1.0, 0.5, 0.25, 0.75]]
_B_IN = [0.1, -0.2]
_W_OUT = [[1.0, -1.0], [0.5, 0.0], [-0.5, 2.0], [0.25, 0.25]]
_B_OUT = [0.0, 0.1, -0.1, 0.2]
_GAMMA = [1.0, 2.0, 0.5, 1.5]
_BETA = [0.0, 0.1, -0.1, 0.3]
_EPS = 1e-5


def _lin(w: list[list[float]], b: list[float], v: list[float]) -> list[float]:
    return [sum(wi * vi for wi, vi in zip(row, v, strict=True)) + bi for row, bi in zip(w, b, strict=True)]


def _gelu(z: float) -> float:
    return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))


def _layer_norm(v: list[float]) -> list[float]:
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + _EPS) * g + b for x, g, b in zip(v, _GAMMA, _BETA, strict=True)]


def _ffn(v: list[float]) -> list[float]:
    return _lin(_W_OUT, _B_OUT, [_gelu(z) for z in _lin(_W_IN, _B_IN, v)])


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_feedforward_post_and_pre_ln_by_hand(norm_first):
    ffn = FeedForward(4, 2, _EPS, 0.0, norm_first=norm_first).double()
    with torch.no_grad():
        ffn.fc_in.weight.copy_(torch.tensor(_W_IN, dtype=torch.float64))
        ffn.fc_in.bias.copy_(torch.tensor(_B_IN, dtype=torch.float64))
        ffn.fc_out.weight.copy_(torch.tensor(_W_OUT, dtype=torch.float64))
        ffn.fc_out.bias.copy_(torch.tensor(_B_OUT, dtype=torch.float64))
        ffn.norm.weight.copy_(torch.tensor(_GAMMA, dtype=torch.float64))
        ffn.norm.bias.copy_(torch.tensor(_BETA, dtype=torch.float64))
        out = ffn(torch.tensor([_X], dtype=torch.float64))
    if norm_first:  # x + ffn(norm(x))
        expected = [[x + f for x, f in zip(row, _ffn(_layer_norm(row)), strict=True)] for row in _X]
    else:  # norm(x + ffn(x))
        expected = [_layer_norm([x + f for x, f in zip(row, _ffn(row), strict=True)]) for row in _X]
    assert out.shape == (1, 2, 4)
    close(out[0], torch.tensor(expected, dtype=torch.float64), tol=1e-10)


def test_transformer_layer_pre_ln_and_post_ln_formulas():
    torch.manual_seed(0)
    post = randomize_(TransformerLayer(32, 4, 64, 1e-5, 0.0, 0.0), seed=2).eval()
    pre = TransformerLayer(32, 4, 64, 1e-5, 0.0, 0.0, norm_first=True).eval()
    pre.load_state_dict(post.state_dict())
    x = torch.randn(2, 5, 32)
    km = key_mask(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    with torch.no_grad():
        out_post, out_pre = post(x, km), pre(x, km)
        attn, norm1, ffn = post.self_attn, post.self_attn_norm, post.ffn

        def mlp(h):
            return ffn.fc_out(F.gelu(ffn.fc_in(h)))

        h = norm1(x + attn(x, x, km))
        close(out_post, ffn.norm(h + mlp(h)))
        n = norm1(x)
        h = x + attn(n, n, km)
        close(out_pre, h + mlp(ffn.norm(h)))
    assert (out_pre - out_post).abs().max() > 0.1


def _encoder(norm_first: bool, experts: bool) -> SingleStreamEncoder:
    return SingleStreamEncoder(
        3, 32, 4, 64, 1e-12, 0.0, 0.0,
        experts=("vision", "text") if experts else None,
        expert_layers={2: ("vision", "text", "vl")} if experts else None,
        norm_first=norm_first,
    ).eval()  # fmt: skip


def test_single_stream_encoder_layer_ranges_compose():
    torch.manual_seed(0)
    enc = randomize_(_encoder(norm_first=True, experts=True), seed=3, std=0.1)
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    route = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])  # text then image tokens
    routes = [route, route, "vl"]
    with torch.no_grad():
        full = enc(x, mask, routes)
        low = enc(x, mask, routes[:1], end=1)
        high = enc(low, mask, routes[1:], start=1)
        mid = enc(low, mask, routes[1:2], start=1, end=2)
        top = enc(mid, mask, "vl", start=2)
        km = key_mask(mask)
        by_hand = x
        for layer, r in zip(enc.layers, routes, strict=True):
            by_hand = layer(by_hand, km, route=r)
    close(high, full)
    close(top, full)
    close(low, enc.layers[0](x, km, route=route))  # a range below the top: no final norm
    close(full, enc.norm(by_hand))  # the final (pre-LN) norm exactly once, at the top
    assert (full - by_hand).abs().max() > 1e-2
    with pytest.raises(ValueError):
        enc(x, mask, routes[:2])


def test_single_stream_padding_keys_do_not_change_real_tokens():
    torch.manual_seed(0)
    enc = randomize_(_encoder(norm_first=False, experts=False), seed=4, std=0.1)
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    other = x.clone()
    other[1, 4:] = torch.randn(2, 32) * 5
    with torch.no_grad():
        out, out_other = enc(x, mask), enc(other, mask)
        alone = enc(x[1:2, :4], None)
        unmasked = enc(other, None)
    close(out[1, :4], out_other[1, :4])
    close(out[1, :4], alone[0])
    close(out[0], out_other[0])
    assert (unmasked[1, :4] - out[1, :4]).abs().max() > 1e-2  # without the mask the padding would leak


# ============================================================================================ Multiway


@pytest.fixture(scope="module", params=[True, False], ids=["pre_ln", "post_ln"])
def multiway(request) -> MultiwayBackbone:
    torch.manual_seed(0)
    return tiny_multiway(norm_first=request.param).eval()


@pytest.fixture(scope="module")
def pixels32() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _perturbed(model: MultiwayBackbone, expert: str) -> MultiwayBackbone:
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for ffn in out.experts(expert):
            ffn.fc_out.weight.add_(torch.randn(ffn.fc_out.weight.shape, generator=gen))
    return out


def test_multiway_pair_pass_routes_tokens_to_their_experts(multiway, pixels32, texts):
    ids, mask = texts
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.ffn.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, (args[0], out)))
        for i, layer in enumerate(multiway.stack.layers)
    ]
    try:
        with torch.no_grad():
            fused = multiway.fuse(pixels32, ids, mask)
    finally:
        for h in hooks:
            h.remove()
    length = ids.shape[1]
    assert fused.hidden.shape == (3, length + 1 + 4, 32)
    assert fused.text_slice == slice(0, length) and fused.image_slice == slice(length, None)
    bottom, top = multiway.stack.layers
    with torch.no_grad():
        # Bottom layer: [text; image] split, each part through its own modality's expert.
        inp, out = seen[0]
        text_part = bottom.ffn.experts["text"](inp[:, :length])
        image_part = bottom.ffn.experts["vision"](inp[:, length:])
        close(out[:, :length], text_part)
        close(out[:, length:], image_part)
        assert (bottom.ffn.experts["vision"](inp[:, :length]) - text_part).abs().max() > 1e-2
        # Top (VL) layer: every token through the VL expert.
        inp, out = seen[1]
        close(out, top.ffn.experts["vl"](inp))
        assert (top.ffn.experts["text"](inp) - out).abs().max() > 1e-2


def test_multiway_expert_perturbations(multiway, pixels32, texts):
    ids, mask = texts
    with torch.no_grad():
        img, txt = multiway.encode_image(pixels32), multiway.encode_text(ids, mask)
        pair = multiway.fuse(pixels32, ids, mask)

        m = _perturbed(multiway, "vision")
        img2, txt2 = m.encode_image(pixels32), m.encode_text(ids, mask)
        close(txt2.hidden, txt.hidden)
        close(txt2.extra["vl_pooled"], txt.extra["vl_pooled"])
        assert (img2.tokens - img.tokens).abs().max() > 1e-2

        m = _perturbed(multiway, "text")
        img2, txt2 = m.encode_image(pixels32), m.encode_text(ids, mask)
        close(img2.tokens, img.tokens)
        close(img2.extra["vl_pooled"], img.extra["vl_pooled"])
        assert (txt2.hidden - txt.hidden).abs().max() > 1e-2

        m = _perturbed(multiway, "vl")
        img2, txt2 = m.encode_image(pixels32), m.encode_text(ids, mask)
        close(img2.tokens, img.tokens)  # the expert paths never touch the VL expert
        close(txt2.hidden, txt.hidden)
        close(img2.pooled, img.pooled)
        assert (img2.extra["vl_pooled"] - img.extra["vl_pooled"]).abs().max() > 1e-2
        assert (txt2.extra["vl_pooled"] - txt.extra["vl_pooled"]).abs().max() > 1e-2
        assert (m.fuse(pixels32, ids, mask).hidden - pair.hidden).abs().max() > 1e-2


def test_multiway_fuse_equals_encode_pair(multiway, pixels32, texts):
    ids, mask = texts
    with torch.no_grad():
        fused = multiway.fuse(pixels32, ids, mask)
        img, txt = multiway.encode_image(pixels32), multiway.encode_text(ids, mask)
        paired = multiway.encode_pair(img, txt)
    close(fused.hidden, paired.hidden)
    close(fused.pooled, paired.pooled)
    assert fused.text_slice == paired.text_slice and fused.image_slice == paired.image_slice
    # The pair pass is not the unimodal passes side by side: the modalities attend to each other.
    assert (fused.image - img.tokens).abs().max() > 1e-2


def test_multiway_image_mask_token_replaces_exactly_the_masked_patches(multiway, pixels32):
    mask = torch.tensor([[True, True, False, False], [False] * 4, [False, False, False, True]])
    with torch.no_grad():
        plain = multiway.embed_image(pixels32)
        masked = multiway.embed_image(pixels32, mask)
        pe = multiway.image_embed.pos_embed[0]
    cells = torch.cat([torch.zeros(3, 1, dtype=torch.bool), mask], dim=1)  # the [CLS] is never masked
    close(masked[~cells], plain[~cells])
    for b, j in cells.nonzero().tolist():
        close(masked[b, j], multiway.mask_token + pe[j] + multiway.image_type)
    assert (masked[cells] - plain[cells]).abs().min() > 1e-3


def test_multiway_attention_modules_and_experts_are_exactly_those_modules(multiway):
    m = multiway
    att = m.attention_modules()
    assert len({id(a) for a in att}) == len(att) == 2 * len(m.stack.layers)
    mha = [mod for mod in m.modules() if isinstance(mod, MultiHeadAttention)]
    assert {id(a) for a in att if isinstance(a, MultiHeadAttention)} == {id(a) for a in mha}
    norms = [a for a in att if not isinstance(a, MultiHeadAttention)]
    assert len(norms) == len(m.stack.layers) and all(isinstance(n, nn.LayerNorm) for n in norms)
    ffns = [mod for mod in m.modules() if isinstance(mod, FeedForward)]
    inside_ffn = {id(sub) for f in ffns for sub in f.modules()}
    assert not {id(n) for n in norms} & (inside_ffn | {id(m.stack.norm), id(m.text_embeddings.norm)})

    experts = {name: m.experts(name) for name in ("vision", "text", "vl")}
    assert [len(experts[n]) for n in ("vision", "text", "vl")] == [2, 2, 1]
    ids = {name: {id(e) for e in es} for name, es in experts.items()}
    assert len(ids["vision"] | ids["text"] | ids["vl"]) == 5
    assert ids["vision"] | ids["text"] | ids["vl"] == {id(f) for f in ffns}
    assert ids["vl"] == {id(m.stack.layers[1].ffn.experts["vl"])}  # only the top layer has a VL expert
    for name in ("vision", "text"):
        assert [id(e) for e in experts[name]] == [id(layer.ffn.experts[name]) for layer in m.stack.layers]


def test_multiway_tiny_preset_loads_minilm_layer_i_into_every_expert_of_layer_i():
    model = MultiwayBackbone(MultiwayConfig.preset("tiny"))
    state = read_bert_checkpoint(default_model_path())
    assert len(model.stack.layers) == 6 and model.first_vl == 4
    for i, layer in enumerate(model.stack.layers):
        assert set(layer.ffn.experts) == ({"vision", "text", "vl"} if i >= 4 else {"vision", "text"})
        for expert in layer.ffn.experts.values():
            for name, tensor in expert.state_dict().items():
                assert torch.equal(tensor, state[f"layers.{i}.ffn.{name}"]), (i, name)
        assert torch.equal(layer.self_attn.q.weight, state[f"layers.{i}.self_attn.q.weight"])
        assert torch.equal(layer.self_attn_norm.bias, state[f"layers.{i}.self_attn_norm.bias"])
    # Layers are not interchangeable, so the index mapping above is really checked.
    assert not torch.equal(state["layers.2.ffn.fc_in.weight"], state["layers.3.ffn.fc_in.weight"])
    assert torch.equal(model.text_embeddings.word.weight, state["embeddings.word.weight"])
    assert model.mlm_head.decoder.weight is model.text_embeddings.word.weight


# ============================================================================================ FLAVA


@pytest.fixture(scope="module")
def flava_cnn() -> FlavaBackbone:
    torch.manual_seed(0)
    cfg = FlavaConfig(text=tiny_text(), vision=tiny_cnn(), image_layers=1, multimodal_layers=1)
    return FlavaBackbone(cfg).eval()


@pytest.fixture(scope="module")
def flava_vit() -> FlavaBackbone:
    torch.manual_seed(0)
    return FlavaBackbone(FlavaConfig(text=tiny_text(), vision=tiny_vit(), multimodal_layers=1)).eval()


@pytest.mark.parametrize("which", ["flava_cnn", "flava_vit"])
def test_flava_encode_pair_layout_is_cls_image_text(which, request, texts):
    model: FlavaBackbone = request.getfixturevalue(which)
    ids, mask = texts
    size = model.image_size
    px = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
    seen = {}
    hook = model.multimodal.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0], mask=args[1]))
    try:
        with torch.no_grad():
            image, text = model.encode_image(px), model.encode_text(ids, mask)
            fused = model.encode_pair(image, text)
    finally:
        hook.remove()
    ni, length = image.tokens.shape[1], ids.shape[1]
    assert ni == 1 + 4
    x = seen["x"]
    assert x.shape == fused.hidden.shape == (3, 1 + ni + length, 32)
    with torch.no_grad():
        close(x[:, 0], model.cls_m[0].expand(3, -1))
        close(x[:, 1 : 1 + ni], model.image_to_mm(image.tokens))
        close(x[:, 1 + ni :], model.text_to_mm(text.hidden))
    assert torch.equal(seen["mask"], torch.cat([torch.ones(3, 1 + ni, dtype=mask.dtype), mask], dim=1))
    assert torch.equal(fused.image, fused.hidden[:, 1 : 1 + ni])
    assert torch.equal(fused.text, fused.hidden[:, 1 + ni :])
    assert torch.equal(fused.pooled, fused.hidden[:, 0])


_CELL_MASK = torch.tensor([[True, True, False, False], [False] * 4, [False, False, False, True]])


def test_flava_cnn_mask_token_replaces_exactly_the_masked_cells(flava_cnn):
    enc = flava_cnn.vision_encoder
    px = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    seen = []
    hook = flava_cnn.image_layers.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            plain = enc(px)
            flava_cnn.encode_image(px, mask=_CELL_MASK)
            expected_masked = enc.norm(flava_cnn.mask_token + enc.pos_embed[0])
    finally:
        hook.remove()
    masked = seen[0]  # the grid tokens the backbone's image layers received
    cells = torch.cat([torch.zeros(3, 1, dtype=torch.bool), _CELL_MASK], dim=1)  # global token never masked
    close(masked[~cells], plain[~cells])
    for b, j in cells.nonzero().tolist():
        close(masked[b, j], expected_masked[j])
    assert (masked[cells] - plain[cells]).abs().min() > 1e-3


def test_flava_vit_mask_token_replaces_exactly_the_masked_patches(flava_vit):
    vit = flava_vit.vision_encoder.backbone
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    seen = []
    hook = vit.blocks.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            plain_out = flava_vit.encode_image(px).tokens
            masked_out = flava_vit.encode_image(px, mask=_CELL_MASK).tokens
            patches = vit.patch_embed(px)
    finally:
        hook.remove()
    plain, masked = seen
    pe = vit.pos_embed[0]
    cells = torch.cat([torch.zeros(3, 1, dtype=torch.bool), _CELL_MASK], dim=1)
    close(plain[:, 1:], patches + pe[1:])
    close(masked[~cells], plain[~cells])
    for b, j in cells.nonzero().tolist():
        close(masked[b, j], flava_vit.mask_token + pe[j])
    assert (masked[cells] - plain[cells]).abs().min() > 1e-3
    close(masked_out[1], plain_out[1])  # the row without masked patches is untouched end to end


# ============================================================================================ objectives


def test_global_mean_scale_is_one_in_one_process():
    for count in (1, 7, 1000):
        scale = global_mean_scale(torch.tensor(count))
        assert scale.shape == () and scale.item() == 1.0
    # No items here: this rank's share of the global mean is 0 (its local loss is a connected 0).
    assert global_mean_scale(torch.tensor(0)).item() == 0.0
    assert global_mean_scale(torch.tensor(3.0, requires_grad=True)).item() == 1.0


def test_step_seed_deterministic_and_distinct():
    keys = [(s, st, r, sm) for s in (0, 1) for st in range(40) for r in range(4) for sm in range(3)]
    seeds = [step_seed(*k) for k in keys]
    assert seeds == [step_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys)
    assert all(isinstance(s, int) and 0 <= s < 2**63 - 1 for s in seeds)
    assert step_seed(0, 5) == step_seed(0, 5, 0, 0) != step_seed(0, 5, 0, 1) != step_seed(0, 5, 1, 0)
    torch.Generator().manual_seed(max(seeds))  # usable as a generator seed


def _itm_inputs(n: int):
    gen = torch.Generator().manual_seed(10 + n)
    image = torch.randn(n, 4, generator=gen).requires_grad_()
    text = torch.randn(n, 2, 4, generator=gen).requires_grad_()
    mask = torch.ones(n, 2, dtype=torch.long)
    mask[1::2, 1] = 0
    weight = (0.7 * torch.randn(4, 4, generator=gen)).requires_grad_()
    return image, text, mask, weight


def _bilinear(weight, calls):
    """A fused scorer written here: match logit ``+-s/2`` with ``s = image . W . mean(text tokens)``."""

    def score(img, txt, m):
        calls.append((img.detach(), txt.detach()))
        pooled = (txt * m[..., None]).sum(1) / m.sum(1, keepdim=True)
        s = ((img @ weight) * pooled).sum(-1)
        return torch.stack([-s / 2, s / 2], dim=1)

    return score


def _run_itm(n, features, ids, seed, negatives):
    image, text, mask, weight = _itm_inputs(n)
    calls = []
    iq, tq, ik, tk = features
    res = hard_negative_itm(
        _bilinear(weight, calls), image, text, mask,
        image_query=iq, text_query=tq, image_key=ik, text_key=tk,
        temperature=torch.tensor(0.5 if n > 3 else 0.01, requires_grad=True), ids=ids, seed=seed,
        negatives=negatives,
    )  # fmt: skip
    res.loss.backward()
    return res, (image.grad, text.grad, weight.grad), calls


def test_hard_negative_itm_global_equals_local_in_one_process():
    gen = torch.Generator().manual_seed(13)
    features = [F.normalize(torch.randn(6, 4, generator=gen), dim=-1) for _ in range(4)]  # queries != keys
    ids = torch.tensor([0, 0, 1, 2, 3, 4])  # rows 0 and 1 show the same image: never each other's negative
    glob, g_grads, g_calls = _run_itm(6, features, ids, 1234, "global")
    loc, l_grads, l_calls = _run_itm(6, features, ids, 1234, "local")
    close(glob.loss, loc.loss, tol=1e-7)
    close(glob.logits, loc.logits, tol=1e-7)
    assert torch.equal(glob.labels, loc.labels) and glob.labels.tolist() == [1] * 6 + [0] * 12
    for a, b in zip(g_grads, l_grads, strict=True):
        close(a, b, tol=1e-7)
    assert torch.equal(g_calls[0][1], l_calls[0][1])
    text_rows = g_calls[0][1]
    texts = _itm_inputs(6)[1].detach()
    negative_text = [next(j for j in range(6) if torch.equal(texts[j], row)) for row in text_rows[12:]]
    assert all(ids[j] != ids[b] for b, j in enumerate(negative_text))
    # The draw is a real random draw (a soft softmax at T = 0.5): another seed scores other rows.
    other = _run_itm(6, features, ids, 99, "local")[2]
    assert not torch.equal(other[0][1], text_rows)


# Three pairs whose draw features make each row's hardest admissible candidate unambiguous under the
# documented draw, softmax(query . key / T) at T = 0.01 (cosine gaps of 1): image b's negative text is
# (b + 1) % 3 and text b's negative image is (b + 2) % 3. Queries and keys differ, so a draw that paired the
# features otherwise (key . key, or the roles swapped) would point elsewhere.
_E = torch.eye(4)
_FORCED = (
    _E[[0, 1, 2]],  # image queries
    _E[[3, 1, 2]],  # text queries
    _E[[1, 2, 3]],  # image keys
    _E[[2, 0, 1]],  # text keys
)


def test_hard_negative_itm_loss_is_the_hand_ce_of_the_scorer():
    res, _, calls = _run_itm(3, _FORCED, torch.tensor([0, 1, 2]), 1234, "global")
    # [positives; text b + its negative image; its negative text + image b].
    text_idx = [0, 1, 2, 0, 1, 2, 1, 2, 0]
    image_idx = [0, 1, 2, 2, 0, 1, 0, 1, 2]
    labels = [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert res.labels.tolist() == labels
    image, text, mask, weight = (t.detach().tolist() for t in _itm_inputs(3))
    img_rows, txt_rows = calls[0]
    assert img_rows.tolist() == [image[i] for i in image_idx]
    assert txt_rows.tolist() == [text[t] for t in text_idx]
    total, correct = 0.0, 0
    for t, i, y in zip(text_idx, image_idx, labels, strict=True):
        n = sum(mask[t])
        pooled = [sum(text[t][k][d] * mask[t][k] for k in range(2)) / n for d in range(4)]
        proj = [sum(image[i][a] * weight[a][d] for a in range(4)) for d in range(4)]
        s = sum(p * q for p, q in zip(proj, pooled, strict=True))
        total += math.log1p(math.exp(-s)) if y == 1 else math.log1p(math.exp(s))
        correct += (s > 0) == (y == 1)
    assert res.loss.item() == pytest.approx(total / 9, rel=1e-5)
    assert res.accuracy.item() == pytest.approx(correct / 9)


def test_hard_negative_itm_never_draws_a_caption_of_the_same_image():
    # Pairs 0 and 1 show the same image and are each other's most similar candidate by far: their only
    # admissible negative is pair 2 (pair 2's own draw is uniform over 0 and 1 and not checked).
    iq = _E[[0, 1, 2]]
    tk = _E[[1, 0, 3]]
    _, _, calls = _run_itm(3, (iq, tk, iq, tk), torch.tensor([0, 0, 1]), 1234, "global")
    image, text = (t.detach() for t in _itm_inputs(3)[:2])
    img_rows, txt_rows = calls[0]
    assert torch.equal(img_rows[3:5], image[[2, 2]])  # negative images of texts 0 and 1
    assert torch.equal(txt_rows[6:8], text[[2, 2]])  # negative texts of images 0 and 1


def test_momentum_twin_update_by_hand_keeps_ties():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5)
    head.weight = emb.weight  # an MLM decoder tied to the word embeddings
    online = {"emb": emb, "head": head}
    twin = MomentumTwin(online, momentum=0.9)
    assert twin["head"].weight is twin["emb"].weight
    assert twin["emb"].weight is not emb.weight
    assert not any(p.requires_grad for p in twin.parameters())
    with torch.no_grad():
        twin["emb"].weight.fill_(1.0)
        twin["head"].bias.fill_(0.0)
        emb.weight.fill_(3.0)
        head.bias.fill_(10.0)
    twin.update_(online)
    # 0.9 * 1 + 0.1 * 3 and 0.9 * 0 + 0.1 * 10; the tied weight is updated once, not twice.
    close(twin["emb"].weight, torch.full((5, 3), 1.2))
    close(twin["head"].bias, torch.full((5,), 1.0))
    assert twin["head"].weight is twin["emb"].weight
    assert emb.weight.eq(3.0).all() and head.bias.eq(10.0).all()  # the online weights are untouched
    twin.update_(online)
    close(twin["emb"].weight, torch.full((5, 3), 0.9 * 1.2 + 0.3))
    with pytest.raises(KeyError):
        twin.update_({"head": head, "emb": emb})


def test_masked_lm_loss_by_hand():
    rows = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-2.0, 1.0, 3.0, -0.5]]
    labels = [2, 0, 3]
    logits = torch.tensor(rows, requires_grad=True)
    loss = masked_lm_loss(logits, torch.tensor(labels))
    expected = (
        sum(math.log(sum(math.exp(v) for v in r)) - r[y] for r, y in zip(rows, labels, strict=True)) / 3
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    close(loss, F.cross_entropy(logits, torch.tensor(labels)))
    empty = masked_lm_loss(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad


def test_swap_captions_rate_own_seed_partners_and_world_size_independence():
    seeds = torch.arange(5000, 9000)
    swap, _ = swap_captions(seeds, 0.3, 4000, 0, seed=1)
    assert swap.dtype == torch.bool and abs(swap.float().mean().item() - 0.3) < 0.03
    assert not swap_captions(seeds[:200], 0.0, 200, 0, seed=1)[0].any()

    # A row's decision depends on its own seed only (not on the other rows, the offset or the step seed).
    s = torch.arange(100, 108)
    swap8, _ = swap_captions(s, 0.5, 8, 0, seed=3)
    assert 0 < swap8.sum() < 8
    changed = s.clone()
    changed[::2] += 1000
    assert torch.equal(swap_captions(changed, 0.5, 8, 0, seed=4)[0][1::2], swap8[1::2])
    for i in range(8):
        assert swap_captions(s[i : i + 1], 0.5, 8, i, seed=99)[0].item() == swap8[i].item()

    # Partners: another row of the global batch, the same whichever rank computes them.
    for global_batch in (2, 3, 8, 17):
        for step in range(10):
            rows = torch.arange(global_batch)
            _, partner = swap_captions(rows + 50, 0.5, global_batch, 0, seed=step)
            assert ((partner >= 0) & (partner < global_batch)).all()
            assert (partner != rows).all()
    full_swap, full_partner = swap_captions(s, 0.5, 8, 0, seed=11)
    for world in (2, 4, 8):
        n = 8 // world
        parts = [swap_captions(s[r * n : (r + 1) * n], 0.5, 8, r * n, seed=11) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), full_swap)
        assert torch.equal(torch.cat([p[1] for p in parts]), full_partner)
    assert not torch.equal(swap_captions(s, 0.5, 8, 0, seed=12)[1], full_partner)  # partners follow the step


# ============================================================================================ VLMo recipe


@pytest.fixture(scope="module")
def vlmo() -> VLMo:
    torch.manual_seed(0)
    cfg = VLMoConfig(embed_dim=16, codebook_size=8, vision_steps=2, language_steps=2)
    recipe = VLMo(cfg, tiny_multiway(norm_first=True))
    recipe.fit_targets_(torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(11)), seed=0)
    return recipe.train()


@pytest.fixture(scope="module")
def batch32(tokenizer) -> dict[str, torch.Tensor]:
    b = make_batch(tokenizer, 32)
    assert (b["mlm_labels"] != -100).any()
    return b


VLMO_METRICS = {
    "image": {"loss_mim", "mim_acc"},
    "text": {"loss_mlm"},
    "pair": {
        "loss_itc",
        "loss_itc_expert",
        "loss_itc_vl",
        "temp",
        "temp_vl",
        "loss_itm",
        "itm_acc",
        "loss_mlm",
    },
}


@pytest.mark.parametrize("kind", ["image", "text", "pair"])
def test_vlmo_losses_finite_with_documented_metrics(vlmo, batch32, kind):
    out = vlmo(batch32, step=3, steps_per_epoch=10, kind=kind)
    assert set(out.metrics) == VLMO_METRICS[kind]
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    assert all(v.shape == () and torch.isfinite(v) for v in out.metrics.values())
    m, cfg = out.metrics, vlmo.config
    if kind == "image":
        expected = cfg.mim_weight * m["loss_mim"]
    elif kind == "text":
        expected = cfg.mlm_weight * m["loss_mlm"]
    else:
        expected = (
            cfg.itc_weight * m["loss_itc"] + cfg.itm_weight * m["loss_itm"] + cfg.mlm_weight * m["loss_mlm"]
        )
    close(out.loss.detach(), expected)


def test_vlmo_pair_itc_is_half_expert_plus_vl_by_hand(vlmo, batch32):
    recipe = copy.deepcopy(vlmo)
    with torch.no_grad():
        recipe.temp_vl.value.fill_(0.05)  # the two heads have their own temperatures
    out = recipe(batch32, step=0, steps_per_epoch=10, kind="pair")
    b, keys = recipe.backbone, batch32["image_key"]
    itc = ContrastiveLoss()
    with torch.no_grad():
        image = b.encode_image(batch32["pixel_values"])
        text = b.encode_text(batch32["input_ids"], batch32["attention_mask"])
        expert = itc(recipe.image_proj(image.pooled), recipe.text_proj(text.pooled), 0.07, ids=keys).loss
        vl = itc(
            recipe.vl_image_proj(image.extra["vl_pooled"]),
            recipe.vl_text_proj(text.extra["vl_pooled"]),
            0.05,
            ids=keys,
        ).loss
    close(out.metrics["loss_itc_expert"], expert)
    close(out.metrics["loss_itc_vl"], vl)
    close(out.metrics["loss_itc"], 0.5 * (expert + vl))
    assert abs(expert.item() - vl.item()) > 1e-3
    assert out.metrics["temp_vl"].item() == pytest.approx(0.05)


def test_vlmo_stages_and_what_each_trains(vlmo):
    stages = vlmo.stages(10)
    assert [(s.name, s.steps, s.kinds) for s in stages] == [
        ("vision", 2, ("image",)),
        ("language", 2, ("text",)),
        ("vl", None, ("pair",)),
    ]
    b = vlmo.backbone
    attention = param_ids(b.attention_modules())
    vision_experts, text_experts, vl_experts = (param_ids(b.experts(n)) for n in ("vision", "text", "vl"))

    language = param_ids(stages[1].trainable(vlmo))
    assert param_ids([b.text_embeddings, *b.experts("text"), b.mlm_head]) <= language
    assert not language & (attention | vision_experts | vl_experts | param_ids([b.image_embed, b.mask_token]))
    assert not language & param_ids([vlmo.itm_head, vlmo.image_proj, vlmo.mim_head])

    vision = param_ids(stages[0].trainable(vlmo))
    assert (attention | vision_experts | param_ids([b.image_embed, vlmo.mim_head])) <= vision
    assert not vision & (text_experts | vl_experts | param_ids([b.text_embeddings]))

    vl = param_ids(stages[2].trainable(vlmo))
    assert vl == param_ids([vlmo]) - param_ids([vlmo.targets, vlmo.mim_head])
    assert VLMo.retrieval_losses == ("itc",) and vlmo.retrieval_losses == ("itc",)


# ============================================================================================ FLAVA recipe


@pytest.fixture(scope="module")
def flava() -> FLAVA:
    torch.manual_seed(0)
    backbone = FlavaBackbone(
        FlavaConfig(text=tiny_text(), vision=tiny_cnn(), image_layers=1, multimodal_layers=1)
    )
    recipe = FLAVA(FLAVAConfig(embed_dim=16, codebook_size=8), backbone)
    recipe.fit_targets_(torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(12)), seed=0)
    return recipe.train()


@pytest.fixture(scope="module")
def batch64(tokenizer) -> dict[str, torch.Tensor]:
    return make_batch(tokenizer, 64)


FLAVA_METRICS = {
    "image": {"loss_mim", "mim_acc"},
    "text": {"loss_mlm"},
    "pair": {"loss_itc", "temp", "loss_itm", "itm_acc", "loss_mmm_image", "mmm_image_acc", "loss_mmm_text"},
}


@pytest.mark.parametrize("kind", ["image", "text", "pair"])
def test_flava_losses_finite_with_documented_metrics(flava, batch64, kind):
    out = flava(batch64, step=1, steps_per_epoch=10, kind=kind)
    assert set(out.metrics) == FLAVA_METRICS[kind]
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    assert all(v.shape == () and torch.isfinite(v) for v in out.metrics.values())
    losses = [v for k, v in out.metrics.items() if k.startswith("loss_")]
    close(out.loss.detach(), sum(losses))  # every weight is 1.0


def test_flava_itc_by_hand(flava, batch64):
    out = flava(batch64, step=0, steps_per_epoch=10, kind="pair")
    b = flava.backbone
    with torch.no_grad():
        image = b.encode_image(batch64["pixel_values"])
        text = b.encode_text(batch64["input_ids"], batch64["attention_mask"])
        expected = ContrastiveLoss()(
            flava.image_proj(image.pooled),
            flava.text_proj(text.pooled),
            flava.temp(),
            ids=batch64["image_key"],
        ).loss
    close(out.metrics["loss_itc"], expected)


class _AlwaysMatch(nn.Module):
    """ITM head whose logits always say "match": its accuracy is the share of rows labelled 1."""

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 1.0]).expand(pooled.shape[0], 2) + 0 * pooled[:, :2]


def test_flava_itm_labels_follow_the_swap_probability(flava, batch64):
    base = dataclasses.replace(flava.config, mmm_image_weight=0.0, mmm_text_weight=0.0)
    with swapped(flava, itm_head=_AlwaysMatch(), config=dataclasses.replace(base, itm_swap_prob=0.0)):
        out = flava(batch64, step=5, steps_per_epoch=10, kind="pair")
    assert out.metrics["itm_acc"].item() == 1.0  # no swap: every label is 1
    assert out.metrics["loss_itm"].item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-5)

    # A step at which some row is swapped to the other caption of its own image (rows 0-1 and 2-3).
    keys = batch64["image_key"]
    for step in range(50):
        swap, partner = swap_captions(
            batch64["sample_seed"], 0.95, 8, 0, step_seed(base.seed, step, stream=1)
        )
        if (swap & (keys[partner] == keys)).any():
            break
    with swapped(flava, itm_head=_AlwaysMatch(), config=dataclasses.replace(base, itm_swap_prob=0.95)):
        out = flava(batch64, step=step, steps_per_epoch=10, kind="pair")
    ones = (~swap | (keys[partner] == keys)).sum().item()  # another caption of the same image still matches
    assert 0 < ones <= 3  # most labels are 0
    assert out.metrics["itm_acc"].item() == pytest.approx(ones / 8)
    by_hand = (ones * math.log1p(math.exp(-1.0)) + (8 - ones) * math.log1p(math.exp(1.0))) / 8
    assert out.metrics["loss_itm"].item() == pytest.approx(by_hand, rel=1e-5)


class _CodeZeroHead(nn.Module):
    """Records the states it scores and predicts code 0 with near certainty."""

    def __init__(self, num_codes: int) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.seen: list[torch.Tensor] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.seen.append(hidden.detach())
        logits = torch.zeros(hidden.shape[0], self.num_codes)
        logits[:, 0] = 30.0
        return logits + 0 * hidden[:, :1]


class _MaskedCellsAreZero(nn.Module):
    """Targets: code 0 at the masked cells, code 1 elsewhere."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, 0, 1)


@pytest.mark.parametrize("kind", ["image", "pair"])
def test_flava_masked_image_losses_score_only_masked_cells(flava, batch64, kind):
    cfg = flava.config
    mask = block_masks(batch64["sample_seed"] ^ MIM_SEED, 2, 2, cfg.mim_ratio)
    assert 0 < mask.sum() < mask.numel()
    head = _CodeZeroHead(cfg.codebook_size)
    head_name, metric = ("mim_head", "mim") if kind == "image" else ("mmm_image_head", "mmm_image")
    with swapped(flava, **{head_name: head, "targets": _MaskedCellsAreZero(mask)}):
        out = flava(batch64, step=0, steps_per_epoch=10, kind=kind)
    assert out.metrics[f"loss_{metric}"].item() < 1e-8  # an unmasked cell scored would cost ~30
    assert out.metrics[f"{metric}_acc"].item() == 1.0
    b = flava.backbone
    with torch.no_grad():
        image = b.encode_image(batch64["pixel_values"], mask=mask)
        if kind == "image":
            cells = image.tokens[:, 1:]
        else:
            text = b.encode_text(batch64["mlm_input_ids"], batch64["attention_mask"])
            cells = b.encode_pair(image, text).image[:, 1:]
    assert len(head.seen) == 1
    close(head.seen[0], cells[mask])


def _empty_rank_worker(rank_: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank_, world_size=2)
    try:
        counts = [0, 3]
        scale = global_mean_scale(torch.tensor(counts[rank_])).item()
        logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])[: counts[rank_]]
        labels = torch.tensor([0, 1, 0])[: counts[rank_]]
        loss = masked_lm_loss(logits, labels).item()  # rank 0 has no masked token: it must still join
        torch.save({"scale": scale, "loss": loss}, f"{out}.{rank_}")
    finally:
        dist.destroy_process_group()


def test_a_rank_without_masked_tokens_joins_and_adds_nothing(tmp_path):
    """Two gloo processes, 0 and 3 masked tokens: the scales are 0 and 2 (= 3 x 2 / 3), the mean of the
    ranks' losses is the CE over the 3 tokens, and the empty rank does not skip the collective."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "res")
    mp.spawn(_empty_rank_worker, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    ce = F.cross_entropy(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 0])).item()
    assert (r0["scale"], r1["scale"]) == (0.0, 2.0)
    assert (r0["loss"] + r1["loss"]) / 2 == pytest.approx(ce, rel=1e-6)
