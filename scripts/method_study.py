"""The method study at CPU scale: zero-shot retrieval on the held-out clip art and easy-VQA accuracy after VQA
fine-tuning, for no vision-language pre-training (pixel and region backbones), ALBEF, VLMo, FLAVA, µ-VLA (also
on random and true pairs), U-VisualBERT and VLMixer (and its ablation), over several seeds, at one budget.

Region methods: µ-VLA's retrieval is its match head over every held-out pair (the ``itm_*`` rows; its
``itc_*`` rows are the pooled-output cosine), U-VisualBERT's and VLMixer's is the cosine of pooled outputs
(VLMixer through its CMCL projection); their VQA reads the easy-VQA images' regions from the corpus store.

For each method and seed (every run an ordinary ``python -m vlp_core.train`` child process with
``OMP_NUM_THREADS=--threads``, ``--parallel`` at a time, under ``<data>/runs/train/``):

1. pre-training: ``--config <method>_tiny --set seed=S --set name=<prefix>-s<S>`` with the same
   ``max_steps`` (``--steps``), batch (``--batch-size``) and peak / final learning rate (``--lr``, cosine to
   ``lr/10``) for every method; each keeps its preset's warm-up (ALBEF / FLAVA 15 steps, VLMo 5 per stage).
   VLMo's vision and language stages keep the tiny preset's share of the steps (30 + 30 of 150, i.e.
   ``--vlmo-stage-frac 0.2`` each; the vision-language stage takes the rest); FLAVA round-robins image-only,
   text-only and paired batches over the same number of steps. The run's ``eval.json`` (written after the
   last step) holds the zero-shot retrieval recalls on ``--eval-images`` held-out clip-art images:
   ``itc_{i2t,t2i}_r{1,5,10}`` (ITC ranking) and ``itm_*`` (ITC top-``--itm-k`` re-ranked by ITM).
2. VQA fine-tuning: ``--config vqa_easy --set init_from=<that run dir> --set name=<prefix>-<method>-s<S>``
   with ``--vqa-steps`` steps of ``--vqa-batch-size`` at ``--vqa-lr`` (the backbone and method are the
   run's); its ``eval.json`` holds ``vqa_accuracy`` (+ per answer type) on ``--vqa-questions`` test
   questions.

``none`` (no VLP): retrieval is ``--config albef_tiny --eval-only`` (the initial ALBEF model: MiniLM +
ImageNet EfficientNet-Lite0 with fresh, random ITC projections and ITM head, so it is the chance-level
reference) and VQA is ``--config vqa_easy --set init_from=null`` (the same encoders, no VL pre-training).

Resumable: every finished (method, seed) is written to ``--out`` at once, and a later study with the same
budget reuses the results there (the file may come from another machine; its run directories need not
exist); runs whose ``eval.json`` exists are skipped (a trained run also needs its ``run.json``), and an
interrupted run resumes from its latest checkpoint; a run directory holding another budget (steps, batch,
lr, seed, eval sizes) is an error, not a silent mix (pick another ``--prefix``). Prints one markdown table
(rows: metrics in %, columns: methods, cells: mean ± std over seeds, std with ddof=1 as in
``scripts/pairing_study.py``) and writes every per-seed number to ``--out``.

    .venv/bin/python scripts/method_study.py --seeds 0,1,2 --steps 150 --batch-size 16 --vqa-steps 150 \\
        --vqa-batch-size 16 --eval-images 300 --vqa-questions 2000 --parallel 2 --threads 1

``--lr`` defaults to 3e-4, not the presets' 1e-4: at this CPU budget 1e-4 leaves ALBEF's freshly
initialised projections and ITM head near where they started (see ``scripts/pairing_study.py``). The region
methods pre-train at ``--lr-regions`` (1e-4, their presets'): at 3e-4 the MiniLM single stream cannot fit
ITM even on 32 pairs repeated for 120 steps (loss stays at 0.69), while at 1e-4 it falls to 0.43.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from study_runs import (
    budget_mismatch,
    default_data_dir,
    mean_std,
    parse_list,
    parse_sets,
    run_train,
    train_command,
)

#: study key -> (method, its pre-training overrides, label). ``none`` / ``none-regions``: no VL pre-training
#: on the pixel (ALBEF's) / the region (µ-VLA's) backbone. ``<method>:<variant>``: µ-VLA on other pairs, and
#: the VLMixer ablation of seed 000 (MLM only; + CMC; + CMC + CMCL; all = + TAVP; TAVP alone).
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "none": ("albef", {}, "no VLP"),
    "none-regions": ("mu-vla", {}, "no VLP (regions)"),
    "albef": ("albef", {}, "ALBEF"),
    "vlmo": ("vlmo", {}, "VLMo"),
    "flava": ("flava", {}, "FLAVA"),
    "mu-vla": ("mu-vla", {}, "µ-VLA"),
    "mu-vla:random": ("mu-vla", {"data.pairs.mode": "random"}, "µ-VLA random pairs"),
    "mu-vla:known": ("mu-vla", {"data.pairs.mode": "known"}, "µ-VLA true pairs"),
    "u-visualbert": ("u-visualbert", {}, "U-VisualBERT"),
    "vlmixer": ("vlmixer", {}, "VLMixer"),
    "vlmixer:mlm": (
        "vlmixer",
        {
            "recipe.cmc_prob": 0.0,
            "recipe.cmcl_weight": 0.0,
            "recipe.mix_weights": {"text": 1.0, "image": 0.0},
        },
        "VLMixer MLM only",
    ),  # fmt: skip
    "vlmixer:cmc": (
        "vlmixer",
        {"recipe.cmcl_weight": 0.0, "recipe.mix_weights": {"text": 1.0, "image": 0.0}},
        "VLMixer MLM + CMC",
    ),  # fmt: skip
    "vlmixer:cmcl": ("vlmixer", {"recipe.mix_weights": {"text": 1.0, "image": 0.0}}, "VLMixer + CMC + CMCL"),
    "vlmixer:tavp": ("vlmixer", {"recipe.mix_weights": {"text": 0.0, "image": 1.0}}, "VLMixer TAVP only"),
}
METHODS = tuple(VARIANTS)
#: methods on the region single-stream backbone (pre-trained at ``--lr-regions``)
REGION_METHODS = ("mu-vla", "u-visualbert", "vlmixer")
LABELS = {k: v[2] for k, v in VARIANTS.items()}
#: (row label, which eval.json, key)
ROWS = [
    *((f"{d} R@{k}", "retrieval", f"itc_{d}_r{k}") for d in ("i2t", "t2i") for k in (1, 5, 10)),
    ("VQA accuracy", "vqa", "vqa_accuracy"),
    ("VQA yes/no", "vqa", "vqa_accuracy_yes_no"),
    ("VQA other", "vqa", "vqa_accuracy_other"),
]
ITM_ROWS = [(f"ITM {d} R@{k}", "retrieval", f"itm_{d}_r{k}") for d in ("i2t", "t2i") for k in (1, 5, 10)]
#: config keys that define a run's budget: a run dir holding other values is not reused
BUDGET = (
    "seed", "max_steps", "batch_size", "optim.lr", "optim.min_lr", "init_from", "eval.retrieval_images",
    "eval.itm_rerank_k", "task.eval_questions", "recipe.vision_steps", "recipe.language_steps",
    "data.pairs.mode", "recipe.cmc_prob", "recipe.cmcl_weight", "recipe.mix_weights", "method",
)  # fmt: skip


#: the settings that must agree for a stored result to be reused
RESULT_SETTINGS = (
    "steps", "batch_size", "lr", "lr_regions", "vlmo_stage_frac", "vqa_steps", "vqa_batch_size", "vqa_lr",
    "eval_images", "itm_k", "vqa_questions", "pretrain_set", "vqa_set",
)  # fmt: skip


def kept_results(path: Path, settings: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """The per-seed results of an earlier study at ``path`` (the ``--out`` file, which may come from another
    machine: its run directories need not exist), keyed by (method, seed), when its budget is this one; an
    earlier file with another budget is an error, not a silent mix."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    diff = [
        f"{k}: {old['settings'].get(k)!r} there, {settings[k]!r} here"
        for k in RESULT_SETTINGS
        if old["settings"].get(k) != settings[k]
    ]
    if diff:
        raise SystemExit(f"error: {path} holds another budget (use another --out):\n  " + "\n  ".join(diff))
    return {(r["method"], r["seed"]): r for r in old["runs"]}


