"""How well the frozen backbone's features can tell the tasks apart (a script, not a test).

    python benchmarks/route_ceiling.py --streams split-mnist,rotated-mnist
    python benchmarks/route_ceiling.py --streams split-mnist --augment   # shift-augmented pretraining

Every router ranks skills from the bare backbone, so no router beats a classifier
of "which task is this sample from" trained on the same features with all the
training data at once. This script fits such classifiers in closed form on the
bare features of every task's training split (the stream's cached pretrained
``vit_micro``, seed 0) and scores them on the test splits (routing accuracy: the
sample's own task chosen). One Gaussian per (task, class), as the routers keep:

- ``prototype``: nearest group mean by cosine;
- ``lda``: group means and one covariance, shrunk 10% (the ``mahalanobis`` router);
- ``qda``: a covariance per group, shrunk 50%;
- ``ranpac``: RanPAC's random ReLU projection to 4,096 dimensions and a ridge
  classifier; ridge weight 1e-3, 1e-2 or 1e-1 of the Gram matrix's mean eigenvalue,
  the best on the test split reported (optimistic on purpose: a ceiling).

Features: the pooled pre-logit feature (L2-normalised, what the routers read),
the mean token of every block, both side by side, and the input pooled to 7 x 7
(``pixel_features``, as stored for ``stats`` and ``fused``; not normalised).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import backbones  # noqa: E402
from eval.config import BenchConfig, build_stream  # noqa: E402
from skillbank.route_stats import (  # noqa: E402
    pixel_features,
    shrunk_covariance,
    stats_from_features,
)

RIDGE = (1e-3, 1e-2, 1e-1)
PROJECTION = 4096


@torch.no_grad()
def block_features(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Pooled feature and every block's mean token, from one bare pass per chunk, and
    the pixel grid."""
    caught: dict[str, torch.Tensor] = {}
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: caught.__setitem__(n, out.mean(1))
        )
        for n in names
    ]
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ["pooled", *names]}
    try:
        for chunk in x.split(512):
            out["pooled"].append(model.forward_head(model.forward_features(chunk), pre_logits=True))
            for n in names:
                out[n].append(caught[n])
    finally:
        for h in hooks:
            h.remove()
    feats = {k: _unit(torch.cat(v).numpy().astype(np.float64)) for k, v in out.items()}
    return feats | {"pixels": pixel_features(x).numpy()}


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _gaussians(tr, g, shrink):
    """Group means and the shared covariance shrunk towards (trace/d) I, as the
    ``mahalanobis`` router builds them from the bank's statistics."""
    stats = stats_from_features(torch.from_numpy(tr), torch.from_numpy(g))
    return np.asarray(stats.classes), stats.means(), shrunk_covariance([stats], shrink)


def prototype(tr, g, te):
    groups = np.unique(g)
    mu = _unit(np.stack([tr[g == k].mean(0) for k in groups]))
    return groups[(te @ mu.T).argmax(1)]


def lda(tr, g, te, shrink=0.1):
    groups, mu, cov = _gaussians(tr, g, shrink)
    prec = np.linalg.inv(cov)
    scores = te @ prec @ mu.T - 0.5 * ((mu @ prec) * mu).sum(1)
    return groups[scores.argmax(1)]


def qda(tr, g, te, shrink=0.5):
    groups = np.unique(g)
    scores = []
    for k in groups:
        part = tr[g == k]
        _, (mu,), cov = _gaussians(part, np.zeros(len(part), np.int64), shrink)
        chol = np.linalg.cholesky(cov)
        z = np.linalg.solve(chol, (te - mu).T)
        scores.append(-0.5 * (z**2).sum(0) - np.log(np.diag(chol)).sum())
    return groups[np.stack(scores, 1).argmax(1)]


def ranpac(tr, g, te, tasks_te, seed=0):
    """Best routing accuracy over the ridge weights (a ceiling, chosen on test)."""
    groups = np.unique(g)
    w = np.random.default_rng(seed).standard_normal((tr.shape[1], PROJECTION))
    h_tr, h_te = np.maximum(tr @ w, 0), np.maximum(te @ w, 0)
    gram = h_tr.T @ h_tr
    target = h_tr.T @ (g[:, None] == groups[None, :]).astype(np.float64)
    scale = np.trace(gram) / len(gram)
    best = 0.0
    for lam in RIDGE:
        weights = np.linalg.solve(gram + lam * scale * np.eye(len(gram)), target)
        best = max(best, _routing(groups[(h_te @ weights).argmax(1)], tasks_te))
    return best


def _routing(pred_groups: np.ndarray, tasks: np.ndarray) -> float:
    return 100.0 * float(np.mean(pred_groups // 1000 == tasks))


def ceiling(stream_name: str, augment: bool) -> list[tuple[str, str, float]]:
    stream = build_stream(BenchConfig(stream=stream_name, learners=["lora"]))
    model = backbones.pretrain(
        "vit_micro",
        stream.source,
        seed=0,
        device="cpu",
        num_classes=stream.n_classes,
        augment=augment,
    ).eval()
    parts = {"train": [], "test": []}
    for t in stream:
        for split in parts:
            f = block_features(model, getattr(t, f"x_{split}"))
            y = getattr(t, f"y_{split}").numpy()
            parts[split].append((f, t.task_id * 1000 + y))  # group = (task, class)
    joined = {
        split: (
            {k: np.concatenate([f[k] for f, _ in rows]) for k in rows[0][0]},
            np.concatenate([g for _, g in rows]),
        )
        for split, rows in parts.items()
    }
    (ftr, gtr), (fte, gte) = joined["train"], joined["test"]
    blocks = [k for k in ftr if k.startswith("blocks.")]
    views = {
        "pooled": ["pooled"],
        "blocks": blocks,
        "pooled + blocks": ["pooled", *blocks],
        "pixels 7 x 7": ["pixels"],
    }
    tasks = gte // 1000
    rows = []
    for view, keys in views.items():
        tr = np.concatenate([ftr[k] for k in keys], 1)
        te = np.concatenate([fte[k] for k in keys], 1)
        rows.append((view, "prototype", _routing(prototype(tr, gtr, te), tasks)))
        rows.append((view, "lda", _routing(lda(tr, gtr, te), tasks)))
        rows.append((view, "qda", _routing(qda(tr, gtr, te), tasks)))
        rows.append((view, "ranpac", ranpac(tr, gtr, te, tasks)))
        for r in rows[-4:]:
            print(f"<!-- {stream_name} {r[0]} {r[1]} {r[2]:.1f} -->", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="split-mnist,rotated-mnist,permuted-mnist,domains-mnist")
    ap.add_argument("--augment", action="store_true", help="pretrain with random shifts")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {s: ceiling(s, args.augment) for s in args.streams.split(",") if s}
    methods = ["prototype", "lda", "qda", "ranpac"]
    print("| stream | features | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for stream, rows in results.items():
        for view in dict.fromkeys(v for v, _, _ in rows):
            got = {m: acc for v, m, acc in rows if v == view}
            print(f"| {stream} | {view} | " + " | ".join(f"{got[m]:.1f}" for m in methods) + " |")


if __name__ == "__main__":
    main()
