"""``pretrain``: the method's recipe on corpus batches (pairs, and image-only / text-only data for recipes
that draw them), its stages; evaluation = zero-shot retrieval on the held-out clip art.

Also home of what the pair-based tasks share: the pair stream and the held-out retrieval evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa
import torch
from pydantic import Field
from torch import nn

from stores.shards import ShardStore
from vlp_core.data import (
    ImageCollator,
    ImageDataset,
    PairDataset,
    PairsConfig,
    PretrainCollator,
    TextCollator,
    TextDataset,
    UnimodalConfig,
    build_image_index,
    build_pair_index,
    build_text_index,
    eval_transform,
    heldout_split,
    load_tokenizer,
    make_pair_index,
    train_transform,
)
from vlp_core.data.cutmix import CutMixCollator, GroundedTextDataset, load_gallery
from vlp_core.data.regions import RegionCollator, RegionConfig, RegionImageDataset, RegionPairDataset
from vlp_core.eval import RetrievalSet, evaluate_retrieval
from vlp_core.models.backbones import RegionInputs
from vlp_core.recipes import Recipe, build_recipe
from vlp_core.tasks.base import TaskConfig, fit_region_stats_, register_task, resolve_init
from vlp_core.train.spec import Stream, TrainSpec

__all__ = [
    "PretrainTask",
    "heldout_retrieval_data",
    "pair_stream",
    "retrieval_eval",
    "score_retrieval",
]


class PretrainTask(TaskConfig):
    """Pre-training. ``images`` / ``texts``: :class:`~vlp_core.data.UnimodalConfig` fields of the image-only
    and text-only streams (recipes that draw them: FLAVA, VLMo's first stages, U-VisualBERT, VLMixer); pairs
    come from ``data.pairs``. ``codebook_images``: images the masked-image-modelling codebook is fitted on.
    ``regions``: :class:`~vlp_core.data.RegionConfig` fields (region backbones)."""

    kind: str = "pretrain"
    images: dict[str, Any] = Field(default_factory=dict)
    texts: dict[str, Any] = Field(default_factory=dict)
    codebook_images: int = Field(256, gt=0)
    regions: dict[str, Any] = Field(default_factory=dict)


def heldout_retrieval_data(
    store: ShardStore, pairs: PairsConfig, max_images: int | None
) -> tuple[pa.Table, pa.Table, RetrievalSet]:
    """The held-out clip art as a retrieval set: (images index, texts table, positives).

    The first ``max_images`` held-out images in id order (ids are content hashes, so this is a fixed random
    sample) and all their known captions."""
    held = heldout_split(store, pairs.heldout_fraction, pairs.heldout_salt)
    if held.num_rows == 0:
        raise ValueError("the held-out split is empty (no known pairs, or heldout_fraction is 0)")
    images = sorted(set(held["image_id"].to_pylist()))
    if max_images is not None:
        images = images[:max_images]
    keep = set(images)
    rows = [r for r in held.to_pylist() if r["image_id"] in keep]
    texts = sorted({(r["text_id"], r["text"]) for r in rows})
    text_pos = {t: i for i, (t, _) in enumerate(texts)}
    image_pos = {im: i for i, im in enumerate(images)}
    data = RetrievalSet.from_pairs(
        [image_pos[r["image_id"]] for r in rows],
        [text_pos[r["text_id"]] for r in rows],
        len(images),
        len(texts),
    )
    # One index row per image (any of its captions) so PairDataset can decode it.
    first_text = {}
    for r in rows:
        first_text.setdefault(r["image_id"], r["text_id"])
    index = make_pair_index(
        pa.table({"image_id": images, "text_id": [first_text[i] for i in images]}), "heldout"
    )
    text_table = pa.table({"text_id": [t for t, _ in texts], "text": [s for _, s in texts]})
    return index, text_table, data


def retrieval_eval(
    config: Any, store: ShardStore, pairs: PairsConfig, tokenizer: Any
) -> Callable[[nn.Module, torch.device], dict[str, float]]:
    """Held-out clip-art retrieval (ITC ranking, ITM re-ranking when the model has ``itm_scores``)."""

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        index, texts, data = heldout_retrieval_data(store, pairs, config.eval.retrieval_images)
        if model.image_input_kind == "regions":
            images = region_inputs(store, index, config, tokenizer)
        else:
            transform = eval_transform(model.image_size, model.image_mean, model.image_std)
            dataset = PairDataset(store, index, transform, seed=0)
            images = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
        return score_retrieval(model, config, tokenizer, images, texts["text"].to_pylist(), data, device)

    return evaluate


def score_retrieval(
    model: nn.Module,
    config: Any,
    tokenizer: Any,
    images: Any,
    texts: list[str],
    data: RetrievalSet,
    device: torch.device,
) -> dict[str, float]:
    """Retrieval recalls of ``model`` over ``images`` (pixels ``(n, 3, S, S)`` or :class:`RegionInputs`) and
    ``texts``: ITC ranking, then ITM re-ranking of the top ``eval.itm_rerank_k`` where the model has a match
    head (single-stream models score every pair up to ``eval.all_pairs_max``)."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=config.data.max_len, return_tensors="pt")
    itm_k = config.eval.itm_rerank_k if model.has_match_head else 0
    all_pairs = getattr(model, "scores_all_pairs", False)
    n_images = data.positives.shape[0]
    if model.has_match_head and all_pairs and n_images * len(texts) <= config.eval.all_pairs_max:
        itm_k = len(texts)  # every candidate of every query
    with torch.no_grad():
        return evaluate_retrieval(
            model,
            images if torch.is_tensor(images) else (lambda: images.split(config.eval.batch_size)),
            (enc["input_ids"], enc["attention_mask"]),
            data,
            device=device,
            batch_size=config.eval.batch_size,
            itm_k=itm_k,
        )


def region_config(config: Any) -> RegionConfig:
    """The task's ``regions`` options (pretrain and retrieval tasks) as a :class:`RegionConfig`."""
    return RegionConfig(**getattr(config.task, "regions", {}))


def region_collator(config: Any, tokenizer: Any) -> RegionCollator:
    return RegionCollator(
        tokenizer, config.data.max_len, whole_word=config.data.whole_word_mask, cfg=region_config(config)
    )


def region_inputs(store: ShardStore, index: pa.Table, config: Any, tokenizer: Any) -> RegionInputs:
    """The regions of an index's images as one padded :class:`RegionInputs` (evaluation sets)."""
    dataset = RegionImageDataset(store, index, region_config(config))
    batch = region_collator(config, tokenizer)([dataset[i] for i in range(len(dataset))])
    return RegionInputs.from_batch(batch)


def pair_stream(config: Any, store: ShardStore, model: Recipe, pairs: PairsConfig, tokenizer: Any):
    """The paired stream of ``data.pairs`` (+ facts for ``run.json``): images as pixels or, for a region
    backbone, as the corpus's regions with the pairs' phrase links."""
    index = build_pair_index(store, pairs, seed=config.seed)
    if config.data.limit is not None:
        index = index.slice(0, config.data.limit)
    origins = index["origin"].value_counts().to_pylist()
    info = {
        "pairs": index.num_rows,
        "images": len(set(index["image_id"].to_pylist())),
        "texts": len(set(index["text_id"].to_pylist())),
        "origins": {d["values"]: d["counts"] for d in origins},
    }
    if model.image_input_kind == "regions":
        dataset = RegionPairDataset(store, index, region_config(config), seed=config.seed)
        return Stream(dataset, region_collator(config, tokenizer)), info
    transform = train_transform(
        model.image_size,
        model.image_mean,
        model.image_std,
        scale=tuple(config.data.crop_scale),
        randaugment=config.data.randaugment,
    )
    collate = PretrainCollator(tokenizer, config.data.max_len, whole_word=config.data.whole_word_mask)
    return Stream(PairDataset(store, index, transform, seed=config.seed), collate), info


def load_init_(model: Recipe, config: Any) -> None:
    """Start from ``init_from``: the whole recipe when the run was of the same method, else its backbone."""
    init = resolve_init(config)
    if init is None:
        return
    run = config.init_run()
    if run is None or run.method == config.method and run.task.kind != "vqa":
        model.load_pretrained_state_dict(init)
    else:
        from vlp_core.tasks.base import load_backbone_weights_

        load_backbone_weights_(model.backbone, init)


def _build(config: Any, env: Any) -> TrainSpec:
    store = ShardStore(config.layout().store)
    task: PretrainTask = config.task
    model = build_recipe(config.method, config.recipe_config(), config.backbone_config())
    load_init_(model, config)
    stages = model.stages(config.max_steps)
    kinds = {k for s in stages for k in s.kinds}
    pairs = PairsConfig(**config.data.pairs)
    tokenizer = load_tokenizer()
    streams: dict[str, Stream] = {}
    info: dict[str, Any] = {"init_from": config.init_from, "method": config.method}
    if "pair" in kinds:
        streams["pair"], pair_info = pair_stream(config, store, model, pairs, tokenizer)
        info.update(pair_info)
    image_index = None
    held = {"heldout_fraction": pairs.heldout_fraction, "heldout_salt": pairs.heldout_salt}
    image_cfg = UnimodalConfig(**{**held, "sources": pairs.sources, **task.images})
    if "image" in kinds or model.wants_image_targets:
        image_index = build_image_index(store, image_cfg, seed=config.seed)
        if "image" in kinds and model.image_input_kind == "regions":
            dataset = RegionImageDataset(store, image_index, region_config(config), seed=config.seed)
            streams["image"] = Stream(dataset, region_collator(config, tokenizer))
        elif "image" in kinds:
            transform = train_transform(
                model.image_size, model.image_mean, model.image_std, scale=tuple(config.data.crop_scale),
                randaugment=config.data.randaugment,
            )  # fmt: skip
            streams["image"] = Stream(
                ImageDataset(store, image_index, transform, seed=config.seed), ImageCollator()
            )
        if "image" in kinds:
            info["image_only"] = image_index.num_rows
    if "text" in kinds:
        ucfg = UnimodalConfig(**{**held, **task.texts})
        text_index = build_text_index(store, ucfg, seed=config.seed)
        cutmix = model.cutmix_options()
        if cutmix is not None:
            gallery = load_gallery(store)
            dataset = GroundedTextDataset(store, text_index, set(gallery.feats), seed=config.seed)
            collate = CutMixCollator(
                tokenizer, gallery, config.data.max_len, whole_word=config.data.whole_word_mask, **cutmix
            )
            info["gallery_patches"] = len(gallery)
        else:
            dataset = TextDataset(store, text_index, seed=config.seed)
            collate = TextCollator(tokenizer, config.data.max_len, whole_word=config.data.whole_word_mask)
        streams["text"] = Stream(dataset, collate)
        info["text_only"] = text_index.num_rows
    if model.image_input_kind == "regions":
        ids = {i for name in ("pair", "image") if name in streams for i in streams[name].dataset.image_ids}
        if not ids:
            # Text-only batches (a VLMixer ablation without TAVP): CutMix patches still enter through the
            # region embedding; fit it on the images an image stream would draw, as the full recipe does.
            index = image_index
            if index is None:
                index = build_image_index(store, image_cfg, seed=config.seed)
            ids = set(index["image_id"].to_pylist())
        info |= fit_region_stats_(model.backbone, store, ids)
    if model.wants_image_targets:
        # The masked-image-modelling codebook: k-means over the target encoder's features of the first
        # images of the (seeded) image index, center-cropped; deterministic, so a resumed run refits the same.
        fit = ImageDataset(
            store, image_index.slice(0, task.codebook_images),
            eval_transform(model.image_size, model.image_mean, model.image_std), seed=0,
        )  # fmt: skip
        model.fit_targets_(torch.stack([fit[i]["pixel_values"] for i in range(len(fit))]), seed=config.seed)
        info["codebook_images"] = len(fit)
    return TrainSpec(
        model=model,
        streams=streams,
        stages=stages,
        evaluate=retrieval_eval(config, store, pairs, tokenizer),
        info=info,
        roles=model.param_roles(),
        ddp_kwargs=model.ddp_kwargs(),
    )


register_task("pretrain", PretrainTask, _build)
