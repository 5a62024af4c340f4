"""The one training loop every method and task uses (nanoGPT-style: readable, no framework indirection).

- ``torchrun`` DDP: NCCL on GPUs, gloo on CPU; a single process without torchrun.
- bf16 autocast on CUDA (``precision=auto``), fp32 on CPU.
- ``batch_size`` is the global batch per optimiser step = world size x micro batch x ``grad_accum``.
- AdamW (no decay on biases / norms / 1-d parameters) with linear warm-up and cosine decay to ``min_lr``.
- Gradient clipping by global norm.
- Checkpoints every ``checkpoint_every`` steps and at the end; resume is automatic and exact (weights incl.
  momentum encoders and queues, optimiser, scheduler, sampler position, every rank's RNG states).
- ``metrics.jsonl`` + TensorBoard, a progress bar, the resolved config saved with the run.

A task (see :mod:`vlp_core.train.tasks`) hands the loop a :class:`TrainJob`: the model, the dataset with its
collate function and an optional evaluation callback; the model returns a ``ModelOutput`` with ``loss`` and
``metrics``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlp_core.data.sampler import ResumableSampler
from vlp_core.train.checkpoint import latest_checkpoint, load_trainer_state, load_weights, save_checkpoint
from vlp_core.train.config import TrainConfig
from vlp_core.train.metrics import MetricsLogger

__all__ = [
    "DistEnv",
    "TrainJob",
    "TrainResult",
    "cosine_schedule",
    "init_distributed",
    "param_groups",
    "train",
]


@dataclass
class TrainJob:
    """What a task gives the loop."""

    model: nn.Module
    dataset: Dataset
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    # evaluate(model, device) -> flat dict of numbers; run on rank 0 after the last step.
    evaluate: Callable[[nn.Module, torch.device], dict[str, float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # e.g. dataset sizes, written to run.json


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    resumed_from: int


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the ``torchrun`` process group when launched by it (env ``WORLD_SIZE`` > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norm weights, temperatures and other 1-d parameters are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_schedule(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """LR multiplier at optimiser ``step`` (0-based): linear warm-up to 1, then cosine to ``min_lr / lr``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _reduce_mean(values: dict[str, torch.Tensor], env: DistEnv) -> dict[str, float]:
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(env.device)
    if env.world_size > 1:
        dist.all_reduce(stacked)
        stacked /= env.world_size
    return dict(zip(keys, stacked.tolist(), strict=True))


