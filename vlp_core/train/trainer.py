"""The one training loop every method and task uses (nanoGPT-style: readable, no framework indirection).

- ``torchrun`` DDP: NCCL on GPUs, gloo on CPU; a single process without torchrun.
- bf16 autocast on CUDA (``precision=auto``), fp32 on CPU.
- ``batch_size`` is the global batch per optimiser step = world size x micro batch x ``grad_accum``.
- AdamW (no decay on biases / norms / 1-d parameters) with linear warm-up and cosine decay to ``min_lr``.
- Gradient clipping by global norm.
- Checkpoints every ``checkpoint_every`` steps and at the end; resume is automatic and exact (weights incl.
  momentum encoders and queues, optimiser, scheduler, sampler position, every rank's RNG states).
- ``metrics.jsonl`` + TensorBoard, a progress bar, the resolved config saved with the run; evaluation every
  ``eval.every`` steps and at the end (``evals.jsonl``, ``eval.json``).
- Batch kinds and stages: each step draws one batch kind (a stream with its own resumable sampler) chosen by
  the stage's mixer (round-robin or weighted, a pure function of the step); at a stage boundary the trainable
  set, the optimiser, the schedule and the DDP wrapper are rebuilt. Parameter groups carry learning-rate
  multipliers per role (``optim.lr_mult``; 0 freezes).

A task (see :mod:`vlp_core.tasks`) hands the loop a :class:`~vlp_core.train.spec.TrainSpec`; the model
returns a ``ModelOutput`` with ``loss`` and ``metrics``. Nothing here knows a method or a task.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlp_core.data.sampler import ResumableSampler
from vlp_core.train.checkpoint import latest_checkpoint, load_trainer_state, load_weights, save_checkpoint
from vlp_core.train.config import TrainConfig
from vlp_core.train.metrics import MetricsLogger, read_metrics
from vlp_core.train.spec import BatchMixer, TrainSpec, param_groups, stage_bounds

__all__ = [
    "DistEnv",
    "TrainResult",
    "cosine_schedule",
    "init_distributed",
    "param_groups",
    "to_device",
    "train",
]


#: ``optim.impl`` → the keyword arguments of ``torch.optim.AdamW`` choosing its implementation
ADAMW_IMPL: dict[str, dict[str, bool]] = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "loop": {"foreach": False},
}


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


def cosine_schedule(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """LR multiplier at optimiser ``step`` (0-based): linear warm-up to 1, then cosine to ``min_lr / lr``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch with its tensors on ``device`` (other values as they are)."""
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


class _Streams:
    """One resumable sampler and one (lazily started) DataLoader iterator per batch kind."""

    def __init__(self, spec: TrainSpec, micro: int, env: DistEnv, seed: int, num_workers: int) -> None:
        self.spec, self.micro, self.env, self.num_workers = spec, micro, env, num_workers
        self.samplers = {
            kind: ResumableSampler(
                len(stream.dataset),
                global_batch=micro * env.world_size,
                rank=env.rank,
                world_size=env.world_size,
                seed=seed,
            )  # fmt: skip
            for kind, stream in spec.streams.items()
        }
        self._iters: dict[str, Iterator[dict[str, Any]]] = {}

    def _batches(self, kind: str) -> Iterator[dict[str, Any]]:
        stream, sampler = self.spec.streams[kind], self.samplers[kind]
        while True:
            loader = DataLoader(
                stream.dataset,
                batch_size=self.micro,
                sampler=sampler,
                collate_fn=stream.collate,
                num_workers=self.num_workers,
                pin_memory=self.env.device.type == "cuda",
                drop_last=True,
                persistent_workers=False,
                # Its own generator: creating an iterator then draws no number from the global RNG, so a
                # resumed run (which starts its iterators at another step) keeps the uninterrupted run's
                # dropout stream. Samples are seeded per sample, so worker seeds do not matter.
                generator=torch.Generator().manual_seed(sampler.seed),
            )
            yield from loader
            sampler.set_epoch(sampler.epoch + 1)

    def next(self, kind: str) -> dict[str, Any]:
        if kind not in self._iters:
            self._iters[kind] = self._batches(kind)
        batch = next(self._iters[kind])
        self.samplers[kind].advance()  # the loader prefetches ahead; only consumed batches count for resume
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {kind: s.state_dict() for kind, s in self.samplers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for kind, sampler in self.samplers.items():
            sampler.load_state_dict(state[kind])


def _stage_of(step: int, bounds: list[tuple[int, int]]) -> int:
    for i, (lo, hi) in enumerate(bounds):
        if lo <= step < hi:
            return i
    return len(bounds) - 1


class _StageRuntime:
    """The parts rebuilt at every stage boundary: trainable set, optimiser, schedule, DDP wrapper, mixer."""

    def __init__(
        self,
        config: TrainConfig,
        spec: TrainSpec,
        env: DistEnv,
        index: int,
        bounds: tuple[int, int],
        base_trainable: dict[int, bool],
    ) -> None:
        model = spec.model
        stage = spec.stages[index]
        self.stage, self.index, self.start, self.end = stage, index, bounds[0], bounds[1]
        chosen = None
        if stage.trainable is not None:
            chosen = set()
            for item in stage.trainable(model):
                chosen |= {id(item)} if isinstance(item, nn.Parameter) else {id(p) for p in item.parameters()}
        for p in model.parameters():
            p.requires_grad_(base_trainable[id(p)] and (chosen is None or id(p) in chosen))
        o = config.optim
        groups = param_groups(model, o.weight_decay, config.optim.lr_mult, spec.roles)
        for g in groups:
            g["lr"] = o.lr * g["lr_mult"]
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **ADAMW_IMPL[o.impl])
        total = self.end - self.start
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: cosine_schedule(
                s, total=total, warmup=min(o.warmup_steps, total), lr=o.lr, min_lr=o.min_lr
            ),
        )
        self.mixer = BatchMixer(stage, index, config.seed)
        self.ddp_model: nn.Module = model
        if env.world_size > 1:
            # Buffers (queues, frozen BN statistics) are identical at init and kept identical by construction
            # (queues enqueue features gathered from every rank); re-syncing them every forward is waste.
            self.ddp_model = DistributedDataParallel(
                model,
                device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                forward_sync_buffers=False,
                **spec.ddp_kwargs,
            )


def train(config: TrainConfig, build_spec: Callable[[TrainConfig, DistEnv], TrainSpec]) -> TrainResult:
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
    spec = build_spec(config, env)
    model = spec.model.to(env.device)
    torch.manual_seed(config.seed + 1000 * env.rank + 1)

    micro = config.batch_size // (env.world_size * config.grad_accum)
    if micro * env.world_size * config.grad_accum != config.batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by world_size {env.world_size} x "
            f"grad_accum {config.grad_accum}"
        )
    streams = _Streams(spec, micro, env, config.seed, config.data.num_workers)
    bounds = stage_bounds(spec.stages, config.max_steps)
    # lr_mult 0 freezes a role for the whole run; stages freeze more on top of this base.
    param_groups(model, config.optim.weight_decay, config.optim.lr_mult, spec.roles)
    base_trainable = {id(p): p.requires_grad for p in model.parameters()}

    step = 0
    saved: dict[str, Any] | None = None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        saved = load_trainer_state(ckpt, model, env.rank)
        if saved["world_size"] != env.world_size:
            raise ValueError(f"checkpoint {ckpt} was written with world size {saved['world_size']}")
        if "samplers" not in saved:
            raise ValueError(
                f"checkpoint {ckpt} is from the trainer before batch kinds and stages; start a new run"
            )
        streams.load_state_dict(saved["samplers"])
        for name, component in spec.state.items():
            component.load_state_dict(saved["components"][name])
        step = int(saved["step"])
    resumed_from = step

    use_bf16 = config.precision == "bf16" or (config.precision == "auto" and env.device.type == "cuda")
    if use_bf16 and env.device.type != "cuda":
        raise ValueError("precision=bf16 is for CUDA; on CPU use fp32 (or auto)")

    logger = MetricsLogger(run_dir, enabled=env.is_main, resume_step=step)
    evals = _EvalLog(run_dir / "evals.jsonl", enabled=env.is_main, resume_step=step)
    bar = tqdm(
        total=config.max_steps,
        initial=step,
        disable=not env.is_main,
        desc=f"{config.task.kind} {config.method}",
    )
    last: dict[str, float] = {}
    rt: _StageRuntime | None = None
    model.train()
    data_time = compute_time = 0.0
    samples = 0
    t_log = time.perf_counter()
    while step < config.max_steps:
        index = _stage_of(step, bounds)
        if rt is None or rt.index != index:
            rt = _StageRuntime(config, spec, env, index, bounds[index], base_trainable)
            # The optimiser and schedule of a checkpoint taken inside this stage continue; at a stage's
            # first step (fresh or resumed exactly at the boundary) they start anew, as uninterrupted.
            if saved is not None and saved.get("stage") == index and step > rt.start:
                rt.optimizer.load_state_dict(saved["optimizer"])
                rt.scheduler.load_state_dict(saved["scheduler"])
            saved = None
            if env.is_main and len(spec.stages) > 1:
                where = f"stage {index + 1}/{len(spec.stages)} {rt.stage.name}"
                bar.write(f"{where}: steps {rt.start}-{rt.end - 1}, {len(rt.trainable)} trainable tensors")
        kind = rt.mixer.kind(step - rt.start)
        sampler = streams.samplers[kind]
        steps_per_epoch = int(sampler.batches_per_epoch / rt.mixer.share(kind)) // config.grad_accum
        if steps_per_epoch < 1:
            raise ValueError(
                f"the {kind} data ({len(spec.streams[kind].dataset)} samples) is less than one global batch"
            )
        step_metrics: dict[str, torch.Tensor] = {}
        for i in range(config.grad_accum):
            t0 = time.perf_counter()
            batch = to_device(streams.next(kind), env.device)
            t1 = time.perf_counter()
            data_time += t1 - t0
            sync = i == config.grad_accum - 1 or env.world_size == 1
            ddp = rt.ddp_model
            ctx = ddp.no_sync() if not sync and isinstance(ddp, DistributedDataParallel) else nullcontext()
            with ctx, torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = ddp(batch, step=step, steps_per_epoch=steps_per_epoch, kind=kind, stage=rt.stage.name)
                loss = out.loss / config.grad_accum
            loss.backward()
            for k, v in {"loss": out.loss, **out.metrics}.items():
                step_metrics[k] = step_metrics.get(k, 0) + v.detach().float() / config.grad_accum
            compute_time += time.perf_counter() - t1
            samples += micro * env.world_size
        t2 = time.perf_counter()
        if config.optim.clip_grad_norm:
            # Over every parameter (those without a gradient are skipped), in the model's order.
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad_norm)
            step_metrics["grad_norm"] = grad_norm.detach().float()
        rt.optimizer.step()
        rt.scheduler.step()
        rt.optimizer.zero_grad(set_to_none=True)
        hook = getattr(model, "after_optimizer_step", None)
        if hook is not None:
            hook()
        step += 1
        compute_time += time.perf_counter() - t2
        if step % config.log_every == 0 or step == config.max_steps:
            last = _reduce_mean(step_metrics, env)
            elapsed = time.perf_counter() - t_log
            record = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "lr": rt.scheduler.get_last_lr()[0],
                **{k: round(v, 6) for k, v in last.items()},
                "samples_per_s": round(samples / max(elapsed, 1e-9), 2),
                "data_time_frac": round(data_time / max(data_time + compute_time, 1e-9), 4),
            }
            if len(spec.stages) > 1 or len(spec.streams) > 1:
                record |= {"stage": rt.stage.name, "kind": kind}
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
                "stage": rt.index,
                "optimizer": rt.optimizer.state_dict(),
                "scheduler": rt.scheduler.state_dict(),
                "samplers": streams.state_dict(),
                "mixer": {"stage": rt.index, "step_in_stage": step - rt.start},
                "components": {name: c.state_dict() for name, c in spec.state.items()},
                "config": config.model_dump(mode="json"),
            }
            save_checkpoint(
                run_dir, step, model, state if env.is_main else None, rank=env.rank,
                barrier=dist.barrier if env.world_size > 1 else None, keep=config.keep_checkpoints,
            )  # fmt: skip
        if config.eval.every and step % config.eval.every == 0 and step < config.max_steps:
            if env.is_main and spec.evaluate is not None:
                evals.log(step, _evaluate(spec, model, env))
            env.barrier()
    bar.close()
    logger.close()

    eval_metrics: dict[str, float] = {}
    if env.is_main and spec.evaluate is not None:
        eval_metrics = _evaluate(spec, model, env)
        (run_dir / "eval.json").write_text(json.dumps(eval_metrics, indent=2))
        evals.log(step, eval_metrics)
    env.barrier()
    if env.is_main:
        (run_dir / "run.json").write_text(
            json.dumps(
                {"step": step, "resumed_from": resumed_from, "world_size": env.world_size, **spec.info}
            )
        )
    return TrainResult(run_dir, step, last, eval_metrics, resumed_from)


def _evaluate(spec: TrainSpec, model: nn.Module, env: DistEnv) -> dict[str, float]:
    """Evaluate in eval mode without touching the training RNG streams (dropout, loaders), then go back."""
    assert spec.evaluate is not None
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        model.eval()
        try:
            return spec.evaluate(model, env.device)
        finally:
            model.train()


class _EvalLog:
    """``evals.jsonl``: one line per evaluation (periodic and final), cut back to the step on resume."""

    def __init__(self, path: Path, *, enabled: bool, resume_step: int) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step] if resume_step else []
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def evaluate_only(
    config: TrainConfig, build_spec: Callable[[TrainConfig, DistEnv], TrainSpec]
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
    spec = build_spec(config, env)
    model = spec.model.to(env.device)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        load_weights(model, ckpt / "model.safetensors")
    if spec.evaluate is None:
        raise ValueError(f"task {config.task.kind!r} has no evaluation")
    model.eval()
    metrics = spec.evaluate(model, env.device)
    metrics["checkpoint_step"] = float(ckpt.name.split("_")[-1]) if ckpt else 0.0
    (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics
