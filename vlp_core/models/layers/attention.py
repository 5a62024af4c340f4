"""Multi-head attention (self or cross) over ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.layers.dropout import Dropout

if TYPE_CHECKING:
    from vlp_core.models.layers.packing import Packing

__all__ = ["MultiHeadAttention", "gather_rows", "key_mask"]


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
        #: dropout on the attention probabilities; with :attr:`Dropout.fast` on a CPU in training the
        #: product is computed here (as SDPA's own math path does) so that the mask is the cheap one.
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
        drop = self.attn_drop
        if self.training and drop.p > 0 and drop.fast and q.device.type == "cpu":
            scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            y = drop(scores.softmax(dim=-1)) @ v
        else:
            p = drop.p if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(b, lq, hidden)
        return self.out(y if packing is None else packing.pack(y))
