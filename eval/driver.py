"""What every benchmark protocol shares: one run context, made the same way for all.

A protocol (continual learning, test-time adaptation, few-shot transfer) checks
its configuration, then opens its run with ``open_context`` (or ``open_run`` from
a ``BenchConfig``): the bank opened once (rank 0 first under a process group), the
device resolved, one run id (the same format everywhere, broadcast so every rank
tags with it), the pretrained backbone, the seed loop and one path for result
files (rank 0 alone writes, atomically). ``eval.registry`` names the protocols.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

import skillbank as sb
from eval import backbones
from eval.data import Task
from eval.report import write_json
from learners import distributed, resolve_device
from skillbank.files import atomic_write

if TYPE_CHECKING:
    from rich.console import Console

    from eval.config import BenchConfig

RESULTS = "results.json"

# How a protocol is started: its config, the bank (an open one, a location, or None
# for none) and the console for progress and tables; returns the results document.
RunProtocol = Callable[["BenchConfig", "sb.SkillBank | str | Path | None", "Console | None"], Any]


def log_lines(console: Console) -> Callable[[str], None]:
    """A progress sink: one timestamped line per message, never wrapped or padded (a log
    file is read with grep and less, not at the terminal's width)."""

    def line(message: str) -> None:
        console.print(
            f"{time.strftime('%H:%M:%S')} {message}", soft_wrap=True, markup=False, highlight=False
        )

    return line


def new_run_id() -> str:
    """A fresh run id (12 hex digits): tagged on every skill a run banks."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Protocol:
    """A protocol as the registry knows it: its defaults and the function that runs it."""

    name: str
    stream: str  # the default stream
    learners: tuple[str, ...]  # the default learners (or methods)
    run: RunProtocol
    multi_process: bool = False  # may run under torchrun with several processes


@dataclass
class Context:
    """One run of a protocol: what every protocol needs, opened once."""

    bank: sb.SkillBank | None
    device: torch.device
    run_id: str
    seeds: tuple[int, ...]
    out: Path | None = None  # None: nothing is written
    backbone: str | nn.Module = "vit_micro"
    pretrain_epochs: int | None = None  # None: eval.backbones.pretrain's default
    console: Console | None = None
    progress: Callable[[str], None] | None = None
    cfg: BenchConfig | None = None  # the config the run came from, if any

    def log(self, message: str) -> None:
        """A progress line (rank 0 only, and only when the run has a progress sink)."""
        if self.progress is not None and distributed.is_main():
            self.progress(message)

    def tags(self, seed: int, **extra: str) -> dict[str, str]:
        """Bank tags of what the run adds for ``seed``: the run id, the seed, then ``extra``."""
        return {"run": self.run_id, "seed": str(seed), **extra}

    def each_seed(self, what: str = "") -> Iterator[int]:
        """The run's seeds in order, each announced as ``seed N: what`` when ``what`` is given."""
        for seed in self.seeds:
            if what:
                self.log(f"seed {seed}: {what}")
            yield seed

    def pretrained(self, source: Task | None, num_classes: int, seed: int = 0) -> nn.Module:
        """The run's backbone: a given module as is, or a name pretrained on ``source`` (cached)."""
        if isinstance(self.backbone, nn.Module):
            return self.backbone
        if self.cfg is not None and (self.cfg.pretrained or self.cfg.weights is not None):
            return backbones.from_weights(  # published weights: no source pretraining
                self.backbone,
                num_classes,
                pretrained=self.cfg.pretrained,
                weights=self.cfg.weights,
                seed=seed,
                device=str(self.device),
            )
        if source is None:
            raise sb.ConfigError(
                f"backbone {self.backbone!r} by name needs a stream with a source split to pretrain on"
            )
        kw = {} if self.pretrain_epochs is None else {"epochs": self.pretrain_epochs}
        return backbones.pretrain(
            self.backbone,
            source,
            seed=seed,
            device=str(self.device),
            num_classes=num_classes,
            **kw,
        )

    def write_json(self, name: str, doc: Any, indent: int | None = 2) -> Path | None:
        """``doc`` as ``out/name``, atomically; rank 0 only, nothing without ``out``."""
        if self.out is None or not distributed.is_main():
            return None
        return write_json(self.out / name, doc, indent=indent)

    def write_results(
        self,
        doc: dict[str, Any],
        *,
        texts: dict[str, str] | None = None,
        plots: Callable[[Path], Any] | None = None,
    ) -> Path | None:
        """``results.json``, then the protocol's text files and plots, under ``out``.

        Every file replaces its previous version atomically; only rank 0 writes.
        """
        path = self.write_json(RESULTS, doc)
        if path is None:
            return None
        for name, text in (texts or {}).items():
            atomic_write(self.out / name, text)
        if plots is not None:
            plots(self.out)
        return path


@contextlib.contextmanager
def open_context(
    bank: sb.SkillBank | str | Path | None,
    *,
    seeds: Sequence[int] = (0,),
    device: str = "auto",
    out: str | Path | None = None,
    backbone: str | nn.Module = "vit_micro",
    pretrain_epochs: int | None = None,
    run_id: str | None = None,
    console: Console | None = None,
    progress: Callable[[str], None] | None = None,
    cfg: BenchConfig | None = None,
) -> Iterator[Context]:
    """The run's context; a bank given by location is opened here and closed on exit.

    ``run_id`` continues a run (e.g. from its checkpoint); otherwise a new one is
    made. Under a process group rank 0 opens the bank first (only it creates or
    migrates the schema) and its run id is the one every rank uses.
    """
    dev = resolve_device(device)
    own = bank is not None and not isinstance(bank, sb.SkillBank)
    if own:
        with distributed.main_first():
            bank = sb.SkillBank.open(bank)
    try:
        yield Context(
            bank=bank,
            device=dev,
            run_id=distributed.broadcast(run_id or new_run_id()),
            seeds=tuple(seeds),
            out=Path(out) if out is not None else None,
            backbone=backbone,
            pretrain_epochs=pretrain_epochs,
            console=console,
            progress=progress,
            cfg=cfg,
        )
    finally:
        if own:
            bank.close()


def open_run(
    cfg: BenchConfig,
    bank: sb.SkillBank | str | Path | None,
    console: Console | None = None,
    run_id: str | None = None,
) -> contextlib.AbstractContextManager[Context]:
    """``open_context`` with everything a ``BenchConfig`` says; progress goes to ``console``."""
    if console is None:
        from rich.console import Console

        console = Console(stderr=True, log_path=False, soft_wrap=True)
    return open_context(
        bank,
        seeds=cfg.seeds,
        device=cfg.device,
        out=cfg.out,
        backbone=cfg.backbone,
        pretrain_epochs=cfg.pretrain_epochs,
        run_id=run_id,
        console=console,
        progress=log_lines(console),
        cfg=cfg,
    )
