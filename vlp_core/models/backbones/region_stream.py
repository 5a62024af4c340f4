"""A single-stream transformer over words and detected regions (VisualBERT / UNITER style), the backbone of
the region methods: µ-VLA, U-VisualBERT and VLMixer.

One BERT stack reads one joint sequence ``[CLS] words [SEP] regions``. Its embeddings:

- a word: word + position + token type 0 (BERT's), plus, for a *tag* (U-VisualBERT, µ-VLA region-tag), the
  projected box of the region it names, so tag and region line up;
- a region: ``LN(W_f feature) + LN(W_b box5)`` + the image modality embedding (token type 1), then LayerNorm
  and dropout; regions carry no position (their order means nothing);
- a *patch token* (VLMixer's cross-modal CutMix): a gallery patch's region embedding placed at the position
  of the word it replaces, with that position's embedding added, so the sentence keeps its word order.

Choices where the papers are out of reach here: the tiny preset is the packaged MiniLM (6 layers, 384 wide)
over the corpus's 1,280-d EfficientNet-Lite0 RoIAlign features; ``base`` is BERT-base's shape (fresh) over
2,048-d detector features (UNITER / VinVL). Pooling: ``"cls"`` reads the [CLS] state (the papers);
``"mean"`` averages every valid token of the joint sequence (tiny: MiniLM's [CLS] state barely differs
between inputs before training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlp_core.models.backbones.base import Backbone, BackboneConfig, register_backbone
from vlp_core.models.fusion import SingleStreamEncoder
from vlp_core.models.layers import Dropout, init_bert_
from vlp_core.models.outputs import ImageFeatures, PairFeatures, TextFeatures
from vlp_core.models.text import (
    MLMHead,
    TextConfig,
    TextEmbeddings,
    load_part_,
    pool_text,
    read_bert_checkpoint,
    require_layers,
)

__all__ = ["RegionEmbedding", "RegionInputs", "RegionStreamBackbone", "RegionStreamConfig"]


@dataclass
class RegionInputs:
    """A batch of images as regions: ``feats`` (B, R, F), ``boxes`` (B, R, 5), ``mask`` (B, R) (1 = region).

    What a region backbone takes where a pixel backbone takes ``pixel_values``; ``split`` / ``to`` let the
    retrieval evaluation batch it like a pixel tensor."""

    feats: torch.Tensor
    boxes: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> RegionInputs:
        return cls(batch["region_feats"], batch["region_boxes"], batch["region_mask"])

    def __len__(self) -> int:
        return self.feats.shape[0]

    def to(self, device: torch.device | str) -> RegionInputs:
        return RegionInputs(self.feats.to(device), self.boxes.to(device), self.mask.to(device))

    def split(self, size: int) -> list[RegionInputs]:
        return [
            RegionInputs(f, b, m)
            for f, b, m in zip(
                self.feats.split(size), self.boxes.split(size), self.mask.split(size), strict=True
            )
        ]

    def __getitem__(self, rows: Any) -> RegionInputs:
        return RegionInputs(self.feats[rows], self.boxes[rows], self.mask[rows])


@dataclass
class RegionStreamConfig(BackboneConfig):
    """The region single-stream transformer.

    Args:
        text: the stack's widths, word embeddings and layers (``num_layers`` = the whole stack);
            ``pretrained`` loads embeddings and layer ``i`` from checkpoint layer ``i``.
        region_dim: width of the stored region features (the corpus's ``regions.feature``).
        box_dim: width of a region box (5: corners and area, normalised).
        feature_norm: ``"standardize"`` (per-dimension mean / std fitted on the corpus before training; see
            :class:`RegionEmbedding`) or ``"none"``.
        pooling: ``"cls"`` or ``"mean"`` (see the module docstring).
    """

    registry_kind: ClassVar[str] = "region_stream"

    text: TextConfig = field(default_factory=lambda: TextConfig(pretrained=None, num_layers=12))
    region_dim: int = 2048
    box_dim: int = 5
    feature_norm: str = "standardize"
    pooling: str = "cls"

    def __post_init__(self) -> None:
        if self.text.num_layers < 1 or self.region_dim < 1 or self.box_dim < 1:
            raise ValueError("the region stream needs layers and positive region / box widths")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.feature_norm not in ("standardize", "none"):
            raise ValueError(f"feature_norm must be 'standardize' or 'none', got {self.feature_norm!r}")


RegionStreamConfig.PRESETS = {
    "base": RegionStreamConfig,
    "tiny": lambda: RegionStreamConfig(
        text=TextConfig(pretrained="minilm", num_layers=6), region_dim=1280, pooling="mean"
    ),
}


class RegionEmbedding(nn.Module):
    """Region feature + box -> hidden: ``LN(W_f s(f)) + LN(W_b b)`` (:meth:`project`), then + the image
    modality embedding, LayerNorm and dropout (:meth:`forward`).

    ``s(f) = (f - mean) / std`` per feature dimension (:meth:`standardize`), with ``mean`` / ``std`` buffers
    fitted on the corpus's features (:meth:`fit_stats_`; identity until fitted). Our choice: the stored
    ImageNet RoIAlign features share a large common component (mean pairwise cosine 0.95 over easy-VQA
    images), so before standardising every image enters the stack as nearly the same vector and, at this
    budget, VQA fine-tuning never learns to read it (the shape and colour are there: a linear probe on the
    standardised features gets them 100 % / 99 % right)."""

    def __init__(self, region_dim: int, box_dim: int, hidden: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(region_dim))
        self.register_buffer("feat_std", torch.ones(region_dim))
        self.register_buffer("stats_fitted", torch.zeros((), dtype=torch.bool))
        self.feat = nn.Linear(region_dim, hidden)
        self.feat_norm = nn.LayerNorm(hidden, eps=eps)
        self.box = nn.Linear(box_dim, hidden)
        self.box_norm = nn.LayerNorm(hidden, eps=eps)
        self.modality = nn.Parameter(torch.zeros(hidden))
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = Dropout(dropout)
        init_bert_(self)
        nn.init.normal_(self.modality, std=0.02)

    @torch.no_grad()
    def fit_stats_(self, feats: torch.Tensor, min_std: float = 1e-3) -> None:
        """Fit the standardisation on ``(N, F)`` region features (float64 sums, so the result does not
        depend on the order or the chunking of the rows)."""
        f = feats.double()
        self.feat_mean.copy_(f.mean(0).to(self.feat_mean.dtype))
        self.feat_std.copy_(f.std(0).clamp(min=min_std).to(self.feat_std.dtype))
        self.stats_fitted.fill_(True)

    def standardize(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.feat_mean) / self.feat_std

    def box_embedding(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.box_norm(self.box(boxes))

    def project(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.feat_norm(self.feat(self.standardize(feats))) + self.box_embedding(boxes)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.project(feats, boxes) + self.modality))


class RegionStreamBackbone(Backbone):
    """See the module docstring. Modules: ``text_embeddings`` (BERT's), ``region_embed``, ``stack`` and the
    tied ``mlm_head``.

    Besides the :class:`Backbone` interface (whose "pixels" are :class:`RegionInputs`), recipes build inputs
    with :meth:`embed_words` (words, tags with boxes, patch tokens) and :meth:`embed_regions`, and run
    :meth:`joint` over any list of embedded segments.
    """

    image_input_kind: ClassVar[str] = "regions"

    def __init__(self, config: RegionStreamConfig) -> None:
        super().__init__()
        self.config = config
        text = config.text.resolved()
        hidden = text.hidden_size
        self.text_embeddings = TextEmbeddings(text)
        self.region_embed = RegionEmbedding(
            config.region_dim, config.box_dim, hidden, text.layer_norm_eps, text.dropout
        )
        self.stack = SingleStreamEncoder(
            text.num_layers, hidden, text.num_heads, text.intermediate_size, text.layer_norm_eps,
            text.dropout, text.attention_dropout,
        )  # fmt: skip
        self.mlm_head = MLMHead(text, self.text_embeddings.word.weight)
        self.init_report = {"loaded": self._load_pretrained_(text)}
        self.width = self.text_width = self.image_width = hidden

    def _load_pretrained_(self, text: TextConfig) -> list[str]:
        ckpt = text.checkpoint_dir()
        if ckpt is None:
            return []
        state = read_bert_checkpoint(ckpt)
        require_layers(state, len(self.stack.layers), "stack")
        renames = {"embeddings.": "text_embeddings.", "mlm.": "mlm_head."}
        renames |= {f"layers.{i}.": f"stack.layers.{i}." for i in range(len(self.stack.layers))}
        usable = {k: v for k, v in state.items() if any(k.startswith(p) for p in renames)}
        fresh = set(load_part_(self, usable, renames))
        return sorted(n for n, _ in self.named_parameters() if n not in fresh)

    @property
    def needs_feature_stats(self) -> bool:
        """Whether the region standardisation must be fitted before training (not yet fitted, nor loaded)."""
        return self.config.feature_norm == "standardize" and not bool(self.region_embed.stats_fitted)

    # -- embeddings
    def embed_words(
        self,
        input_ids: torch.Tensor,
        *,
        boxes: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
        patches: RegionInputs | None = None,
    ) -> torch.Tensor:
        """``(B, L)`` ids -> ``(B, L, H)``.

        ``boxes`` (B, L, 5) with ``box_mask`` (B, L): tokens that carry a region's box (tags). ``patches``:
        patch tokens at the positions where ``patches.mask`` is 1 (``feats`` / ``boxes`` (B, L, ...)): their
        region embedding replaces the word, and the position embedding stays."""
        e = self.text_embeddings
        length = input_ids.shape[1]
        if length > e.position.num_embeddings:
            raise ValueError(
                f"sequence length {length} > max_position_embeddings {e.position.num_embeddings}"
            )
        pos = e.position(torch.arange(length, device=input_ids.device))[None]
        x = e.word(input_ids) + e.token_type.weight[0]
        if boxes is not None:
            keep = (box_mask if box_mask is not None else torch.ones_like(input_ids))[..., None].to(x.dtype)
            x = x + keep * self.region_embed.box_embedding(boxes)
        x = e.norm(x + pos)
        if patches is not None:
            where = patches.mask.bool()[..., None]
            r = self.region_embed
            patch = r.norm(r.project(patches.feats, patches.boxes) + r.modality + pos)
            x = torch.where(where, patch, x)
        return e.drop(x)

    def embed_regions(self, regions: RegionInputs) -> torch.Tensor:
        """``(B, R, H)`` region embeddings."""
        return self.region_embed(regions.feats, regions.boxes)

    def joint(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stack over the concatenation of embedded segments ``[(x (B, n, H), mask (B, n))]`` ->
        ``(hidden (B, N, H), mask (B, N))``."""
        x = torch.cat([p[0] for p in parts], dim=1)
        mask = torch.cat([p[1].long() for p in parts], dim=1)
        return self.stack(x, mask), mask

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return pool_text(hidden, mask, self.config.pooling)

    def _empty_text(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``[CLS] [SEP]`` for a regions-only pass (ids of BERT's uncased vocabulary)."""
        ids = torch.tensor([[101, 102]], device=device).expand(n, 2)
        return self.embed_words(ids), torch.ones_like(ids)

    # -- interface
    def encode_image(self, pixel_values: RegionInputs, *, mask: torch.Tensor | None = None) -> ImageFeatures:
        """Regions only: ``[CLS] [SEP] regions``. ``tokens`` are the outputs, ``embeddings`` the region
        embeddings; ``mask`` is not supported (recipes mask regions themselves)."""
        if mask is not None:
            raise ValueError("the region stream masks regions in the recipe, not in encode_image")
        regions = pixel_values
        emb = self.embed_regions(regions)
        text = self._empty_text(len(regions), emb.device)
        hidden, full = self.joint([text, (emb, regions.mask)])
        return ImageFeatures(tokens=hidden, pooled=self.pool(hidden, full), embeddings=emb,
                             extra={"mask": regions.mask})  # fmt: skip

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        emb = self.embed_words(input_ids)
        hidden, _ = self.joint([(emb, attention_mask)])
        return TextFeatures(hidden, attention_mask, self.pool(hidden, attention_mask), embeddings=emb)

    def fuse_embeddings(
        self,
        image_emb: torch.Tensor,
        image_mask: torch.Tensor,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> PairFeatures:
        """The joint pass over ``[text; regions]`` embeddings."""
        length = text_emb.shape[1]
        hidden, mask = self.joint([(text_emb, text_mask), (image_emb, image_mask)])
        return PairFeatures(
            hidden=hidden, pooled=self.pool(hidden, mask), text_slice=slice(0, length),
            image_slice=slice(length, None),
        )  # fmt: skip

    def encode_pair(self, image: ImageFeatures, text: TextFeatures) -> PairFeatures:
        if image.embeddings is None or text.embeddings is None:
            raise ValueError(
                "the region stream's pair pass starts from embeddings; encode with this backbone"
            )
        return self.fuse_embeddings(image.embeddings, image.extra["mask"], text.embeddings, text.mask)

    def fuse(
        self, pixel_values: RegionInputs, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> PairFeatures:
        return self.fuse_embeddings(
            self.embed_regions(pixel_values), pixel_values.mask, self.embed_words(input_ids), attention_mask
        )

    # -- structure
    def image_input(self) -> nn.Module:
        raise TypeError("the region stream reads regions from the corpus store, not pixels")

    def param_roles(self) -> dict[str, list[nn.Module]]:
        return {
            "vision": [self.region_embed],
            "text": [self.text_embeddings, self.mlm_head],
            "fusion": [self.stack],
        }


register_backbone(RegionStreamConfig, RegionStreamBackbone)
