"""``retrieval``: fine-tune a pre-trained run for image-text retrieval with exactly the losses the task
names (default: the method's retrieval losses, e.g. ALBEF ITC + ITM, VLMo ITC as a dual encoder; every other
loss weight is set to 0, so no MLM or MIM pass runs); evaluation = retrieval on the held-out clip art."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from stores.shards import ShardStore
from vlp_core.data import PairsConfig, load_tokenizer
from vlp_core.models.configs import config_from_dict
from vlp_core.recipes import Stage, build_recipe
from vlp_core.tasks.base import TaskConfig, fit_region_stats_, register_task
from vlp_core.tasks.pretrain import load_init_, pair_stream, retrieval_eval
from vlp_core.train.spec import TrainSpec

__all__ = ["RetrievalTask", "retrieval_recipe_config"]


class RetrievalTask(TaskConfig):
    """Retrieval fine-tuning. ``losses``: the recipe losses to train (``None``: the method's
    ``retrieval_losses``)."""

    kind: str = "retrieval"
    losses: list[str] | None = Field(None, description="e.g. [itc, itm]; the others get weight 0")
    regions: dict[str, Any] = Field(
        default_factory=dict, description="RegionConfig fields (region backbones)"
    )


def retrieval_recipe_config(config: Any) -> Any:
    """The method's recipe config with every loss not in the task's losses at weight 0 (and the recipe's
    :meth:`~vlp_core.recipes.RecipeConfig.finetune_overrides`)."""
    from vlp_core.recipes import RECIPES

    rcfg = config.recipe_config()
    weights = rcfg.loss_weights()
    losses = config.task.losses or list(RECIPES[config.method].recipe.retrieval_losses)
    unknown = sorted(set(losses) - set(weights))
    if unknown:
        raise ValueError(f"task.losses {unknown}: {config.method} has the losses {sorted(weights)}")
    zero = {f"{name}_weight": 0.0 for name in weights if name not in losses}
    return config_from_dict(rcfg, {**rcfg.finetune_overrides(), **zero})


def _build(config: Any, env: Any) -> TrainSpec:
    store = ShardStore(config.layout().store)
    model = build_recipe(config.method, retrieval_recipe_config(config), config.backbone_config())
    load_init_(model, config)
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
