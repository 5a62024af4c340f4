"""Encoders shared by the image-text models, and the output type every model returns.

- Text: a BERT-style transformer in plain PyTorch (post-LN layers, ``F.scaled_dot_product_attention``,
  exact-erf GELU feed-forward). :class:`TextEncoder` is the text-only bottom of the stack,
  :class:`FusionEncoder` the top layers that add cross-attention to image tokens (ALBEF's layers 6-11), and
  :class:`MLMHead` the masked-LM head tied to the word embeddings. Weights load from a Hugging Face BERT
  directory (the packaged all-MiniLM-L6-v2 by default) through an explicit parameter-name map, so the layers
  stay ours and can grow options (cross-attention) without patching ``transformers``.
- Vision: :class:`CNNGridEncoder` (EfficientNet-Lite0 grid cells as tokens) and :class:`ViTEncoder` (timm
  ViT), both returning ``(B, 1 + N, width)`` tokens with a global token first and exposing the
  ``image_size`` / ``mean`` / ``std`` their inputs must be prepared with.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "pool_text",
    "ImageInputs",
    "BERT_BASE",
    "CNNGridEncoder",
    "FusionConfig",
    "FusionEncoder",
    "MLMHead",
    "ModelOutput",
    "TextConfig",
    "TextEmbeddings",
    "TextEncoder",
    "TransformerLayer",
    "ViTEncoder",
    "VisionConfig",
    "VisionEncoder",
    "build_text_stack",
    "build_vision_encoder",
    "hf_bert_name",
    "read_bert_checkpoint",
]

log = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    """What every model's ``forward`` returns to the trainer."""

    loss: torch.Tensor  # scalar, what the trainer back-propagates
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached 0-d tensors to log
    logits: torch.Tensor | None = None  # task logits where there are any, e.g. VQA (B, A)


# ---------------------------------------------------------------------------------------------- configs

#: BERT-base widths (and its uncased WordPiece vocabulary): what a fresh text config gets for unset widths.
BERT_BASE: dict[str, int | float] = {
    "hidden_size": 768,
    "num_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
# Our field name -> the Hugging Face BertConfig key it is read from.
_HF_CONFIG_KEYS = {
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
    "pad_token_id": "pad_token_id",
}


@dataclass
class TextConfig:
    """The text transformer (the fusion layers share its widths).

    Args:
        pretrained: ``"minilm"`` (the packaged all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads, BERT uncased
            vocabulary), a path to a Hugging Face BERT directory (``config.json`` + ``model.safetensors`` or
            ``pytorch_model.bin``), or ``None`` for a fresh randomly initialised BERT with the same
            tokenizer/vocabulary.
        num_layers: text-only layers (the bottom of the stack). Layer ``i`` loads checkpoint layer ``i``.
        hidden_size, num_heads, intermediate_size, vocab_size, max_position_embeddings, type_vocab_size,
        layer_norm_eps, pad_token_id: ``None`` = taken from the checkpoint's ``config.json`` when
            ``pretrained`` is set, else BERT-base (:data:`BERT_BASE`). An explicit value that contradicts the
            checkpoint is an error, so a config never says something the weights are not.
        dropout: hidden-state dropout (embeddings, attention output, feed-forward output).
        attention_dropout: dropout on the attention probabilities.
    """

    pretrained: str | None = None
    num_layers: int = 6
    hidden_size: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: int | None = None
    type_vocab_size: int | None = None
    layer_norm_eps: float | None = None
    pad_token_id: int | None = None
    dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")

    def checkpoint_dir(self) -> Path | None:
        """Directory of the pretrained weights, or ``None`` for a fresh model."""
        if self.pretrained is None:
            return None
        if self.pretrained == "minilm":
            from vlp_core.language.embed import default_model_path

            return Path(default_model_path())
        path = Path(self.pretrained).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a Hugging Face BERT directory (no config.json)")
        return path

    def resolved(self) -> TextConfig:
        """A copy with every width filled in (from the checkpoint, or BERT-base for a fresh model)."""
        ckpt = self.checkpoint_dir()
        source: dict[str, int | float] = dict(BERT_BASE)
        if ckpt is not None:
            hf = json.loads((ckpt / "config.json").read_text())
            source = {ours: hf[theirs] for ours, theirs in _HF_CONFIG_KEYS.items() if theirs in hf}
            source = {**BERT_BASE, **source}
        values = {}
        for name in _HF_CONFIG_KEYS:
            mine = getattr(self, name)
            if mine is not None and ckpt is not None and mine != source[name]:
                raise ValueError(f"text.{name}={mine} contradicts the checkpoint {ckpt} ({source[name]})")
            values[name] = mine if mine is not None else source[name]
        out = TextConfig(**{**self.__dict__, **values})
        if out.hidden_size % out.num_heads != 0:
            raise ValueError(f"hidden_size {out.hidden_size} is not a multiple of num_heads {out.num_heads}")
        return out


@dataclass
class FusionConfig:
    """The fusion layers on top of the text layers: BERT layers with cross-attention to the image tokens.

    Args:
        num_layers: fusion layers (every one has cross-attention, as in ALBEF).
        init_from_pretrained: initialise fusion layer ``j``'s self-attention and feed-forward from checkpoint
            layer ``text.num_layers + j`` when the text checkpoint has it (MiniLM split 3 + 3 uses all six
            layers); layers beyond the checkpoint and all cross-attention weights are fresh.
    """

    num_layers: int = 6
    init_from_pretrained: bool = True

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"fusion needs at least one layer, got {self.num_layers}")


