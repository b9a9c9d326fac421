"""``skillbank report RUN_DIR``: the tables of a finished run, printed from its results.json.

Numbers come from the file alone (the metrics ``bench`` wrote), formatted by
``eval.report``'s own row code, so a README table pasted from here matches both
the file and the terminal table of the run.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from .core import app, command


class Format(str, Enum):
    md = "md"
    json = "json"


def load_results(run_dir: Path) -> dict[str, Any]:
    """``RUN_DIR/results.json`` (or the file itself), checked for the fields the tables need."""
    from skillbank import ConfigError

    path = run_dir / "results.json" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise ConfigError(f"no results.json in {run_dir}; run `skillbank bench --out DIR` first")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("learners"), dict):
        raise ConfigError(f"{path} has no 'learners' mapping: not a results.json of `bench`")
    for name, entry in doc["learners"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
            raise ConfigError(f"{path}: learner {name!r} has no metrics")
    return doc


def summary(doc: dict[str, Any]) -> dict[str, Any]:
    """What the tables show, as data: the run's header and each learner's metrics."""
    keys = ("stream", "scenario", "seeds", "device", "backbone", "run_id", "router", "rerank")
    return {
        **{k: doc.get(k) for k in keys if k in doc},
        "learners": {name: e["metrics"] for name, e in doc["learners"].items()},
    }


def markdown(doc: dict[str, Any]) -> str:
    """A Markdown table, one row per learner, with the run's header as its caption."""
    from eval.report import COLUMNS, metric_row, title_of

    try:
        rows = [metric_row(name, e["metrics"]) for name, e in doc["learners"].items()]
    except (KeyError, TypeError) as e:
        from skillbank import ConfigError

        raise ConfigError(f"results.json metrics lack {e}") from None
    head = title_of(
        doc.get("stream", "?"),
        doc.get("scenario", "?"),
        doc.get("seeds", []),
        doc.get("device", "?"),
        doc.get("router", ""),
    )
    lines = [
        f"**{head}** (ACC and friends in %, mean ± std over seeds)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if c == "learner" else "---:" for c in COLUMNS) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]
    return "\n".join(lines)


@command()
def report(
    run_dir: Path = typer.Argument(..., help="A bench output folder (or its results.json)."),
    fmt: Format = typer.Option(Format.md, "--format", "-f", help="md (a table) | json"),
) -> None:
    """Print the tables of a finished run from its results.json (no bank needed)."""
    doc = load_results(run_dir)
    if fmt is Format.json:
        typer.echo(json.dumps(summary(doc), indent=2))
    else:
        typer.echo(markdown(doc))


__all__ = ["app", "load_results", "markdown", "report", "summary"]
