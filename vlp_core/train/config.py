"""The one typed training config shared by every method and task.

A run is three separate choices, each from a registry and validated when the config is loaded:

- ``backbone`` (what the network is; :mod:`vlp_core.models.backbones`): overrides over the ``preset`` of the
  kind, which defaults to the method's backbone kind — or, when ``init_from`` names a run, to that run's
  backbone (fine-tuning builds exactly the network that was pre-trained, whatever the method);
- ``method`` + ``recipe`` (how it is pre-trained; :mod:`vlp_core.recipes`): overrides of the method's recipe
  config (loss weights, queue sizes, stage lengths, ...);
- ``task`` (what it is trained / evaluated for; :mod:`vlp_core.tasks`): ``{kind: pretrain | retrieval |
  vqa, ...}`` with the task's own typed fields.

Presets live in ``configs/train/*.yaml``; dotted ``--set`` overrides apply on top; every run writes its config
to ``<run_dir>/config.yaml``. A new method, backbone or task adds its options in its own config class,
without touching this file.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_serializer,
    field_validator,
    model_validator,
)

from vlp_core.config import load_yaml_config
from vlp_core.paths import DataLayout

__all__ = ["DataConfig", "EvalConfig", "OptimConfig", "TrainConfig", "load_train_config", "run_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimConfig(_Strict):
    """AdamW with linear warm-up then cosine decay to ``min_lr`` (ALBEF: 1e-4 → 1e-5, wd 0.02), per stage."""

    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.02, ge=0, description="not applied to biases, norms and 1-d parameters")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = Field(0, ge=0)
    clip_grad_norm: float | None = Field(1.0, description="max global grad norm; null disables clipping")
    impl: Literal["fused", "foreach", "loop"] = Field(
        "fused",
        description="AdamW's implementation: one fused kernel over all parameters (default: its optimiser "
        "phase ran 3-7x faster than torch's per-parameter loop in benchmarks/step.py), multi-tensor "
        "(foreach), or the per-parameter loop; the same update up to float rounding",
    )
    lr_mult: dict[str, float] = Field(
        default_factory=dict,
        description="learning-rate multiplier per backbone role (vision, vision_pretrained, text, fusion, "
        "...); 0 freezes the role",
    )

    @field_validator("lr_mult")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: m for k, m in v.items() if m < 0}
        if bad:
            raise ValueError(f"lr_mult must be >= 0, got {bad}")
        return v


class DataConfig(_Strict):
    """Sample preparation shared by the tasks (the task says which data; see its config)."""

    pairs: dict[str, Any] = Field(default_factory=dict, description="vlp_core.data.PairsConfig fields")
    max_len: int = Field(30, gt=2, description="text tokens incl. [CLS]/[SEP]")
    num_workers: int = Field(2, ge=0)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    randaugment: bool = False
    whole_word_mask: bool = False
    limit: int | None = Field(None, description="cap on training samples (small runs)")

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, v: dict[str, Any]) -> dict[str, Any]:
        from vlp_core.data import PairsConfig

        try:
            PairsConfig(**v)
        except TypeError as exc:
            raise ValueError(f"data.pairs: {exc}") from None
        return v


class EvalConfig(_Strict):
    """Evaluation after training, and every ``every`` steps when > 0."""

    retrieval_images: int | None = Field(500, description="cap on held-out images scored (null = all)")
    itm_rerank_k: int = Field(16, ge=0, description="re-rank each query's ITC top-k with ITM (0 = ITC only)")
    all_pairs_max: int = Field(
        20000,
        ge=0,
        description="single-stream models (no dual encoder) score every image-text pair with the match head "
        "when images x texts <= this; above it they re-rank the pooled-cosine top itm_rerank_k",
    )
    batch_size: int = Field(64, gt=0)
    every: int = Field(0, ge=0, description="also evaluate every N steps (0 = only at the end)")


def run_config(path: str | Path) -> TrainConfig | None:
    """The config of the run that ``path`` (a run dir, one of its checkpoints or its weights file) belongs
    to, or ``None`` when there is no run config there."""
    p = Path(path).expanduser()
    for candidate in (p, p.parent, p.parent.parent, p.parent.parent.parent):
        f = candidate / "config.yaml"
        if f.is_file() and (candidate / "checkpoints").is_dir():
            return TrainConfig.model_validate(yaml.safe_load(f.read_text()))
    return None


class TrainConfig(_Strict):
    """Everything one training run needs; ``batch_size`` is the GLOBAL batch per optimiser step."""

    task: Any = Field(
        "pretrain", validate_default=True, description="{kind: pretrain | retrieval | vqa, ...task fields}"
    )
    method: str | None = Field(None, description="the recipe (albef | vlmo | flava); default: init_from's")
    preset: str = Field("tiny", description="size preset of the backbone and the recipe (tiny | base)")
    backbone: dict[str, Any] = Field(default_factory=dict, description="overrides of the backbone preset")
    recipe: dict[str, Any] = Field(default_factory=dict, description="overrides of the method's recipe")
    init_from: str | None = Field(None, description="run / checkpoint dir / weights file to start from")
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    batch_size: int = Field(32, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int = Field(200, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA")
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    seed: int = 0
    data_dir: str | None = Field(None, description="data directory (default $VLP_DATA_DIR or <repo>/data)")
    run_dir: str | None = Field(None, description="default <data>/runs/train/<task>-<method>-<name>")
    name: str = "run"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    _backbone: Any = PrivateAttr(None)
    _recipe: Any = PrivateAttr(None)
    _init_run: Any = PrivateAttr(None)

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, v: Any) -> Any:
        from vlp_core.tasks import task_config

        return task_config(v)

    @field_serializer("task")
    def _dump_task(self, v: Any) -> dict[str, Any]:
        return v.model_dump(mode="json")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        from vlp_core.models.backbones import backbone_config
        from vlp_core.models.configs import config_from_dict
        from vlp_core.recipes import RECIPES, default_backbone_kind, recipe_config

        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr {self.optim.min_lr} > optim.lr {self.optim.lr}")
        run = self.init_run()
        if run is not None:
            if self.method is None:
                self.method = run.method
            elif self.method != run.method and self.task.kind == "retrieval":
                raise ValueError(f"init_from is a {run.method} run; retrieval fine-tunes it as {run.method}")
        self.method = self.method or "albef"
        try:
            # A recipe's own ``seed`` (e.g. ITM negative draws) follows the run's seed unless set.
            overrides = dict(self.recipe)
            if "seed" in {f.name for f in fields(RECIPES[self.method].config)}:
                overrides.setdefault("seed", self.seed)
            self._recipe = recipe_config(self.method, overrides, preset=self.preset)
            if run is not None:
                base = run.backbone_config()
                kind = self.backbone.get("kind", base.registry_kind)
                if kind != base.registry_kind:
                    raise ValueError(
                        f"init_from is a {base.registry_kind} run; backbone.kind {kind!r} does not fit"
                    )
                self._backbone = config_from_dict(
                    base, {k: v for k, v in self.backbone.items() if k != "kind"}
                )
            else:
                kind = self.backbone.get("kind", default_backbone_kind(self.method))
                self._backbone = backbone_config({**self.backbone, "kind": kind}, preset=self.preset)
        except KeyError as exc:  # unknown method / kind / field: a validation error at load time
            raise ValueError(str(exc).strip("'\"")) from None
        return self

    def init_path(self) -> Path | None:
        """``init_from`` with ``{data}`` expanded to the data directory."""
        return Path(self.init_from.format(data=self.layout().root)) if self.init_from else None

    def init_run(self) -> TrainConfig | None:
        """The config of the run ``init_from`` names, when it exists already (else ``None``)."""
        if self._init_run is None and self.init_from:
            path = self.init_path()
            self._init_run = run_config(path) if path is not None and path.exists() else None
        return self._init_run

    def backbone_config(self) -> Any:
        """The typed backbone config (a :class:`~vlp_core.models.backbones.BackboneConfig`)."""
        return self._backbone

    def recipe_config(self) -> Any:
        """The typed recipe config of :attr:`method` (a :class:`~vlp_core.recipes.RecipeConfig`)."""
        return self._recipe

    def layout(self) -> DataLayout:
        return (
            DataLayout(Path(self.data_dir).expanduser().resolve()) if self.data_dir else DataLayout.default()
        )

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir).expanduser().resolve()
        return self.layout().runs / "train" / f"{self.task.kind}-{self.method}-{self.name}"


def load_train_config(
    name_or_path: str = "albef_tiny", overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """``configs/train/<name>.yaml`` (or a YAML path) + dotted overrides (``optim.lr=3e-4``)."""
    return TrainConfig.model_validate(load_yaml_config("train", name_or_path, overrides))