@dataclass
class VisionConfig:
    """The image encoder.

    Args:
        kind: ``"cnn"`` (EfficientNet-Lite0 grid, :class:`CNNGridEncoder`) or ``"vit"`` (:class:`ViTEncoder`).
        image_size: input side in pixels (square). CNN: the grid is ``ceil(image_size / 32)`` per side.
        width: token width ``Dv``. CNN: the projection width of the grid features. ViT: the embedding width
            (with ``vit_name`` it must equal the named model's width).
        pretrained: CNN only: load ImageNet weights (the packaged ones, or ``weights_path``).
        weights_path: CNN: EfficientNet-Lite0 weights file instead of the packaged one. ViT: a timm state
            dict (``.safetensors`` or torch) loaded into the model; position embeddings are resampled to
            ``image_size`` and a classifier head is dropped. ``None`` for ViT = random init.
        freeze_bn: CNN only: BatchNorm always runs in eval mode with the ImageNet running statistics (its
            affine weights still train). Per-sample outputs then do not depend on the batch, hence not on how
            a global batch is split across processes.
        drop_path: ViT only: stochastic depth rate.
        vit_name: ViT only: a timm model name (e.g. ``"vit_base_patch16_224"``, built offline at
            ``image_size``); ``None`` builds a ``VisionTransformer`` from the explicit widths below.
        patch_size, depth, num_heads, mlp_ratio: ViT widths when ``vit_name`` is ``None``.
    """

    kind: str = "vit"
    image_size: int = 256
    width: int = 768
    pretrained: bool = True
    weights_path: str | None = None
    freeze_bn: bool = True
    drop_path: float = 0.0
    vit_name: str | None = None
    patch_size: int = 16
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("cnn", "vit"):
            raise ValueError(f"vision.kind must be 'cnn' or 'vit', got {self.kind!r}")
        if self.image_size <= 0 or self.width <= 0:
            raise ValueError(f"image_size and width must be positive, got {self.image_size}, {self.width}")

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` of RGB in [0, 1] the encoder expects, known without building it (for transforms).

        CNN: 0.5 / 0.5 (the packaged EfficientNet-Lite0 weights). ViT by name: the timm model's pretrained
        config (e.g. CLIP's statistics for ``*_clip_*`` models); explicit-width ViT: 0.5 / 0.5.
        """
        if self.kind == "vit" and self.vit_name is not None:
            from timm.models import get_pretrained_cfg

            pcfg = get_pretrained_cfg(self.vit_name)
            if pcfg is not None:
                return tuple(float(x) for x in pcfg.mean), tuple(float(x) for x in pcfg.std)
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------- text transformer


def _init_bert_(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm (used for every fresh layer)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, Lk)`` 1/0 padding mask -> ``(B, 1, 1, Lk)`` bool for SDPA (True = attend)."""
    return None if mask is None else mask.bool()[:, None, None, :]


class MultiHeadAttention(nn.Module):
    """Multi-head attention; ``kv_width`` differs from ``hidden`` for cross-attention to image tokens."""

    def __init__(self, hidden: int, num_heads: int, kv_width: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(kv_width, hidden)
        self.v = nn.Linear(kv_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """``x`` (B, Lq, hidden) attends to ``context`` (B, Lk, kv_width); ``key_mask`` (B, 1, 1, Lk) bool."""
        b, lq, hidden = x.shape
        lk = context.shape[1]
        h, d = self.num_heads, hidden // self.num_heads
        q = self.q(x).view(b, lq, h, d).transpose(1, 2)
        k = self.k(context).view(b, lk, h, d).transpose(1, 2)
        v = self.v(context).view(b, lk, h, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, lq, hidden))


class TransformerLayer(nn.Module):
    """One post-LN BERT layer: self-attention, optional cross-attention to image tokens, GELU feed-forward.

    Each sub-block is ``norm(x + dropout(block(x)))`` as in BERT; the cross-attention block sits between the
    self-attention and the feed-forward, as in ALBEF's fusion layers.

    Args:
        hidden, num_heads, intermediate, eps: BERT widths and LayerNorm epsilon.
        dropout, attention_dropout: hidden-state and attention-probability dropout.
        cross_width: width of the image tokens to cross-attend to; ``None`` for a text-only layer.
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        intermediate: int,
        eps: float,
        dropout: float,
        attention_dropout: float,
        cross_width: int | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(hidden, num_heads, hidden, attention_dropout)
        self.self_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.cross_attn: MultiHeadAttention | None = None
        self.cross_attn_norm: nn.LayerNorm | None = None
        if cross_width is not None:
            self.cross_attn = MultiHeadAttention(hidden, num_heads, cross_width, attention_dropout)
            self.cross_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, intermediate)
        self.ffn_out = nn.Linear(intermediate, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None,
        image: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` (B, L, hidden), ``key_mask`` (B, 1, 1, L) bool, ``image`` (B, N, Dv) -> (B, L, hidden)."""
        x = self.self_attn_norm(x + self.drop(self.self_attn(x, x, key_mask)))
        if self.cross_attn is not None:
            if image is None:
                raise ValueError("a fusion layer needs image tokens")
            x = self.cross_attn_norm(x + self.drop(self.cross_attn(x, image, image_mask)))
        return self.ffn_norm(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + absolute position + token type (always type 0 here), LayerNorm, dropout."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` int64 -> ``(B, L, hidden)``."""
        length = input_ids.shape[1]
        if length > self.position.num_embeddings:
            limit = self.position.num_embeddings
            raise ValueError(f"sequence length {length} > max_position_embeddings {limit}")
        pos = torch.arange(length, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos)[None] + self.token_type.weight[0]
        return self.drop(self.norm(x))


