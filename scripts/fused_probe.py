"""A linear probe on a model's *frozen* fused vectors: is what a classification task asks present in them at
all, whatever fine-tuning does with it?

For a task preset (``nlvr2_scenes``, ``snli_ve_scenes``, ``gqa_scenes``) and a run to start from, it builds
the fine-tuning model exactly as the trainer does (backbone weights from ``--init``, a fresh head), encodes
the first ``--n`` training examples with the backbone's ``fuse`` (one pass per image, pooled vectors
concatenated: :meth:`~vlp_core.models.heads.FusedClassifier.pooled`, what its head reads), and fits a logistic
regression on the first part, scoring the rest (``--held-out``), for a few regularisation strengths. Above
chance here while fine-tuning stays at chance means the signal is in the features but too weak for the
fine-tuning budget to find; at chance means the features do not carry it.

    .venv/bin/python scripts/fused_probe.py --init data/runs/train/vqa-albef-easy-vqa \\
        --config nlvr2_scenes --dataset scene-pairs-easy
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch


def fused_features(cfg: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(features, labels)`` of the first ``n`` training examples of the task ``cfg`` names, from the model
    the trainer would fine-tune (``cfg.init_from``'s backbone, ``None``: as built), in eval mode: what its
    head reads (one ``fuse`` pass per image, pooled vectors concatenated)."""
    from vlp_core.tasks.base import build_spec
    from vlp_core.train.trainer import DistEnv

    spec = build_spec(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    model = spec.model.eval()
    stream = spec.streams["pair"]
    n = min(n, len(stream.dataset))
    xs, ys = [], []
    with torch.no_grad():
        for start in range(0, n, 64):
            batch = stream.collate([stream.dataset[i] for i in range(start, min(start + 64, n))])
            pooled = model.pooled(model.image_batch(batch), batch["input_ids"], batch["attention_mask"])
            xs.append(pooled.numpy())
            ys.append(batch["labels"].numpy())
    return np.concatenate(xs), np.concatenate(ys)


def probe(
    x: np.ndarray, y: np.ndarray, held_out: float = 0.2, cs: tuple[float, ...] = (0.1, 1.0, 10.0)
) -> tuple[float, list[dict[str, float]]]:
    """Logistic regressions fitted on the first ``1 - held_out`` of the rows, scored on the rest: the
    held-out majority label's share and, per ``C``, the training and held-out accuracy."""
    from sklearn.linear_model import LogisticRegression

    cut = int(round(len(y) * (1 - held_out)))
    if not 0 < cut < len(y) or len(set(y[:cut].tolist())) < 2:
        raise ValueError(f"need two labels to fit and rows to score, got {len(y)} rows, cut at {cut}")
    chance = Counter(y[cut:].tolist()).most_common(1)[0][1] / (len(y) - cut)
    out = []
    for c in cs:
        clf = LogisticRegression(max_iter=3000, C=c).fit(x[:cut], y[:cut])
        out.append({"C": c, "train": clf.score(x[:cut], y[:cut]), "held_out": clf.score(x[cut:], y[cut:])})
    return chance, out


def main() -> None:
    from vlp_core.paths import DataLayout
    from vlp_core.train.config import load_train_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="the run whose backbone is probed")
    ap.add_argument("--config", default="nlvr2_scenes", help="task preset (configs/train/)")
    ap.add_argument("--dataset", default=None, help="task dataset in the store (default: the preset's)")
    ap.add_argument("--n", type=int, default=3000, help="training examples encoded")
    ap.add_argument("--held-out", type=float, default=0.2, help="fraction of them scored, not fitted")
    ap.add_argument("--data-dir", type=Path, default=None, help="default: the project's data directory")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layout = DataLayout(args.data_dir.resolve()) if args.data_dir else DataLayout.default()
    over = {
        "init_from": str(Path(args.init).resolve()),
        "data_dir": str(layout.root),
        "run_dir": str(layout.runs / "probes" / Path(args.init).name),
    }
    if args.dataset:
        over["task.dataset"] = args.dataset
    cfg = load_train_config(args.config, over)
    t0 = time.time()
    x, y = fused_features(cfg, args.n)
    chance, rows = probe(x, y, args.held_out)
    cut = int(round(len(y) * (1 - args.held_out)))
    secs = time.time() - t0
    print(f"{cfg.task.dataset}: {len(y)} examples encoded in {secs:.0f}s ({x.shape[1]} features); "
          f"fit on {cut}, scored on {len(y) - cut}; majority label {100 * chance:.1f} %")  # fmt: skip
    for r in rows:
        print(f"  C={r['C']:<5} train {100 * r['train']:5.1f} %   held-out {100 * r['held_out']:5.1f} %")


if __name__ == "__main__":
    main()
