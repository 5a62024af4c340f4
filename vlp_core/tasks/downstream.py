"""The downstream tasks over the store's ``task_examples``, for any backbone (pixels, or the regions the
task-regions stage makes of the task's images for region backbones):

- ``nlvr2``: a statement about two images, true / false (:class:`~vlp_core.models.FusedClassifier` over two
  fused passes); accuracy.
- ``snli_ve``: image premise + hypothesis, entailment / neutral / contradiction; accuracy.
- ``gqa``: answer classification over the most frequent training answers; exact-match accuracy (an answer
  outside the vocabulary is wrong), also per question type.
- ``refcoco``: score each candidate box for the expression (:class:`~vlp_core.models.BoxScorer`: candidate-box
  pooling on grid backbones, the candidates' own regions on region backbones); accuracy = IoU > 0.5 with the
  target box, per split (RefCOCO+: val, testA, testB).

Each task names a ``dataset`` (a task in the store: a bundled scene task by default, or a real dataset
imported with ``vlp import-task``), the split it trains on and the splits it is evaluated on. Image-text
retrieval on Karpathy-shaped data is the ``retrieval`` task with ``dataset`` set
(:mod:`vlp_core.tasks.retrieval`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from stores.shards import ShardStore
from vlp_core.data import eval_transform, load_tokenizer, train_transform
from vlp_core.data.examples import ENTAILMENT_LABELS, NLVR2_LABELS
from vlp_core.data.regions import RegionConfig
from vlp_core.data.task_data import (
    ExampleCollator,
    ExampleDataset,
    LabelVocab,
    RegionExampleCollator,
    RegionExampleDataset,
    TaskImages,
    read_task_examples,
)
from vlp_core.models import BoxScorer, FusedClassifier, build_backbone
from vlp_core.models.heads import ref_hits
from vlp_core.recipes import Stage
from vlp_core.tasks.base import (
    TaskConfig,
    fit_region_stats_,
    load_backbone_weights_,
    register_task,
    resolve_init,
)
from vlp_core.train.spec import Stream, TrainSpec

__all__ = ["ExampleTask", "GQATask", "NLVR2Task", "RefTask", "SNLIVETask"]


class ExampleTask(TaskConfig):
    """What the tasks over ``task_examples`` share."""

    dataset: str = Field(..., description="the task's examples in the store (bundled scene task or imported)")
    train_split: str = "train"
    eval_splits: list[str] = Field(default_factory=lambda: ["test"], min_length=1)
    eval_examples: int | None = Field(None, gt=0, description="cap on examples scored per split (null = all)")
    augment: Literal["none", "crop"] = Field(
        "none",
        description="none: resize only (labels that count or refer to objects survive); crop: "
        "RandomResizedCrop(data.crop_scale), never a flip",
    )
    head_hidden: int | None = Field(None, description="MLP head width (default 2x the fused width)")
    head_dropout: float = Field(0.0, ge=0, lt=1)
    blind: Literal["none", "text", "image"] = Field(
        "none",
        description="single-modality baselines, in training and evaluation alike: text = every image "
        "replaced by a uniform grey one (a text-only model), image = every text empty (an image-only one)",
    )
    regions: dict[str, Any] = Field(
        default_factory=dict,
        description="RegionConfig fields (region backbones; max_regions is raised to fit every candidate)",
    )

    def store_datasets(self) -> list[str]:
        return [self.dataset]


class NLVR2Task(ExampleTask):
    kind: str = "nlvr2"
    dataset: str = "scene-pairs"


class SNLIVETask(ExampleTask):
    kind: str = "snli_ve"
    dataset: str = "scene-entailment"


class GQATask(ExampleTask):
    kind: str = "gqa"
    dataset: str = "scene-qa"
    top_answers: int = Field(1842, gt=1, description="answer vocabulary: the most frequent training answers")
    breakdown: list[str] = Field(
        default_factory=lambda: ["qtype", "structural"],
        description="meta fields to report accuracy per value of (question types)",
    )


class RefTask(ExampleTask):
    kind: str = "refcoco"
    dataset: str = "scene-refs"
    eval_splits: list[str] = Field(default_factory=lambda: ["val", "testA", "testB"], min_length=1)


def _transforms(config: Any, model: nn.Module) -> tuple[Callable, Callable]:
    test = eval_transform(model.image_size, model.image_mean, model.image_std)
    if config.task.augment == "none":
        return test, test
    train = train_transform(
        model.image_size, model.image_mean, model.image_std, scale=tuple(config.data.crop_scale), hflip=False
    )
    return train, test


def _build_examples(
    config: Any,
    env: Any,
    make_model: Callable[[nn.Module, Any], nn.Module],
    labels: Any,
    backbone: nn.Module | None = None,
) -> TrainSpec:
    """The spec of a task over ``task_examples``: the backbone (from ``init_from``, or the one given, e.g.
    shared by a multitask model), the head ``make_model`` puts on it, the training stream and the per-split
    evaluation."""
    task: ExampleTask = config.task
    store = ShardStore(config.layout().store)
    given = backbone is not None
    backbone = backbone if given else build_backbone(config.backbone_config())
    region = backbone.image_input_kind == "regions"
    backbone.use_task(task.kind)
    train_ex, train_roots = read_task_examples(store, task.dataset, [task.train_split])
    vocab = labels(train_ex) if callable(labels) else labels
    if config.data.limit is not None:
        train_ex, train_roots = train_ex[: config.data.limit], train_roots[: config.data.limit]
    init = None if given else resolve_init(config)
    if init is not None:
        load_backbone_weights_(backbone, init)
    model = make_model(backbone, vocab)
    images = TaskImages(store, task.dataset)
    if region:
        # Regions are the image (made by the task-regions stage); no augmentation.
        region_cfg = RegionConfig(**task.regions)
        collate: Callable = RegionExampleCollator(load_tokenizer(), config.data.max_len)

        def dataset(ex: list[Any], roots: list[str], train: bool) -> Any:
            seed = config.seed if train else 0
            return RegionExampleDataset(store, ex, roots, images, region_cfg, vocab, seed, task.blind)
    else:
        train_tf, test_tf = _transforms(config, model)
        collate = ExampleCollator(load_tokenizer(), config.data.max_len)

        def dataset(ex: list[Any], roots: list[str], train: bool) -> Any:
            tf, seed = (train_tf, config.seed) if train else (test_tf, 0)
            return ExampleDataset(ex, roots, images, tf, vocab, seed=seed, blind=task.blind)

    if vocab is not None and env.is_main:
        run_dir = config.resolved_run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "labels.json").write_text(json.dumps({"labels": vocab.labels}))

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        out: dict[str, float] = {}
        correct_all, n_all = 0.0, 0
        for split in task.eval_splits:
            ex, roots = read_task_examples(store, task.dataset, [split])
            if task.eval_examples is not None:
                ex, roots = ex[: task.eval_examples], roots[: task.eval_examples]
            loader = torch.utils.data.DataLoader(
                dataset(ex, roots, train=False),
                batch_size=config.eval.batch_size,
                collate_fn=collate,
                num_workers=config.data.num_workers,
            )
            hits: list[torch.Tensor] = []
            with torch.no_grad():
                for batch in loader:
                    hits.append(_hits(model, {k: v.to(device) for k, v in batch.items()}).cpu())
            hit = torch.cat(hits).float()
            out[f"accuracy_{split}"] = float(hit.mean())
            out[f"n_{split}"] = float(len(ex))
            correct_all, n_all = correct_all + float(hit.sum()), n_all + len(ex)
            for key in getattr(task, "breakdown", []):
                values = sorted({e.meta[key] for e in ex if key in e.meta})
                for v in values:
                    sel = torch.tensor([e.meta.get(key) == v for e in ex])
                    out[f"accuracy_{split}_{key}_{v}"] = float(hit[sel].mean())
            if vocab is not None:
                out[f"label_coverage_{split}"] = vocab.coverage([e.label for e in ex])
        out["accuracy"] = correct_all / max(1, n_all)
        return out

    train_set = dataset(train_ex, train_roots, train=True)
    fitted = fit_region_stats_(backbone, store, train_set.image_ids) if region else {}
    info = {
        "dataset": task.dataset,
        "train_examples": len(train_ex),
        "labels": None if vocab is None else len(vocab),
        "init_from": config.init_from,
        **fitted,
    }
    return TrainSpec(
        model=model,
        streams={"pair": Stream(train_set, collate)},
        stages=[Stage("finetune", None, kinds=("pair",))],
        evaluate=evaluate,
        info=info,
        roles=model.param_roles(),
        ddp_kwargs=model.ddp_kwargs(),
    )


def _hits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example correctness of a batch: arg-max = label, or the chosen box's IoU > 0.5 with the target."""
    if isinstance(model, BoxScorer):
        s = model.scores(
            model.image_batch(batch), batch["input_ids"], batch["attention_mask"], batch["boxes"],
            batch["box_mask"], batch.get("cand_regions"),
        )  # fmt: skip
        return ref_hits(s, batch["boxes"], batch["target"])
    logits = model.logits(model.image_batch(batch), batch["input_ids"], batch["attention_mask"])
    return logits.argmax(-1) == batch["labels"]