def train(config: TrainConfig, build_job: Callable[[TrainConfig, DistEnv], TrainJob]) -> TrainResult:
    """Run (or resume) one training run; returns the last logged metrics and the evaluation."""
    env = init_distributed(config.device)
    run_dir = config.resolved_run_dir()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    env.barrier()

    # Same initial weights on every rank (DDP would broadcast them anyway; this also makes runs with and
    # without DDP start identically). Per-rank streams (dropout) are offset by the rank afterwards.
    torch.manual_seed(config.seed)
    job = build_job(config, env)
    model = job.model.to(env.device)
    torch.manual_seed(config.seed + 1000 * env.rank + 1)

    micro = config.batch_size // (env.world_size * config.grad_accum)
    if micro * env.world_size * config.grad_accum != config.batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by world_size {env.world_size} x "
            f"grad_accum {config.grad_accum}"
        )
    sampler = ResumableSampler(
        len(job.dataset),
        global_batch=micro * env.world_size,
        rank=env.rank,
        world_size=env.world_size,
        seed=config.seed,
    )
    steps_per_epoch = sampler.batches_per_epoch // config.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"dataset of {len(job.dataset)} samples is smaller than one global batch")

    o = config.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: cosine_schedule(s, total=config.max_steps, warmup=o.warmup_steps, lr=o.lr, min_lr=o.min_lr),
    )

    step = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = load_trainer_state(ckpt, model, env.rank)
        if state["world_size"] != env.world_size:
            raise ValueError(f"checkpoint {ckpt} was written with world size {state['world_size']}")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        step = int(state["step"])
    resumed_from = step

    ddp_model: nn.Module = model
    if env.world_size > 1:
        # Buffers (queues, frozen BN statistics) are identical at init and kept identical by construction
        # (queues enqueue features gathered from every rank); re-syncing them every forward would be waste.
        ddp_model = DistributedDataParallel(
            model,
            device_ids=[env.local_rank] if env.device.type == "cuda" else None,
            forward_sync_buffers=False,
        )
    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and env.device.type == "cuda")
    if use_bf16 and env.device.type != "cuda":
        raise ValueError("precision=bf16 is for CUDA; on CPU use fp32 (or auto)")

    def batches():
        while True:
            loader = DataLoader(
                job.dataset,
                batch_size=micro,
                sampler=sampler,
                collate_fn=job.collate,
                num_workers=config.data.num_workers,
                pin_memory=env.device.type == "cuda",
                drop_last=True,
                persistent_workers=False,
            )
            yield from loader
            sampler.set_epoch(sampler.epoch + 1)

    logger = MetricsLogger(run_dir, enabled=env.is_main, resume_step=step)
    bar = tqdm(
        total=config.max_steps, initial=step, disable=not env.is_main, desc=f"{config.task} {config.method}"
    )
    last: dict[str, float] = {}
    stream = batches()
    model.train()
    data_time = compute_time = 0.0
    samples = 0
    t_log = time.perf_counter()
    while step < config.max_steps:
        step_metrics: dict[str, torch.Tensor] = {}
        for i in range(config.grad_accum):
            t0 = time.perf_counter()
            batch = _to_device(next(stream), env.device)
            sampler.advance()  # the loader prefetches ahead; only consumed batches count for resume
            t1 = time.perf_counter()
            data_time += t1 - t0
            sync = i == config.grad_accum - 1 or env.world_size == 1
            ctx = (
                ddp_model.no_sync()
                if not sync and isinstance(ddp_model, DistributedDataParallel)
                else nullcontext()
            )
            with ctx, torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = ddp_model(batch, step=step, steps_per_epoch=steps_per_epoch)
                loss = out.loss / config.grad_accum
            loss.backward()
            for k, v in {"loss": out.loss, **out.metrics}.items():
                step_metrics[k] = step_metrics.get(k, 0) + v.detach().float() / config.grad_accum
            compute_time += time.perf_counter() - t1
            samples += micro * env.world_size
        t2 = time.perf_counter()
        if o.clip_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad_norm)
            step_metrics["grad_norm"] = grad_norm.detach().float()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        hook = getattr(model, "after_optimizer_step", None)
        if hook is not None:
            hook()
        step += 1
        compute_time += time.perf_counter() - t2
        sampler_state = sampler.state_dict()
        if step % config.log_every == 0 or step == config.max_steps:
            last = _reduce_mean(step_metrics, env)
            elapsed = time.perf_counter() - t_log
            record = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "lr": scheduler.get_last_lr()[0],
                **{k: round(v, 6) for k, v in last.items()},
                "samples_per_s": round(samples / max(elapsed, 1e-9), 2),
                "data_time_frac": round(data_time / max(data_time + compute_time, 1e-9), 4),
            }
            logger.log(record)
            bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
            data_time = compute_time = 0.0
            samples = 0
            t_log = time.perf_counter()
        bar.update(1)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            state = {
                "step": step,
                "world_size": env.world_size,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": sampler_state,
                "config": config.model_dump(mode="json"),
            }
            save_checkpoint(
                run_dir,
                step,
                model,
                state if env.is_main else None,
                rank=env.rank,
                barrier=dist.barrier if env.world_size > 1 else None,
                keep=config.keep_checkpoints,
            )
    bar.close()
    logger.close()

    eval_metrics: dict[str, float] = {}
    if env.is_main and job.evaluate is not None:
        model.eval()
        eval_metrics = job.evaluate(model, env.device)
        (run_dir / "eval.json").write_text(json.dumps(eval_metrics, indent=2))
    env.barrier()
    if env.is_main:
        (run_dir / "run.json").write_text(
            json.dumps({"step": step, "resumed_from": resumed_from, "world_size": env.world_size, **job.info})
        )
    return TrainResult(run_dir, step, last, eval_metrics, resumed_from)


def evaluate_only(
    config: TrainConfig, build_job: Callable[[TrainConfig, DistEnv], TrainJob]
) -> dict[str, float]:
    """Evaluate without training: the run's latest checkpoint if it has one, else the initial model (e.g.
    the "no vision-language pre-training" baseline). Writes ``<run_dir>/eval.json``."""
    env = init_distributed(config.device)
    if env.world_size > 1:
        raise ValueError("evaluation runs in one process; launch it without torchrun")
    run_dir = config.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    torch.manual_seed(config.seed)
    job = build_job(config, env)
    model = job.model.to(env.device)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        load_weights(model, ckpt / "model.safetensors")
    if job.evaluate is None:
        raise ValueError(f"task {config.task!r} has no evaluation")
    model.eval()
    metrics = job.evaluate(model, env.device)
    metrics["checkpoint_step"] = float(ckpt.name.split("_")[-1]) if ckpt else 0.0
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics
