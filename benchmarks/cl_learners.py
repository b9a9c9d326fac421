"""Continual-learning learners side by side on MNIST-5k streams, through ``eval.runner.bench``.

    python benchmarks/cl_learners.py [--streams split rotated permuted] [--seeds 0 1 2] [--out runs/learners]

Prints ACC, forgetting, BWT, parameters and bytes per skill and training time per
learner and stream. Goals: rank_selective and increlora within 1 point of
lora (r=8) with <= 50% of its parameters; orthogonal (summed, no routing) at
half of finetune's forgetting.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eval import data, streams
from eval.runner import bench

LEARNERS = ["lora", "rank_selective", "increlora", "orthogonal", "finetune", "joint"]
STREAMS = {
    "split": lambda d: streams.split(d, n_tasks=5, scenario="class"),
    "rotated": lambda d: streams.rotated(d, n_tasks=5),
    "permuted": lambda d: streams.permuted(d, n_tasks=5),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    ap.add_argument("--learners", nargs="+", default=LEARNERS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--backbone", default="vit_micro")
    ap.add_argument("--out", default="runs/learners")
    args = ap.parse_args()
    d = data.mnist()
    print(f"{'stream':9} {'learner':15} {'ACC':>6} {'forget':>7} {'BWT':>7} {'params':>8} {'bytes':>8} {'train s':>8}")
    for key in args.streams:
        results = bench(STREAMS[key](d), args.learners, backbone=args.backbone, seeds=args.seeds,
                        out=Path(args.out) / key)
        for name, res in results.items():
            m = {k: (v["mean"] if v["mean"] is not None else float("nan")) for k, v in res.metrics.items()
                 if isinstance(v, dict) and "mean" in v}
            print(f"{key:9} {name:15} {100 * m['acc']:6.1f} {100 * m['forgetting']:7.1f} {100 * m['bwt']:7.1f} "
                  f"{m['params_per_skill']:8.0f} {m['bytes_per_skill']:8.0f} {m['train_seconds']:8.1f}", flush=True)

if __name__ == "__main__":
    main()
