"""The feed-forward sub-block of a transformer layer, and modality experts (VLMo's Multiway FFNs).

Both are *sub-blocks*: they own their LayerNorm and residual, so a layer is ``ffn(attention(x))`` whatever
the feed-forward is, and each expert keeps its own norm (VLMo gives every expert its own ``norm2``).
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.layers.dropout import Dropout

__all__ = ["FeedForward", "ModalityExperts", "Route"]

#: How a :class:`ModalityExperts` block routes tokens: an expert name for the whole sequence, or a ``(B, L)``
#: int64 tensor of expert indices (positions in ``ModalityExperts.names``) per token.
Route = Union[str, torch.Tensor, None]  # noqa: UP007 - a runtime alias


class FeedForward(nn.Module):
    """GELU feed-forward with residual and LayerNorm: post-LN ``norm(x + drop(ffn(x)))`` (BERT) or pre-LN
    ``x + drop(ffn(norm(x)))`` (ViT, VLMo). ``route`` is accepted for a common call and ignored."""

    def __init__(
        self, hidden: int, intermediate: int, eps: float, dropout: float, *, norm_first: bool = False
    ) -> None:
        super().__init__()
        self.fc_in = nn.Linear(hidden, intermediate)
        self.fc_out = nn.Linear(intermediate, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: torch.Tensor, route: Route = None) -> torch.Tensor:
        if self.norm_first:
            return x + self.drop(self.fc_out(F.gelu(self.fc_in(self.norm(x)))))
        return self.norm(x + self.drop(self.fc_out(F.gelu(self.fc_in(x)))))


class ModalityExperts(nn.Module):
    """One :class:`FeedForward` per modality (e.g. ``("vision", "text", "vl")``), tokens routed by type.

    ``route`` is an expert name (every token of the batch to that expert: an image-only, text-only or fused
    pass) or a ``(B, L)`` int64 tensor of indices into :attr:`names` (each token to its own expert: an
    image-text input below VLMo's VL layers, image tokens to V-FFN and text tokens to L-FFN). Experts are
    position-wise, so routing by token and scattering back gives exactly what running each expert on its
    tokens alone gives. An expert that receives no token in a batch gets no gradient: DDP needs
    ``find_unused_parameters`` (the backbone says so, see ``Backbone.ddp_kwargs``).
    """

    def __init__(
        self,
        names: tuple[str, ...],
        hidden: int,
        intermediate: int,
        eps: float,
        dropout: float,
        *,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"expert names must be distinct and non-empty, got {names}")
        self.names = tuple(names)
        self.experts = nn.ModuleDict(
            {n: FeedForward(hidden, intermediate, eps, dropout, norm_first=norm_first) for n in names}
        )

    def forward(self, x: torch.Tensor, route: Route = None) -> torch.Tensor:
        if route is None:
            raise ValueError(f"modality experts need a route (one of {self.names} or a (B, L) index tensor)")
        if isinstance(route, str):
            if route not in self.experts:
                raise KeyError(f"no expert {route!r} (experts: {self.names})")
            return self.experts[route](x)
        if route.shape != x.shape[:2]:
            raise ValueError(f"route {tuple(route.shape)} does not match tokens {tuple(x.shape[:2])}")
        if route.device.type == "cpu" and (int(route.min()) < 0 or int(route.max()) >= len(self.names)):
            raise ValueError(f"route indices must be in [0, {len(self.names)}) for experts {self.names}")
        # An expert that gets no token does not run, so its parameters get no gradient (None, not 0): the
        # optimiser then leaves them alone, as a reference implementation with unused parameters does. The
        # check costs one host sync per expert and layer on GPUs.
        out = torch.zeros_like(x)
        for i, name in enumerate(self.names):
            sel = route == i
            if bool(sel.any()):
                out[sel] = self.experts[name](x[sel][None])[0]
        return out
