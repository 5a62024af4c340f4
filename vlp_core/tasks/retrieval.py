"""``retrieval``: fine-tune a pre-trained run for image-text retrieval with exactly the losses the task
names (default: the method's retrieval losses, e.g. ALBEF ITC + ITM, VLMo ITC as a dual encoder; every other
loss weight is set to 0, so no MLM or MIM pass runs).

Data: the corpus's known clip-art pairs, evaluated on the held-out clip art (``dataset: null``, the
default); or a caption task in the store (``dataset``: the bundled ``scene-captions``, or COCO / Flickr30K
Karpathy splits imported with ``vlp import-task karpathy``), trained on ``train_split`` and evaluated on
``eval_split`` (R@1/5/10 both ways). Zero-shot retrieval is the same evaluation of a pre-trained run without
fine-tuning (the finetune flow's ``zero_shot``, ``python -m vlp_core.train --eval-only``)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from stores.shards import ShardStore
from vlp_core.data import PairsConfig, PretrainCollator, eval_transform, load_tokenizer, train_transform
from vlp_core.data.regions import RegionConfig
from vlp_core.data.task_data import (
    ExampleDataset,
    ExamplePairDataset,
    RegionExampleCollator,
    RegionExampleDataset,
    TaskImages,
    read_task_examples,
    retrieval_groups,
)
from vlp_core.eval import RetrievalSet
from vlp_core.models.backbones.region_stream import RegionInputs
from vlp_core.models.configs import config_from_dict
from vlp_core.recipes import Stage, build_recipe
from vlp_core.tasks.base import TaskConfig, fit_region_stats_, register_task
from vlp_core.tasks.pretrain import load_init_, pair_stream, region_collator, retrieval_eval, score_retrieval
from vlp_core.train.spec import Stream, TrainSpec

__all__ = ["RetrievalTask", "retrieval_recipe_config"]


class RetrievalTask(TaskConfig):
    """Retrieval fine-tuning. ``losses``: the recipe losses to train (``None``: the method's
    ``retrieval_losses``)."""

    kind: str = "retrieval"
    losses: list[str] | None = Field(None, description="e.g. [itc, itm]; the others get weight 0")
    regions: dict[str, Any] = Field(
        default_factory=dict, description="RegionConfig fields (region backbones)"
    )
    dataset: str | None = Field(None, description="a caption task in the store (null: the clip-art pairs)")
    train_split: str = "train"
    eval_split: str = "test"
    eval_images: int | None = Field(None, gt=0, description="cap on evaluation images (null = all)")

    def store_datasets(self) -> list[str]:
        return [self.dataset] if self.dataset else []


def retrieval_recipe_config(config: Any) -> Any:
    """The method's recipe config with every loss not in the task's losses at weight 0, a task loss the
    config has at weight 0 at weight 1 (a recipe without that objective in pre-training, e.g. U-VisualBERT's
    and VLMixer's ITM: fine-tuning trains it), and the recipe's
    :meth:`~vlp_core.recipes.RecipeConfig.finetune_overrides`."""
    from vlp_core.recipes import RECIPES

    rcfg = config.recipe_config()
    weights = rcfg.loss_weights()
    losses = config.task.losses or list(RECIPES[config.method].recipe.retrieval_losses)
    unknown = sorted(set(losses) - set(weights))
    if unknown:
        raise ValueError(f"task.losses {unknown}: {config.method} has the losses {sorted(weights)}")
    zero = {f"{name}_weight": 0.0 for name in weights if name not in losses}
    on = {f"{name}_weight": 1.0 for name in losses if weights[name] == 0}
    return config_from_dict(rcfg, {**rcfg.finetune_overrides(), **zero, **on})


def _build(config: Any, env: Any) -> TrainSpec:
    store = ShardStore(config.layout().store)
    model = build_recipe(config.method, retrieval_recipe_config(config), config.backbone_config())
    load_init_(model, config)
    if config.task.dataset is not None:
        return _build_captions(config, store, model)
    pairs = PairsConfig(**config.data.pairs)
    tokenizer = load_tokenizer()
    stream, info = pair_stream(config, store, model, pairs, tokenizer)
    if model.image_input_kind == "regions":
        info |= fit_region_stats_(model.backbone, store, stream.dataset.image_ids)
    info |= {
        "init_from": config.init_from,
        "losses": sorted(k for k, w in model.config.loss_weights().items() if w),
    }
    return TrainSpec(
        model=model,
        streams={"pair": stream},
        stages=[Stage("finetune", None, kinds=("pair",))],
        evaluate=retrieval_eval(config, store, pairs, tokenizer),
        info=info,
        roles=model.param_roles(),
        ddp_kwargs=model.ddp_kwargs(),
    )


register_task("retrieval", RetrievalTask, _build)


def _build_captions(config: Any, store: ShardStore, model: Any) -> TrainSpec:
    """Retrieval on a caption task of the store (``task.dataset``)."""
    task: RetrievalTask = config.task
    region = model.image_input_kind == "regions"
    tokenizer = load_tokenizer()
    images = TaskImages(store, task.dataset)
    train_ex, train_roots = read_task_examples(store, task.dataset, [task.train_split])
    if config.data.limit is not None:
        train_ex, train_roots = train_ex[: config.data.limit], train_roots[: config.data.limit]
    fitted: dict[str, int] = {}
    if region:
        # the regions the task-regions stage made of the task's images; no augmentation
        region_cfg = RegionConfig(**task.regions)
        train_set = RegionExampleDataset(store, train_ex, train_roots, images, region_cfg, seed=config.seed)
        fitted = fit_region_stats_(model.backbone, store, train_set.image_ids)
        pairs = ExamplePairDataset(train_set)
        collate: Any = region_collator(config, tokenizer)
    else:
        transform = train_transform(
            model.image_size, model.image_mean, model.image_std, scale=tuple(config.data.crop_scale),
            hflip=False, randaugment=config.data.randaugment,
        )  # fmt: skip
        pairs = ExamplePairDataset(ExampleDataset(train_ex, train_roots, images, transform, seed=config.seed))
        collate = PretrainCollator(tokenizer, config.data.max_len, whole_word=config.data.whole_word_mask)

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        ex, roots = read_task_examples(store, task.dataset, [task.eval_split])
        image_of, first = retrieval_groups(ex)
        if task.eval_images is not None and len(first) > task.eval_images:
            keep = [i for i, g in enumerate(image_of) if g < task.eval_images]
            ex, roots, image_of = [ex[i] for i in keep], [roots[i] for i in keep], [image_of[i] for i in keep]
            first = first[: task.eval_images]
        shown_ex, shown_roots = [ex[i] for i in first], [roots[i] for i in first]
        if region:
            shown_regions = RegionExampleDataset(store, shown_ex, shown_roots, images, region_cfg)
            batch = RegionExampleCollator(tokenizer)([shown_regions[i] for i in range(len(shown_regions))])
            pixels: Any = RegionInputs.from_batch(batch)
        else:
            tf = eval_transform(model.image_size, model.image_mean, model.image_std)
            shown = ExampleDataset(shown_ex, shown_roots, images, tf)
            pixels = torch.stack([shown[i]["pixel_values"][0] for i in range(len(shown))])
        data = RetrievalSet.from_pairs(image_of, range(len(ex)), len(first), len(ex))
        out = score_retrieval(model, config, tokenizer, pixels, [e.text for e in ex], data, device)
        return {f"{task.eval_split}_{k}" if k.startswith(("itc", "itm")) else k: v for k, v in out.items()}

    info = {
        "dataset": task.dataset,
        "train_captions": len(pairs),
        "train_images": len(set(pairs.image_keys)),
        "init_from": config.init_from,
        "losses": sorted(k for k, w in model.config.loss_weights().items() if w),
        **fitted,
    }
    return TrainSpec(
        model=model,
        streams={"pair": Stream(pairs, collate)},
        stages=[Stage("finetune", None, kinds=("pair",))],
        evaluate=evaluate,
        info=info,
        roles=model.param_roles(),
        ddp_kwargs=model.ddp_kwargs(),
    )
