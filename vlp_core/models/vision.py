"""The image side: :class:`CNNGridEncoder` (EfficientNet-Lite0 grid cells as tokens, packaged ImageNet
weights) and :class:`ViTEncoder` (timm ViT), both ``(B, 3, S, S) -> (B, 1 + N, width)`` tokens with a global
token first, exposing the ``image_size`` / ``mean`` / ``std`` their inputs must be prepared with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.models.layers.attention import attention

__all__ = [
    "CNNGridEncoder",
    "PatchEmbedding",
    "ViTEncoder",
    "VisionConfig",
    "VisionEncoder",
    "build_vision_encoder",
]


@dataclass
class VisionConfig:
    """The image encoder.

    Args:
        kind: ``"cnn"`` (EfficientNet-Lite0 grid, :class:`CNNGridEncoder`) or ``"vit"`` (:class:`ViTEncoder`).
        image_size: input side in pixels (square). CNN: the grid is ``ceil(image_size / 32)`` per side.
        width: token width ``Dv``. CNN: the projection width of the grid features. ViT: the embedding width
            (with ``vit_name`` it must equal the named model's width).
        pretrained: CNN only: load ImageNet weights (the packaged ones, or ``weights_path``).
        weights_path: CNN: EfficientNet-Lite0 weights file instead of the packaged one. ViT: a timm state
            dict (``.safetensors`` or torch) loaded into the model; position embeddings are resampled to
            ``image_size`` and a classifier head is dropped. ``None`` for ViT = random init.
        freeze_bn: CNN only: BatchNorm always runs in eval mode with the ImageNet running statistics (its
            affine weights still train). Per-sample outputs then do not depend on the batch, hence not on how
            a global batch is split across processes.
        drop_path: ViT only: stochastic depth rate.
        vit_name: ViT only: a timm model name (e.g. ``"vit_base_patch16_224"``, built offline at
            ``image_size``); ``None`` builds a ``VisionTransformer`` from the explicit widths below.
        patch_size, depth, num_heads, mlp_ratio: ViT widths when ``vit_name`` is ``None``.
    """

    kind: str = "vit"
    image_size: int = 256
    width: int = 768
    pretrained: bool = True
    weights_path: str | None = None
    freeze_bn: bool = True
    drop_path: float = 0.0
    vit_name: str | None = None
    patch_size: int = 16
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("cnn", "vit"):
            raise ValueError(f"vision.kind must be 'cnn' or 'vit', got {self.kind!r}")
        if self.image_size <= 0 or self.width <= 0:
            raise ValueError(f"image_size and width must be positive, got {self.image_size}, {self.width}")

    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` of RGB in [0, 1] the encoder expects, known without building it (for transforms).

        CNN: 0.5 / 0.5 (the packaged EfficientNet-Lite0 weights). ViT by name: the timm model's pretrained
        config (e.g. CLIP's statistics for ``*_clip_*`` models); explicit-width ViT: 0.5 / 0.5.
        """
        if self.kind == "vit" and self.vit_name is not None:
            from timm.models import get_pretrained_cfg

            pcfg = get_pretrained_cfg(self.vit_name)
            if pcfg is not None:
                return tuple(float(x) for x in pcfg.mean), tuple(float(x) for x in pcfg.std)
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class VisionEncoder(nn.Module):
    """Base of the image encoders: ``pixel_values (B, 3, S, S) -> tokens (B, 1 + N, width)``, global first.

    Attributes the data side needs: ``image_size`` (S), ``mean`` and ``std`` (per-channel normalisation of
    RGB in [0, 1]); ``width`` (Dv) and ``num_tokens`` (1 + N) for the model side.
    """

    image_size: int
    width: int
    num_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> VisionEncoder:
        return build_vision_encoder(cfg)


def _bn_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class CNNGridEncoder(VisionEncoder):
    """EfficientNet-Lite0 feature grid as image tokens.

    The last feature map (1,280 channels, stride 32: 4 x 4 at 128 px) is flattened to ``N = g * g`` tokens; a
    global token, the mean of the grid cells (the backbone's own global pool), is put first. All ``1 + N``
    tokens go through one linear projection to ``width``, get learned position embeddings and a LayerNorm
    (so their scale matches the text side's post-LN states that the cross-attention and ITC compare them
    with). Inputs are normalised with mean = std = 0.5, the packaged weights' convention.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        from vlp_core.vision.features import load_efficientnet_lite0

        if cfg.pretrained:
            backbone = load_efficientnet_lite0(cfg.weights_path)
        else:
            backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        # forward_features never uses the ImageNet classifier; dropping it keeps DDP free of unused params.
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.freeze_bn = cfg.freeze_bn
        self.image_size = cfg.image_size
        self.width = cfg.width
        self.mean, self.std = cfg.normalisation()
        # TF "same" padding: every stride-2 stage rounds up, so the grid is ceil(S / 32).
        self.grid = math.ceil(cfg.image_size / 32)
        self.num_tokens = 1 + self.grid * self.grid
        self.proj = nn.Linear(backbone.num_features, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, cfg.width))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.train(self.training)

    def train(self, mode: bool = True) -> CNNGridEncoder:
        super().train(mode)
        if self.freeze_bn:
            for bn in _bn_layers(self.backbone):
                bn.eval()
        return self

    def grid_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> the backbone's grid cells ``(B, g*g, 1280)`` (before the projection)."""
        fmap = self.backbone.forward_features(pixel_values)  # (B, C, g, g)
        if fmap.shape[-2:] != (self.grid, self.grid):
            raise ValueError(f"expected a {self.grid}x{self.grid} grid, got {tuple(fmap.shape[-2:])}")
        return fmap.flatten(2).transpose(1, 2)

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        *,
        global_only: bool = False,
    ) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised -> ``(B, 1 + g*g, width)``; with ``global_only`` the global token
        alone, ``(B, 1, width)`` (what an ITC-only pass reads).

        ``mask`` (B, g*g) bool replaces those cells' projected features by ``mask_token`` (width,) before
        the positions are added. The CNN still sees the whole image, so a masked cell's neighbours carry
        some of its content through their receptive fields: masked modelling on a CNN grid is easier than on
        ViT patches (documented; the ViT path masks patch embeddings, which leaks nothing)."""
        cells = self.grid_features(pixel_values)
        if global_only:
            return self.norm(self.proj(cells.mean(dim=1, keepdim=True)) + self.pos_embed[:, :1])
        tokens = self.proj(torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1))
        if mask is not None:
            masked = torch.cat([mask.new_zeros(mask.shape[0], 1), mask], dim=1)
            tokens = torch.where(masked[..., None], mask_token.to(tokens.dtype), tokens)
        return self.norm(tokens + self.pos_embed)


class ViTEncoder(VisionEncoder):
    """timm Vision Transformer; the tokens are ``forward_features`` (after the final norm), [CLS] first.

    Random init with the explicit widths of :class:`VisionConfig`, or a timm model by name (built offline),
    optionally loaded from ``weights_path``. Normalisation: :meth:`VisionConfig.normalisation`.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if cfg.vit_name is not None:
            model = timm.create_model(
                cfg.vit_name,
                pretrained=False,
                img_size=cfg.image_size,
                num_classes=0,
                drop_path_rate=cfg.drop_path,
            )
            if model.embed_dim != cfg.width:
                raise ValueError(f"{cfg.vit_name} is {model.embed_dim} wide but vision.width is {cfg.width}")
        else:
            model = VisionTransformer(
                img_size=cfg.image_size,
                patch_size=cfg.patch_size,
                embed_dim=cfg.width,
                depth=cfg.depth,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                num_classes=0,
                drop_path_rate=cfg.drop_path,
            )
        if cfg.weights_path is not None:
            state = _read_state_dict(cfg.weights_path)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            # Resamples the position embeddings to this image size (and patch embedding if needed).
            state = checkpoint_filter_fn(state, model)
            model.load_state_dict(state, strict=True)
        self.backbone = model
        self.image_size = cfg.image_size
        self.width = model.embed_dim
        self.num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        self.mean, self.std = cfg.normalisation()

    @property
    def grid(self) -> int:
        return self.backbone.patch_embed.grid_size[0]

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        *,
        global_only: bool = False,
    ) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised -> ``(B, 1 + (S/patch)^2, width)``.

        ``mask`` (B, N) bool replaces those patch embeddings by ``mask_token`` (width,) before the position
        embeddings and the blocks (BEiT / FLAVA masked image modelling). ``global_only``: the [CLS] token
        alone, ``(B, 1, width)``, its value the full pass's: the last block computes its attention query,
        output and MLP at [CLS] only (keys and values at every token), three quarters of that block's work
        saved (an ITC-only pass, e.g. ALBEF's momentum image features in retrieval fine-tuning)."""
        m = self.backbone
        if mask is None and not global_only:
            return m.forward_features(pixel_values)
        x = m.patch_embed(pixel_values)
        if mask is not None:
            x = torch.where(mask[..., None], mask_token.to(x.dtype), x)
        x = m.norm_pre(m.patch_drop(m._pos_embed(x)))
        if not global_only:
            return m.norm(m.blocks(x))
        return m.norm(_block_at_cls(m.blocks[-1], m.blocks[:-1](x)))


def _block_at_cls(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm ViT ``Block`` over ``x`` (B, N, C), computed at position 0 only -> (B, 1, C): the query, the
    attention output and the MLP at [CLS], keys and values at every token. Another block type, or attention
    with parts this does not know (a gate, query / key / output norms), runs whole and is sliced."""
    from timm.models.vision_transformer import Attention, Block

    attn = getattr(block, "attn", None)
    norms = ("q_norm", "k_norm", "norm")
    plain = (
        type(block) is Block
        and type(attn) is Attention
        and getattr(attn, "gate", None) is None
        and all(isinstance(getattr(attn, a, nn.Identity()), nn.Identity) for a in norms)
    )
    if not plain:
        return block(x)[:, :1]
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    width = h * d
    y = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(y[:, :1], weight[:width], None if bias is None else bias[:width])
    kv = F.linear(y, weight[width:], None if bias is None else bias[width:])
    q = q.view(b, 1, h, d).transpose(1, 2)
    k, v = kv.view(b, n, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    y = attention(q, k, v, None, attn.attn_drop).transpose(1, 2).reshape(b, 1, width)
    x = x[:, :1] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(y))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class PatchEmbedding(nn.Module):
    """ViT's input embedding alone (for a shared stack that is not a ViT: VLMo's Multiway transformer):
    ``Conv(patch, stride patch)`` + a [CLS] token + learned positions -> ``(B, 1 + (S/patch)^2, width)``;
    ``mask`` (B, N) bool replaces patch embeddings by ``mask_token`` before the positions are added."""

    def __init__(self, cfg: VisionConfig, width: int) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.grid = cfg.image_size // cfg.patch_size
        self.image_size = cfg.image_size
        self.width = width
        self.num_tokens = 1 + self.grid * self.grid
        self.mean, self.std = cfg.normalisation()
        self.proj = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(
        self,
        pixel_values: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.proj(pixel_values).flatten(2).transpose(1, 2)
        if mask is not None:
            x = torch.where(mask[..., None], mask_token.to(x.dtype), x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def build_vision_encoder(cfg: VisionConfig) -> VisionEncoder:
    """The encoder of ``cfg.kind``."""
    return CNNGridEncoder(cfg) if cfg.kind == "cnn" else ViTEncoder(cfg)