# Hugging Face BERT parameter names -> ours. Layer indices stay global ("layers.{i}") so one checkpoint can
# be split between the text and fusion stacks.
_HF_LAYER_PARTS = {
    "attention.self.query": "self_attn.q",
    "attention.self.key": "self_attn.k",
    "attention.self.value": "self_attn.v",
    "attention.output.dense": "self_attn.out",
    "attention.output.LayerNorm": "self_attn_norm",
    "crossattention.self.query": "cross_attn.q",
    "crossattention.self.key": "cross_attn.k",
    "crossattention.self.value": "cross_attn.v",
    "crossattention.output.dense": "cross_attn.out",
    "crossattention.output.LayerNorm": "cross_attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_HF_OTHER = {
    "embeddings.word_embeddings": "embeddings.word",
    "embeddings.position_embeddings": "embeddings.position",
    "embeddings.token_type_embeddings": "embeddings.token_type",
    "embeddings.LayerNorm": "embeddings.norm",
    "cls.predictions.transform.dense": "mlm.dense",
    "cls.predictions.transform.LayerNorm": "mlm.norm",
}
_HF_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def hf_bert_name(name: str) -> str | None:
    """Our name for a Hugging Face BERT parameter, or ``None`` for ones we do not use.

    Handles ``BertModel`` and ``BertForPreTraining``/``BertForMaskedLM`` layouts (``bert.`` prefix, MLM head
    ``cls.predictions.*``) and old TF-converted ``gamma``/``beta`` LayerNorm names. Dropped: the pooler,
    ``position_ids``, the next-sentence head and the MLM decoder weight (tied to the word embeddings here).
    """
    name = name.removeprefix("bert.")
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    if name == "cls.predictions.bias":
        return "mlm.bias"
    m = _HF_LAYER_RE.match(name)
    if m:
        part = _HF_LAYER_PARTS.get(m.group(2))
        return None if part is None else f"layers.{m.group(1)}.{part}.{m.group(3)}"
    stem, _, leaf = name.rpartition(".")
    ours = _HF_OTHER.get(stem)
    return None if ours is None else f"{ours}.{leaf}"


