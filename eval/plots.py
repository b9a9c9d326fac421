"""PNG plots of a run: accuracy matrices, accuracy per task over time, forgetting."""

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


def _save(plt, fig, path: Path) -> Path:
    """``fig`` to ``path`` atomically (the format from its suffix), then closed."""
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def plot_all(results: dict[str, RunResult], out: Path) -> list[Path]:
    return [
        heatmaps(results, out / "accuracy_matrix.png"),
        over_time(results, out / "accuracy_over_time.png"),
        forgetting(results, out / "forgetting.png"),
    ]


def heatmaps(results: dict[str, RunResult], path: Path) -> Path:
    """R (mean over seeds) per learner: rows = after training task i, columns = task j."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        R = r.R
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for i in range(R.shape[0]):
            for j in range(R.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{100 * R[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if R[i, j] < 0.6 else "black",
                )
        ax.set_title(name)
        ax.set_xlabel("task j")
        ax.set_ylabel("after task i (0 = before)")
    return _save(plt, fig, path)


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
    names = list(results)
    values = [[metrics.forgetting(np.asarray(run.R)) for run in results[n].runs] for n in names]
    ax.bar(
        names,
        [100 * np.nanmean(v) for v in values],
        yerr=[100 * np.nanstd(v) for v in values],
        capsize=4,
    )
    ax.set_ylabel("forgetting (points)")
    return _save(plt, fig, path)
