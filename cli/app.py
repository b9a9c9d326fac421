"""The `skillbank` command line (typer + rich), a presentation layer over the API.

Commands live in ``browse`` (read-only) and ``manage`` (writes, maintenance);
importing them here registers them on ``app``. ``bench`` is added by the lead.
"""

from __future__ import annotations

import contextlib

import typer

from . import browse, manage, report  # noqa: F401  (registration by explicit import)
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
def bench(
    ctx: typer.Context,
    config: str = typer.Option(
        None, "--config", "-c", help="YAML or JSON file of settings; flags override it."
    ),
    protocol: str = typer.Option(
        None,
        help="continual (default) | tta (test-time adaptation) | transfer (few-shot composition).",
    ),
    stream: str = typer.Option(
        None,
        help="domains-mnist (the main job) | split-mnist | rotated-mnist | permuted-mnist | permuted-mnist-disjoint | corrupted-mnist | corrupted-mnist-s3 | split-digits",
    ),
    tasks: int = typer.Option(None, help="Number of tasks (domains: the first N of 5)."),
    scenario: str = typer.Option(None, help="class | task (split streams)."),
    backbone: str = typer.Option(None, help="Preset, timm model name or open_clip:<name>."),
    learners: str = typer.Option(None, help="Comma-separated, e.g. lora,finetune,joint."),
    seeds: str = typer.Option(None, help="Comma-separated seeds, e.g. 0,1,2."),
    epochs: int = typer.Option(None, help="Training epochs per task."),
    rank: int = typer.Option(None, help="Adapter rank."),
    device: str = typer.Option(None, help="auto | cpu | cuda"),
    out: str = typer.Option(None, help="Folder for results.json, plots and the checkpoint."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from its checkpoint."
    ),
    router: str = typer.Option(
        None,
        help="How routed learners find skills: examples | prototype | mahalanobis | stats | fused "
        "(default: the scenario's).",
    ),
    rerank: int = typer.Option(
        None, help="Re-rank each sample's N best skills by the adapted model's confidence."
    ),
    log: str = typer.Option(
        None,
        "--log",
        help="Per-task logs, comma-separated: csv (out/tasks.csv, the default) | tensorboard "
        "| wandb, e.g. csv,tensorboard.",
    ),
    nproc: int = typer.Option(
        None,
        "--nproc",
        help="Train and score with N processes (torch.distributed; "
        "gloo on CPU, one GPU each with NCCL).",
    ),
) -> None:
    """Run the continual-learning benchmark (default: the main job, digit domains of MNIST-5k, 3 seeds).

    Skills go into the bank given by the global --bank (default ./skills). With
    --nproc N the command re-launches itself N times through torch.distributed.run.
    """
    from eval.config import execute, load

    from .core import open_bank, progress, state

    chosen = state().bank
    cfg = load(
        config,
        protocol=protocol,
        stream=stream,
        tasks=tasks,
        scenario=scenario,
        backbone=backbone,
        learners=learners.split(",") if learners else None,
        seeds=[int(s) for s in seeds.split(",")] if seeds else None,
        epochs=epochs,
        rank=rank,
        device=device,
        out=out,
        bank=chosen if chosen != "skills" else None,
        resume=resume or None,
        nproc=nproc,
        router=router,
        rerank=rerank,
        log=log,  # split at commas by the config; "" writes no per-task logs
    )
    from learners import distributed

    if cfg.nproc > 1 and not distributed.launched():  # validated here, run by N workers
        _launch(ctx, cfg.nproc)
        return
    created = distributed.init_from_env()  # a worker: join the group before touching the bank
    try:
        with contextlib.ExitStack() as stack:
            with distributed.main_first():  # rank 0 creates the bank, the others open it after
                bank = stack.enter_context(
                    open_bank(create=True)
                    if cfg.bank == chosen
                    else contextlib.nullcontext(cfg.bank)
                )
            execute(cfg, console=progress(), bank=bank)
    finally:
        distributed.shutdown(created)


def _flags(ctx: typer.Context, skip: tuple[str, ...] = ()) -> list[str]:
    """The options given to a command, back as command-line flags."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in skip or value is None or not getattr(param, "opts", None):
            continue
        if getattr(param, "is_flag", False):
            args += [param.opts[0]] if value else []
        else:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                args += [param.opts[0], str(v)]
    return args


def _launch(ctx: typer.Context, nproc: int) -> None:
    """This very ``bench`` command in ``nproc`` processes (torchrun's standalone launcher)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from .core import fail

    argv = [
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "cli",
        *_flags(ctx.parent),
        "bench",
        *_flags(ctx, skip=("nproc",)),
    ]
    try:
        torchrun(argv)
    except ChildFailedError as e:
        raise fail(
            f"{len(e.failures)} of {nproc} bench processes failed (their errors are above)"
        ) from None


if __name__ == "__main__":
    app(prog_name="skillbank")
