"""PNG plots of a run: accuracy matrices, accuracy per task over time, forgetting, and a
small summary picture (the first learner's matrix beside everyone's forgetting)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eval import metrics
from skillbank.files import atomic_path

if TYPE_CHECKING:
    from eval.runner import RunResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path, dpi: int = 120) -> Path:
    """``fig`` to ``path`` atomically (the format from its suffix), then closed."""
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def plot_all(results: dict[str, RunResult], out: Path) -> list[Path]:
    return [
        heatmaps(results, out / "accuracy_matrix.png"),
        over_time(results, out / "accuracy_over_time.png"),
        forgetting(results, out / "forgetting.png"),
        summary(results, out / "summary.png"),
    ]


def heatmaps(results: dict[str, RunResult], path: Path) -> Path:
    """R (mean over seeds) per learner: rows = after training task i, columns = task j."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        _matrix(ax, r.R, name)
    return _save(plt, fig, path)


def _matrix(ax, R: np.ndarray, title: str) -> None:
    ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            color = "white" if R[i, j] < 0.6 else "black"
            ax.text(j, i, f"{100 * R[i, j]:.0f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title)
    ax.set_xlabel("task j")
    ax.set_ylabel("after task i (0 = before)")


def over_time(results: dict[str, RunResult], path: Path) -> Path:
    """Average accuracy over the tasks seen so far, after each task, per learner."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results.items():
        R = r.R
        seen = [R[i, :i].mean() for i in range(1, R.shape[0])]
        ax.plot(range(1, R.shape[0]), [100 * v for v in seen], marker="o", label=name)
    ax.set_xticks(range(1, next(iter(results.values())).R.shape[0]))
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("accuracy on seen tasks (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    return _save(plt, fig, path)


def forgetting(results: dict[str, RunResult], path: Path) -> Path:
    """Chaudhry forgetting per learner, mean and std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    _forgetting_bars(ax, results)
    return _save(plt, fig, path)


def summary(results: dict[str, RunResult], path: Path) -> Path:
    """One small picture for a README: the first learner's accuracy matrix, and the
    forgetting of every learner."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.5, 3.2))
    name, first = next(iter(results.items()))
    _matrix(left, first.R, f"{name}: accuracy (%)")
    _forgetting_bars(right, results)
    return _save(plt, fig, path, dpi=80)


def _forgetting_bars(ax, results: dict[str, RunResult]) -> None:
    names = list(results)
    values = [[metrics.forgetting(np.asarray(run.R)) for run in results[n].runs] for n in names]
    ax.bar(
        names,
        [100 * np.nanmean(v) for v in values],
        yerr=[100 * np.nanstd(v) for v in values],
        capsize=4,
    )
    ax.set_ylabel("forgetting (points)")