def lr_sets(lr: float) -> dict[str, float]:
    """Peak lr, cosine to lr / 10 (rounded: 3e-05, not 2.9999999999999997e-05, in commands and configs)."""
    return {"optim.lr": lr, "optim.min_lr": round(lr / 10, 12)}


def plan(method: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs of one (method, seed), in order: retrieval (pre-training or the untrained model), VQA."""
    runs = Path(args.data_dir) / "runs" / "train"
    common = {"data_dir": args.data_dir, "seed": seed, "data.num_workers": args.num_workers}
    arch, extra, _ = VARIANTS[method]
    config = f"{arch.replace('-', '_')}_tiny"
    tag = method.replace(":", "-")
    if method.startswith("none"):
        name = f"{args.prefix}-{tag}-s{seed}"
        pre_sets = {"name": name, **common}
    else:
        name = f"{args.prefix}-s{seed}" if tag == arch else f"{args.prefix}-{tag}-s{seed}"
        lr = args.lr_regions if arch in REGION_METHODS else args.lr
        pre_sets = {
            "name": name, **common, "max_steps": args.steps, "batch_size": args.batch_size,
            **lr_sets(lr), "keep_checkpoints": 1, **extra,
        }  # fmt: skip
        if arch == "vlmo":
            n = min(round(args.steps * args.vlmo_stage_frac), (args.steps - 1) // 2)
            pre_sets |= {"recipe.vision_steps": n, "recipe.language_steps": n}
    pre_dir = runs / f"pretrain-{arch}-{name}"
    pre_sets |= {
        "run_dir": str(pre_dir), "eval.retrieval_images": args.eval_images, "eval.itm_rerank_k": args.itm_k,
        **args.pretrain_set,
    }  # fmt: skip
    vqa_name = f"{args.prefix}-{tag}-s{seed}"
    vqa_dir = runs / f"vqa-{arch}-{vqa_name}"
    init = None if method.startswith("none") else str(pre_dir)
    vqa_sets = {
        "name": vqa_name, "run_dir": str(vqa_dir), **common, "init_from": init, "max_steps": args.vqa_steps,
        "batch_size": args.vqa_batch_size, **lr_sets(args.vqa_lr), "keep_checkpoints": 1,
        "task.eval_questions": args.vqa_questions,
        **({"method": arch} if init is None else {}),
        **args.vqa_set,
    }  # fmt: skip
    return [
        {
            "what": "retrieval",
            "config": config,
            "sets": pre_sets,
            "dir": pre_dir,
            "eval_only": method.startswith("none"),
        },
        {"what": "vqa", "config": "vqa_easy", "sets": vqa_sets, "dir": vqa_dir, "eval_only": False},
    ]


def run_chain(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"method": method, "seed": seed}
    for run in plan(method, seed, args):
        cmd = train_command(run["config"], run["sets"], eval_only=run["eval_only"])
        label = f"{method} seed {seed} {run['what']}"
        out[run["what"]], out[f"{run['what']}_seconds"] = run_train(
            cmd, run["dir"], threads=args.threads, label=label, eval_only=run["eval_only"]
        )
        out[f"{run['what']}_dir"] = str(run["dir"])
    return out


def table(results: list[dict[str, Any]], methods: list[str], rows: list[tuple[str, str, str]]) -> str:
    lines = [
        "| metric (%) | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for label, what, key in rows:
        cells = []
        for m in methods:
            vals = [100 * r[what][key] for r in results if r["method"] == m and key in r.get(what, {})]
            cells.append("{:.2f} ± {:.2f}".format(*mean_std(vals)) if vals else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(results: list[dict[str, Any]], methods: list[str], rows: list[tuple[str, str, str]]) -> dict:
    out: dict[str, dict[str, Any]] = {}
    for _, what, key in rows:
        for m in methods:
            vals = [r[what][key] for r in results if r["method"] == m and key in r.get(what, {})]
            if vals:
                mean, sd = mean_std(vals)
                out.setdefault(key, {})[m] = {"mean": mean, "std": sd, "n": len(vals)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=default_data_dir(), help="default $VLP_DATA_DIR or <repo>/data")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=150, help="pre-training steps (every method)")
    p.add_argument("--batch-size", type=int, default=16, help="pre-training batch (every method)")
    p.add_argument("--lr", type=float, default=3e-4, help="pre-training peak AdamW lr (cosine to lr/10)")
    p.add_argument(
        "--lr-regions", type=float, default=1e-4, help="the same for the region methods (see the docstring)"
    )
    p.add_argument("--vlmo-stage-frac", type=float, default=0.2, help="VLMo vision and language stage share")
    p.add_argument("--vqa-steps", type=int, default=150)
    p.add_argument("--vqa-batch-size", type=int, default=16)
    p.add_argument("--vqa-lr", type=float, default=1e-4, help="VQA peak AdamW lr (cosine to lr/10)")
    p.add_argument("--eval-images", type=int, default=300, help="held-out clip-art images for retrieval")
    p.add_argument("--itm-k", type=int, default=8, help="ITM re-ranks each query's ITC top-k")
    p.add_argument("--vqa-questions", type=int, default=2000, help="easy-VQA test questions scored")
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers per run")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--prefix", default="study", help="run names: <prefix>-s<S>, <prefix>-<method>-s<S>")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE", help="extra override")
    p.add_argument("--vqa-set", action="append", default=[], metavar="KEY=VALUE", help="extra override")
    p.add_argument("--itm", action="store_true", help="also tabulate the ITM re-ranked recalls")
    p.add_argument("--out", help="per-seed JSON (default <data>/runs/<prefix>/methods.json)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    args.data_dir = str(Path(args.data_dir).resolve())
    methods, seeds = parse_list(args.methods), parse_list(args.seeds, int)
    if unknown := set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    if min(args.steps, args.vqa_steps, args.parallel, args.threads) < 1:
        p.error("--steps, --vqa-steps, --parallel and --threads must be >= 1")
    try:
        args.pretrain_set, args.vqa_set = parse_sets(args.pretrain_set), parse_sets(args.vqa_set)
    except ValueError as exc:
        p.error(str(exc))
    out = Path(args.out) if args.out else Path(args.data_dir) / "runs" / args.prefix / "methods.json"

    chains = [(m, s) for s in seeds for m in methods]
    stale = []
    for m, s in chains:
        for run in plan(m, s, args):
            budget = {k: v for k, v in run["sets"].items() if k in BUDGET}
            if args.dry_run:
                print(" ".join(train_command(run["config"], run["sets"], eval_only=run["eval_only"])))
            stale += [f"{run['dir']}: {d}" for d in budget_mismatch(run["dir"], budget)]
    if stale:
        print("error: run dirs hold another budget (use another --prefix):\n  " + "\n  ".join(stale))
        return 2
    if args.dry_run:
        return 0

    settings = {k: v for k, v in vars(args).items() if k not in ("dry_run", "out")}
    kept = kept_results(out, settings)
    todo = [(m, s) for m, s in chains if (m, s) not in kept]
    if kept:
        print(f"{len(chains) - len(todo)} of {len(chains)} (method, seed) results reused from {out}")
    rows = ROWS + (ITM_ROWS if args.itm else [])
    t0 = time.time()
    lock = threading.Lock()
    failed: list[str] = []

    def write() -> None:
        done = [kept[c] for c in chains if c in kept]
        others = [r for (m, s), r in kept.items() if (m, s) not in chains]
        report = {
            "settings": settings,
            "wall_s": time.time() - t0,
            "runs": others + done,
            "summary": summary(done, methods, rows),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out)

    def chain(m: str, s: int) -> None:
        try:
            result = run_chain(m, s, args)
        except RuntimeError as exc:
            failed.append(f"{m} seed {s}: {exc}")
            return
        with lock:  # every finished chain is on disk at once: a killed study loses no finished result
            kept[(m, s)] = result
            write()

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda c: chain(*c), todo))
    wall = time.time() - t0
    write()
    results = [kept[c] for c in chains if c in kept]

    ret = next((r["retrieval"] for r in results if "retrieval" in r), {})
    vqa = next((r["vqa"] for r in results if "vqa" in r), {})
    print(
        f"\nPre-training {args.steps} steps of {args.batch_size} (lr {args.lr:g}; region methods "
        f"{args.lr_regions:g}), VQA fine-tuning {args.vqa_steps} steps of {args.vqa_batch_size} "
        f"(lr {args.vqa_lr:g}). Zero-shot ITC retrieval on "
        f"{int(ret.get('n_images', 0))} held-out clip-art images / {int(ret.get('n_texts', 0))} captions; "
        f"easy-VQA accuracy on {int(vqa.get('n_questions', 0))} test questions. Mean ± std over seeds "
        f"{seeds}; {wall / 60:.0f} min.\n"
    )
    print(table(results, methods, rows))
    print(f"\nper-seed numbers: {out}")
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
