"""Training-step benchmark at a fixed model shape: exactly ``zero_grad`` + forward + backward + optimiser
step, on the same synthetic batches, nothing else (no data loading, no scheduler, no clipping, no logging).

The default shape is the **reference tiny ALBEF** the official code can be built at (``--shape reference``):
ViT 192 wide, 4 layers, 3 heads, patch 16 at 128 px; BERT 256 wide, 4 heads, 1,024 feed-forward, 2 text + 2
fusion layers, fresh; embed 128; queue 1,024; momentum encoders; fp32; AdamW (lr 1e-4, weight decay 0.02).
At that shape the project's ALBEF has 13,661,693 trainable parameters, as the official one has (printed and
checked). ``--shape tiny`` takes the ``albef_tiny`` preset instead (EfficientNet-Lite0 grid + MiniLM).

Variants (``--variants``): ``pretrain`` (ITC + ITM + MLM, the pre-training objective) and ``retrieval``
(ITC + ITM: the MLM weight 0, so no MLM pass runs, as in retrieval fine-tuning).

Batches: ``--batches`` distinct batches of ``--batch-size`` made once before the clock from a fixed seed:
pixels ~ N(0, 1) at the model's input size, sentences of 8-20 words drawn from the tokenizer's whole-word
vocabulary, collated (tokenised, MLM-masked) by the project's ``PretrainCollator``; step ``i`` uses batch
``i mod --batches``. ``--warmup`` steps run before the clock, ``--steps`` are timed one by one
(``time.perf_counter`` around the four calls). Every (variant) runs in its own child process so its peak RSS
(``VmHWM``) is its own; ``--threads`` pins torch's intra-op threads (default 2).

    .venv/bin/python benchmarks/step.py
    .venv/bin/python benchmarks/step.py --steps 50 --threads 1 --json
    .venv/bin/python benchmarks/step.py --optimizers loop,foreach,fused --zero-grad zeros   # lockstep
    .venv/bin/python benchmarks/step.py --tokens padded,packed --dropout torch,fast      # lockstep

``official_step.py`` times the official ALBEF code (from a checkout) at the same shape on the same batches
and alternates it with this script, variant by variant.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks.common import fmt_table, peak_rss_mb  # noqa: E402

#: the reference tiny ALBEF's parameter count (trainable; momentum encoders and queues excluded).
REFERENCE_PARAMS = 13_661_693

REFERENCE_BACKBONE = {
    "kind": "dual_stream",
    "vision": {"kind": "vit", "image_size": 128, "width": 192, "depth": 4, "num_heads": 3, "patch_size": 16,
               "pretrained": False},
    "text": {"pretrained": None, "num_layers": 2, "hidden_size": 256, "num_heads": 4,
             "intermediate_size": 1024},
    "fusion": {"num_layers": 2},
}  # fmt: skip
REFERENCE_RECIPE = {"embed_dim": 128, "queue_size": 1024}


def build_model(shape: str, variant: str) -> Any:
    """The project's ALBEF (recipe + backbone) at ``shape``; ``retrieval`` sets the MLM weight to 0."""
    from vlp_core.train.config import load_train_config

    over: dict[str, Any] = {"init_from": None}
    if shape == "reference":
        over |= {"backbone": REFERENCE_BACKBONE, **{f"recipe.{k}": v for k, v in REFERENCE_RECIPE.items()}}
    if variant == "retrieval":
        over["recipe.mlm_weight"] = 0.0
    cfg = load_train_config("albef_tiny", over)
    from vlp_core.recipes import build_recipe

    return build_recipe(cfg.method, cfg.recipe_config(), cfg.backbone_config())


def make_batches(
    model: Any,
    n: int,
    batch_size: int,
    seed: int = 0,
    *,
    tokenizer_path: str | None = None,
    max_len: int = 30,
) -> list[dict[str, Any]]:
    """``n`` synthetic pre-training batches (see the module docstring); the tokenizer at ``tokenizer_path``
    (default: the packaged MiniLM's)."""
    import numpy as np
    import torch

    from vlp_core.data import PretrainCollator, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and len(w) > 2)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    collate = PretrainCollator(tok, max_len)
    out = []
    for b in range(n):
        samples = [
            {
                "pixel_values": torch.randn(3, model.image_size, model.image_size, generator=gen),
                "text": " ".join(rng.choice(words, size=int(rng.integers(8, 21)))),
                "image_key": b * batch_size + i,
                "text_key": b * batch_size + i,
                "sample_seed": b * batch_size + i,
            }
            for i in range(batch_size)
        ]
        out.append(collate(samples))
    return out