def _classifier(config: Any, n_images: int) -> Callable[[nn.Module, LabelVocab], nn.Module]:
    def make(backbone: nn.Module, vocab: LabelVocab) -> nn.Module:
        task = config.task
        return FusedClassifier(
            backbone, len(vocab), n_images=n_images, head_hidden=task.head_hidden,
            head_dropout=task.head_dropout,
        )  # fmt: skip

    return make


def _build_nlvr2(config: Any, env: Any, backbone: nn.Module | None = None) -> TrainSpec:
    return _build_examples(config, env, _classifier(config, 2), LabelVocab(NLVR2_LABELS), backbone)


def _build_snli_ve(config: Any, env: Any, backbone: nn.Module | None = None) -> TrainSpec:
    return _build_examples(config, env, _classifier(config, 1), LabelVocab(ENTAILMENT_LABELS), backbone)


def _build_gqa(config: Any, env: Any, backbone: nn.Module | None = None) -> TrainSpec:
    top = config.task.top_answers

    def vocab(ex: list[Any]) -> LabelVocab:
        return LabelVocab.from_answers([e.label for e in ex if e.label], top)

    return _build_examples(config, env, _classifier(config, 1), vocab, backbone)


def _build_ref(config: Any, env: Any, backbone: nn.Module | None = None) -> TrainSpec:
    def make(backbone: nn.Module, _vocab: Any) -> nn.Module:
        return BoxScorer(backbone, head_hidden=config.task.head_hidden, head_dropout=config.task.head_dropout)

    return _build_examples(config, env, make, None, backbone)


register_task("nlvr2", NLVR2Task, _build_nlvr2)
register_task("snli_ve", SNLIVETask, _build_snli_ve)
register_task("gqa", GQATask, _build_gqa)
register_task("refcoco", RefTask, _build_ref)
