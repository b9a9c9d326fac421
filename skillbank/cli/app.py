"""The `skillbank` command line (typer + rich), a presentation layer over the API.

Commands live in ``browse`` (read-only) and ``manage`` (writes, maintenance);
importing them here registers them on ``app``. ``bench`` is added by the lead.
"""

from __future__ import annotations

import contextlib

import typer

from . import browse, manage  # noqa: F401  (registration by explicit import)
from .core import app, command


@app.command()
def version() -> None:
    """Print the skillbank version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        typer.echo(dist_version("skillbank"))
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        from skillbank import __version__

        typer.echo(__version__)


@command()
def bench(config: str = typer.Option(None, "--config", "-c", help="YAML or JSON file of settings; flags override it."),
          protocol: str = typer.Option(None, help="continual (default) | tta (test-time adaptation) | transfer (few-shot composition)."),
          stream: str = typer.Option(None, help="split-mnist | rotated-mnist | permuted-mnist | corrupted-mnist | split-digits"),
          tasks: int = typer.Option(None, help="Number of tasks (split, rotated, permuted)."),
          scenario: str = typer.Option(None, help="class | task (split streams)."),
          backbone: str = typer.Option(None, help="Preset, timm model name or open_clip:<name>."),
          learners: str = typer.Option(None, help="Comma-separated, e.g. lora,finetune,joint."),
          seeds: str = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2."),
          epochs: int = typer.Option(None, help="Training epochs per task."),
          rank: int = typer.Option(None, help="Adapter rank."),
          device: str = typer.Option(None, help="auto | cpu | cuda"),
          out: str = typer.Option(None, help="Folder for results.json, plots and the checkpoint."),
          resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint.")) -> None:
    """Run the continual-learning benchmark (default: the main job, split MNIST-5k, 3 seeds).

    Skills go into the bank given by the global --bank (default ./skills).
    """
    from eval.config import execute, load

    from .core import open_bank, state

    chosen = state().bank
    cfg = load(config, protocol=protocol, stream=stream, tasks=tasks, scenario=scenario, backbone=backbone,
               learners=learners.split(",") if learners else None,
               seeds=[int(s) for s in seeds.split(",")] if seeds else None, epochs=epochs, rank=rank,
               device=device, out=out, bank=chosen if chosen != "skills" else None, resume=resume or None)
    with open_bank(create=True) if cfg.bank == chosen else contextlib.nullcontext(cfg.bank) as bank:
        execute(cfg, bank=bank)


if __name__ == "__main__":
    app(prog_name="skillbank")
