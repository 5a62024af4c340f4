"""The training step of the project's ALBEF against the official ALBEF code, side by side, alternating.

Needs a checkout of the official code (github.com/salesforce/ALBEF; its ``models/`` are imported from there,
unchanged). Both sides are built at the reference tiny shape of ``step.py`` (ViT 192 wide / 4 layers / 3
heads at 128 px; BERT 256 wide, 4 heads, 1,024 feed-forward, 2 text + 2 fusion layers; embed 128; queue 1,024;
fp32) and time exactly ``zero_grad`` + forward + backward + ``AdamW.step()`` on the same synthetic batches
(``step.make_batches``, made once here and loaded by both). Per round and variant, the official step runs in
its own child process, then the project's (``step.py`` in its own child), so each has its own peak RSS
(``VmHWM``) and the two alternate under the same machine load.

Variants: ``pretrain`` — official ``models/model_pretrain.ALBEF`` (ITC + ITM + MLM with momentum
distillation, alpha 0.4) against the project's pre-training step; ``retrieval`` — official
``models/model_retrieval.ALBEF`` (ITC with image ids + ITM, distillation) against the project's step with the
MLM weight 0. The official side uses ``torch.optim.AdamW`` with its defaults, as its ``optim_factory``
does; the project's side its trainer's AdamW (``optim.impl``). Both check their trainable parameter count
(13,661,693 / 13,564,867).

The official ``models/xbert.py`` was written for transformers 4.8 and does not build under the project's
transformers 5 (its ``PreTrainedModel`` subclasses miss attributes 5.x's weight tying reads). Give the
official child a transformers 4.x on ``--pythonpath`` (installed beside the project's, not into it); the
child also patches what 4.x renamed since 4.8 (a docstring decorator's keywords; helpers that moved from
``modeling_utils`` to ``pytorch_utils``) before importing it:

    .venv/bin/pip install --no-deps --target /tmp/tf4 \
        transformers==4.30.2 tokenizers==0.13.3 huggingface_hub==0.16.4
    .venv/bin/python benchmarks/official_step.py --albef-repo ~/src/ALBEF --pythonpath /tmp/tf4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# fmt: off
BERT_TINY = {
    "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 256, "initializer_range": 0.02, "intermediate_size": 1024,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 4, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30522, "fusion_layer": 2,
    "encoder_width": 192,
}
# fmt: on
VIT_TINY = {"img_size": 128, "embed_dim": 192, "depth": 4, "num_heads": 3}
EXPECTED_PARAMS = {"pretrain": 13_661_693, "retrieval": 13_564_867}


def _patch_transformers() -> None:
    """What the official xbert.py imports under the names transformers 4.8 had."""
    import transformers.file_utils as file_utils
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    file_utils.add_code_sample_docstrings = lambda *a, **k: lambda f: f  # docstrings only
    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(modeling_utils, name) and hasattr(pytorch_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
    if not hasattr(
        modeling_utils, "find_pruneable_heads_and_indices"
    ):  # removed in 5.x; used only by pruning
        modeling_utils.find_pruneable_heads_and_indices = None


def official_stage(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant of the official code (child process: no project module is imported here)."""
    import time

    for p in reversed(spec["pythonpath"] + [spec["albef_repo"]]):
        sys.path.insert(0, p)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(spec["threads"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 500))
    dist.init_process_group("gloo", rank=0, world_size=1)  # the official queue update all-gathers
    _patch_transformers()
    import models.vit as vit
    from models import xbert
    from transformers import BertTokenizer

    def tiny_vit(**kw):  # the official code builds ViT-B/16; the reference tiny shape overrides its size
        return vit.VisionTransformer(**{**kw, **VIT_TINY})

    for cls in (xbert.BertForMaskedLM, xbert.BertModel):  # fresh weights at the tiny config, no download
        cls.from_pretrained = classmethod(lambda c, name, config=None, **kw: c(config, **kw))
    bert_config = Path(spec["out_dir"]) / "config_bert_tiny.json"
    bert_config.write_text(json.dumps(BERT_TINY))
    config = {
        "mlm_probability": 0.15,
        "embed_dim": 128,
        "image_res": 128,
        "vision_width": 192,
        "bert_config": str(bert_config),
        "temp": 0.07,
        "queue_size": 1024,
        "momentum": 0.995,
        "distill": True,
        "alpha": 0.4,
    }
    tokenizer = BertTokenizer(spec["vocab"])
    torch.manual_seed(0)
    if spec["variant"] == "pretrain":
        import models.model_pretrain as mp

        mp.VisionTransformer = tiny_vit
        model = mp.ALBEF(text_encoder="bert", tokenizer=tokenizer, config=config, init_deit=False)
    else:
        import models.model_retrieval as mr

        mr.VisionTransformer = tiny_vit
        model = mr.ALBEF(text_encoder="bert", tokenizer=tokenizer, config=config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.02)
    batches = torch.load(spec["batches"])

    class Text(dict):
        __getattr__ = dict.__getitem__

    times, loss = [], None
    for i in range(spec["warmup"] + spec["steps"]):
        b = batches[i % len(batches)]
        text = Text(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        n = b["image"].shape[0]
        t0 = time.perf_counter()
        opt.zero_grad()
        if spec["variant"] == "pretrain":
            loss = sum(model(b["image"], text, alpha=0.4))
        else:
            loss = sum(model(b["image"], text, alpha=0.4, idx=torch.arange(i * n, (i + 1) * n)))
        loss.backward()
        opt.step()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    with open(
        "/proc/self/status"
    ) as f:  # VmHWM, as benchmarks/common.peak_rss_mb reads it (no project import)
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return {
        "params": n_params,
        "step_ms": 1000 * med,
        "samples_per_s": n / med,
        "loss": float(loss),
        "peak_rss_mb": hwm_kb * 1024 / 1e6,
    }


def _child(args: list[str], cwd: Path, threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # as step.py runs its child
    r = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child {' '.join(args[:2])} failed:\n{r.stderr[-4000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--albef-repo", type=Path, help="a checkout of github.com/salesforce/ALBEF")
    ap.add_argument("--variants", default="pretrain,retrieval")
    ap.add_argument("--rounds", type=int, default=3, help="official, then ours, per variant, this many times")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pythonpath", default="", help="paths put first for the official child (os.pathsep)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(official_stage(json.loads(args.stage))))
        return
    if args.albef_repo is None or not (args.albef_repo / "models" / "model_pretrain.py").exists():
        raise SystemExit(
            "--albef-repo must be a checkout of github.com/salesforce/ALBEF (models/model_pretrain.py)"
        )
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from benchmarks.step import make_batches
    from vlp_core.language.embed import default_model_path

    class _Shape:
        image_size = VIT_TINY["img_size"]

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        batches = make_batches(_Shape(), 4, args.batch_size, 0)  # step.py's defaults: 4 batches, seed 0
        keep = ("pixel_values", "input_ids", "attention_mask")
        torch.save(
            [
                dict(zip(("image", "input_ids", "attention_mask"), (b[k] for k in keep), strict=True))
                for b in batches
            ],
            Path(tmp) / "batches.pt",
        )
        vocab = Path(default_model_path()) / "vocab.txt"  # the uncased BERT vocabulary step.py tokenises with
        rows: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for variant in variants:
                spec = {
                    "variant": variant,
                    "albef_repo": str(args.albef_repo.resolve()),
                    "out_dir": tmp,
                    "batches": str(Path(tmp) / "batches.pt"),
                    "vocab": str(vocab),
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "threads": args.threads,
                    "pythonpath": [p for p in args.pythonpath.split(os.pathsep) if p],
                }
                off = json.loads(
                    _child([__file__, "--stage", json.dumps(spec)], REPO_ROOT, args.threads).splitlines()[-1]
                )
                out = _child(
                    [
                        str(REPO_ROOT / "benchmarks" / "step.py"),
                        "--variants",
                        variant,
                        "--steps",
                        str(args.steps),
                        "--warmup",
                        str(args.warmup),
                        "--threads",
                        str(args.threads),
                        "--batch-size",
                        str(args.batch_size),
                        "--json",
                    ],
                    REPO_ROOT,
                    args.threads,
                )
                ours = json.loads(out[out.index("[") :])[0]
                for side, res in (("official", off), ("ours", ours)):
                    if res["params"] != EXPECTED_PARAMS[variant]:
                        raise SystemExit(
                            f"{side} {variant}: {res['params']:,} trainable parameters, "
                            f"expected {EXPECTED_PARAMS[variant]:,}: not the reference shape"
                        )
                    rows.append({"round": r, "variant": variant, "side": side, **res})
                print(
                    f"round {r} {variant}: official {off['samples_per_s']:.2f} samples/s "
                    f"({off['peak_rss_mb']:.0f} MB), ours {ours['samples_per_s']:.2f} "
                    f"({ours['peak_rss_mb']:.0f} MB): {ours['samples_per_s'] / off['samples_per_s']:.2f}x",
                    file=sys.stderr,
                    flush=True,
                )
    header = [
        "variant",
        "params",
        "official samples/s",
        "ours samples/s",
        "ratio per round",
        "median ratio",
        "official peak RSS MB",
        "ours peak RSS MB",
    ]
    lines, summary = [], {}
    for variant in variants:
        off = [x for x in rows if x["variant"] == variant and x["side"] == "official"]
        our = [x for x in rows if x["variant"] == variant and x["side"] == "ours"]
        ratios = [b["samples_per_s"] / a["samples_per_s"] for a, b in zip(off, our, strict=True)]
        summary[variant] = {"median_ratio": statistics.median(ratios), "ratios": ratios}
        lines.append(
            [
                variant,
                f"{EXPECTED_PARAMS[variant]:,}",
                f"{statistics.median(x['samples_per_s'] for x in off):.2f}",
                f"{statistics.median(x['samples_per_s'] for x in our):.2f}",
                ", ".join(f"{x:.2f}" for x in ratios),
                f"{statistics.median(ratios):.2f}x",
                f"{max(x['peak_rss_mb'] for x in off):.0f}",
                f"{max(x['peak_rss_mb'] for x in our):.0f}",
            ]
        )
    from benchmarks.common import fmt_table

    print(
        f"== ALBEF step at the reference tiny shape, batch {args.batch_size}, {args.threads} threads, fp32; "
        f"median of {args.steps} steps after {args.warmup}; {args.rounds} alternating rounds"
    )
    print(fmt_table(header, lines))
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
