"""The µ-VLA pairing study at CPU scale: zero-shot retrieval on the held-out clip art for four ALBEF models of
the same shape and budget, over several seeds.

1. ``no-vlp``     no vision-language pre-training (MiniLM + ImageNet EfficientNet-Lite0, fresh projections);
2. ``random``     pre-trained on random pairs of the same images and sentences as ``retrieved``;
3. ``retrieved``  pre-trained on the retrieved (weakly aligned) pairs of the unpaired corpus;
4. ``known``      pre-trained on the true (known) caption pairs.

Every run uses the same preset, steps, batch and learning-rate schedule, and only the clip-art images
(``pairs.sources=[openclipart]``), so the models see the same number of samples. Each run is an ordinary
``python -m vlp_core.train`` run under ``<data>/runs/train/pairing-<condition>-s<seed>`` (resumable:
re-running the study skips finished runs; a run dir holding another budget is an error). Prints mean ± std
over seeds of each recall. Run helpers shared with ``scripts/method_study.py``: ``scripts/study_runs.py``.

    .venv/bin/python scripts/pairing_study.py --seeds 0,1,2 --steps 120 --batch-size 16 --lr 3e-4 --parallel 2

At this CPU budget (~2,000 samples) the ALBEF reference lr of 1e-4 leaves the freshly initialised projection
and ITM heads nearly where they started (every pre-trained model stays at chance); 3e-4 is the default here.
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from study_runs import budget_mismatch, default_data_dir, mean_std, run_train, train_command

CONDITIONS = ("no-vlp", "random", "retrieved", "known")
METRICS = ("itc_i2t_r1", "itc_i2t_r5", "itc_i2t_r10", "itc_t2i_r1", "itc_t2i_r5", "itc_t2i_r10", "itm_mean_r")


def run_dir(condition: str, seed: int, args: argparse.Namespace) -> Path:
    return Path(args.data_dir) / "runs" / "train" / f"pairing-{condition}-s{seed}"


def overrides(condition: str, seed: int, args: argparse.Namespace) -> dict:
    mode = "retrieved" if condition == "no-vlp" else condition
    return {
        "name": f"{condition}-s{seed}",
        "run_dir": str(run_dir(condition, seed, args)),
        "data_dir": args.data_dir,
        "seed": seed,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "checkpoint_every": args.steps,
        "log_every": 5,
        "optim.warmup_steps": max(1, args.steps // 10),
        "optim.lr": args.lr,
        "optim.min_lr": args.lr / 10,
        "data.pairs.mode": mode,
        "data.pairs.sources": ["openclipart"],
        "data.num_workers": 1,
        "eval.retrieval_images": args.eval_images,
        "eval.itm_rerank_k": args.itm_k,
    }


def run_one(condition: str, seed: int, args: argparse.Namespace) -> dict:
    no_vlp = condition == "no-vlp"
    cmd = train_command("albef_tiny", overrides(condition, seed, args), eval_only=no_vlp)
    metrics, _ = run_train(
        cmd, run_dir(condition, seed, args), threads=args.threads, label=f"{condition:9s} seed {seed}",
        eval_only=no_vlp,
    )  # fmt: skip
    return {"condition": condition, "seed": seed, **metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--conditions", default=",".join(CONDITIONS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak AdamW lr (cosine to lr/10)")
    parser.add_argument("--eval-images", type=int, default=300)
    parser.add_argument("--itm-k", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.data_dir = str(Path(args.data_dir).resolve())
    seeds = [int(s) for s in args.seeds.split(",")]
    conditions = [c for c in args.conditions.split(",") if c]
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        parser.error(f"unknown conditions {sorted(unknown)}; known: {CONDITIONS}")
    jobs = [(c, s) for s in seeds for c in conditions]
    budget = ("seed", "max_steps", "batch_size", "optim.lr", "data.pairs.mode", "eval.retrieval_images")
    stale = [
        f"{run_dir(c, s, args)}: {d}"
        for c, s in jobs
        for d in budget_mismatch(
            run_dir(c, s, args), {k: v for k, v in overrides(c, s, args).items() if k in budget}
        )
    ]
    if stale:
        print("error: run dirs hold another budget (move them away first):\n  " + "\n  ".join(stale))
        return 2
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda cs: run_one(*cs, args), jobs))
    if args.json:
        print(json.dumps(results, indent=2))
    width = max(len(m) for m in METRICS)
    print(
        f"\nzero-shot retrieval on {int(results[0]['n_images'])} held-out images / "
        f"{int(results[0]['n_texts'])} captions; mean ± std over seeds {seeds} (in %)\n"
    )
    print(f"{'':{width}s}  " + "  ".join(f"{c:>14s}" for c in conditions))
    for m in METRICS:
        cells = []
        for c in conditions:
            mean, sd = mean_std([100 * r[m] for r in results if r["condition"] == c])
            cells.append(f"{mean:6.2f} ± {sd:5.2f}")
        print(f"{m:{width}s}  " + "  ".join(f"{x:>14s}" for x in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
