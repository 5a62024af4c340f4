"""Multi-head attention (self or cross): the product by :func:`attention`, SDPA or the plain product."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.layers.dropout import Dropout

if TYPE_CHECKING:
    from vlp_core.models.layers.packing import Packing

__all__ = ["MultiHeadAttention", "attention", "gather_rows", "key_mask"]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, drop: Dropout | None
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` over heads: ``q`` (B, h, Lq, d), ``k``, ``v`` (B, h, Lk, d),
    ``key_mask`` broadcastable to (B, h, Lq, Lk) bool (True = attend), ``drop`` the dropout module on the
    probabilities (a :class:`Dropout` or ``nn.Dropout``; ``None`` or not training: none).

    ``F.scaled_dot_product_attention``, except with the fast dropout on a CPU (:class:`Dropout`): then the
    plain product (two matrix multiplies and a softmax, as SDPA's math path), so that the mask is drawn the
    fast way. There a query row whose keys are all masked gets the mean of the values, not NaN.
    (The plain product without dropout was measured too: no faster than SDPA in a reference-shape step.)"""
    p = drop.p if drop is not None and drop.training else 0.0
    if not (p > 0 and getattr(drop, "fast", False) and q.device.type == "cpu"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1)
    return drop(probs) @ v


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` whose backward sums the rows' gradients as an embedding's does
    (``index_add_``). ``index_select``'s own backward falls back to a far slower ``scatter_add_`` on CPUs when
    the incoming gradient is not contiguous, as the attention product's is when it runs with dropout."""
    return F.embedding(index, x.reshape(x.shape[0], -1)).view(index.shape[0], *x.shape[1:])


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
        #: dropout on the attention probabilities (see :func:`attention`).
        self.attn_drop = Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        key_mask: torch.Tensor | None,
        context_index: torch.Tensor | None = None,
        *,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """``x`` (B, Lq, hidden) attends to ``context`` (B, Lk, kv_width); ``key_mask`` (B, 1, 1, Lk) bool.

        ``context_index`` (B,) int64: ``context`` holds distinct sequences (U, Lk, kv_width) and row ``i`` of
        ``x`` attends to ``context[context_index[i]]``: keys and values are computed once per distinct
        sequence (an image shared by several rows of an ITM pass), then gathered.

        ``packing``: ``x`` is packed tokens (T, hidden) of its sequences, and so is ``context`` when it is
        ``x`` itself (self-attention; the key mask is then the packing's). The projections run on the packed
        tokens, the attention product on the padded layout; the result is packed (T, hidden)."""
        q, k, v = self.q(x), self.k(context), self.v(context)
        if packing is not None:
            if context is x:
                k, v, key_mask = packing.unpack(k), packing.unpack(v), packing.key_mask
            q = packing.unpack(q)
        if context_index is not None:
            k, v = gather_rows(k, context_index), gather_rows(v, context_index)
        b, lq, hidden = q.shape
        lk = k.shape[1]
        h, d = self.num_heads, hidden // self.num_heads
        q = q.view(b, lq, h, d).transpose(1, 2)
        k = k.view(b, lk, h, d).transpose(1, 2)
        v = v.view(b, lk, h, d).transpose(1, 2)
        y = attention(q, k, v, key_mask, self.attn_drop).transpose(1, 2).reshape(b, lq, hidden)
        return self.out(y if packing is None else packing.pack(y))
