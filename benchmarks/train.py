"""Training benchmark: a plain PyTorch training step vs. data loading alone vs. the project's trainer.

A tiny pre-training preset on CPU (``--method albef|vlmo|flava`` → ``configs/train/<method>_tiny.yaml``,
default ALBEF), on the retrieved pairs of an existing corpus store. Every stage times the method's PAIRED
step: VLMo runs with ``recipe.vision_steps=0 recipe.language_steps=0`` (only its vision-language stage) and
FLAVA with ``recipe.mixing=weighted recipe.mix_weights={image: 0, text: 0, pair: 1}`` (only paired batches),
in all three stages; ALBEF draws only pairs anyway. Three stages, each in its own child process (this script
re-run with the hidden ``--stage`` flag), so each stage's peak RSS (``VmHWM``) is its own. Model building,
data indexing and ``--warmup`` steps come before the clock; ``--steps`` steps are measured.

1. ``plain-step``  the plain-library baseline: the same model (``spec.model`` of
                   ``vlp_core.tasks.build_spec``, as the trainer builds it), ONE pre-collated batch of the
                   ``pair`` stream reused every step, and a bare loop of ``model(batch, step=,
                   steps_per_epoch=, kind="pair", stage=<the stage drawing pairs>)`` → ``loss.backward()`` →
                   ``torch.optim.AdamW.step()`` (the implementation the trainer uses, ``optim.impl``) →
                   ``zero_grad()`` over every parameter that requires a gradient (the paired stage of each
                   recipe trains everything). No data loading, no
                   scheduler, no clipping, no logging.
2. ``data-only``   no model: the pretrain task's pair stream (``vlp_core.tasks.pretrain.pair_stream``:
                   ``PairDataset`` + ``PretrainCollator``) in ``DataLoader(batch_size,
                   sampler=ResumableSampler, num_workers=--num-workers)``, built and iterated the way the
                   trainer does it (a new loader per epoch, ``sampler.advance()`` per batch). The input size
                   and normalisation come from the backbone config (nothing is built).
3. ``trainer``     ``vlp_core.train.trainer.train(config, build_spec)`` in the child, into a temporary
                   ``run_dir``, with ``log_every=1``, ``checkpoint_every`` past the end of the run and the
                   task's evaluation switched off (``spec.evaluate = None``). Throughput and the fraction of
                   time spent waiting on data come from the ``samples_per_s`` and ``data_time_frac`` of
                   ``metrics.jsonl`` per step.

``samples/s`` is the median over the measured steps (batches for ``data-only``); ``vs plain-step`` is its
ratio to the baseline's. Timings on a shared machine vary from run to run.

    .venv/bin/python benchmarks/train.py --data-dir /path/to/data
    .venv/bin/python benchmarks/train.py --method vlmo --batch-size 32 --steps 20 --num-workers 2 --json
    .venv/bin/python benchmarks/train.py --set recipe.queue_size=256 --stages plain-step,trainer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks.common import (  # noqa: E402
    ChildMonitor,
    fmt_table,
    load_average,
    peak_rss_mb,
    run_stage_child,
    stage_main,
)

STAGES = ("plain-step", "data-only", "trainer")
BASELINE = "plain-step"
METHODS = ("albef", "vlmo", "flava")
#: overrides that make every step of a method's run a paired step (applied before ``--set``)
PAIR_ONLY: dict[str, dict[str, Any]] = {
    "albef": {},
    "vlmo": {"recipe.vision_steps": 0, "recipe.language_steps": 0},
    "flava": {"recipe.mixing": "weighted", "recipe.mix_weights": {"image": 0, "text": 0, "pair": 1}},
}


# ------------------------------------------------------------------------------------------ child side


def _config(spec: dict[str, Any]):
    import torch

    from vlp_core.train.config import load_train_config

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    return load_train_config(spec["config"], spec["overrides"])


def _pair_stage(train_spec: Any) -> Any:
    """The (last) stage that draws paired batches: the one the benchmark times."""
    stages = [s for s in train_spec.stages if "pair" in s.kinds]
    if not stages or "pair" not in train_spec.streams:
        raise ValueError("the run has no stage drawing paired batches")
    return stages[-1]


def _stage_plain(spec: dict[str, Any]) -> dict[str, Any]:
    import itertools

    import torch

    from vlp_core.data import ResumableSampler
    from vlp_core.tasks import build_spec
    from vlp_core.train.trainer import DistEnv

    config = _config(spec)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(config.seed)  # as train() does before build_spec: the same initial weights
    train_spec = build_spec(config, env)
    stage = _pair_stage(train_spec).name
    stream = train_spec.streams["pair"]
    sampler = ResumableSampler(len(stream.dataset), global_batch=config.batch_size, seed=config.seed)
    keys = list(itertools.islice(iter(sampler), config.batch_size))  # the trainer's first paired batch
    batch = stream.collate([stream.dataset[k] for k in keys])
    steps_per_epoch = sampler.batches_per_epoch  # as the trainer's when every step draws pairs
    model = train_spec.model
    del train_spec, stream  # datasets, tokenizer, evaluation closure: the baseline keeps only model + batch
    model.train()
    from vlp_core.train.trainer import ADAMW_IMPL

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, **ADAMW_IMPL[config.optim.impl])

    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    step_s: list[float] = []
    warmup, steps = spec["warmup"], spec["steps"]
    rss0 = cpu0 = None
    for step in range(warmup + steps):
        if step == warmup:
            rss0, cpu0 = peak_rss_mb(), time.process_time()
        t0 = time.perf_counter()
        out = model(batch, step=step, steps_per_epoch=steps_per_epoch, kind="pair", stage=stage)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= warmup:
            step_s.append(t3 - t0)
            phases["forward"] += t1 - t0
            phases["backward"] += t2 - t1
            phases["optimizer"] += t3 - t2
    return {
        "step_s": step_s,
        "cpu_s": time.process_time() - cpu0,
        "worker_cpu_s": None,
        "phases_s": phases,
        "loss_last": float(out.loss.detach()),
        "stage_name": stage,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_modules": sorted(
            {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
        ),
        "rss_at_start_mb": rss0,
    }


def _stage_data(spec: dict[str, Any]) -> dict[str, Any]:
    """The pair stream of the pretrain task's ``build_spec`` and ``train()``'s loader, without a model."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from stores.shards import ShardStore
    from vlp_core.data import PairsConfig, ResumableSampler, load_tokenizer
    from vlp_core.tasks.pretrain import pair_stream

    config = _config(spec)
    if config.task.kind != "pretrain":
        raise ValueError("data-only mirrors the pair stream of the pretrain task")
    # The input size and normalisation the model would report, from the backbone config (the vision
    # encoders take both from it), so no network is built.
    vision = config.backbone_config().vision
    size, (mean, std) = vision.image_size, vision.normalisation()
    facts = SimpleNamespace(image_size=size, image_mean=mean, image_std=std)
    store = ShardStore(config.layout().store)
    stream, _ = pair_stream(config, store, facts, PairsConfig(**config.data.pairs), load_tokenizer())
    dataset, collate = stream.dataset, stream.collate
    sampler = ResumableSampler(len(dataset), global_batch=config.batch_size, seed=config.seed)

    def batches():  # as in train()
        while True:
            loader = DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=sampler,
                collate_fn=collate,
                num_workers=config.data.num_workers,
                pin_memory=False,
                drop_last=True,
                persistent_workers=False,
            )
            yield from loader
            sampler.set_epoch(sampler.epoch + 1)

    stream = batches()
    warmup, steps = spec["warmup"], spec["steps"]
    step_s: list[float] = []
    rss0 = cpu0 = None
    snap: dict[int, float] = {}
    with ChildMonitor() as workers:
        for step in range(warmup + steps):
            if step == warmup:
                rss0, cpu0, snap = peak_rss_mb(), time.process_time(), workers.snapshot()
            t0 = time.perf_counter()
            batch = next(stream)
            sampler.advance()
            if step >= warmup:
                step_s.append(time.perf_counter() - t0)
        cpu = time.process_time() - cpu0
    epoch = sampler.epoch
    stream.close()
    return {
        "step_s": step_s,
        "cpu_s": cpu,
        "worker_cpu_s": workers.cpu_since(snap) if config.data.num_workers else None,
        "pairs": len(dataset),
        "batches_per_epoch": sampler.batches_per_epoch,
        "epochs_started": epoch + 1,
        "image_size": size,
        "text_len": int(batch["input_ids"].shape[1]),
        "worker_peak_rss_mb": workers.largest_mb,
        "workers_seen": len(workers.peaks),
        "rss_at_start_mb": rss0,
    }


