"""Momentum (EMA) models for ALBEF-style distillation, and the distillation-weight ramp.

The momentum copy of an encoder is an ordinary frozen module: :func:`momentum_copy` makes one, the trainer
calls :func:`ema_update_` once per step (before the momentum forward pass), and nothing else special happens.
One implementation, used by every method that needs it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["MomentumTwin", "alpha_ramp", "copy_params_", "ema_update_", "freeze_", "momentum_copy"]

Params = nn.Module | Iterable[torch.Tensor]


def _tensors(params: Params) -> list[torch.Tensor]:
    return list(params.parameters()) if isinstance(params, nn.Module) else list(params)


def _check_pairs(target: list[torch.Tensor], source: list[torch.Tensor]) -> None:
    if len(target) != len(source):
        raise ValueError(f"target has {len(target)} tensors, source {len(source)}")
    for t, s in zip(target, source, strict=True):
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch: target {tuple(t.shape)} vs source {tuple(s.shape)}")


def freeze_(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter of ``module``; returns it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@torch.no_grad()
def copy_params_(target: Params, source: Params) -> None:
    """Copy ``source`` parameter values into ``target`` (same order and shapes) and freeze ``target``.

    Modules or iterables of tensors are accepted; for modules the parameters are paired in
    ``.parameters()`` order, so both must have the same architecture.
    """
    tgt, src = _tensors(target), _tensors(source)
    _check_pairs(tgt, src)
    for t, s in zip(tgt, src, strict=True):
        t.copy_(s)
        t.requires_grad_(False)


@torch.no_grad()
def ema_update_(target: Params, source: Params, momentum: float = 0.995) -> None:
    """``target <- momentum * target + (1 - momentum) * source``, in place, for every parameter pair.

    Args:
        target: momentum parameters (module or tensors), frozen.
        source: online parameters, same order and shapes.
        momentum: EMA coefficient in [0, 1] (ALBEF: 0.995).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    tgt, src = _tensors(target), _tensors(source)
    _check_pairs(tgt, src)
    if not tgt:
        return
    # lerp_(s, w) = t + w * (s - t): one fused multi-tensor kernel instead of a Python loop of small ops.
    torch._foreach_lerp_(tgt, [s.to(t.dtype) for t, s in zip(tgt, src, strict=True)], 1.0 - momentum)


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep, frozen copy of ``module`` to serve as its momentum model (same train/eval mode)."""
    return freeze_(copy.deepcopy(module))


def alpha_ramp(step: int, steps_per_epoch: int, alpha: float = 0.4, ramp_epochs: float = 1.0) -> float:
    """Distillation weight at global ``step``: linear from 0 to ``alpha`` over ``ramp_epochs``, then constant.

    ALBEF ramps over the first epoch (the default); LAVIS over two (``ramp_epochs=2``). ``ramp_epochs=0``
    disables the ramp.

    Args:
        step: global optimisation step, counted from 0.
        steps_per_epoch: optimisation steps per epoch (> 0).
        alpha: final weight.
        ramp_epochs: length of the ramp in epochs.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if ramp_epochs <= 0:
        return float(alpha)
    return float(alpha) * min(1.0, step / (ramp_epochs * steps_per_epoch))


class MomentumTwin(nn.ModuleDict):
    """Frozen EMA copies of named online parts, kept as one module (``twin["text_encoder"]`` etc.).

    All parts are deep-copied together, so weights tied across parts (an MLM decoder sharing the word
    embeddings) stay tied in the twin. :meth:`update_` is the EMA step (call it before the momentum forward
    pass, as ALBEF does), :meth:`sync_` copies the online weights (after loading pre-trained weights).

    Args:
        online: part name -> online module; the twin keeps the same names and order.
        momentum: EMA coefficient m in ``twin <- m * twin + (1 - m) * online``.
    """

    def __init__(self, online: dict[str, nn.Module] | nn.ModuleDict, momentum: float = 0.995) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        copied = momentum_copy(nn.ModuleDict(online))
        super().__init__(dict(copied.items()))
        self.momentum = float(momentum)

    def _check(self, online: dict[str, nn.Module]) -> nn.ModuleDict:
        if list(online) != list(self.keys()):
            raise KeyError(f"online parts {list(online)} do not match the twin's {list(self.keys())}")
        return nn.ModuleDict(online)

    @torch.no_grad()
    def update_(self, online: dict[str, nn.Module]) -> None:
        """``twin <- m * twin + (1 - m) * online`` for every parameter."""
        ema_update_(self, self._check(online), self.momentum)

    @torch.no_grad()
    def sync_(self, online: dict[str, nn.Module]) -> None:
        """Set the twin to a copy of the online weights (it stays frozen)."""
        copy_params_(self, self._check(online))

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"
