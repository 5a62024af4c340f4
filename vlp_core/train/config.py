"""The one typed training config shared by every method and task (pre-training, VQA, retrieval fine-tuning).

Presets live in ``configs/train/*.yaml``; dotted ``--set`` overrides apply on top; every run writes its
resolved config to ``<run_dir>/config.yaml``. Model and pair-data sections stay plain dicts here and are
validated by the method's own config class (``vlp_core.models``) and by ``vlp_core.data.PairsConfig``, so
a new method adds its options without touching this file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vlp_core.config import load_yaml_config
from vlp_core.paths import DataLayout

__all__ = ["DataConfig", "EvalConfig", "OptimConfig", "TrainConfig", "load_train_config"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OptimConfig(_Strict):
    """AdamW with linear warm-up then cosine decay to ``min_lr`` (ALBEF: 1e-4 → 1e-5, wd 0.02)."""

    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.02, ge=0, description="not applied to biases, norms and 1-d parameters")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = Field(0, ge=0)
    clip_grad_norm: float | None = Field(1.0, description="max global grad norm; null disables clipping")


class DataConfig(_Strict):
    """Where samples come from. ``task=pretrain|retrieval`` read corpus pairs; ``task=vqa`` reads VQA data."""

    pairs: dict[str, Any] = Field(default_factory=dict, description="vlp_core.data.PairsConfig fields")
    max_len: int = Field(30, gt=2, description="text tokens incl. [CLS]/[SEP]")
    num_workers: int = Field(2, ge=0)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    randaugment: bool = False
    whole_word_mask: bool = False
    # VQA
    vqa_dataset: Literal["easy_vqa", "vqa_v2"] = "easy_vqa"
    vqa_questions: str | None = Field(None, description="VQA v2 questions JSON (vqa_dataset=vqa_v2)")
    vqa_annotations: str | None = Field(None, description="VQA v2 annotations JSON")
    vqa_images: str | None = Field(None, description="VQA v2 image folder (COCO file names)")
    vqa_eval_questions: str | None = Field(None, description="VQA v2 evaluation questions JSON")
    vqa_eval_annotations: str | None = Field(None, description="VQA v2 evaluation annotations JSON")
    vqa_eval_images: str | None = Field(None, description="VQA v2 evaluation image folder")
    vqa_top_answers: int = Field(3129, gt=0)
    limit: int | None = Field(None, description="cap on training samples (small runs)")


class EvalConfig(_Strict):
    """Evaluation after training (and every ``every`` steps when > 0)."""

    retrieval_images: int | None = Field(500, description="cap on held-out images scored (null = all)")
    itm_rerank_k: int = Field(16, ge=0, description="re-rank each query's ITC top-k with ITM (0 = ITC only)")
    batch_size: int = Field(64, gt=0)
    vqa_questions: int | None = Field(None, description="cap on VQA test questions scored (null = all)")
    every: int = Field(0, ge=0)


class TrainConfig(_Strict):
    """Everything one training run needs; ``batch_size`` is the GLOBAL batch per optimiser step."""

    task: Literal["pretrain", "vqa", "retrieval"] = "pretrain"
    method: str = "albef"
    preset: str = Field("tiny", description="model preset of the method (tiny | base)")
    model: dict[str, Any] = Field(default_factory=dict, description="nested overrides of the model preset")
    init_from: str | None = Field(None, description="checkpoint dir/file of a pre-training run to start from")
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

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.optim.min_lr > self.optim.lr:
            raise ValueError(f"optim.min_lr {self.optim.min_lr} > optim.lr {self.optim.lr}")
        return self

    def layout(self) -> DataLayout:
        return (
            DataLayout(Path(self.data_dir).expanduser().resolve()) if self.data_dir else DataLayout.default()
        )

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir).expanduser().resolve()
        return self.layout().runs / "train" / f"{self.task}-{self.method}-{self.name}"


def load_train_config(
    name_or_path: str = "albef_tiny", overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """``configs/train/<name>.yaml`` (or a YAML path) + dotted overrides (``optim.lr=3e-4``)."""
    return TrainConfig.model_validate(load_yaml_config("train", name_or_path, overrides))
