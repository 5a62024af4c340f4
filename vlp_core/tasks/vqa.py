"""``vqa``: answer classification (soft-score BCE) on the fused vector of any backbone, on easy-VQA or VQA v2;
evaluation = VQA accuracy (overall and per answer type)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from vlp_core.data import (
    AnswerVocab,
    VQACollator,
    VQADataset,
    eval_transform,
    load_image_file,
    load_tokenizer,
    read_easy_vqa,
    read_vqa_v2,
    train_transform,
)
from vlp_core.eval import vqa_accuracy
from vlp_core.models import AnswerClassifier, build_backbone
from vlp_core.recipes import Stage
from vlp_core.tasks.base import TaskConfig, load_backbone_weights_, register_task, resolve_init
from vlp_core.train.spec import Stream, TrainSpec

__all__ = ["VQATask"]


class VQATask(TaskConfig):
    """VQA fine-tuning. ``dataset: easy_vqa`` needs nothing else; ``vqa_v2`` needs the official questions /
    annotations JSON and the COCO image folders for training and evaluation."""

    kind: str = "vqa"
    dataset: Literal["easy_vqa", "vqa_v2"] = "easy_vqa"
    questions: str | None = Field(None, description="VQA v2 questions JSON")
    annotations: str | None = Field(None, description="VQA v2 annotations JSON")
    images: str | None = Field(None, description="VQA v2 image folder (COCO file names)")
    eval_questions_file: str | None = Field(None, description="VQA v2 evaluation questions JSON")
    eval_annotations: str | None = Field(None, description="VQA v2 evaluation annotations JSON")
    eval_images: str | None = Field(None, description="VQA v2 evaluation image folder")
    top_answers: int = Field(3129, gt=0, description="answer vocabulary: the most frequent training answers")
    eval_questions: int | None = Field(None, description="cap on test questions scored (null = all)")
    head_hidden: int | None = Field(None, description="MLP head width (default 2x the fused width)")
    head_dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _files(self) -> VQATask:
        if self.dataset == "vqa_v2":
            for split, q, i in (
                ("", self.questions, self.images),
                ("eval_", self.eval_questions_file, self.eval_images),
            ):
                if not q or not i:
                    raise ValueError(f"vqa_v2 needs task.{split}questions and task.{split}images")
        return self


def _records(task: VQATask, split: str):
    if task.dataset == "easy_vqa":
        return read_easy_vqa(split), load_image_file
    train = split == "train"
    questions = task.questions if train else task.eval_questions_file
    annotations = task.annotations if train else task.eval_annotations
    root = Path(task.images if train else task.eval_images)
    return read_vqa_v2(questions, annotations), lambda rel: load_image_file(root / rel)


def _build(config: Any, env: Any) -> TrainSpec:
    task: VQATask = config.task
    train_records, loader = _records(task, "train")
    vocab = AnswerVocab.build(train_records, top_k=task.top_answers)
    if config.data.limit is not None:
        train_records = train_records[: config.data.limit]
    backbone = build_backbone(config.backbone_config())
    init = resolve_init(config)
    if init is not None:
        load_backbone_weights_(backbone, init)
    model = AnswerClassifier(
        backbone, len(vocab), head_hidden=task.head_hidden, head_dropout=task.head_dropout
    )
    run_dir = config.resolved_run_dir()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "answer_vocab.json").write_text(json.dumps(vocab.to_dict()))
    # No flip: "left"/"right" in a question must keep meaning what it says.
    transform = train_transform(
        model.image_size, model.image_mean, model.image_std, scale=tuple(config.data.crop_scale), hflip=False
    )
    collate = VQACollator(load_tokenizer(), config.data.max_len)

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        records, test_loader = _records(task, "test")
        if task.eval_questions is not None:
            records = records[: task.eval_questions]
        records = [r for r in records if r.scores]  # unannotated test questions cannot be scored
        dataset = VQADataset(
            records,
            vocab,
            eval_transform(model.image_size, model.image_mean, model.image_std),
            image_loader=test_loader,
        )
        batches = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.eval.batch_size,
            collate_fn=collate,
            num_workers=config.data.num_workers,
        )
        logits, scores = [], []
        with torch.no_grad():
            for batch in batches:
                out = model.logits(
                    batch["pixel_values"].to(device),
                    batch["input_ids"].to(device),
                    batch["attention_mask"].to(device),
                )
                logits.append(out.float().cpu())
                scores.append(batch["answer_scores"])
        all_logits, all_scores = torch.cat(logits), torch.cat(scores)
        out = {
            "vqa_accuracy": vqa_accuracy(all_logits, all_scores),
            "n_questions": float(len(records)),
            "answer_coverage": vocab.coverage(records),
        }
        for kind in sorted({r.answer_type for r in records if r.answer_type}):
            sel = torch.tensor([r.answer_type == kind for r in records])
            out[f"vqa_accuracy_{kind.replace('/', '_')}"] = vqa_accuracy(all_logits[sel], all_scores[sel])
        return out

    info = {"questions": len(train_records), "answers": len(vocab), "init_from": config.init_from}
    return TrainSpec(
        model=model,
        streams={
            "pair": Stream(
                VQADataset(train_records, vocab, transform, image_loader=loader, seed=config.seed), collate
            )
        },
        stages=[Stage("finetune", None, kinds=("pair",))],
        evaluate=evaluate,
        info=info,
        roles=model.param_roles(),
        ddp_kwargs=model.ddp_kwargs(),
    )


register_task("vqa", VQATask, _build)
