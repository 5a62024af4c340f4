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

Anyone holding the official ALBEF code can time it on the same shape and batch size and compare samples/s
and peak RSS; the harness prints what to match (shape, parameter count, batch, threads).
"""

from __future__ import annotations

import argparse
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


def make_batches(model: Any, n: int, batch_size: int, seed: int = 0) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    from vlp_core.data import PretrainCollator, load_tokenizer

    tok = load_tokenizer()
    words = sorted(w for w in tok.get_vocab() if w.isalpha() and len(w) > 2)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    collate = PretrainCollator(tok, 30)
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


def run_stage(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = build_model(spec["shape"], spec["variant"]).train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    batches = make_batches(model, spec["batches"], spec["batch_size"])
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.02)
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(batch, step=i, steps_per_epoch=1000, kind="pair", stage=None)
        out.loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= spec["warmup"]:
            times.append(dt)
        if not torch.isfinite(out.loss):
            raise RuntimeError(f"step {i}: loss {out.loss}")
    med = statistics.median(times)
    return {
        "variant": spec["variant"],
        "params": n_params,
        "step_ms": 1000 * med,
        "samples_per_s": spec["batch_size"] / med,
        "peak_rss_mb": peak_rss_mb(),
        "loss": float(out.loss),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("reference", "tiny"), default="reference")
    ap.add_argument("--variants", default="pretrain,retrieval")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(run_stage(json.loads(args.stage))))
        return
    import subprocess

    rows = []
    for variant in args.variants.split(","):
        spec = {
            "shape": args.shape, "variant": variant, "batch_size": args.batch_size, "batches": args.batches,
            "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
        }  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(
            [sys.executable, __file__, "--stage", json.dumps(spec)], env=env, capture_output=True, text=True
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.shape == "reference":
        for r in rows:
            if r["variant"] == "pretrain" and r["params"] != REFERENCE_PARAMS:
                raise SystemExit(f"{r['params']} trainable parameters, not the reference {REFERENCE_PARAMS}")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"ALBEF at the {args.shape} shape, batch {args.batch_size}, {args.threads} threads, fp32, AdamW; "
          f"median of {args.steps} steps after {args.warmup}")  # fmt: skip
    print(fmt_table(
        ["variant", "trainable params", "step ms", "samples/s", "peak RSS MB", "last loss"],
        [[r["variant"], f"{r['params']:,}", f"{r['step_ms']:.1f}", f"{r['samples_per_s']:.2f}",
          f"{r['peak_rss_mb']:.0f}", f"{r['loss']:.3f}"] for r in rows],
    ))  # fmt: skip


if __name__ == "__main__":
    main()
