"""UniT as a method: the ``unit`` backbone (:mod:`vlp_core.models.backbones.unit`) trained jointly on a mix of
downstream tasks by the ``multitask`` task (:mod:`vlp_core.tasks.multitask`), grad clip 0.1
(``configs/train/unit_tiny.yaml``). UniT has no objective on corpus batches: its recipe has no batch kinds,
and pre-training it on the corpus is an error that says what to run instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from vlp_core.recipes.base import Recipe, RecipeConfig, Stage, register_recipe

__all__ = ["UniT", "UniTRecipeConfig"]

_HOW = (
    "UniT trains jointly on downstream tasks, not on corpus batches: task kind multitask "
    "(configs/train/unit_tiny.yaml, deployment pretrain/unit)"
)


@dataclass
class UniTRecipeConfig(RecipeConfig):
    """No loss weights: each task of the mix brings its own loss (see ``task.tasks``)."""

    registry_name: ClassVar[str] = "unit"


UniTRecipeConfig.PRESETS = {"base": UniTRecipeConfig, "tiny": UniTRecipeConfig}


class UniT(Recipe):
    batch_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: UniTRecipeConfig, backbone: Any) -> None:
        super().__init__()
        self.config, self.backbone = config, backbone

    def stages(self, max_steps: int) -> list[Stage]:
        raise ValueError(_HOW)

    def forward(self, batch: Any, **kwargs: Any) -> Any:
        raise ValueError(_HOW)


register_recipe(UniTRecipeConfig, UniT, "unit")
