"""One transformer layer with a pluggable feed-forward, and BERT's initialisation."""

from __future__ import annotations

import torch
from torch import nn

from vlp_core.models.layers.attention import MultiHeadAttention
from vlp_core.models.layers.feedforward import FeedForward, ModalityExperts, Route

__all__ = ["TransformerLayer", "init_bert_"]


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
        self.drop = nn.Dropout(dropout)

    def _attend(self, attn, norm, x, context, mask):
        if self.norm_first:
            h = norm(x)
            return x + self.drop(attn(h, h if context is None else context, mask))
        return norm(x + self.drop(attn(x, x if context is None else context, mask)))

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None,
        image: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        route: Route = None,
    ) -> torch.Tensor:
        """``x`` (B, L, hidden), ``key_mask`` (B, 1, 1, L) bool, ``image`` (B, N, Dv) -> (B, L, hidden)."""
        x = self._attend(self.self_attn, self.self_attn_norm, x, None, key_mask)
        if self.cross_attn is not None:
            if image is None:
                raise ValueError("a fusion layer needs image tokens")
            x = self._attend(self.cross_attn, self.cross_attn_norm, x, image, image_mask)
        return self.ffn(x, route)
