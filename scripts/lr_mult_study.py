"""Does a lower learning rate for the ImageNet CNN stop its features collapsing in pre-training?

The ALBEF issue found that tiny ALBEF pre-training at lr 3e-4 updates every EfficientNet-Lite0 weight (its
BatchNorm statistics frozen) until the image features collapse (mean pairwise cosine of the pooled backbone
features on easy-VQA images 0.41 -> 0.83) and easy-VQA accuracy after fine-tuning falls below no VLP
pre-training. This script pre-trains ALBEF on known pairs with the CNN's lr multiplier
(``optim.lr_mult.vision_pretrained``) at each of ``--mults`` (1 = as before, 0.1, 0 = frozen), fine-tunes
each on easy-VQA (and a no-VLP baseline), and prints per condition: the features' mean pairwise cosine, VQA
accuracy overall / yes-no / other, over ``--seeds``.

    .venv/bin/python scripts/lr_mult_study.py --mults 1,0.1,0 --seeds 0 --steps 80 --vqa-steps 100
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from study_runs import default_data_dir, mean_std, parse_list, run_train, train_command


def feature_cosine(run_dir: Path | None, n_images: int = 34) -> float:
    """Mean pairwise cosine of the CNN's pooled features on the first easy-VQA test images (the weights of
    ``run_dir``'s latest checkpoint, any method's backbone, or the ImageNet initialisation when ``None``)."""
    import torch.nn.functional as F

    from vlp_core.data import eval_transform, load_image_file, read_easy_vqa
    from vlp_core.models import build_backbone
    from vlp_core.tasks import load_backbone_weights_
    from vlp_core.train.checkpoint import load_pretrained_weights
    from vlp_core.train.config import run_config

    cfg = (
        run_config(run_dir).backbone_config()
        if run_dir is not None
        else {"kind": "dual_stream", "preset": "tiny"}
    )
    backbone = build_backbone(cfg).eval()
    if run_dir is not None:
        load_backbone_weights_(backbone, load_pretrained_weights(run_dir))
    records = read_easy_vqa("test")
    paths = list(dict.fromkeys(r.image for r in records))[:n_images]
    tf = eval_transform(backbone.image_size, backbone.image_mean, backbone.image_std)
    px = torch.stack([tf(load_image_file(p)) for p in paths])
    with torch.no_grad():
        feats = backbone.image_input().grid_features(px).mean(1)
    f = F.normalize(feats, dim=-1)
    sim = f @ f.t()
    n = len(paths)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mults", default="1,0.1,0")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--vqa-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--vqa-questions", type=int, default=1000)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=default_data_dir())
    args = p.parse_args()
    runs = Path(args.data_dir) / "runs" / "train"
    mults, seeds = parse_list(args.mults, float), parse_list(args.seeds, int)
    common = {"data_dir": args.data_dir, "batch_size": 16, "log_every": 5, "data.num_workers": 1,
              "optim.lr": args.lr, "optim.min_lr": args.lr / 10}  # fmt: skip

    def pretrain(m: float, s: int) -> Path:
        d = runs / f"lrmult-{m:g}-s{s}"
        sets = {**common, "run_dir": str(d), "seed": s, "max_steps": args.steps,
                "checkpoint_every": args.steps, "optim.warmup_steps": max(1, args.steps // 10),
                "data.pairs.mode": "known", "data.pairs.sources": ["openclipart"],
                "optim.lr_mult": {"vision_pretrained": m}, "eval.retrieval_images": 50,
                "eval.itm_rerank_k": 0}  # fmt: skip
        run_train(train_command("albef_tiny", sets), d, threads=args.threads, label=d.name)
        return d

    def vqa(init: Path | None, s: int) -> dict:
        d = runs / f"lrmult-vqa-{init.name if init else 'none'}-s{s}"
        sets = {**common, "run_dir": str(d), "seed": s, "max_steps": args.vqa_steps,
                "checkpoint_every": args.vqa_steps, "optim.warmup_steps": max(1, args.vqa_steps // 10),
                "init_from": str(init) if init else None,
                "task.eval_questions": args.vqa_questions}  # fmt: skip
        return run_train(train_command("vqa_easy", sets), d, threads=args.threads, label=d.name)[0]

    jobs = [(m, s) for m in mults for s in seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        pre = dict(zip(jobs, pool.map(lambda j: pretrain(*j), jobs), strict=True))
        evals = dict(zip(jobs, pool.map(lambda j: vqa(pre[j], j[1]), jobs), strict=True))
        base = dict(zip(seeds, pool.map(lambda s: vqa(None, s), seeds), strict=True))
    rows = {"no VLP": ([feature_cosine(None)] * len(seeds), [base[s] for s in seeds])}
    for m in mults:
        rows[f"pre-trained, CNN lr x{m:g}"] = (
            [feature_cosine(pre[(m, s)]) for s in seeds],
            [evals[(m, s)] for s in seeds],
        )
    print("| condition | feature cosine | VQA accuracy | yes/no | other |\n|---|---|---|---|---|")
    out = {}
    for name, (cos, ev) in rows.items():
        cells = [mean_std(cos)] + [
            mean_std([e[k] for e in ev])
            for k in ("vqa_accuracy", "vqa_accuracy_yes_no", "vqa_accuracy_other")
        ]
        print(f"| {name} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in cells) + " |")
        out[name] = {"cosine": cos, "vqa": ev}
    path = Path(args.data_dir) / "runs" / "study" / "lr_mult.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
