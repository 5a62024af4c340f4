"""The CUDA paths on one GPU, in one script: the paper-sized ALBEF in bf16, and the corpus stages' CUDA paths
against their CPU outputs on the same machine, same weights, same inputs.

``--checks`` (comma-separated, default all):

- ``train``: ``albef_base`` (ViT-B/16 at 256 px, BERT-base shape 6 text + 6 fusion layers, embed 256, queue
  65,536, momentum encoders; fresh weights, as the preset has them) for ``--steps`` steps of ``--batch-size``
  under bf16 autocast, as the trainer runs it on CUDA (``precision: auto``), fused AdamW (lr 1e-4, weight
  decay 0.02). Synthetic batches as ``benchmarks/step.py`` makes them (pixels ~ N(0, 1), sentences of 8-20
  vocabulary words, collated and MLM-masked by the project's collator), ``--batches`` distinct ones cycled,
  so the loss has something to fall on. Prints samples/s (median step after ``--warmup``, CUDA-synchronised),
  peak GPU memory (``torch.cuda.max_memory_allocated``), and the loss at the first and last steps; fails if a
  loss is not finite.
- ``features``: the regions stage's ``RegionFeatureExtractor`` (EfficientNet-Lite0 with the packaged
  ImageNet weights; 384 px region pass + 224 px tag pass) on CPU (fp32) and on CUDA (bf16 autocast, RoIAlign
  and softmax in fp32) over the PNGs in ``--images``, each with its whole-image box and two sub-boxes:
  cosine of every region feature CPU vs CUDA (min, mean), top-1 ImageNet class agreement, max |Δ prob|.
- ``sbert``: the embed stage's ``SentenceEncoder`` on CPU and on CUDA over ``--sentences`` (a text file, a
  sentence a line) with the model at ``--sbert-model`` (a sentence-transformers directory): min / mean cosine
  of the two embeddings of each sentence, and whether the nearest neighbour of every sentence is the same.

Every check prints one table and, with ``--out DIR``, writes ``DIR/gpu_<check>.json``.

    python benchmarks/gpu.py --tokenizer <dir with tokenizer.json> --images <dir of PNGs> \\
        --sentences sentences.txt --sbert-model <dir> --out results/
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

from benchmarks.common import fmt_table  # noqa: E402
from benchmarks.step import make_batches  # noqa: E402

GIB = 1024**3


def _device(args: argparse.Namespace, check: str) -> Any:
    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{check}: no CUDA device")
    return dev


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def check_train(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from vlp_core.recipes import build_recipe
    from vlp_core.train.config import load_train_config
    from vlp_core.train.trainer import ADAMW_IMPL, to_device

    dev = _device(args, "train")
    cuda = dev.type == "cuda"
    cfg = load_train_config(args.config, {"init_from": None})
    torch.manual_seed(0)
    model = build_recipe(cfg.method, cfg.recipe_config(), cfg.backbone_config()).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.02, **ADAMW_IMPL["fused"])
    batches = [
        to_device(b, dev)
        for b in make_batches(
            model, args.batches, args.batch_size, tokenizer_path=args.tokenizer, max_len=cfg.data.max_len
        )
    ]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses, parts = [], [], []
    for i in range(args.warmup + args.steps):
        _sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(batches[i % len(batches)], step=i, steps_per_epoch=1000, kind="pair", stage=None)
        out.loss.backward()
        opt.step()
        _sync(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        loss = float(out.loss.detach())
        if not torch.isfinite(out.loss):
            raise SystemExit(f"train: step {i}: loss {loss}")
        losses.append(loss)
        parts.append({k: float(v) for k, v in out.metrics.items() if k.startswith("loss_")})
    med = statistics.median(times)
    k = max(1, len(losses) // 10)
    return {
        "config": args.config,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": "bf16 autocast" if cuda else "fp32",
        "torch": torch.__version__,
        "trainable_params": sum(p.numel() for p in params),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "step_ms": 1000 * med,
        "samples_per_s": args.batch_size / med,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / GIB if cuda else float("nan"),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_first_mean": statistics.fmean(losses[:k]),
        "loss_last_mean": statistics.fmean(losses[-k:]),
        "parts_first": parts[0],
        "parts_last": parts[-1],
        "losses": losses,
    }


def _boxes(w: int, h: int) -> Any:
    import numpy as np

    return np.array([[0, 0, w, h], [0, 0, w / 2, h / 2], [w / 4, h / 4, 3 * w / 4, 3 * h / 4]], np.float32)


def check_features(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from PIL import Image

    from vlp_core.vision.features import RegionFeatureExtractor, load_efficientnet_lite0

    dev = _device(args, "features")
    paths = sorted(Path(args.images).glob("*.png"))
    if not paths:
        raise SystemExit(f"features: no PNG in {args.images}")
    images = [Image.open(p).convert("RGB") for p in paths]
    boxes = [_boxes(*im.size) for im in images]
    backbone = load_efficientnet_lite0()
    out = {}
    for side, device in (("cpu", torch.device("cpu")), ("dev", dev)):
        ex = RegionFeatureExtractor(backbone=backbone, device=device)
        t0 = time.perf_counter()
        out[side] = ex.extract(images, boxes)
        _sync(device)
        out[side + "_s"] = time.perf_counter() - t0
        backbone = backbone.cpu()
    cos, top1, dprob = [], [], []
    for a, b in zip(out["cpu"], out["dev"], strict=True):
        ra, rb = a.regions, b.regions
        cos.extend((ra * rb).sum(1) / (np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1) + 1e-12))
        top1.append(int(a.probs.argmax()) == int(b.probs.argmax()))
        dprob.append(float(np.abs(a.probs - b.probs).max()))
    return {
        "images": len(images),
        "regions": len(cos),
        "cos_min": float(min(cos)),
        "cos_mean": float(statistics.fmean(cos)),
        "top1_agree": sum(top1) / len(top1),
        "max_abs_dprob": max(dprob),
        "device": str(dev),
        "cpu_s": out["cpu_s"],
        "device_s": out["dev_s"],
    }


def check_sbert(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from vlp_core.language.embed import SentenceEncoder

    dev = _device(args, "sbert")
    sentences = [s.strip() for s in Path(args.sentences).read_text().splitlines() if s.strip()]
    emb, secs = {}, {}
    for side, device in (("cpu", "cpu"), ("dev", str(dev))):
        enc = SentenceEncoder(args.sbert_model, device=device)
        t0 = time.perf_counter()
        emb[side] = enc.encode(sentences)
        _sync(torch.device(device))
        secs[side] = time.perf_counter() - t0
    a, b = emb["cpu"], emb["dev"]
    cos = (a * b).sum(1)  # rows are L2-normalised
    sa, sb = a @ a.T, b @ b.T
    np.fill_diagonal(sa, -2)
    np.fill_diagonal(sb, -2)
    return {
        "sentences": len(sentences),
        "dim": int(a.shape[1]),
        "cos_min": float(cos.min()),
        "cos_mean": float(cos.mean()),
        "nn_agree": float((sa.argmax(1) == sb.argmax(1)).mean()),
        "device": str(dev),
        "cpu_s": secs["cpu"],
        "device_s": secs["dev"],
    }


CHECKS = {"train": check_train, "features": check_features, "sbert": check_sbert}


def _table(name: str, r: dict[str, Any]) -> str:
    rows = [[k, f"{v:.4f}" if isinstance(v, float) else str(v)] for k, v in r.items() if k != "losses"]
    return f"== {name}\n" + fmt_table(["", "value"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checks", default="train,features,sbert")
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (cpu: a smoke test)")
    ap.add_argument("--config", default="albef_base", help="train: the training config (preset and shape)")
    ap.add_argument("--batch-size", type=int, default=64, help="train: ALBEF's per-GPU batch")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument(
        "--tokenizer", help="train: a directory with tokenizer.json (default: the packaged MiniLM)"
    )
    ap.add_argument("--images", help="features: a directory of PNGs")
    ap.add_argument("--sentences", help="sbert: a text file, one sentence a line")
    ap.add_argument(
        "--sbert-model", help="sbert: a sentence-transformers model directory (default: packaged)"
    )
    ap.add_argument("--out", help="write gpu_<check>.json here")
    args = ap.parse_args()
    failed = []
    for name in args.checks.split(","):
        try:
            r = CHECKS[name](args)
        except (SystemExit, Exception) as e:  # one check's failure must not hide the others' results
            import traceback

            traceback.print_exc()
            print(f"== {name}: FAILED: {e}", flush=True)
            failed.append(name)
            continue
        print(_table(name, r), flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"gpu_{name}.json").write_text(json.dumps(r, indent=1))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
