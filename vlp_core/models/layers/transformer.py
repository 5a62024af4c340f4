"""One transformer layer with a pluggable feed-forward, and BERT's initialisation."""

from __future__ import annotations

import torch
from torch import nn

from vlp_core.models.layers.attention import MultiHeadAttention, gather_rows
from vlp_core.models.layers.dropout import Dropout
from vlp_core.models.layers.feedforward import FeedForward, ModalityExperts, Route
from vlp_core.models.layers.packing import Packing

__all__ = ["TransformerLayer", "init_bert_", "selected_rows", "take_rows"]


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` (B, L, H) at ``rows`` (B, Q) int64 positions -> (B, Q, H)."""
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


def selected_rows(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``(B, L)`` bool selection as ``rows`` (B, Q) int64 for :func:`take_rows` and ``valid`` (B, Q) bool,
    Q = the most selected positions of any row (at least 1): ``take_rows(x, rows)[valid]`` is ``x[selected]``,
    in the same order. Padding rows repeat a position and are not ``valid``."""
    counts = selected.sum(1)
    q = max(1, int(counts.max())) if selected.numel() else 1
    rows = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :q]
    valid = torch.arange(q, device=selected.device)[None] < counts[:, None]
    return rows, valid


def init_bert_(module: nn.Module, std: float = 0.02) -> None:
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


class TransformerLayer(nn.Module):
    """Self-attention, optional cross-attention to image tokens, then a pluggable feed-forward sub-block.

    Post-LN (BERT, the default): each attention sub-block is ``norm(x + drop(attn(x)))``; pre-LN
    (``norm_first``, ViT / VLMo): ``x + drop(attn(norm(x)))``. The cross-attention sits between the
    self-attention and the feed-forward, as in ALBEF's fusion layers. The feed-forward is a
    :class:`FeedForward` or, with ``experts``, a :class:`ModalityExperts` routed by ``route``.

    Args:
        hidden, num_heads, intermediate, eps: widths and LayerNorm epsilon.
        dropout, attention_dropout: hidden-state and attention-probability dropout.
        cross_width: width of the image tokens to cross-attend to; ``None`` for no cross-attention.
        experts: expert names for a Multiway feed-forward; ``None`` for one shared FFN.
        norm_first: pre-LN instead of post-LN.
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
        *,
        experts: tuple[str, ...] | None = None,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(hidden, num_heads, hidden, attention_dropout)
        self.self_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.cross_attn: MultiHeadAttention | None = None
        self.cross_attn_norm: nn.LayerNorm | None = None
        if cross_width is not None:
            self.cross_attn = MultiHeadAttention(hidden, num_heads, cross_width, attention_dropout)
            self.cross_attn_norm = nn.LayerNorm(hidden, eps=eps)
        if experts:
            self.ffn: nn.Module = ModalityExperts(
                experts, hidden, intermediate, eps, dropout, norm_first=norm_first
            )
        else:
            self.ffn = FeedForward(hidden, intermediate, eps, dropout, norm_first=norm_first)
        self.drop = Dropout(dropout)

    def _attend(self, attn, norm, x, context, mask, rows=None, context_index=None, packing=None):
        """One attention sub-block; ``context`` ``None`` = self-attention over ``x``. With ``rows`` (self-
        attention only), only those positions of ``x`` are queries (and outputs); every position is a key.
        ``context_index``, ``packing``: see :meth:`MultiHeadAttention.forward`."""
        if self.norm_first:
            h = norm(x)
            keys = h if context is None else context
            if rows is not None:
                x, h = take_rows(x, rows), take_rows(h, rows)
            return x + self.drop(attn(h, keys, mask, context_index, packing=packing))
        keys = x if context is None else context
        if rows is not None:
            x = take_rows(x, rows)
        return norm(x + self.drop(attn(x, keys, mask, context_index, packing=packing)))

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None,
        image: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        route: Route = None,
        *,
        rows: torch.Tensor | None = None,
        gather: torch.Tensor | Packing | None = None,
        image_index: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """``x`` (B, L, hidden), ``key_mask`` (B, 1, 1, L) bool, ``image`` (B, N, Dv) -> (B, L, hidden).

        ``rows`` (B, Q) int64: compute only those positions' outputs -> (B, Q, hidden) (the top layer of a
        stack whose loss reads a few positions: [CLS] for ITM, the masked tokens for MLM). Every position
        still serves as a key, so each computed row equals the full layer's row at that position. Needs a
        route that is a name (a per-token route would have to be taken at the rows too).

        Shared inputs (an ITM pass scores each text and each image several times): ``gather`` (B',) int64
        says ``x`` and ``key_mask`` hold distinct sequences and the layer's rows are ``x[gather]`` after the
        self-attention (which depends on the text alone, so it runs once per distinct text, its dropout masks
        shared by that text's rows); with ``rows``, those index the gathered rows. ``image_index`` (B',)
        int64 says ``image`` (and ``image_mask``) hold distinct images and row ``i`` cross-attends to
        ``image[image_index[i]]`` (its keys and values are computed once per image).

        Packed tokens (:mod:`~vlp_core.models.layers.packing`): with ``packing``, ``x`` is (T, hidden), the
        real tokens of ``packing``'s sequences (``key_mask`` is then unused), and so is the result; every
        per-token operation runs on those alone. ``gather`` is then the :meth:`Packing.gather` of the rows to
        score (the self-attention runs on ``packing``, then the tokens are laid out as ``gather`` says, and
        the result is packed by ``gather``). ``rows`` need the padded layout."""
        if rows is not None and torch.is_tensor(route):
            raise ValueError("rows need a route by name, not per token")
        if packing is not None:
            if rows is not None or torch.is_tensor(route):
                raise ValueError("packed tokens take neither rows nor a per-token route")
            x = self._attend(self.self_attn, self.self_attn_norm, x, None, None, packing=packing)
            if gather is not None:
                if not isinstance(gather, Packing) or gather.source_index is None:
                    raise TypeError("packed tokens are gathered by a Packing.gather of their packing")
                x, packing = gather_rows(x, gather.source_index), gather
        elif gather is None:
            x = self._attend(self.self_attn, self.self_attn_norm, x, None, key_mask, rows)
        else:
            x = gather_rows(self._attend(self.self_attn, self.self_attn_norm, x, None, key_mask), gather)
            if rows is not None:
                x = take_rows(x, rows)
        if self.cross_attn is not None:
            if image is None:
                raise ValueError("a fusion layer needs image tokens")
            if image_mask is not None and image_index is not None:
                image_mask = image_mask.index_select(0, image_index)
            x = self._attend(
                self.cross_attn, self.cross_attn_norm, x, image, image_mask, context_index=image_index,
                packing=packing,
            )  # fmt: skip
        return self.ffn(x, route)
