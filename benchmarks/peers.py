"""Our reference learners beside Avalanche 0.6's implementations, on the same stream and backbone.

Both sides start from the same pretrained ``vit_micro`` (the main job's backbone,
pretrained on the stream's source split), train its every weight with AdamW at
the same lr, batch size and epochs (constant lr, no clipping, no weight decay on
both sides), and are scored by the same code (``eval.protocol.score_direct``,
class-IL over the whole head) after each task. Ours run through ``eval.runner``
(what ``skillbank bench --learners ...`` runs); Avalanche's run as its strategies
and plugins:

- naive: ``Naive``;
- ewc: ``EWCPlugin(ewc_lambda=0.4, mode="online", decay_factor=0.1)``
  (ours: ``ewc_lambda=0.8`` in the ``lambda / 2`` convention, the same penalty);
- lwf: ``LwFPlugin(alpha=1, temperature=2)``;
- replay: ``ReplayPlugin(mem_size=200, storage_policy=ReservoirSamplingBuffer(200))``;
- simplecil: Avalanche has no SimpleCIL; its ``NCMClassifier`` on the frozen
  backbone's features, fed the normalised class means, is the same classifier.

Needs the ``peers`` extra (``pip install -e '.[peers]'``, best in its own venv);
the skillbank package itself never imports Avalanche.

    python benchmarks/peers.py [--stream split-mnist] [--epochs 1] [--seeds 0] [--methods ...]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from eval import backbones, metrics
from eval.config import build_stream, load
from eval.protocol import score_direct
from eval.runner import bench
from learners import TrainConfig, create_learner
from skillbank.embed import features

METHODS = ("naive", "ewc", "lwf", "replay", "simplecil")
TOLERANCE = 3.0  # points of ACC


def _avalanche_plugins(method: str) -> list:
    from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ReservoirSamplingBuffer

    return {
        "naive": [],
        "ewc": [EWCPlugin(ewc_lambda=0.4, mode="online", decay_factor=0.1)],
        "lwf": [LwFPlugin(alpha=1, temperature=2)],
        "replay": [ReplayPlugin(mem_size=200, storage_policy=ReservoirSamplingBuffer(200))],
    }[method]


def _row(model: torch.nn.Module, stream) -> list[float]:
    return [score_direct(model, t).class_il for t in stream]


def avalanche_run(
    method: str, stream, base, cfg: TrainConfig, reset_optimizer: bool = False
) -> np.ndarray:
    """Avalanche's strategy over ``stream``; the accuracy matrix R, (T+1) x T.

    Avalanche keeps AdamW's moments from one experience to the next; our loop
    starts a fresh optimizer per task. ``reset_optimizer`` makes Avalanche reset
    them too, to tell that difference apart from the method's own.
    """
    from avalanche.benchmarks.scenarios.deprecated.generic_benchmark_creation import (
        create_generic_benchmark_from_tensor_lists,
    )
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(base).cpu().requires_grad_(True)
    if method == "simplecil":
        return _avalanche_ncm(model, stream)
    scenario = create_generic_benchmark_from_tensor_lists(
        train_tensors=[[t.x_train, t.y_train] for t in stream],
        test_tensors=[[t.x_test, t.y_test] for t in stream],
        task_labels=[0] * len(stream),
    )
    strategy = Naive(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0),
        train_mb_size=cfg.batch_size,
        train_epochs=cfg.epochs,
        eval_mb_size=512,
        device="cpu",
        plugins=_avalanche_plugins(method),
        evaluator=EvaluationPlugin(loggers=[]),
    )
    if reset_optimizer:
        make = strategy.make_optimizer
        strategy.make_optimizer = lambda **kw: make(**{**kw, "reset_optimizer_state": True})
    R = [_row(model, stream)]
    for exp in scenario.train_stream:
        strategy.train(exp)
        R.append(_row(model, stream))
    return np.asarray(R)


def _avalanche_ncm(model: torch.nn.Module, stream) -> np.ndarray:
    """Avalanche's ``NCMClassifier`` on the frozen backbone's pre-logit features."""
    from avalanche.models import NCMClassifier

    ncm = NCMClassifier(normalize=True)
    feats = {id(t): (features(model, t.x_train, head="head"), t.y_train) for t in stream}

    def row() -> list[float]:
        out = []
        for t in stream:
            logits = ncm(features(model, t.x_test, head="head"))
            out.append(float((logits.argmax(1) == t.y_test).float().mean()))
        return out

    R = [_row(model, stream)]
    seen: dict[int, list[torch.Tensor]] = {}  # a class seen again (domain-IL): one mean of all
    for t in stream:
        f, y = feats[id(t)]
        for c in y.unique().tolist():
            seen.setdefault(c, []).append(f[y == c])
        ncm.replace_class_means_dict(
            {c: F.normalize(torch.cat(fs).mean(0), dim=0) for c, fs in seen.items()}
        )
        R.append(row())
    return np.asarray(R)


def ours_run(method: str, stream, base, cfg: TrainConfig) -> np.ndarray:
    """Our learner through the runner; the accuracy matrix R."""
    learner = create_learner(method, train=cfg)
    with tempfile.TemporaryDirectory() as tmp:
        result = bench(
            stream, [learner], backbone=base, bank=f"{tmp}/bank", seeds=(cfg.seed,), device="cpu"
        )
    return np.asarray(result[method].runs[0].R)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--stream", default="domains-mnist", help="domains-mnist (the main job) | split-mnist | ..."
    )
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--reset-optimizer",
        action="store_true",
        help="Avalanche resets AdamW's state per experience, as our loop does",
    )
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    stream = build_stream(load(stream=args.stream))
    base = backbones.pretrain(
        "vit_micro", stream.source, num_classes=stream.n_classes, device="cpu"
    )
    console = Console(width=120)
    table = Table(
        title=f"{stream.name} ({stream.scenario}-IL), vit_micro, {args.epochs} epoch(s), "
        f"lr {args.lr}, batch {args.batch_size}, seeds {seeds}"
        + (", Avalanche's optimizer reset per experience" if args.reset_optimizer else "")
        + ": ACC %"
    )
    for col in ("method", "skillbank", "Avalanche 0.6", "difference", "verdict"):
        table.add_column(col, justify="left" if col in ("method", "verdict") else "right")
    for method in methods:
        ours, theirs = [], []
        for seed in seeds:
            cfg = TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                b_ratio=1.0,
                schedule="constant",
                grad_clip=None,
                seed=seed,
                device="cpu",
                progress=False,
            )
            t0 = time.perf_counter()
            ours.append(100 * metrics.acc(ours_run(method, stream, base, cfg)))
            t1 = time.perf_counter()
            R = avalanche_run(method, stream, base, cfg, reset_optimizer=args.reset_optimizer)
            theirs.append(100 * metrics.acc(R))
            console.log(
                f"{method} seed {seed}: ours {ours[-1]:.1f} ({t1 - t0:.0f} s), "
                f"avalanche {theirs[-1]:.1f} ({time.perf_counter() - t1:.0f} s)"
            )
        diff = float(np.mean(ours) - np.mean(theirs))
        table.add_row(
            method,
            f"{np.mean(ours):.1f} ± {np.std(ours):.1f}",
            f"{np.mean(theirs):.1f} ± {np.std(theirs):.1f}",
            f"{diff:+.1f}",
            "within 3" if abs(diff) <= TOLERANCE else "DIFFERS",
        )
    console.print(table)


if __name__ == "__main__":
    main()