def read_bert_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A Hugging Face BERT directory's weights, renamed by :func:`hf_bert_name` (unused ones dropped)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        raw = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    out = {}
    for name, tensor in raw.items():
        ours = hf_bert_name(name)
        if ours is not None:
            out[ours] = tensor
    return out


def _load_part_(module: nn.Module, state: dict[str, torch.Tensor], renames: dict[str, str]) -> list[str]:
    """Copy checkpoint entries into ``module``: ``renames`` maps a checkpoint prefix to a module prefix.

    Every checkpoint entry under a mapped prefix must exist in the module with the same shape. Returns the
    module parameter names that got no checkpoint value (they keep their fresh initialisation).
    """
    own = module.state_dict()
    picked: dict[str, torch.Tensor] = {}
    for src_prefix, dst_prefix in renames.items():
        for name, tensor in state.items():
            if not name.startswith(src_prefix):
                continue
            dst = dst_prefix + name[len(src_prefix) :]
            if dst not in own:
                raise KeyError(f"checkpoint entry {name} has no counterpart {dst} in {type(module).__name__}")
            if own[dst].shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(own[dst].shape)}")
            picked[dst] = tensor
    module.load_state_dict(picked, strict=False)
    return [name for name, _ in module.named_parameters() if name not in picked]


