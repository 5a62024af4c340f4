"""Checkpoints that make resume exact: weights, optimiser, LR schedule, data position and RNG states.

Layout of one checkpoint (a directory, written under a temporary name and renamed into place, so a killed run
never leaves a half-written checkpoint that resume would pick)::

    <run_dir>/checkpoints/step_00000200/
        model.safetensors        # the full model state (momentum encoders and queues included)
        trainer.pt               # optimiser, scheduler, step, sampler position, config (rank 0)
        rng_rank{r}.pt           # python / numpy / torch / CUDA RNG states of every rank

Weights are written under every state-dict name, tied parameters included (the MLM decoder shares the word
embeddings): a checkpoint is then a plain ``name -> tensor`` file that any part of the model (a VQA head's
text encoder, say) can be loaded from by name, at the cost of one extra copy of each tied tensor on disk.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "latest_checkpoint",
    "load_pretrained_weights",
    "load_rng_state",
    "load_trainer_state",
    "load_weights",
    "rng_state",
    "save_checkpoint",
    "save_weights",
]

_PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(model: nn.Module, path: Path) -> None:
    """Every entry of ``model.state_dict()`` to a safetensors file (aliases of tied tensors as copies)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[name] = t.clone().contiguous() if key in seen else t.contiguous()
        seen.add(key)
    save_file(out, str(path))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a :func:`save_weights` file into ``model``, strictly."""
    model.load_state_dict(load_file(str(path)), strict=True)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{_PREFIX}{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (temporary directories are ignored), or None."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "trainer.pt").exists())
    return done[-1] if done else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    trainer_state: dict[str, Any] | None,
    *,
    rank: int = 0,
    barrier: Any = None,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of ``step``; every rank calls it (each writes its RNG state).

    Rank 0 writes weights and ``trainer_state`` into ``step_N.tmp`` and renames it after the other ranks have
    written their RNG files (``barrier`` is ``torch.distributed.barrier`` under DDP). Older checkpoints beyond
    ``keep`` are removed.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if barrier:
        barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        save_weights(model, tmp / "model.safetensors")
        torch.save(trainer_state, tmp / "trainer.pt")
    if barrier:
        barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        done = sorted(p for p in final.parent.iterdir() if p.name.startswith(_PREFIX) and p.suffix != ".tmp")
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if barrier:
        barrier()
    return final


def load_trainer_state(ckpt: Path, model: nn.Module, rank: int = 0) -> dict[str, Any]:
    """Load weights into ``model`` (strict) and this rank's RNG; return the trainer state dict."""
    load_weights(model, ckpt / "model.safetensors")
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        raise FileNotFoundError(
            f"{rng_file} missing: resume with the world size the run was checkpointed with"
        )
    load_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(ckpt / "trainer.pt", weights_only=False)


def load_pretrained_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint dir, a run dir (its latest checkpoint) or a .safetensors file."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "checkpoints").is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise FileNotFoundError(f"run {p} has no complete checkpoint")
        p = found
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"no weights at {p}")
    return load_file(str(p))