PHASES = ("zero_grad", "forward", "backward", "optimizer")


def set_packed_(model: Any, packed: bool) -> None:
    """Packed or padded tokens in every text and fusion stack of ``model`` (momentum twins included)."""
    from vlp_core.models.fusion import FusionEncoder
    from vlp_core.models.text import TextEncoder

    for module in model.modules():
        if isinstance(module, TextEncoder | FusionEncoder):
            module.packed = packed


def set_fast_dropout_(model: Any, fast: bool) -> None:
    """The project's CPU dropout masks (``fast``) or torch's in every :class:`Dropout` of ``model``."""
    from vlp_core.models.layers import Dropout

    for module in model.modules():
        if isinstance(module, Dropout):
            module.fast = fast


def run_stage(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant; with several optimisers, top layers, token layouts or dropouts, one model per
    combination (same initial weights), stepped in lockstep (step i of each in turn), so all see the same
    machine load."""
    import torch

    from vlp_core.train.trainer import ADAMW_IMPL

    torch.set_num_threads(spec["threads"])
    runs = []
    combos = itertools.product(spec["top_layer"], spec["tokens"], spec["dropout"], spec["optimizers"])
    for top, tokens, drop, name in combos:
        torch.manual_seed(0)
        model = build_model(spec["shape"], spec["variant"]).train()
        model.backbone.prune_top_layer = top == "pruned"
        set_packed_(model, tokens == "packed")
        set_fast_dropout_(model, drop == "fast")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.02, **ADAMW_IMPL[name])
        runs.append({"name": name, "top": top, "tokens": tokens, "dropout": drop, "model": model, "opt": opt,
                     "params": sum(p.numel() for p in params), "phases": {k: [] for k in PHASES},
                     "times": []})  # fmt: skip
    batches = make_batches(runs[0]["model"], spec["batches"], spec["batch_size"])
    set_to_none = spec["zero_grad"] == "none"
    for i in range(spec["warmup"] + spec["steps"]):
        batch = batches[i % len(batches)]
        for r in runs:
            t0 = time.perf_counter()
            r["opt"].zero_grad(set_to_none=set_to_none)
            t1 = time.perf_counter()
            out = r["model"](batch, step=i, steps_per_epoch=1000, kind="pair", stage=None)
            t2 = time.perf_counter()
            out.loss.backward()
            t3 = time.perf_counter()
            r["opt"].step()
            t4 = time.perf_counter()
            if i >= spec["warmup"]:
                r["times"].append(t4 - t0)
                for k, a, b in zip(PHASES, (t0, t1, t2, t3), (t1, t2, t3, t4), strict=True):
                    r["phases"][k].append(1000 * (b - a))
            if not torch.isfinite(out.loss):
                raise RuntimeError(f"step {i}: loss {out.loss}")
            r["loss"] = float(out.loss)
    profile = None
    if spec.get("profile"):  # a few more steps of the first optimiser under torch.profiler: where the ops go
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        r = runs[0]
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(3):
                r["opt"].zero_grad(set_to_none=set_to_none)
                out = r["model"](
                    batches[i % len(batches)], step=i, steps_per_epoch=1000, kind="pair", stage=None
                )
                out.loss.backward()
                r["opt"].step()
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=spec["profile"])
    rows = []
    for r in runs:
        med = statistics.median(r["times"])
        rows.append({
            "variant": spec["variant"], "optimizer": r["name"], "top_layer": r["top"], "tokens": r["tokens"],
            "dropout": r["dropout"],
            "zero_grad": spec["zero_grad"],
            "params": r["params"], "step_ms": 1000 * med, "samples_per_s": spec["batch_size"] / med,
            "phase_ms": {k: statistics.median(v) for k, v in r["phases"].items()},
            "peak_rss_mb": peak_rss_mb(), "loss": r["loss"],
        })  # fmt: skip
    return {"rows": rows, "profile": profile}


def main() -> None:
    from vlp_core.train.config import OptimConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("reference", "tiny"), default="reference")
    ap.add_argument("--variants", default="pretrain,retrieval")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--optimizers",
        default=OptimConfig().impl,
        help="AdamW implementations, comma-separated (loop, foreach, fused); several are stepped in "
        "lockstep in one process, so their ratio is measured under the same load (default: the trainer's, "
        "optim.impl)",
    )
    ap.add_argument(
        "--zero-grad",
        choices=("none", "zeros"),
        default="none",
        help="zero_grad(set_to_none=True) (none) or keep the gradient buffers and zero them",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the timed steps, profile 3 more (first optimiser) and print the N ops with the "
        "most self CPU time",
    )
    ap.add_argument(
        "--top-layer",
        default="pruned",
        help="comma-separated: pruned (the top fusion layer computed only where a loss reads it: [CLS] "
        "for ITM, the masked tokens for MLM; the trainer's way) and/or full (every position, as the "
        "reference code does); both = lockstep before/after",
    )
    ap.add_argument(
        "--tokens",
        default="packed",
        help="comma-separated: packed (the text and fusion layers run on the real tokens only; the "
        "trainer's way) and/or padded (on the padded batch, as the reference code does); both = lockstep",
    )
    ap.add_argument(
        "--dropout",
        default="fast",
        help="comma-separated: fast (the project's CPU dropout masks, the trainer's way) and/or torch "
        "(torch's bernoulli_ masks); both = lockstep",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(run_stage(json.loads(args.stage))))
        return
    import subprocess

    rows, profiles = [], []
    for variant in args.variants.split(","):
        spec = {
            "shape": args.shape, "variant": variant, "batch_size": args.batch_size, "batches": args.batches,
            "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
            "optimizers": args.optimizers.split(","), "zero_grad": args.zero_grad, "profile": args.profile,
            "top_layer": args.top_layer.split(","), "tokens": args.tokens.split(","),
            "dropout": args.dropout.split(","),
        }  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(
            [sys.executable, __file__, "--stage", json.dumps(spec)], env=env, capture_output=True, text=True
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.extend(result["rows"])
        if result.get("profile"):
            profiles.append((variant, result["profile"]))
    if args.shape == "reference":
        for r in rows:
            if r["variant"] == "pretrain" and r["params"] != REFERENCE_PARAMS:
                raise SystemExit(f"{r['params']} trainable parameters, not the reference {REFERENCE_PARAMS}")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"ALBEF at the {args.shape} shape, batch {args.batch_size}, {args.threads} threads, fp32, AdamW; "
          f"median of {args.steps} steps after {args.warmup}; zero_grad: {args.zero_grad}")  # fmt: skip
    first = {}
    lines = []
    for r in rows:
        base = first.setdefault(r["variant"], r["samples_per_s"])
        lines.append([r["variant"], r["optimizer"], r["top_layer"], r["tokens"], r["dropout"],
                      f"{r['params']:,}", f"{r['step_ms']:.1f}",
                      *(f"{r['phase_ms'][k]:.1f}" for k in PHASES), f"{r['samples_per_s']:.2f}",
                      f"{r['samples_per_s'] / base:.2f}x", f"{r['peak_rss_mb']:.0f}",
                      f"{r['loss']:.3f}"])  # fmt: skip
    print(fmt_table(
        ["variant", "AdamW", "top layer", "tokens", "dropout", "trainable params", "step ms",
         *(f"{k} ms" for k in PHASES), "samples/s", "vs first", "peak RSS MB", "last loss"], lines,
    ))  # fmt: skip
    lockstep = (args.optimizers, args.top_layer, args.tokens, args.dropout)
    if any("," in a for a in lockstep):
        print("  the rows of one variant ran in lockstep in one process; the peak RSS is that process's")
    for variant, table in profiles:
        print(f"\n== profile: {variant}, 3 steps ({args.optimizers.split(',')[0]} AdamW)\n{table}")


if __name__ == "__main__":
    main()