def _stage_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    import shutil

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from vlp_core.tasks import build_spec
    from vlp_core.train.metrics import read_metrics
    from vlp_core.train.trainer import train

    warmup, steps = spec["warmup"], spec["steps"]
    total = warmup + steps
    run_dir = Path(tempfile.mkdtemp(prefix="vlp-bench-train-"))
    spec = dict(spec)
    spec["overrides"] = {
        **spec["overrides"],
        "run_dir": str(run_dir),
        "max_steps": total,
        "checkpoint_every": total + 1,  # only the final checkpoint, written after the last logged step
        "log_every": 1,
    }
    config = _config(spec)
    timings: dict[str, float] = {}

    def build_spec_without_eval(cfg, env):
        t0 = time.perf_counter()
        train_spec = build_spec(cfg, env)
        train_spec.evaluate = None  # the task's retrieval evaluation is not part of a training step
        timings["build_spec_s"] = time.perf_counter() - t0
        return train_spec

    # CPU seconds of the measured steps: from the end of the last warm-up step's optimiser step to the end
    # of the last one (this process; DataLoader workers from the monitor), read by a global optimiser hook.
    marks: list[tuple[float, float]] = []
    snap: dict[int, float] = {}

    def after_optimizer_step(optimizer, args, kwargs) -> None:
        marks.append((time.perf_counter(), time.process_time()))
        if len(marks) == warmup:
            snap.update(workers.snapshot())

    handle = register_optimizer_step_post_hook(after_optimizer_step)
    try:
        with ChildMonitor() as workers:
            t0 = time.perf_counter()
            result = train(config, build_spec_without_eval)
            wall = time.perf_counter() - t0
        records = read_metrics(run_dir / "metrics.jsonl")
    finally:
        handle.remove()
        shutil.rmtree(run_dir, ignore_errors=True)
    if len(marks) != total:
        raise RuntimeError(f"{len(marks)} optimiser steps seen, expected {total}")
    if [r["step"] for r in records] != list(range(1, total + 1)):
        raise RuntimeError(f"metrics.jsonl has steps {[r['step'] for r in records]}, expected 1..{total}")
    if kinds := {r["kind"] for r in records if r.get("kind", "pair") != "pair"}:
        raise RuntimeError(f"the trainer drew {sorted(kinds)} batches: only paired steps are timed")
    batch = config.batch_size
    # metrics.jsonl rounds samples_per_s to 2 decimals: a step slower than 200 s per sample logs 0.0
    if any(r["samples_per_s"] <= 0 for r in records):
        raise RuntimeError("a step logged samples_per_s 0.0 (too slow to time from metrics.jsonl)")
    all_s = [batch / r["samples_per_s"] for r in records]
    measured = [r for r in records if r["step"] > warmup]
    return {
        "step_s": [batch / r["samples_per_s"] for r in measured],
        "samples_per_s_logged": [r["samples_per_s"] for r in measured],
        "data_time_frac": [r["data_time_frac"] for r in measured],
        "cpu_s": marks[-1][1] - marks[warmup - 1][1],
        "worker_cpu_s": workers.cpu_since(snap) if config.data.num_workers else None,
        "hook_wall_s": marks[-1][0] - marks[warmup - 1][0],
        "warmup_step_s": all_s[:warmup],
        "build_spec_s": timings.get("build_spec_s"),
        "train_wall_s": wall,
        "steps_wall_s": sum(all_s),
        "epoch_at_end": records[-1]["epoch"],
        "loss_last": result.last_metrics.get("loss"),
        "worker_peak_rss_mb": workers.largest_mb,
        "workers_seen": len(workers.peaks),
    }


