"""Training-step throughput of every method at its tiny preset, per stage and batch kind.

For each method (``configs/train/<method>_tiny.yaml``), in its own child process (so its peak RSS is its
own): the run's :class:`~vlp_core.train.spec.TrainSpec` built as the trainer builds it (same seed, same
initial weights), then for every stage and every batch kind that stage draws, the trainer's first batch of
that kind's stream (collated once, before the clock) and ``--steps`` steps of exactly ``zero_grad`` +
forward + backward + optimiser step under that stage's trainable set and optimiser (the trainer's own
stage runtime: ``requires_grad`` per stage, AdamW over the trainable parameters with the configured
implementation). No data loading, scheduler, clipping or logging: what one step of that kind costs.
UniT's kinds are its tasks (one batch per task; the multitask mix draws them by ratio).

Needs the corpus store the presets read (``make quickstart`` builds it) and, for UniT, the bundled task
datasets (``vlp build-tasks``).

    .venv/bin/python benchmarks/methods.py                                  # every method, 10 steps
    .venv/bin/python benchmarks/methods.py --methods albef,vlmo --steps 20 --threads 1 --json

``samples/s`` is the batch size over the median step time of a (method, stage, kind). Absolute times
depend on the machine and its load; compare rows of one run.
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

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks.common import fmt_table, peak_rss_mb, run_stage_child, stage_main  # noqa: E402

#: method -> its tiny preset
METHODS = {
    "albef": "albef_tiny",
    "vlmo": "vlmo_tiny",
    "flava": "flava_tiny",
    "mu-vla": "mu_vla_tiny",
    "u-visualbert": "u_visualbert_tiny",
    "vlmixer": "vlmixer_tiny",
    "unit": "unit_tiny",
}


def _first_batch(spec: Any, kind: str, batch_size: int, seed: int) -> dict[str, Any]:
    """The trainer's first batch of ``kind``: the first ``batch_size`` keys of its resumable sampler."""
    import itertools

    from vlp_core.data import ResumableSampler

    stream = spec.streams[kind]
    sampler = ResumableSampler(len(stream.dataset), global_batch=batch_size, seed=seed)
    keys = list(itertools.islice(iter(sampler), batch_size))
    return stream.collate([stream.dataset[k] for k in keys])


def run_method(spec_in: dict[str, Any]) -> dict[str, Any]:
    import torch

    from vlp_core.tasks import build_spec
    from vlp_core.train.config import load_train_config
    from vlp_core.train.spec import stage_bounds
    from vlp_core.train.trainer import DistEnv, _StageRuntime

    torch.set_num_threads(spec_in["threads"])
    overrides = {"run_dir": tempfile.mkdtemp(prefix="vlp-bench-methods-"), **spec_in["overrides"]}
    config = load_train_config(spec_in["config"], overrides)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(config.seed)  # as train() does before build_spec
    t0 = time.perf_counter()
    spec = build_spec(config, env)
    build_s = time.perf_counter() - t0
    spec.evaluate = None
    model = spec.model.train()
    base_trainable = {id(p): p.requires_grad for p in model.parameters()}
    bounds = stage_bounds(spec.stages, config.max_steps)
    batches = {k: _first_batch(spec, k, config.batch_size, config.seed) for k in spec.streams}
    rows = []
    for index, stage in enumerate(spec.stages):
        rt = _StageRuntime(config, spec, env, index, bounds[index], base_trainable)
        steps_per_epoch = 1000
        for kind in stage.kinds:
            batch = batches[kind]
            times: list[float] = []
            for i in range(spec_in["warmup"] + spec_in["steps"]):
                t0 = time.perf_counter()
                rt.optimizer.zero_grad(set_to_none=True)
                out = model(
                    batch, step=rt.start + i, steps_per_epoch=steps_per_epoch, kind=kind, stage=stage.name
                )
                out.loss.backward()
                rt.optimizer.step()
                if i >= spec_in["warmup"]:
                    times.append(time.perf_counter() - t0)
                if not torch.isfinite(out.loss):
                    raise RuntimeError(f"{stage.name}/{kind} step {i}: loss {out.loss}")
            med = statistics.median(times)
            rows.append({
                "stage": stage.name, "kind": kind, "step_ms": 1000 * med,
                "samples_per_s": config.batch_size / med, "loss": float(out.loss.detach()),
                "trainable": sum(p.numel() for p in rt.trainable),
            })  # fmt: skip
    return {
        "rows": rows,
        "params": sum(p.numel() for p in model.parameters()),
        "build_spec_s": build_s,
        "batch_size": config.batch_size,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ",".join(METHODS))
    ap.add_argument("--steps", type=int, default=10, help="measured steps per (stage, kind) (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="steps before the clock per (stage, kind)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    ap.add_argument("--data-dir", help="the data directory (default: VLP_DATA_DIR or ./data)")
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (YAML values)"
    )
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        return stage_main(args, lambda stage, spec: run_method(spec))
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    env = {"OMP_NUM_THREADS": str(args.threads)}
    results = {}
    with tempfile.TemporaryDirectory(prefix="vlp-bench-methods-") as work:
        for method in args.methods.split(","):
            if method not in METHODS:
                raise SystemExit(f"unknown method {method!r}; one of {', '.join(METHODS)}")
            spec = {"config": METHODS[method], "overrides": overrides, "threads": args.threads,
                    "warmup": args.warmup, "steps": args.steps}  # fmt: skip
            results[method] = run_stage_child(__file__, method, spec, Path(work), env)
    print(f"one step per (method, stage, batch kind) at each tiny preset: zero_grad + forward + backward + "
          f"AdamW, median of {args.steps} after {args.warmup}, {args.threads} thread(s)")  # fmt: skip
    lines = []
    for method, res in results.items():
        for r in res["rows"]:
            lines.append([method, r["stage"], r["kind"], f"{r['trainable']:,}", f"{r['step_ms']:.1f}",
                          f"{r['samples_per_s']:.2f}", f"{res['peak_rss_mb']:.0f}",
                          f"{r['loss']:.3f}"])  # fmt: skip
    print(fmt_table(
        ["method", "stage", "kind", "trainable params", "step ms", "samples/s", "peak RSS MB", "last loss"],
        lines,
    ))  # fmt: skip
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
