"""The `skillbank` command line (typer + rich), a presentation layer over the API."""

from __future__ import annotations

import typer

app = typer.Typer(help="skillbank: lifelong low-rank skills for frozen PyTorch backbones.", no_args_is_help=True,
                  add_completion=False)


@app.command()
def version() -> None:
    """Print the skillbank version."""
    from skillbank import __version__

    typer.echo(__version__)


@app.command()
def demo(bank: str = typer.Option("skills", help="Bank directory (embedded SQLite) to write the skill into."),
         steps: int = typer.Option(300, help="Adapter training steps."),
         seed: int = typer.Option(0)) -> None:
    """Train a LoRA skill on a real MNIST-5k task, save, load, merge and bank it."""
    from eval.demo import main

    main(bank=bank, steps=steps, seed=seed)


if __name__ == "__main__":
    app()
