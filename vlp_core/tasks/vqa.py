"""``vqa``: answer classification (soft-score BCE) on the fused vector of any backbone, on easy-VQA or VQA v2;
evaluation = VQA accuracy (overall and per answer type)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from stores.shards import ShardStore
from vlp_core.corpus.ingest import content_id
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
from vlp_core.data.regions import RegionCollator, RegionConfig, RegionVQADataset
from vlp_core.eval import vqa_accuracy
from vlp_core.models import AnswerClassifier, build_backbone
from vlp_core.recipes import Stage
from vlp_core.tasks.base import (
    TaskConfig,
    fit_region_stats_,
    load_backbone_weights_,
    register_task,
    resolve_init,
)
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
    store_images_only: bool = Field(
        False,
        description="keep only questions whose image is in the corpus store (the same questions for pixel "
        "and region backbones; region backbones need the store's regions of every image they see)",
    )
    regions: dict[str, Any] = Field(
        default_factory=dict, description="RegionConfig fields (region backbones)"
    )

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

    def reads_corpus(self) -> bool:
        """Yes, whatever the backbone: with ``store_images_only`` its questions are those whose image is in
        the corpus store, and region backbones read the store's regions of its images."""
        return True


def _records(task: VQATask, split: str):
    """``(records, image loader, image path of a record's image)`` of a split."""
    if task.dataset == "easy_vqa":
        return read_easy_vqa(split), load_image_file, Path
    train = split == "train"
    questions = task.questions if train else task.eval_questions_file
    annotations = task.annotations if train else task.eval_annotations
    root = Path(task.images if train else task.eval_images)
    return (
        read_vqa_v2(questions, annotations),
        lambda rel: load_image_file(root / rel),
        lambda rel: root / rel,
    )


def _store_ids(records: list[Any], path_of: Any) -> list[str]:
    """The corpus id of each record's image: the content hash of its file, as ingest computes it."""
    ids: dict[str, str] = {}
    for r in records:
        if r.image not in ids:
            ids[r.image] = content_id(Path(path_of(r.image)).read_bytes())
    return [ids[r.image] for r in records]


def _in_store(task: VQATask, store: ShardStore, split: str, region: bool) -> tuple[list[Any], Any, list[str]]:
    """A split's records (only those with a stored image when ``store_images_only``), their image loader and
    (when needed) their store ids."""
    records, loader, path_of = _records(task, split)
    if not (task.store_images_only or region):
        return records, loader, []
    ids = _store_ids(records, path_of)
    if task.store_images_only:
        stored = set(store.read_table("images", ["image_id"])["image_id"].to_pylist())
        keep = [i for i, x in enumerate(ids) if x in stored]
        if not keep:
            raise ValueError(
                f"no {split} question's image is in the corpus store {store.root}: ingest the VQA images "
                "(configs/corpus/quickstart.yaml has an easy_vqa source) or set task.store_images_only=false"
            )
        records, ids = [records[i] for i in keep], [ids[i] for i in keep]
    return records, loader, ids


def _build(config: Any, env: Any, backbone: nn.Module | None = None) -> TrainSpec:
    """The VQA spec; ``backbone``: use this one (e.g. shared by a multitask model) instead of building it
    and loading ``init_from``."""
    task: VQATask = config.task
    store = ShardStore(config.layout().store)
    given = backbone is not None
    backbone = backbone if given else build_backbone(config.backbone_config())
    backbone.use_task(task.kind)
    region = backbone.image_input_kind == "regions"
    train_records, loader, train_ids = _in_store(task, store, "train", region)
    vocab = AnswerVocab.build(train_records, top_k=task.top_answers)
    if config.data.limit is not None:
        train_records, train_ids = train_records[: config.data.limit], train_ids[: config.data.limit]
    init = None if given else resolve_init(config)
    if init is not None:
        load_backbone_weights_(backbone, init)
    fitted = fit_region_stats_(backbone, store, train_ids) if region else {}
    model = AnswerClassifier(
        backbone, len(vocab), head_hidden=task.head_hidden, head_dropout=task.head_dropout
    )
    run_dir = config.resolved_run_dir()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "answer_vocab.json").write_text(json.dumps(vocab.to_dict()))
    tokenizer = load_tokenizer()
    if region:
        # Regions are the image (question + regions, no tags); no augmentation.
        cfg = RegionConfig(**task.regions)
        collate = RegionCollator(tokenizer, config.data.max_len, cfg=cfg)

        def dataset(records: list[Any], ids: list[str], _loader: Any, train: bool) -> Any:
            return RegionVQADataset(store, records, ids, vocab, cfg, seed=config.seed if train else 0)
    else:
        collate = VQACollator(tokenizer, config.data.max_len)
        # No flip: "left"/"right" in a question must keep meaning what it says.
        train_tf = train_transform(
            model.image_size, model.image_mean, model.image_std, scale=tuple(config.data.crop_scale),
            hflip=False,
        )  # fmt: skip

        def dataset(records: list[Any], ids: list[str], image_loader: Any, train: bool) -> Any:
            if train:
                return VQADataset(records, vocab, train_tf, image_loader=image_loader, seed=config.seed)
            tf = eval_transform(model.image_size, model.image_mean, model.image_std)
            return VQADataset(records, vocab, tf, image_loader=image_loader)

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        records, test_loader, ids = _in_store(task, store, "test", region)
        if task.eval_questions is not None:
            records, ids = records[: task.eval_questions], ids[: task.eval_questions]
        keep = [i for i, r in enumerate(records) if r.scores]  # unannotated test questions cannot be scored
        records, ids = [records[i] for i in keep], [ids[i] for i in keep] if ids else []
        batches = torch.utils.data.DataLoader(
            dataset(records, ids, test_loader, train=False),
            batch_size=config.eval.batch_size,
            collate_fn=collate,
            num_workers=config.data.num_workers,
        )
        logits, scores = [], []
        with torch.no_grad():
            for batch in batches:
                out = model.logits(
                    model.image_batch(batch).to(device),
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

    info = {
        "questions": len(train_records),
        "images": len(set(r.image for r in train_records)),
        "answers": len(vocab),
        "init_from": config.init_from,
        **fitted,
    }
    return TrainSpec(
        model=model,
        streams={"pair": Stream(dataset(train_records, train_ids, loader, train=True), collate)},
        stages=[Stage("finetune", None, kinds=("pair",))],
        evaluate=evaluate,
        info=info,
        roles=model.param_roles(),
        ddp_kwargs=model.ddp_kwargs(),
    )


register_task("vqa", VQATask, _build)
