"""Packed (unpadded) token layout: the tokens of a padded batch as one ``(T, H)`` matrix without the padding.

A batch of captions padded to its longest one spends a quarter or more of every per-token operation of a
text or fusion layer (the projections, the feed-forward, the norms, dropout) on padding whose outputs no loss
reads. :class:`Packing` keeps the real tokens only; a layer runs its per-token work on them and lays them out
padded only for the attention product (:meth:`Packing.unpack`), whose key mask excludes the padding as
before. Every real token's value is the one the padded layer computes, up to float rounding.
"""

from __future__ import annotations

import torch

from vlp_core.models.layers.attention import gather_rows, key_mask

__all__ = ["ROW_STEPS", "Packing"]

#: A packed matrix's row count is the number of real tokens rounded up to a multiple of ``B * L /
#: ROW_STEPS`` (at least 8; at most ``B * L``): the real tokens, then copies of the first one that no
#: attention reads and no output keeps. So a batch shape gives at most this many matrix shapes, and the
#: rounding costs under ``1 / ROW_STEPS`` of the padded work. The number of real tokens changes with every
#: batch, and CPU kernels that compile and cache code per shape (oneDNN's GELU: about 0.8 MB a shape, up to
#: 1,024 shapes) would otherwise grow with every new count: 1.7 GB over 60 steps of the reference ALBEF.
ROW_STEPS = 32


class Packing:
    """Where the real tokens of a ``(B, L)`` padding ``mask`` (1 = token) sit: ``index`` (T,) int64 holds
    their flat positions in ``B * L``, row-major, so packed token ``t`` is position ``index[t]``. A packed
    matrix has :attr:`rows` rows, ``T`` rounded up as :data:`ROW_STEPS` says: rows past ``T`` repeat token 0
    and are dropped by :meth:`unpack` (their gradient is zero).

    :meth:`gather` makes the packing of a batch whose sequences are some of these (with repeats), and says
    which packed token each of its rows is (``source_index``): an ITM pass scores each text several times.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.dim() != 2:
            raise ValueError(f"a padding mask is (B, L), got {tuple(mask.shape)}")
        self.mask = mask
        self.batch, self.length = mask.shape
        flat = mask.reshape(-1).bool()
        self.index = flat.nonzero().squeeze(1)
        self.tokens = self.index.numel()
        self.dense = self.tokens == flat.numel()  # no padding: pack and unpack are reshapes
        padded = flat.numel()
        step = max(8, -(-padded // ROW_STEPS))
        self.rows = (
            self.tokens if self.dense or not self.tokens else min(-(-self.tokens // step) * step, padded)
        )
        self.key_mask = key_mask(mask)
        #: with :meth:`gather`: row ``t`` of this packing is row ``source_index[t]`` of the source's.
        self.source_index: torch.Tensor | None = None

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        """``index`` (T,) extended to :attr:`rows` entries by repeating its first."""
        extra = self.rows - index.numel()
        return index if extra == 0 else torch.cat([index, index[:1].expand(extra)])

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, ...)`` -> ``(rows, ...)``: the real tokens in row-major order, then the filler rows."""
        flat = x.reshape(self.batch * self.length, *x.shape[2:])
        return flat if self.dense else gather_rows(flat, self._rows(self.index))

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(rows, ...)`` -> ``(B, L, ...)`` with zeros at the padding."""
        tail = x.shape[1:]
        if not self.dense:
            x = x.new_zeros(self.batch * self.length, *tail).index_copy(0, self.index, x[: self.tokens])
        return x.view(self.batch, self.length, *tail)

    def gather(self, rows: torch.Tensor) -> Packing:
        """The packing of sequences ``rows`` (B',) int64 of this batch; its ``source_index`` says which row of
        this packing each of its rows is, so ``gather_rows(packed, source_index)`` lays them out."""
        position = torch.full((self.batch * self.length,), -1, dtype=torch.long, device=self.index.device)
        position[self.index] = torch.arange(self.tokens, device=self.index.device)
        out = Packing(self.mask.index_select(0, rows))
        source = position.view(self.batch, self.length).index_select(0, rows).reshape(-1)[out.index]
        out.source_index = out._rows(source)
        return out
