"""Inference precision of the corpus's models (detector, region backbone, sentence encoder).

``"fp32"``: no autocast. ``"bf16"``: ``torch.autocast`` in bfloat16 (matrix multiplies and convolutions in
bf16 with float32 accumulation; norms, softmax and RoIAlign stay float32), on CUDA float16 where the GPU has
no bf16. ``"auto"``: bf16 where the hardware runs it natively (a CUDA GPU; a CPU whose oneDNN kernels have
bf16 instructions: AVX512-BF16 or AMX), fp32 elsewhere, where emulated bf16 would be slower than fp32.

What ``"auto"`` chose is part of a corpus stage's signature (:func:`resolve`), so a store built in bf16 on
one machine is not silently mixed with fp32 shards from another.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

#: the settings of ``regions.precision`` and ``embed.precision``
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU's oneDNN kernels run bf16 natively (AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the op
        return False


def resolve(precision: str, device: str | torch.device | None = None) -> str:
    """``precision`` with ``"auto"`` made concrete for ``device`` (None: CUDA when available, else CPU)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    import torch

    kind = (
        torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: fp32, no autocast)."""
    import torch

    if resolve(precision, device) == "fp32":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(dtype: torch.dtype | None, device: str | torch.device):
    """``torch.autocast`` in ``dtype`` on ``device``'s type, or a disabled one for ``dtype`` None (fp32; it
    also switches off an autocast the caller may have opened)."""
    import torch

    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)