class TextEncoder(nn.Module):
    """Text-only BERT layers: ``(input_ids, attention_mask) (B, L) -> hidden (B, L, hidden)``.

    Built from a :class:`TextConfig` (resolved here); weights are fresh until :meth:`load_bert_` or
    :meth:`from_config` loads them.
    """

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        cfg = cfg.resolved()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(
            TransformerLayer(
                cfg.hidden_size,
                cfg.num_heads,
                cfg.intermediate_size,
                cfg.layer_norm_eps,
                cfg.dropout,
                cfg.attention_dropout,
            )
            for _ in range(cfg.num_layers)
        )
        _init_bert_(self)

    @property
    def width(self) -> int:
        return self.config.hidden_size

    @classmethod
    def from_config(cls, cfg: TextConfig) -> TextEncoder:
        """Build and, when ``cfg.pretrained`` is set, load the checkpoint's embeddings and first layers."""
        enc = cls(cfg)
        ckpt = enc.config.checkpoint_dir()
        if ckpt is not None:
            enc.load_bert_(read_bert_checkpoint(ckpt))
        return enc

    def load_bert_(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load embeddings and layers ``0 .. num_layers - 1`` from a renamed checkpoint; returns fresh names.

        Raises:
            ValueError: if the checkpoint has fewer layers than this encoder (a half-pretrained text encoder
                is almost certainly a configuration mistake).
        """
        renames = {"embeddings.": "embeddings."}
        for i in range(len(self.layers)):
            if not any(k.startswith(f"layers.{i}.") for k in state):
                n = len(self.layers)
                raise ValueError(f"the checkpoint has no layer {i} for a {n}-layer text encoder")
            renames[f"layers.{i}."] = f"layers.{i}."
        return _load_part_(self, state, renames)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids``, ``attention_mask`` (B, L) int64 (1 = token, 0 = padding) -> ``(B, L, hidden)``."""
        x = self.embeddings(input_ids)
        key_mask = _key_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


class FusionEncoder(nn.Module):
    """Fusion layers: text hidden states attend to themselves and cross-attend to image tokens.

    ``(text_hidden (B, L, H), text_mask (B, L), image_tokens (B, N, Dv)) -> (B, L, H)``; the fused [CLS] is
    ``out[:, 0]``.
    """

    def __init__(self, text: TextConfig, fusion: FusionConfig, image_width: int) -> None:
        super().__init__()
        text = text.resolved()
        self.config = fusion
        self.text_config = text
        self.image_width = image_width
        self.layers = nn.ModuleList(
            TransformerLayer(
                text.hidden_size,
                text.num_heads,
                text.intermediate_size,
                text.layer_norm_eps,
                text.dropout,
                text.attention_dropout,
                cross_width=image_width,
            )
            for _ in range(fusion.num_layers)
        )
        _init_bert_(self)

    @property
    def width(self) -> int:
        return self.text_config.hidden_size

    def load_bert_(self, state: dict[str, torch.Tensor], first_layer: int) -> list[str]:
        """Initialise layer ``j`` from checkpoint layer ``first_layer + j`` where it exists.

        Checkpoint cross-attention weights are used when present and shaped alike (e.g. an ALBEF BERT);
        otherwise cross-attention stays fresh. Returns the parameter names left fresh.
        """
        renames = {}
        for j in range(len(self.layers)):
            src = f"layers.{first_layer + j}."
            if any(k.startswith(src) for k in state):
                renames[src] = f"layers.{j}."
        own = self.state_dict()
        usable = {}
        for name, tensor in state.items():
            src = next((s for s in renames if name.startswith(s)), None)
            if src is None:
                continue
            dst = renames[src] + name[len(src) :]
            if ".cross_attn" in name and (dst not in own or own[dst].shape != tensor.shape):
                log.warning("checkpoint entry %s does not fit the cross-attention; it stays fresh", name)
                continue
            usable[name] = tensor
        return _load_part_(self, usable, renames)

    def forward(
        self,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``text_hidden`` (B, L, H), ``text_mask`` (B, L), ``image_tokens`` (B, N, Dv), ``image_mask``
        optional (B, N) -> ``(B, L, H)``."""
        key_mask = _key_mask(text_mask)
        img_mask = _key_mask(image_mask)
        x = text_hidden
        for layer in self.layers:
            x = layer(x, key_mask, image_tokens, img_mask)
        return x


class MLMHead(nn.Module):
    """BERT's MLM head: ``dense + GELU + LayerNorm``, then a decoder tied to the word embeddings, plus a bias.

    Args:
        cfg: the (resolved) text config.
        word_embeddings: the ``(V, H)`` embedding weight the decoder shares (tied, as in BERT).
    """

    def __init__(self, cfg: TextConfig, word_embeddings: nn.Parameter) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        _init_bert_(self)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def load_bert_(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load ``cls.predictions`` from the checkpoint when it has one; returns the names left fresh."""
        return _load_part_(self, {k: v for k, v in state.items() if k.startswith("mlm.")}, {"mlm.": ""})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` -> ``(..., V)`` vocabulary logits."""
        return self.decoder(self.norm(F.gelu(self.dense(hidden)))) + self.bias


def build_text_stack(
    text: TextConfig, fusion: FusionConfig, image_width: int
) -> tuple[TextEncoder, FusionEncoder, MLMHead, dict[str, list[str]]]:
    """Text encoder, fusion encoder and tied MLM head, loaded from one read of the text checkpoint.

    Returns:
        ``(text_encoder, fusion, mlm_head, fresh)``; ``fresh`` maps each part to the parameter names that did
        not come from the checkpoint (everything when ``text.pretrained`` is ``None``), for the run log.
    """
    text_encoder = TextEncoder(text)
    cfg = text_encoder.config
    fusion_encoder = FusionEncoder(cfg, fusion, image_width)
    head = MLMHead(cfg, text_encoder.embeddings.word.weight)
    fresh = {
        "text": [n for n, _ in text_encoder.named_parameters()],
        "fusion": [n for n, _ in fusion_encoder.named_parameters()],
        "mlm_head": [n for n, _ in head.named_parameters() if not n.startswith("decoder.")],
    }
    ckpt = cfg.checkpoint_dir()
    if ckpt is not None:
        state = read_bert_checkpoint(ckpt)
        fresh["text"] = text_encoder.load_bert_(state)
        if fusion.init_from_pretrained:
            fresh["fusion"] = fusion_encoder.load_bert_(state, first_layer=cfg.num_layers)
        fresh["mlm_head"] = [n for n in head.load_bert_(state) if not n.startswith("decoder.")]
    return text_encoder, fusion_encoder, head, fresh


# ----------------------------------------------------------------------------------------------- vision


class VisionEncoder(nn.Module):
    """Base of the image encoders: ``pixel_values (B, 3, S, S) -> tokens (B, 1 + N, width)``, global first.

    Attributes the data side needs: ``image_size`` (S), ``mean`` and ``std`` (per-channel normalisation of
    RGB in [0, 1]); ``width`` (Dv) and ``num_tokens`` (1 + N) for the model side.
    """

    image_size: int
    width: int
    num_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> VisionEncoder:
        return build_vision_encoder(cfg)


def _bn_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class CNNGridEncoder(VisionEncoder):
    """EfficientNet-Lite0 feature grid as image tokens.

    The last feature map (1,280 channels, stride 32: 4 x 4 at 128 px) is flattened to ``N = g * g`` tokens; a
    global token, the mean of the grid cells (the backbone's own global pool), is put first. All ``1 + N``
    tokens go through one linear projection to ``width``, get learned position embeddings and a LayerNorm
    (so their scale matches the text side's post-LN states that the cross-attention and ITC compare them
    with). Inputs are normalised with mean = std = 0.5, the packaged weights' convention.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        from vlp_core.vision.features import load_efficientnet_lite0

        if cfg.pretrained:
            backbone = load_efficientnet_lite0(cfg.weights_path)
        else:
            backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        # forward_features never uses the ImageNet classifier; dropping it keeps DDP free of unused params.
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.freeze_bn = cfg.freeze_bn
        self.image_size = cfg.image_size
        self.width = cfg.width
        self.mean, self.std = cfg.normalisation()
        # TF "same" padding: every stride-2 stage rounds up, so the grid is ceil(S / 32).
        self.grid = math.ceil(cfg.image_size / 32)
        self.num_tokens = 1 + self.grid * self.grid
        self.proj = nn.Linear(backbone.num_features, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, cfg.width))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.train(self.training)

    def train(self, mode: bool = True) -> CNNGridEncoder:
        super().train(mode)
        if self.freeze_bn:
            for bn in _bn_layers(self.backbone):
                bn.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised -> ``(B, 1 + g*g, width)``."""
        fmap = self.backbone.forward_features(pixel_values)  # (B, C, g, g)
        if fmap.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"expected a {self.grid}x{self.grid} grid, got {tuple(fmap.shape[-2:])}")
        cells = fmap.flatten(2).transpose(1, 2)  # (B, g*g, C)
        tokens = torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)
        return self.norm(self.proj(tokens) + self.pos_embed)


class ViTEncoder(VisionEncoder):
    """timm Vision Transformer; the tokens are ``forward_features`` (after the final norm), [CLS] first.

    Random init with the explicit widths of :class:`VisionConfig`, or a timm model by name (built offline),
    optionally loaded from ``weights_path``. Normalisation: :meth:`VisionConfig.normalisation`.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if cfg.vit_name is not None:
            model = timm.create_model(
                cfg.vit_name,
                pretrained=False,
                img_size=cfg.image_size,
                num_classes=0,
                drop_path_rate=cfg.drop_path,
            )
            if model.embed_dim != cfg.width:
                raise ValueError(f"{cfg.vit_name} is {model.embed_dim} wide but vision.width is {cfg.width}")
        else:
            model = VisionTransformer(
                img_size=cfg.image_size,
                patch_size=cfg.patch_size,
                embed_dim=cfg.width,
                depth=cfg.depth,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                num_classes=0,
                drop_path_rate=cfg.drop_path,
            )
        if cfg.weights_path is not None:
            state = _read_state_dict(cfg.weights_path)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            # Resamples the position embeddings to this image size (and patch embedding if needed).
            state = checkpoint_filter_fn(state, model)
            model.load_state_dict(state, strict=True)
        self.backbone = model
        self.image_size = cfg.image_size
        self.width = model.embed_dim
        self.num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        self.mean, self.std = cfg.normalisation()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised -> ``(B, 1 + (S/patch)^2, width)``."""
        return self.backbone.forward_features(pixel_values)


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    """The encoder of ``cfg.kind``."""
    return CNNGridEncoder(cfg) if cfg.kind == "cnn" else ViTEncoder(cfg)


class ImageInputs:
    """Mixin for models with a ``vision_encoder``: the input size and normalisation data code needs."""

    vision_encoder: nn.Module

    @property
    def image_size(self) -> int:
        return self.vision_encoder.image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.vision_encoder.mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.vision_encoder.std


def pool_text(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per sequence from ``(B, L, H)`` states: ``"cls"`` (position 0, BERT / ALBEF) or ``"mean"``
    (mean over the ``mask``-ed tokens, how sentence-transformers MiniLM was trained). ``-> (B, H)``.

    MiniLM's [CLS] state is close to the same vector for every sentence (cosine 0.999999 between unrelated
    captions after its first 3 layers), so a [CLS]-pooled MiniLM gives ITC, ITM and VQA heads nothing to
    tell sentences apart by; ``"mean"`` is the tiny preset's choice.
    """
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        m = mask[..., None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {how!r}")
