"""A linear probe on a model's *frozen* fused vectors: is what a classification task asks present in them at
all, whatever fine-tuning does with it?

For a task preset (``nlvr2_scenes``, ``snli_ve_scenes``, ``gqa_scenes``) and a run to start from, it builds
the fine-tuning model exactly as the trainer does (backbone weights from ``--init``, a fresh head), encodes
the first ``--n`` training examples with the backbone's ``fuse`` (one pass per image, pooled vectors
concatenated, as :class:`~vlp_core.models.heads.FusedClassifier` feeds its head), and fits a logistic
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

import numpy as np
import torch


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    from vlp_core.paths import DataLayout
    from vlp_core.tasks.base import build_spec
    from vlp_core.train.config import load_train_config
    from vlp_core.train.trainer import DistEnv

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
    spec = build_spec(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    model = spec.model.eval()
    stream = spec.streams["pair"]
    n = min(args.n, len(stream.dataset))
    t0 = time.time()
    xs, ys = [], []
    with torch.no_grad():
        for start in range(0, n, 64):
            batch = stream.collate([stream.dataset[i] for i in range(start, min(start + 64, n))])
            pixels = model.image_batch(batch)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            k = getattr(model, "n_images", 1)
            views = [pixels] if k == 1 else [pixels[:, j] for j in range(k)]
            xs.append(torch.cat([model.backbone.fuse(v, ids, mask).pooled for v in views], -1).numpy())
            ys.append(batch["labels"].numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    cut = int(round(n * (1 - args.held_out)))
    chance = Counter(y[cut:].tolist()).most_common(1)[0][1] / (n - cut)
    print(f"{cfg.task.dataset}: {n} examples encoded in {time.time() - t0:.0f}s ({x.shape[1]} features); "
          f"fit on {cut}, scored on {n - cut}; majority label {100 * chance:.1f} %")  # fmt: skip
    for c in (0.1, 1.0, 10.0):
        clf = LogisticRegression(max_iter=3000, C=c).fit(x[:cut], y[:cut])
        fit, held = clf.score(x[:cut], y[:cut]), clf.score(x[cut:], y[cut:])
        print(f"  C={c:<5} train {100 * fit:5.1f} %   held-out {100 * held:5.1f} %")


if __name__ == "__main__":
    main()
