"""Results of a run as JSON, a terminal table and plots."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from eval import metrics
from skillbank.files import atomic_write

if TYPE_CHECKING:
    from eval.runner import RunResult


def stats(values: list[float]) -> dict[str, Any]:
    """Mean, std and the per-seed values (undefined ones skipped in the mean, null in JSON)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if not len(arr):
        return {"mean": None, "std": None, "per_seed": [None] * len(values)}
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "per_seed": [_clean(v) for v in values],
    }


def write_json(path: Path, doc: Any, indent: int | None = 2) -> Path:
    """``doc`` as JSON at ``path``, atomically: a crash leaves the previous file whole."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(doc, indent=indent))


def _clean(v: Any) -> Any:
    """JSON has no NaN: undefined values (e.g. BWT of one task) become null."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def learner_metrics(result: RunResult) -> dict[str, Any]:
    """Metrics per seed, with mean and std: the summary of R, task-IL ACC, routing, cost."""
    per_seed = [metrics.summary(np.asarray(r.R)) for r in result.runs]
    out = {k: stats([m[k] for m in per_seed]) for k in per_seed[0]}
    out["acc_task_il"] = stats([metrics.acc(np.asarray(r.R_task)) for r in result.runs])
    out["routing"] = stats([r.routing[-1] for r in result.runs])
    out["retention"] = stats([r.retention[-1] if r.retention else None for r in result.runs])
    out["params_per_skill"] = stats(
        [float(np.mean(r.params)) if r.params else 0.0 for r in result.runs]
    )
    out["bytes_per_skill"] = stats(
        [float(np.mean(r.bytes)) if r.bytes else 0.0 for r in result.runs]
    )
    out["train_seconds"] = stats([float(np.sum(r.seconds)) for r in result.runs])
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "skillbank",
        "torch",
        "timm",
        "open_clip_torch",
        "faiss-cpu",
        "sqlalchemy",
        "numpy",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def results_doc(results: dict[str, RunResult], extra: dict | None = None) -> dict[str, Any]:
    """The continual protocol's ``results.json``: R per seed, metrics with mean/std, costs,
    device, versions, then ``extra`` (e.g. the run id)."""
    first = next(iter(results.values()))
    return {
        "stream": first.stream,
        "scenario": first.scenario,
        "device": first.device,
        "seeds": first.seeds,
        "versions": versions(),
        **(extra or {}),
        "learners": {
            name: {
                "metrics": learner_metrics(r),
                "R": [_clean(run.R) for run in r.runs],
                "R_task_il": [_clean(run.R_task) for run in r.runs],
                "routing_per_row": [_clean(run.routing) for run in r.runs],
                "retention_per_row": [_clean(run.retention) for run in r.runs],
                "seconds_per_task": [run.seconds for run in r.runs],
                "skills": [run.skills for run in r.runs],
            }
            for name, r in results.items()
        },
    }


def write_results(
    results: dict[str, RunResult], out: str | Path, extra: dict | None = None
) -> Path:
    """``results.json`` (``results_doc``) and the plots under ``out``."""
    from eval.plots import plot_all

    out = Path(out)
    write_json(out / "results.json", results_doc(results, extra))
    plot_all(results, out)
    return out


def _fmt(stat: dict[str, Any], scale: float = 100.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


COLUMNS = (
    "learner",
    "ACC",
    "avg ACC",
    "forgetting",
    "BWT",
    "FWT",
    "task-IL ACC",
    "routing",
    "params/skill",
    "KiB/skill",
    "train s",
)


def metric_row(name: str, m: dict[str, Any]) -> list[str]:
    """One learner's cells under ``COLUMNS``, from its metrics (``learner_metrics`` or results.json)."""
    return [
        name,
        _fmt(m["acc"]),
        _fmt(m["avg_acc"]),
        _fmt(m["forgetting"]),
        _fmt(m["bwt"]),
        _fmt(m["fwt"]),
        _fmt(m["acc_task_il"]),
        _fmt(m["routing"]),
        _fmt(m["params_per_skill"], 1, 0),
        _fmt(m["bytes_per_skill"], 1 / 1024),
        _fmt(m["train_seconds"], 1, 1),
    ]


def title_of(stream: str, scenario: str, seeds: list, device: str, router: str = "") -> str:
    return f"{stream} ({scenario}-IL), {len(seeds)} seed(s), {device}" + (
        f", router {router}" if router else ""
    )


def table(results: dict[str, RunResult], title: str | None = None) -> Table:
    """One row per learner: accuracies in percent (mean ± std over seeds), costs."""
    first = next(iter(results.values()))
    t = Table(
        title=title
        or title_of(first.stream, first.scenario, first.seeds, first.device, first.router)
    )
    for col in COLUMNS:
        t.add_column(col, justify="left" if col == "learner" else "right")
    for name, r in results.items():
        t.add_row(*metric_row(name, learner_metrics(r)))
    return t


def print_table(results: dict[str, RunResult], console: Console | None = None, **kw: Any) -> None:
    # Wide enough for every column even when stdout is a file or a pipe.
    (console or Console(width=max(160, Console().width))).print(table(results, **kw))
