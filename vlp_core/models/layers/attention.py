"""Multi-head attention (self or cross) over ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiHeadAttention", "key_mask"]


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
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

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        key_mask: torch.Tensor | None,
        context_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` (B, Lq, hidden) attends to ``context`` (B, Lk, kv_width); ``key_mask`` (B, 1, 1, Lk) bool.

        ``context_index`` (B,) int64: ``context`` holds distinct sequences (U, Lk, kv_width) and row ``i`` of
        ``x`` attends to ``context[context_index[i]]``: keys and values are computed once per distinct
        sequence (an image shared by several rows of an ITM pass), then gathered."""
        b, lq, hidden = x.shape
        lk = context.shape[1]
        h, d = self.num_heads, hidden // self.num_heads
        q = self.q(x).view(b, lq, h, d).transpose(1, 2)
        k, v = self.k(context), self.v(context)
        if context_index is not None:
            k, v = k[context_index], v[context_index]
        k = k.view(b, lk, h, d).transpose(1, 2)
        v = v.view(b, lk, h, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, lq, hidden))
