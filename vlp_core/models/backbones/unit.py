"""UniT's backbone: an image encoder, a text encoder, and one transformer decoder shared by every task, whose
queries are task-specific learned embeddings (Hu & Singh, "UniT: Multimodal Multitask Learning with a Unified
Transformer", 2021).

The decoder's memory is the concatenation of the projected image tokens and text states (UniT's multimodal
setting), each with a modality embedding; the decoder's self-attention runs over the task's queries, its
cross-attention over that memory. The fused vector a head reads is the first query's output (UniT's
classification heads read the decoder's output; with several queries, this choice is named here). A task is
selected with :meth:`UniTBackbone.use_task` (single-task training) or the :meth:`task_context` context
(the multitask model, per batch); every task has its own query set.

Where the paper is silent at this scale, the tiny preset's choices: the image side is the EfficientNet-Lite0
grid (ImageNet weights, frozen BatchNorm) plus one transformer encoder layer (UniT: a DETR ResNet-50 with six
encoder layers); the text side is MiniLM's first 3 layers (UniT: BERT-base); the decoder has 2 layers and 4
queries per task (UniT: 6 layers, 100 queries, shaped for detection).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from vlp_core.models.backbones.base import Backbone, BackboneConfig, register_backbone
from vlp_core.models.backbones.towers import UnimodalTowers
from vlp_core.models.layers import TransformerLayer, init_bert_
from vlp_core.models.layers import key_mask as _key_mask
from vlp_core.models.outputs import ImageFeatures, PairFeatures, TextFeatures
from vlp_core.models.text import TextConfig, read_bert_checkpoint
from vlp_core.models.vision import CNNGridEncoder, VisionConfig

__all__ = ["UNIT_TASKS", "UniTBackbone", "UniTConfig"]

#: the task kinds that get a query set by default.
UNIT_TASKS = ("vqa", "snli_ve", "nlvr2", "gqa", "refcoco")


@dataclass
class UniTConfig(BackboneConfig):
    """Image encoder (+ ``image_layers`` transformer encoder layers), text encoder, and a shared decoder of
    ``decoder_layers`` layers with ``num_queries`` learned queries per task of ``tasks``.

    Defaults are the ``"base"`` preset (BERT-base text side fresh, ViT-B/16 image side, 6 decoder layers);
    ``"tiny"``: see the module docstring."""

    registry_kind: ClassVar[str] = "unit"

    text: TextConfig = field(default_factory=lambda: TextConfig(pretrained=None, num_layers=12))
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(kind="vit", image_size=224, width=768))
    image_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 16
    tasks: tuple[str, ...] = UNIT_TASKS
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if self.decoder_layers < 1 or self.num_queries < 1 or self.image_layers < 0:
            raise ValueError("decoder_layers and num_queries must be >= 1, image_layers >= 0")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct and non-empty, got {self.tasks}")
        self.tasks = tuple(self.tasks)


UniTConfig.PRESETS = {
    "base": UniTConfig,
    "tiny": lambda: UniTConfig(
        text=TextConfig(pretrained="minilm", num_layers=3),
        vision=VisionConfig(kind="cnn", image_size=128, width=384, pretrained=True, freeze_bn=True),
        image_layers=1,
        decoder_layers=2,
        num_queries=4,
    ),
}


class UniTBackbone(UnimodalTowers, Backbone):
    """``vision_encoder`` (+ ``image_layers``), ``text_encoder``, the memory projections and modality
    embeddings, the shared ``decoder`` and the per-task ``queries``."""

    fused_image_states: ClassVar[bool] = False  # the decoder outputs query states only

    def __init__(self, config: UniTConfig) -> None:
        super().__init__()
        self.config = config
        vw, text = self._build_towers(config)
        hidden = text.hidden_size
        self.image_to_memory = nn.Linear(vw, hidden)
        self.text_to_memory = nn.Linear(hidden, hidden)
        self.modality = nn.Embedding(2, hidden)  # 0 image, 1 text
        self.decoder = nn.ModuleList(
            TransformerLayer(
                hidden,
                text.num_heads,
                text.intermediate_size,
                text.layer_norm_eps,
                text.dropout,
                text.attention_dropout,
                cross_width=hidden,
            )  # fmt: skip
            for _ in range(config.decoder_layers)
        )
        self.queries = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(config.num_queries, hidden)) for t in config.tasks}
        )
        init_bert_(self.decoder)
        for p in self.queries.values():
            nn.init.normal_(p, std=0.02)
        for m in (self.image_to_memory, self.text_to_memory, self.modality):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        ckpt = config.text.checkpoint_dir()
        self.init_report = {"text": self.text_encoder.load_bert_(read_bert_checkpoint(ckpt))} if ckpt else {}
        self.width = self.text_width = hidden
        self.image_width = vw
        self.task = config.tasks[0]

    # -- the task
    def use_task(self, task: str) -> None:
        """Select the query set the decoder runs with (single-task training and evaluation)."""
        if task not in self.queries:
            raise KeyError(f"UniT has queries for {sorted(self.queries)}, not {task!r}")
        self.task = task

    @contextmanager
    def task_context(self, task: str) -> Iterator[None]:
        """Run with ``task``'s queries inside the block (the multitask model, per batch)."""
        before = self.task
        self.use_task(task)
        try:
            yield
        finally:
            self.task = before

    # -- interface
    def encode_pair(self, image: ImageFeatures, text: TextFeatures) -> PairFeatures:
        n, ni = image.tokens.shape[:2]
        memory = torch.cat(
            [
                self.image_to_memory(image.tokens) + self.modality.weight[0],
                self.text_to_memory(text.hidden) + self.modality.weight[1],
            ],
            dim=1,
        )
        memory_mask = torch.cat([text.mask.new_ones(n, ni), text.mask], dim=1)
        x = self.queries[self.task].unsqueeze(0).expand(n, -1, -1)
        cross_mask = _key_mask(memory_mask)
        for layer in self.decoder:
            x = layer(x, None, memory, cross_mask)
        return PairFeatures(hidden=x, pooled=x[:, 0], text_slice=slice(0, 0))

    # -- data / optimiser
    def image_input(self) -> nn.Module:
        return self.vision_encoder

    def param_roles(self) -> dict[str, list[nn.Module]]:
        roles = {
            "vision": [self.vision_encoder, self.image_layers],
            "text": [self.text_encoder],
            "fusion": [self.image_to_memory, self.text_to_memory, self.modality, self.decoder, self.queries],
        }
        if isinstance(self.vision_encoder, CNNGridEncoder):
            roles["vision_pretrained"] = [self.vision_encoder.backbone]
        return roles

    def ddp_kwargs(self) -> dict[str, object]:
        return {"find_unused_parameters": True}  # a step trains one task's queries


register_backbone(UniTConfig, UniTBackbone)
