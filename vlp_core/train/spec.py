"""What a task hands the training loop: a :class:`TrainSpec` (model, batch streams, stages, optimiser
groups, evaluation, stateful parts, DDP arguments), and the batch mixer that picks a stream per step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vlp_core.data.sampler import sample_seed
from vlp_core.recipes.base import Stage

__all__ = ["BatchMixer", "Stateful", "Stream", "TrainSpec", "param_groups", "stage_bounds"]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Stream:
    """One kind of batch (``"pair"``, ``"image"``, ``"text"``, ...): a map-style dataset keyed by the
    sampler's ``(epoch, index)`` and its collate function. Each stream has its own resumable sampler."""

    dataset: Dataset
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]


@dataclass
class TrainSpec:
    """Everything the loop needs from a task.

    Attributes:
        model: returns a ``ModelOutput`` from ``model(batch, step=, steps_per_epoch=, kind=, stage=)``.
        streams: batch kind -> :class:`Stream`.
        stages: the stages in order (``Stage.steps=None`` for the last = the rest of ``max_steps``).
        evaluate: ``evaluate(model, device) -> {name: number}`` on rank 0 (every ``eval.every`` steps and
            after the last step), or ``None``.
        info: facts written to ``run.json`` (dataset sizes, ...).
        roles: name -> modules, for ``optim.lr_mult`` (e.g. ``{"vision_pretrained": [cnn]}``).
        state: extra stateful components checkpointed by name (besides the model, the optimiser, the
            schedule, the samplers and the stage position, which the loop owns).
        ddp_kwargs: extra ``DistributedDataParallel`` arguments (``find_unused_parameters`` for experts).
    """

    model: nn.Module
    streams: dict[str, Stream]
    stages: list[Stage]
    evaluate: Callable[[nn.Module, torch.device], dict[str, float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    roles: dict[str, list[nn.Module]] = field(default_factory=dict)
    state: dict[str, Stateful] = field(default_factory=dict)
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for stage in self.stages:
            missing = [k for k in stage.kinds if k not in self.streams]
            if missing:
                raise ValueError(
                    f"stage {stage.name} draws {missing} but the task has streams {list(self.streams)}"
                )
        if any(s.steps is None for s in self.stages[:-1]):
            raise ValueError("only the last stage may run for the rest of max_steps (steps: null)")


def stage_bounds(stages: list[Stage], max_steps: int) -> list[tuple[int, int]]:
    """``[(first_step, end_step), ...]`` of each stage; the stages must cover exactly ``max_steps``."""
    bounds, start = [], 0
    for i, stage in enumerate(stages):
        n = stage.steps if stage.steps is not None else max_steps - start
        if n < 1:
            raise ValueError(f"stage {stage.name} has no steps left of max_steps={max_steps}")
        bounds.append((start, start + n))
        start += n
        if i == len(stages) - 1 and start != max_steps:
            raise ValueError(
                f"the stages ({', '.join(f'{s.name}={s.steps}' for s in stages)}) add up to {start} steps, "
                f"max_steps is {max_steps}"
            )
    return bounds


class BatchMixer:
    """Which batch kind a step of a stage draws: a pure function of (seed, stage, step), so every rank
    draws the same kind and a resumed run draws exactly what the uninterrupted run drew. Its position is
    the step, which the checkpoint records.

    - ``round_robin``: ``kinds[step_in_stage % len(kinds)]`` (FLAVA, U-VisualBERT).
    - ``weighted``: a draw with ``weights`` from a generator seeded by ``(seed, stage, step)`` (UniT's
      multitask sampling ratios).
    """

    def __init__(self, stage: Stage, stage_index: int, seed: int) -> None:
        self.kinds = tuple(stage.kinds)
        self.mixing = stage.mixing
        self.stage_index = stage_index
        self.seed = seed
        w = np.array([stage.weights.get(k, 0.0) for k in self.kinds], dtype=np.float64)
        self.probs = (
            w / w.sum() if self.mixing == "weighted" else np.full(len(self.kinds), 1 / len(self.kinds))
        )

    def kind(self, step_in_stage: int) -> str:
        if self.mixing == "round_robin" or len(self.kinds) == 1:
            return self.kinds[step_in_stage % len(self.kinds)]
        rng = np.random.default_rng(sample_seed(self.seed, 1_000_003 + self.stage_index, step_in_stage))
        return self.kinds[int(rng.choice(len(self.kinds), p=self.probs))]

    def share(self, kind: str) -> float:
        """Expected fraction of the stage's steps that draw ``kind``."""
        return float(self.probs[self.kinds.index(kind)])


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_mult: dict[str, float] | None = None,
    roles: dict[str, list[nn.Module]] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices only (biases, norms and other 1-d parameters are not decayed), times
    a learning-rate multiplier per role.

    ``lr_mult`` maps a role of ``roles`` (modules, chosen structurally by the backbone) to a multiplier; a
    parameter takes the multiplier of the last listed role whose modules contain it, 1.0 otherwise. A
    multiplier of 0 freezes the role (``requires_grad=False``; it is left out of the optimiser). Only
    trainable parameters enter the groups. Each group carries ``lr_mult`` for the schedule.
    """
    lr_mult, roles = dict(lr_mult or {}), dict(roles or {})
    unknown = sorted(set(lr_mult) - set(roles))
    if unknown:
        raise KeyError(f"optim.lr_mult names unknown roles {unknown} (this model has {sorted(roles)})")
    mult: dict[int, float] = {}
    for role, factor in lr_mult.items():
        for module in roles[role]:
            for p in module.parameters():
                mult[id(p)] = float(factor)
                if factor == 0:
                    p.requires_grad_(False)
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        groups.setdefault((no_decay, mult.get(id(p), 1.0)), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr_mult": m}
        for (nd, m), ps in sorted(groups.items(), key=lambda kv: (kv[0][1] != 1.0, kv[0][0], kv[0][1]))
    ]
