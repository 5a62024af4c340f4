"""Darknet YOLO networks (YOLOv3, YOLOv3-tiny) in PyTorch: ``.cfg`` parser, ``.weights`` loader, box decoding.

Why not ``cv2.dnn.readNetFromDarknet``: OpenCV 5.0 (the pinned ``opencv-python-headless``) removed the
Darknet importer ("Darknet importer has been removed. Please use ... ONNX-converted models"), and no ONNX
export of YOLOv3-tiny ships offline. The network is small (24 layers of conv / max-pool / route / upsample),
so it is rebuilt here from the original files, which also gives batched inference, CUDA and thread safety
(a forward pass in ``torch.inference_mode`` only reads the module).

Numerics follow darknet: leaky ReLU slope 0.1; batch norm ``(x - mean) / (sqrt(var) + 1e-6)`` (darknet's
``normalize_cpu``), folded into the convolution at load time; max-pool pads ``size - 1`` pixels, left/top
``(size - 1) // 2`` (so the 2×2 stride-1 pool of YOLOv3-tiny keeps 13×13); nearest-neighbour upsampling.
Supported sections: ``net``, ``convolutional``, ``maxpool``, ``route``, ``upsample``, ``shortcut``, ``yolo``;
anything else (YOLOv4's ``groups`` routes, mish) raises ``ValueError`` rather than running wrongly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def parse_cfg(text: str) -> list[dict[str, str]]:
    """Sections of a darknet ``.cfg`` in order; each a dict of its keys plus ``"type"`` (e.g. ``"yolo"``)."""
    sections: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append({"type": line[1:-1].strip()})
        elif "=" in line:
            if not sections:
                raise ValueError(f"darknet cfg: key outside a section: {raw!r}")
            key, value = line.split("=", 1)
            sections[-1][key.strip()] = value.strip()
        else:
            raise ValueError(f"darknet cfg: cannot parse line {raw!r}")
    if not sections or sections[0]["type"] not in ("net", "network"):
        raise ValueError("darknet cfg must start with a [net] section")
    return sections


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.replace(" ", "").split(",") if v]


class _ConvBlock(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, activation: str):
        super().__init__()
        if activation not in ("leaky", "linear", "relu"):
            raise ValueError(f"darknet activation {activation!r} is not supported")
        self.conv, self.bn, self.activation = conv, bn, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activation == "leaky":
            return F.leaky_relu(x, 0.1)
        return F.relu(x) if self.activation == "relu" else x


class _MaxPool(nn.Module):
    def __init__(self, size: int, stride: int):
        super().__init__()
        self.size, self.stride = size, stride
        left = (size - 1) // 2
        self.pad = (left, size - 1 - left, left, size - 1 - left)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x[..., :: self.stride, :: self.stride]
        x = F.pad(x, self.pad, value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)


class _YoloHead(nn.Module):
    """Decodes one YOLO output map into ``(B, A·H·W, 5 + C)`` rows ``[cx, cy, w, h, objectness, p_1..p_C]``:
    centre and size in pixels of the network input, objectness and class probabilities in [0, 1]."""

    def __init__(self, anchors: list[tuple[float, float]], num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        b, _, h, w = x.shape
        a = self.anchors.shape[0]
        p = x.view(b, a, 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2).float()
        gy, gx = torch.meshgrid(
            torch.arange(h, device=x.device, dtype=p.dtype),
            torch.arange(w, device=x.device, dtype=p.dtype),
            indexing="ij",
        )
        stride_y, stride_x = input_hw[0] / h, input_hw[1] / w
        cx = (p[..., 0].sigmoid() + gx) * stride_x
        cy = (p[..., 1].sigmoid() + gy) * stride_y
        bw = p[..., 2].exp() * self.anchors[:, 0].view(1, a, 1, 1)
        bh = p[..., 3].exp() * self.anchors[:, 1].view(1, a, 1, 1)
        rest = p[..., 4:].sigmoid()
        out = torch.cat([torch.stack([cx, cy, bw, bh], dim=-1), rest], dim=-1)
        return out.reshape(b, a * h * w, 5 + self.num_classes)


class DarknetYolo(nn.Module):
    """A YOLOv3-family network built from parsed cfg sections.

    ``forward(x)``: ``x`` (B, 3, H, W) float RGB in [0, 1], H and W multiples of 32 → (B, N, 5 + C) decoded
    rows (see :class:`_YoloHead`), all YOLO heads concatenated.
    Under ``torch.autocast`` the trunk runs in the autocast dtype, and the convolution feeding each YOLO head
    and the decoding in float32, so the logits that meet the confidence threshold keep float32 resolution.
    """

    def __init__(self, sections: list[dict[str, str]]):
        super().__init__()
        net = sections[0]
        self.channels = int(net.get("channels", 3))
        self.default_size = (int(net.get("height", 416)), int(net.get("width", 416)))
        self.layers = nn.ModuleList()
        self.kinds: list[str] = []
        self.sources: list[list[int]] = []  # absolute indices of the inputs of route / shortcut layers
        out_channels: list[int] = []
        num_classes: int | None = None
        for i, sec in enumerate(sections[1:]):
            kind = sec["type"]
            c_in = out_channels[-1] if out_channels else self.channels
            srcs: list[int] = []
            if kind == "convolutional":
                bn = int(sec.get("batch_normalize", 0)) == 1
                filters, size = int(sec["filters"]), int(sec["size"])
                pad = size // 2 if int(sec.get("pad", 0)) else int(sec.get("padding", 0))
                if int(sec.get("groups", 1)) != 1:
                    raise ValueError("darknet grouped convolutions are not supported")
                conv = nn.Conv2d(c_in, filters, size, int(sec.get("stride", 1)), pad, bias=not bn)
                layer: nn.Module = _ConvBlock(
                    conv, nn.BatchNorm2d(filters) if bn else None, sec["activation"]
                )
                c_out = filters
            elif kind == "maxpool":
                size = int(sec["size"])
                layer, c_out = _MaxPool(size, int(sec.get("stride", size))), c_in
            elif kind == "upsample":
                layer, c_out = nn.Upsample(scale_factor=int(sec.get("stride", 2)), mode="nearest"), c_in
            elif kind == "route":
                if "groups" in sec:
                    raise ValueError("darknet route with groups (YOLOv4) is not supported")
                srcs = [j if j >= 0 else i + j for j in _ints(sec["layers"])]
                layer, c_out = nn.Identity(), sum(out_channels[j] for j in srcs)
            elif kind == "shortcut":
                if sec.get("activation", "linear") != "linear":
                    raise ValueError("darknet shortcut activations other than linear are not supported")
                srcs = [i + int(sec["from"]) if int(sec["from"]) < 0 else int(sec["from"])]
                layer, c_out = nn.Identity(), c_in
            elif kind == "yolo":
                anchors = _ints(sec["anchors"])
                pairs = [(float(anchors[2 * k]), float(anchors[2 * k + 1])) for k in range(len(anchors) // 2)]
                mask = _ints(sec.get("mask", ",".join(map(str, range(len(pairs))))))
                classes = int(sec["classes"])
                if num_classes not in (None, classes):
                    raise ValueError("darknet yolo layers disagree on the number of classes")
                num_classes = classes
                if c_in != len(mask) * (5 + classes):
                    raise ValueError(
                        f"yolo layer {i}: {c_in} input channels, expected {len(mask) * (5 + classes)}"
                    )
                layer, c_out = _YoloHead([pairs[m] for m in mask], classes), c_in
            else:
                raise ValueError(f"darknet section [{kind}] is not supported")
            self.layers.append(layer)
            self.kinds.append(kind)
            self.sources.append(srcs)
            out_channels.append(c_out)
        if num_classes is None:
            raise ValueError("darknet cfg has no [yolo] layer")
        self.num_classes = num_classes
        # The convolutions right before a [yolo] layer give its logits: run them in float32 under autocast.
        self.head_convs = {
            i - 1 for i, k in enumerate(self.kinds) if k == "yolo" and self.kinds[i - 1] == "convolutional"
        }

    @classmethod
    def from_files(cls, cfg: str | Path, weights: str | Path) -> DarknetYolo:
        """Build from a ``.cfg`` and load a ``.weights`` file; batch norm is folded into the convolutions."""
        model = cls(parse_cfg(Path(cfg).read_text()))
        model.load_darknet_weights(weights)
        model.fuse_batchnorm()
        return model.eval()

    def load_darknet_weights(self, path: str | Path) -> None:
        """Read darknet's binary format: an int32 header (major, minor, revision), ``seen`` (int64 from format
        0.2 on), then float32 tensors per convolution in layer order: [bn beta, gamma, mean, var | bias],
        weights. Raises ``ValueError`` when the file does not hold exactly the tensors the cfg asks for."""
        with open(path, "rb") as f:
            major, minor, _ = np.fromfile(f, dtype=np.int32, count=3)
            wide_seen = (major * 10 + minor) >= 2 and major < 1000 and minor < 1000
            np.fromfile(f, dtype=np.int64 if wide_seen else np.int32, count=1)
            data = np.fromfile(f, dtype=np.float32)
        pos = 0

        def take(t: torch.Tensor) -> None:
            nonlocal pos
            n = t.numel()
            if pos + n > data.size:
                raise ValueError(f"{path}: weights file too short for the cfg ({data.size} floats)")
            t.copy_(torch.from_numpy(data[pos : pos + n].copy()).view_as(t))
            pos += n

        with torch.no_grad():
            for layer in self.layers:
                if not isinstance(layer, _ConvBlock):
                    continue
                if layer.bn is not None:
                    for t in (layer.bn.bias, layer.bn.weight, layer.bn.running_mean, layer.bn.running_var):
                        take(t)
                else:
                    take(layer.conv.bias)
                take(layer.conv.weight)
        if pos != data.size:
            raise ValueError(
                f"{path}: {data.size - pos} float32 values left over: weights do not match the cfg"
            )

    def fuse_batchnorm(self) -> None:
        """Fold each batch norm into its convolution with darknet's formula ``gamma / (sqrt(var) + 1e-6)``."""
        with torch.no_grad():
            for layer in self.layers:
                if isinstance(layer, _ConvBlock) and layer.bn is not None:
                    bn, conv = layer.bn, layer.conv
                    scale = bn.weight / (bn.running_var.sqrt() + 1e-6)
                    fused = nn.Conv2d(
                        conv.in_channels,
                        conv.out_channels,
                        conv.kernel_size,
                        conv.stride,
                        conv.padding,
                        bias=True,
                    )
                    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
                    fused.bias.copy_(bn.bias - bn.running_mean * scale)
                    layer.conv, layer.bn = fused, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_hw = (x.shape[-2], x.shape[-1])
        outputs: list[torch.Tensor] = []
        heads: list[torch.Tensor] = []
        for i, (layer, kind, srcs) in enumerate(zip(self.layers, self.kinds, self.sources, strict=True)):
            if kind == "route":
                x = torch.cat([outputs[j] for j in srcs], dim=1) if len(srcs) > 1 else outputs[srcs[0]]
            elif kind == "shortcut":
                x = x + outputs[srcs[0]]
            elif kind == "yolo":
                heads.append(layer(x, input_hw))
            elif i in self.head_convs:
                with torch.autocast(x.device.type, enabled=False):
                    x = layer(x.float())
            else:
                x = layer(x)
            outputs.append(x)
        return torch.cat(heads, dim=1)
