"""The task interface and registry: a task turns a :class:`TrainConfig` into a :class:`TrainSpec`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

__all__ = [
    "TASKS",
    "TaskConfig",
    "build_spec",
    "fit_region_stats_",
    "load_backbone_weights_",
    "register_task",
    "resolve_init",
    "task_config",
]


class TaskConfig(BaseModel):
    """Base of task configs (pydantic, strict); ``kind`` is the registry key."""

    model_config = ConfigDict(extra="forbid")
    kind: str

    def store_datasets(self) -> list[str]:
        """The ``task_examples`` datasets the task reads (their versions key benchmark runs); none by
        default."""
        return []

    def reads_corpus(self) -> bool:
        """Whether the task reads the corpus store (its pairs, images or regions), so that a rebuilt corpus
        re-keys benchmark runs of it; by default, a task that reads no task dataset does."""
        return not self.store_datasets()


@dataclass
class _Entry:
    config: type[TaskConfig]
    build: Callable[[Any, Any], Any]


#: task kind -> its config model and its ``build(config, env) -> TrainSpec``.
TASKS: dict[str, _Entry] = {}


def register_task(kind: str, config: type[TaskConfig], build: Callable[[Any, Any], Any]) -> None:
    if kind in TASKS:
        raise KeyError(f"task {kind!r} is already registered")
    TASKS[kind] = _Entry(config, build)


def task_config(v: Any) -> TaskConfig:
    """``"vqa"`` or ``{"kind": "vqa", ...}`` (or a config already) -> the typed task config."""
    if isinstance(v, TaskConfig):
        return v
    d = {"kind": v} if isinstance(v, str) else dict(v or {})
    kind = d.get("kind")
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r} (known: {sorted(TASKS)})")
    return TASKS[kind].config.model_validate(d)


def build_spec(config: Any, env: Any) -> Any:
    """The :class:`~vlp_core.train.spec.TrainSpec` of ``config.task``."""
    return TASKS[config.task.kind].build(config, env)


def resolve_init(config: Any) -> dict[str, torch.Tensor] | None:
    """The weights named by ``init_from`` (``{data}`` expands to the data directory), or None."""
    from vlp_core.train.checkpoint import load_pretrained_weights

    path = config.init_path()
    if path is None:
        return None
    if not Path(path).exists():
        raise FileNotFoundError(
            f"init_from {path} does not exist: run pre-training first (prefect deployment run "
            f"pretrain/{config.method}) or pass init_from=<run or checkpoint dir>"
        )
    return load_pretrained_weights(path)


def _unwrap_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    # DDP and torch.compile wrappers prefix every name.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def fit_region_stats_(backbone: torch.nn.Module, store: Any, image_ids: Any) -> dict[str, int]:
    """Fit a region backbone's feature standardisation on the training images' regions, unless it has
    been fitted (or loaded from ``init_from``) already; a no-op for other backbones. Returns facts for
    ``run.json``."""
    if not getattr(backbone, "needs_feature_stats", False):
        return {}
    from vlp_core.data.regions import region_feature_sample

    feats = region_feature_sample(store, list(image_ids))
    backbone.region_embed.fit_stats_(feats)
    return {"region_stats_regions": int(feats.shape[0])}


def load_backbone_weights_(backbone: torch.nn.Module, state: dict[str, Any] | str | Path) -> None:
    """Load a backbone from any run's weights (the ``backbone.*`` entries of a recipe or task model, or a
    plain backbone state dict), strictly: every backbone tensor must be there with its shape."""
    if not isinstance(state, dict):
        state = torch.load(state, map_location="cpu", weights_only=True)
    state = _unwrap_state(state)
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(
            f"the weights do not fit this {type(backbone).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
