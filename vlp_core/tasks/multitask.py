"""``multitask``: one backbone trained jointly on several tasks (UniT's setting), any backbone.

Each sub-task is built by its own task builder around the one shared backbone (its head, its stream, its
evaluation), so a multitask run and a single-task run of the same task use the same data, head and metric.
A step draws one task with the configured sampling ratios (the trainer's ``weighted`` mixing: a pure function
of the seed and the step, so every rank draws the same task and a resumed run draws what the uninterrupted run
drew) and trains on a batch of that task. Backbones with task-specific parts (UniT's per-task decoder queries)
switch to the step's task (:meth:`~vlp_core.models.backbones.Backbone.task_context`).

Metrics and evaluation results are prefixed with the task: ``nlvr2/accuracy``, ``vqa/vqa_accuracy``, ...
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from vlp_core.models import build_backbone
from vlp_core.models.backbones import Backbone, OnBackbone
from vlp_core.models.outputs import ModelOutput
from vlp_core.recipes import Stage
from vlp_core.tasks.base import (
    TASKS,
    TaskConfig,
    load_backbone_weights_,
    register_task,
    resolve_init,
    task_config,
)
from vlp_core.train.spec import TrainSpec

__all__ = ["MultiTask", "MultiTaskModel"]


class MultiTask(TaskConfig):
    """``tasks``: task kind -> that task's config fields (``{}`` for its defaults); ``ratios``: task kind ->
    sampling weight (normalised; default equal). UniT's reference ratios were VQA 0.26, SNLI-VE 0.12,
    detection 0.27, GLUE 0.35 (tasks this project does not all have)."""

    kind: str = "multitask"
    tasks: dict[str, dict[str, Any]] = Field(..., min_length=1)
    ratios: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> MultiTask:
        for kind, fields in self.tasks.items():
            if kind not in TASKS or kind == "multitask":
                raise ValueError(f"multitask: unknown or unsupported task {kind!r} (known: {sorted(TASKS)})")
            if "backbone" not in inspect.signature(TASKS[kind].build).parameters:
                raise ValueError(f"multitask: task {kind!r} cannot share a backbone")
            task_config({**fields, "kind": kind})  # a bad field is an error at load time
        unknown = sorted(set(self.ratios) - set(self.tasks))
        if unknown or any(w < 0 for w in self.ratios.values()):
            raise ValueError(f"multitask: ratios {self.ratios} name unknown tasks {unknown} or are negative")
        if self.ratios and not sum(self.ratios.get(k, 0.0) for k in self.tasks):
            raise ValueError("multitask: the ratios sum to 0")
        return self

    def store_datasets(self) -> list[str]:
        return [
            d
            for kind, fields in self.tasks.items()
            for d in task_config({**fields, "kind": kind}).store_datasets()
        ]

    def reads_corpus(self) -> bool:
        return any(
            task_config({**fields, "kind": kind}).reads_corpus() for kind, fields in self.tasks.items()
        )

    def weights(self) -> dict[str, float]:
        raw = {k: (self.ratios.get(k, 0.0) if self.ratios else 1.0) for k in self.tasks}
        total = sum(raw.values())
        return {k: v / total for k, v in raw.items()}


class MultiTaskModel(OnBackbone, nn.Module):
    """One backbone, one head set per task. ``forward(batch, kind=<task>)`` runs that task's model under
    the backbone's task context. The backbone is registered once (``backbone.*``), each task's own modules
    under ``heads.<task>.*``, so the state dict holds every tensor once."""

    def __init__(self, backbone: Backbone, models: dict[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(
            {
                kind: nn.ModuleDict({n: c for n, c in m.named_children() if c is not backbone})
                for kind, m in models.items()
            }
        )
        self.models = dict(models)  # a plain dict: not registered a second time

    def task_model(self, kind: str) -> nn.Module:
        return self.models[kind]

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        *,
        step: int = 0,
        steps_per_epoch: int = 1,
        kind: str = "pair",
        stage: str | None = None,
    ) -> ModelOutput:
        if kind not in self.models:
            raise ValueError(f"no task {kind!r} in this multitask model ({sorted(self.models)})")
        with self.backbone.task_context(kind):
            out = self.models[kind](
                batch, step=step, steps_per_epoch=steps_per_epoch, kind="pair", stage=stage
            )
        out.metrics = {f"{kind}/{k}": v for k, v in out.metrics.items()}
        return out

    def ddp_kwargs(self) -> dict[str, Any]:
        return {**self.backbone.ddp_kwargs(), "find_unused_parameters": True}  # other tasks' heads idle


def _build(config: Any, env: Any) -> TrainSpec:
    task: MultiTask = config.task
    backbone = build_backbone(config.backbone_config())
    init = resolve_init(config)
    if init is not None:
        load_backbone_weights_(backbone, init)
    run_dir = config.resolved_run_dir()
    specs = {}
    for kind, fields in task.tasks.items():
        sub = config.model_copy(
            update={"task": task_config({**fields, "kind": kind}), "run_dir": str(run_dir / kind)}
        )
        specs[kind] = TASKS[kind].build(sub, env, backbone=backbone)
    model = MultiTaskModel(backbone, {k: s.model for k, s in specs.items()})
    weights = task.weights()

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, spec in specs.items():
            if spec.evaluate is None:
                continue
            with model.backbone.task_context(kind):
                res = spec.evaluate(model.task_model(kind), device)
            out.update({f"{kind}/{k}": v for k, v in res.items()})
        return out

    stage = Stage("multitask", None, kinds=tuple(specs), mixing="weighted", weights=weights)
    return TrainSpec(
        model=model,
        streams={k: s.streams["pair"] for k, s in specs.items()},
        stages=[stage],
        evaluate=evaluate,
        info={
            "tasks": {k: s.info for k, s in specs.items()},
            "ratios": weights,
            "init_from": config.init_from,
        },
        roles=model.param_roles(),
        ddp_kwargs=model.ddp_kwargs(),
    )


register_task("multitask", MultiTask, _build)