STAGE_FUNCS = {"plain-step": _stage_plain, "data-only": _stage_data, "trainer": _stage_trainer}


def run_stage(stage: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    res = STAGE_FUNCS[stage](spec)
    res.update(stage=stage, peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads())
    return res


# ---------------------------------------------------------------------------------------- parent side


def retrieved_pair_rows(store: Path) -> int:
    """Rows in the store's ``retrieved_pairs`` table (Parquet footers only; creates nothing)."""
    import pyarrow.parquet as pq

    table = store / "retrieved_pairs"
    files = [p for p in table.rglob("*.parquet") if p.name != "_schema.parquet"] if table.is_dir() else []
    return sum(pq.ParquetFile(p).metadata.num_rows for p in files)


def summarise(rows: list[dict[str, Any]], batch: int) -> None:
    """Add samples/s (median step and overall), data wait, CPU per sample and the ratios to the baseline."""
    for r in rows:
        r["samples"] = batch * len(r["step_s"])
        r["seconds"] = sum(r["step_s"])
        r["samples_per_s"] = batch / statistics.median(r["step_s"])
        r["samples_per_s_overall"] = r["samples"] / r["seconds"]
        r["cpu_per_sample_s"] = (r["cpu_s"] + (r["worker_cpu_s"] or 0.0)) / r["samples"]
        if r["stage"] == "trainer":
            # time-weighted: the share of the measured steps' time spent in next(loader)
            r["data_wait_frac"] = (
                sum(f * s for f, s in zip(r["data_time_frac"], r["step_s"], strict=True)) / r["seconds"]
            )
    base = next((r for r in rows if r["stage"] == BASELINE), None)
    for r in rows:
        r["vs_plain_step"] = r["samples_per_s"] / base["samples_per_s"] if base else None
        r["cpu_vs_plain_step"] = base["cpu_per_sample_s"] / r["cpu_per_sample_s"] if base else None


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(rows: list[dict[str, Any]]) -> str:
    header = ["stage", "steps", "seconds", "samples/s", "overall/s", "data wait", "CPU s", "worker CPU s",
              "vs plain-step", "CPU vs plain-step", "peak RSS MB", "worker RSS MB"]  # fmt: skip
    lines = []
    for r in rows:
        wait, wcpu, wrss = r.get("data_wait_frac"), r["worker_cpu_s"], r.get("worker_peak_rss_mb")
        lines.append([
            r["stage"], f"{len(r['step_s'])}", f"{r['seconds']:.2f}", f"{r['samples_per_s']:,.1f}",
            f"{r['samples_per_s_overall']:,.1f}", "-" if wait is None else f"{100 * wait:.1f}%",
            f"{r['cpu_s']:.2f}", "-" if wcpu is None else f"{wcpu:.2f}", _ratio(r["vs_plain_step"]),
            _ratio(r["cpu_vs_plain_step"]), f"{r['peak_rss_mb']:,.0f}",
            "-" if wrss is None else f"{wrss:,.0f}",
        ])  # fmt: skip
    return fmt_table(header, lines)


def details(rows: list[dict[str, Any]], spec: dict[str, Any]) -> str:
    out = []
    for r in rows:
        if r["stage"] == "plain-step":
            ph = r["phases_s"]
            total = sum(ph.values())
            out.append(
                f"  plain-step: forward {100 * ph['forward'] / total:.0f}%, backward "
                f"{100 * ph['backward'] / total:.0f}%, AdamW step {100 * ph['optimizer'] / total:.0f}% of "
                f"the step time ({r['stage_name']} stage, pair batches); {r['parameters'] / 1e6:.1f} M "
                f"parameters ({r['trainable'] / 1e6:.1f} M trainable; frozen: "
                f"{', '.join(r['frozen_modules']) or 'none'}), loss {r['loss_last']:.3f} after the last step"
            )
        elif r["stage"] == "data-only":
            per_sample = 1000 * r["seconds"] / r["samples"]
            out.append(
                f"   data-only: {per_sample:.1f} ms per sample (decode, crop/flip, normalise, tokenize, "
                f"MLM masks) with {spec['num_workers']} worker(s); {r['pairs']:,} pairs = "
                f"{r['batches_per_epoch']} batches per epoch, {r['epochs_started']} epoch(s) started, "
                f"{r['image_size']} px images, text length {r['text_len']} in the last batch"
            )
        else:
            med = statistics.median(r["data_time_frac"])
            other = r["train_wall_s"] - (r["build_spec_s"] or 0.0) - r["steps_wall_s"]
            warm = ", ".join(f"{s:.2f}" for s in r["warmup_step_s"])
            out.append(
                f"     trainer: data_time_frac median {100 * med:.1f}% per step; train() took "
                f"{r['train_wall_s']:.1f} s: build_spec {r['build_spec_s'] or 0:.1f} s, all "
                f"{len(r['warmup_step_s']) + len(r['step_s'])} steps {r['steps_wall_s']:.1f} s (warm-up "
                f"steps {warm} s), other {other:.1f} s (setup, TensorBoard, final checkpoint); "
                f"epoch {r['epoch_at_end']} at the end, loss {r['loss_last']:.3f}"
            )
    workers = [r for r in rows if r.get("worker_peak_rss_mb") is not None]
    if workers:
        out.append(
            "  worker RSS: the largest DataLoader worker's VmHWM; forked workers share the parent's pages "
            "copy-on-write, so the stage's real footprint is less than the sum of the two columns"
        )
    threads, workers_n, cpus = max(r["threads"] for r in rows), spec["num_workers"], os.cpu_count() or 1
    if workers_n and threads + workers_n > cpus and any(r["stage"] == "trainer" for r in rows):
        out.append(
            f"  note: {threads} torch threads + {workers_n} DataLoader worker(s) on {cpus} CPU cores: the "
            f"trainer stage oversubscribes the CPU (compare --threads {max(1, cpus - workers_n)})"
        )
    busy = ", ".join(f"{r['stage']} {r['cpu_s'] / r['seconds']:.2f}" for r in rows)
    out.append(
        f"  CPU s: the stage process over the measured steps; per wall second: {busy} (torch threads: "
        f"{'/'.join(str(t) for t in sorted({r['threads'] for r in rows}))}; less means other jobs or the "
        "DataLoader worker took the cores)"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data-dir",
        type=Path,
        help="data directory with the corpus store (default $VLP_DATA_DIR or <repo>/data)",
    )
    p.add_argument("--method", choices=METHODS, default="albef", help="the recipe timed (default albef)")
    p.add_argument("--config", help="training preset or YAML path of that method (default <method>_tiny)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per step (default 16)")
    p.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="steps before the clock starts, >= 1 (default 2)")
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per stage (default: torch's own)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override (repeatable)"
    )
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ",".join(STAGES))
    p.add_argument("--json", action="store_true", help="also print one JSON line of results")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.stage:  # child: one stage, results to a file
        return stage_main(args, run_stage)

    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        p.error(f"unknown stage(s): {sorted(unknown)}")
    if min(args.batch_size, args.steps, args.warmup) < 1 or args.num_workers < 0:
        p.error("--batch-size, --steps and --warmup must be >= 1, --num-workers >= 0")

    from vlp_core.paths import data_dir
    from vlp_core.train.config import load_train_config

    root = args.data_dir.expanduser().resolve() if args.data_dir else data_dir()
    args.config = args.config or f"{args.method}_tiny"
    overrides: dict[str, Any] = dict(PAIR_ONLY[args.method])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    overrides.update({
        "data_dir": str(root), "batch_size": args.batch_size, "data.num_workers": args.num_workers,
        "device": "cpu",
    })  # fmt: skip
    try:
        config = load_train_config(args.config, overrides)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.method != args.method or config.task.kind != "pretrain":
        print(
            f"error: {args.config} is a {config.task.kind} run of {config.method}, not pretrain of "
            f"{args.method}",
            file=sys.stderr,
        )
        return 2
    store = config.layout().store
    n_pairs = retrieved_pair_rows(store)
    if n_pairs == 0:
        print(
            f"error: no retrieved pairs in {store}: build the corpus first (make quickstart)", file=sys.stderr
        )
        return 2

    spec = {
        "config": args.config, "overrides": overrides, "warmup": args.warmup, "steps": args.steps,
        "num_workers": args.num_workers, "threads": args.threads,
    }  # fmt: skip
    load0 = load_average()
    print(
        f"{os.cpu_count()} CPU cores, load average {load0 if load0 is None else f'{load0:.1f}'}; "
        f"{n_pairs:,} retrieved pairs in {store}",
        file=sys.stderr,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlp-bench-") as tmp:
        for stage in stages:
            print(f"[{stage}] ...", file=sys.stderr)
            try:
                rows.append(run_stage_child(__file__, stage, spec, Path(tmp)))
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    load1 = load_average()
    summarise(rows, args.batch_size)
    threads = sorted({r["threads"] for r in rows})
    print(
        f"\n== {args.config} ({args.method} paired steps) on CPU, batch {args.batch_size}: {args.warmup} "
        f"warm-up + {args.steps} measured steps, {args.num_workers} DataLoader worker(s), torch threads "
        f"{'/'.join(map(str, threads))}"
    )
    print(table(rows))
    print(details(rows, spec))
    loads = "?" if load0 is None or load1 is None else f"{load0:.1f} -> {load1:.1f}"
    print(
        f"  samples/s: median over the measured steps; overall/s: samples / summed step time. "
        f"{os.cpu_count()} CPU cores, load average {loads}: timings on a shared machine vary between runs"
    )
    if args.json:
        print(json.dumps({
            "config": args.config, "method": args.method, "data_dir": str(root), "retrieved_pairs": n_pairs,
            "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps,
            "num_workers": args.num_workers, "cpus": os.cpu_count(), "load_average": [load0, load1],
            "overrides": overrides, "stages": rows,
        }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
