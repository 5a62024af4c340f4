"""Launch one training run: ``python -m vlp_core.train --config albef_tiny --set optim.lr=3e-4``.

Multi-process / multi-GPU: ``torchrun --nproc_per_node 8 -m vlp_core.train --config albef_base``.
Re-running the same command resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import yaml

from vlp_core.tasks import build_spec
from vlp_core.train.config import load_train_config
from vlp_core.train.trainer import evaluate_only, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlp_core.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="albef_tiny", help="preset under configs/train/ or a YAML path")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override (repeatable)"
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="evaluate the run's latest checkpoint (or the initial model)"
    )
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects key=value, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    try:
        config = load_train_config(args.config, overrides)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.eval_only:
        metrics = evaluate_only(config, build_spec)
        print(
            "RESULT "
            + json.dumps(
                {
                    "run_dir": str(config.resolved_run_dir()),
                    "step": 0,
                    "resumed_from": 0,
                    "last": {},
                    "eval": metrics,
                }
            ),
            flush=True,
        )
        return 0
    result = train(config, build_spec)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {
            "run_dir": str(result.run_dir),
            "step": result.step,
            "resumed_from": result.resumed_from,
            "last": result.last_metrics,
            "eval": result.eval_metrics,
        }
        print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
