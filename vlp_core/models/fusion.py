"""Fusion of image and text: cross-attention fusion layers (ALBEF) and a single-stream encoder over one
joint sequence ([image; text], FLAVA's multimodal encoder; with modality experts, VLMo's Multiway stack).

- :class:`FusionEncoder`: text hidden states attend to themselves and cross-attend to image tokens.
- :class:`SingleStreamEncoder`: one stack of :class:`TransformerLayer` over a joint sequence with one padding
  mask; layers may carry modality experts, routed per call (a name for the whole sequence, or a per-token
  index tensor), and :meth:`SingleStreamEncoder.forward` can run any contiguous range of layers (VLMo runs
  its top layers twice: with the modality expert, and with the VL expert).
- :func:`build_text_stack`: text encoder, fusion layers and the tied MLM head from one checkpoint read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from vlp_core.models.layers import Packing, Route, TransformerLayer, gather_rows, init_bert_
from vlp_core.models.layers import key_mask as _key_mask
from vlp_core.models.text import MLMHead, TextConfig, TextEncoder, load_part_, read_bert_checkpoint

__all__ = ["FusionConfig", "FusionEncoder", "SingleStreamEncoder", "build_text_stack"]

log = logging.getLogger(__name__)


@dataclass
class FusionConfig:
    """The fusion layers on top of the text layers: BERT layers with cross-attention to the image tokens.

    Args:
        num_layers: fusion layers (every one has cross-attention, as in ALBEF).
        init_from_pretrained: initialise fusion layer ``j``'s self-attention and feed-forward from checkpoint
            layer ``text.num_layers + j`` when the text checkpoint has it (MiniLM split 3 + 3 uses all six
            layers); layers beyond the checkpoint and all cross-attention weights are fresh.
        share_text_self_attention: in a pass that scores each text against several images (ITM's positives
            and hard negatives: every text three times), run the first fusion layer's self-attention once per
            distinct text and reuse it for each of that text's rows, since it reads the text alone. Without
            dropout the rows equal separate passes exactly. With dropout (training) a text's rows share that
            sublayer's dropout masks, where the official ALBEF's positive and negative passes draw their own:
            each row's expectation is the same, the noise across a text's rows is correlated. ``False``
            gathers the texts to the rows first (independent masks, as the official code), at the cost of
            that sublayer for the two negative rows of every text.
    """

    num_layers: int = 6
    init_from_pretrained: bool = True
    share_text_self_attention: bool = True

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"fusion needs at least one layer, got {self.num_layers}")


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
        init_bert_(self)
        #: run the layers on the real text tokens only (see :attr:`TextEncoder.packed`).
        self.packed = True

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
        return load_part_(self, usable, renames)

    def forward(
        self,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_mask: torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``text_hidden`` (B, L, H), ``text_mask`` (B, L), ``image_tokens`` (B, N, Dv), ``image_mask``
        optional (B, N) -> ``(B, L, H)``, 0 at the padding when :attr:`packed`; with ``rows`` (B, Q) int64 the
        top layer computes only those positions -> ``(B, Q, H)`` (see :meth:`TransformerLayer.forward`).

        ``text_index`` / ``image_index`` (B',) int64: the texts / images given are distinct ones and output
        row ``i`` fuses ``text_hidden[text_index[i]]`` with ``image_tokens[image_index[i]]`` (B' rows): the
        first layer's self-attention runs once per text (dropout masks included: a text's rows share them;
        without :class:`FusionConfig`'s ``share_text_self_attention`` the texts are gathered to the rows
        first) and the cross-attention keys and values once per image, as a pass scoring each of them several
        times (ITM) needs."""
        if text_index is not None and not self.config.share_text_self_attention:
            text_hidden = gather_rows(text_hidden, text_index)
            text_mask, text_index = text_mask.index_select(0, text_index), None
        key_mask = _key_mask(text_mask)
        img_mask = _key_mask(image_mask)
        x = text_hidden
        top = len(self.layers) - 1
        # Packed tokens below the top layer, and in it too unless it computes ``rows`` only.
        packing = Packing(text_mask) if self.packed and len(self.layers) > (rows is not None) else None
        if packing is not None:
            x = packing.pack(x)
        for i, layer in enumerate(self.layers):
            gather = text_index if i == 0 else None
            if packing is not None and (i < top or rows is None):
                to = packing.gather(gather) if gather is not None else None
                x = layer(x, None, image_tokens, img_mask, gather=to, image_index=image_index,
                          packing=packing)  # fmt: skip
                packing = to if to is not None else packing
                continue
            if packing is not None:  # the top layer at ``rows`` reads the padded layout
                x, key_mask, packing = packing.unpack(x), packing.key_mask, None
            x = layer(x, key_mask, image_tokens, img_mask, rows=rows if i == top else None, gather=gather,
                      image_index=image_index)  # fmt: skip
            if gather is not None and key_mask is not None:
                key_mask = key_mask.index_select(0, gather)
        return packing.unpack(x) if packing is not None else x


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


class SingleStreamEncoder(nn.Module):
    """A stack of :class:`TransformerLayer` over one joint sequence (no cross-attention).

    Args:
        num_layers, hidden, num_heads, intermediate, eps, dropout, attention_dropout: the layers' widths.
        experts: expert names of Multiway layers (e.g. ``("vision", "text")``) or ``None`` for plain FFNs.
        expert_layers: per-layer expert names overriding ``experts`` for the listed layer indices (VLMo:
            the top layers also hold a ``"vl"`` expert).
        norm_first: pre-LN layers (a final LayerNorm is then applied by :meth:`forward` when ``final_norm``).
    """

    def __init__(
        self,
        num_layers: int,
        hidden: int,
        num_heads: int,
        intermediate: int,
        eps: float,
        dropout: float,
        attention_dropout: float,
        *,
        experts: tuple[str, ...] | None = None,
        expert_layers: dict[int, tuple[str, ...]] | None = None,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        per_layer = {i: experts for i in range(num_layers)} | dict(expert_layers or {})
        self.layers = nn.ModuleList(
            TransformerLayer(
                hidden,
                num_heads,
                intermediate,
                eps,
                dropout,
                attention_dropout,
                experts=per_layer[i],
                norm_first=norm_first,
            )
            for i in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden, eps=eps) if norm_first else nn.Identity()
        self.hidden = hidden
        init_bert_(self)

    @property
    def width(self) -> int:
        return self.hidden

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        route: Route | list[Route] = None,
        *,
        start: int = 0,
        end: int | None = None,
        final_norm: bool = True,
    ) -> torch.Tensor:
        """Layers ``start .. end - 1`` over ``x`` (B, L, hidden) with padding ``mask`` (B, L).

        ``route`` is one route for every layer or a list with one per layer of the range. The final norm
        (pre-LN stacks only) is applied when the range ends at the top and ``final_norm`` is set.
        """
        end = len(self.layers) if end is None else end
        routes = route if isinstance(route, list) else [route] * (end - start)
        if len(routes) != end - start:
            raise ValueError(f"{len(routes)} routes for layers {start}..{end - 1}")
        km = _key_mask(mask)
        for layer, r in zip(self.layers[start:end], routes, strict=True):
            x = layer(x, km, route=r)
        return self.norm(x) if final_norm and end == len(self.layers) else x
