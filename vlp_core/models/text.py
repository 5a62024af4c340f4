"""The text side: BERT-layout transformer in plain PyTorch, loaded from Hugging Face BERT weights by name.

:class:`TextEncoder` is the text-only bottom of a stack (post-LN layers, SDPA attention, exact-erf GELU),
:class:`MLMHead` the masked-LM head tied to the word embeddings, :class:`TextEmbeddings` BERT's embeddings.
Weights load from a Hugging Face BERT directory (the packaged all-MiniLM-L6-v2 by default) through an
explicit parameter-name map (:func:`read_bert_checkpoint`), so the layers stay ours and can grow options
(cross-attention, modality experts) without patching ``transformers``. :func:`pool_text` turns a sequence
into one vector.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.layers import Dropout, Packing, TransformerLayer, init_bert_, take_rows
from vlp_core.models.layers import key_mask as _key_mask

__all__ = [
    "BERT_BASE",
    "MLMHead",
    "TextConfig",
    "TextEmbeddings",
    "TextEncoder",
    "hf_bert_name",
    "load_part_",
    "pool_text",
    "read_bert_checkpoint",
    "require_layers",
]


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


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + absolute position + token type (always type 0 here), LayerNorm, dropout."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)

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
    "intermediate.dense": "ffn.fc_in",
    "output.dense": "ffn.fc_out",
    "output.LayerNorm": "ffn.norm",
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


def require_layers(state: dict[str, torch.Tensor], n: int, what: str) -> None:
    """Raise ``ValueError`` unless the renamed checkpoint ``state`` has at least ``n`` layers for ``what``."""
    have = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("layers.")), default=-1)
    if have < n:
        raise ValueError(f"the checkpoint has {have} layers for a {n}-layer {what}")


def load_part_(module: nn.Module, state: dict[str, torch.Tensor], renames: dict[str, str]) -> list[str]:
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
        init_bert_(self)
        #: run the layers on the real tokens only (:mod:`~vlp_core.models.layers.packing`); ``False`` runs
        #: them on the padded batch, as the reference code does (the same values up to float rounding, more
        #: work; kept for the step benchmark's before/after and the equality tests).
        self.packed = True

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
        return load_part_(self, state, renames)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``input_ids``, ``attention_mask`` (B, L) int64 (1 = token, 0 = padding) -> ``(B, L, hidden)``,
        0 at the padding when :attr:`packed`; with ``rows`` (B, Q) int64 the top layer computes only those
        positions -> ``(B, Q, hidden)``."""
        x = self.embeddings(input_ids)
        key_mask = _key_mask(attention_mask)
        top = len(self.layers) - 1
        packing = Packing(attention_mask) if self.packed and len(self.layers) > (rows is not None) else None
        if packing is not None:
            x = packing.pack(x)
        for i, layer in enumerate(self.layers):
            if packing is not None and (i < top or rows is None):
                x = layer(x, None, packing=packing)
                continue
            if packing is not None:  # the top layer at ``rows`` reads the padded layout
                x, packing = packing.unpack(x), None
            x = layer(x, key_mask, rows=rows if i == top else None)
        if packing is not None:
            x = packing.unpack(x)
        if rows is not None and not self.layers:
            x = take_rows(x, rows)
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
        init_bert_(self)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decoder.weight = word_embeddings
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def load_bert_(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load ``cls.predictions`` from the checkpoint when it has one; returns the names left fresh."""
        return load_part_(self, {k: v for k, v in state.items() if k.startswith("mlm.")}, {"mlm.": ""})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` -> ``(..., V)`` vocabulary logits."""
        return self.decoder(self.norm(F.gelu(self.dense(hidden)))) + self.bias


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
