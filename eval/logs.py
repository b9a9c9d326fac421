"""Per-task logs in the formats people already read: a CSV file, TensorBoard, Weights & Biases.

The runner builds one ``TaskRecord`` when a task finishes (for one learner and seed)
and hands it to every sink the run asked for (``LOGGERS`` by name, config key
``log``). The CSV is appended and flushed row by row, so an interrupted run keeps
the rows so far. TensorBoard and wandb are optional packages, imported only when
asked for; a missing one is a ``ConfigError`` naming the extra to install, raised
before any training. Only rank 0 writes.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

import skillbank as sb
from eval import metrics
from learners import distributed

if TYPE_CHECKING:
    from eval.runner import SeedRun
    from eval.streams import Stream

CSV_NAME = "tasks.csv"
TENSORBOARD_DIR = "tensorboard"
DEFAULT_LOGS = ("csv",)


@dataclass(frozen=True)
class TaskRecord:
    """What is known when task ``task`` (1-based) of a learner and seed has finished.

    Accuracies are fractions; ``acc`` is ACC_i, the mean of the accuracy matrix's row
    ``task`` over the tasks seen so far; ``forgetting`` (Chaudhry, over those tasks) and
    ``routing`` are None when undefined (first task; a learner that does not route).
    """

    run_id: str
    learner: str
    seed: int
    task: int
    task_name: str
    acc: float
    class_il: list[float]  # the matrix row: every task of the stream, seen or not
    task_il: float
    forgetting: float | None
    routing: float | None
    seconds: float
    skill: str
    params: int
    bytes: int

    def scalars(self) -> dict[str, float]:
        """The numbers worth a curve, without the undefined ones."""
        values = {
            "acc": self.acc,
            "task_il": self.task_il,
            "forgetting": self.forgetting,
            "routing": self.routing,
            "seconds": self.seconds,
        }
        return {k: float(v) for k, v in values.items() if v is not None}


def task_record(run_id: str, learner: str, seed: int, stream: Stream, state: SeedRun) -> TaskRecord:
    """The record of the last task ``state`` finished."""
    i = state.done  # row i of R was measured after training task i (1-based)
    if i < 1 or len(state.R) <= i:
        raise sb.ConfigError(f"no finished task to log ({state.done} done)")
    R = np.asarray(state.R[: i + 1], dtype=np.float64)[:, :i]
    forgot = metrics.forgetting(R)  # NaN with one task seen
    return TaskRecord(
        run_id=run_id,
        learner=learner,
        seed=seed,
        task=i,
        task_name=stream[i - 1].name,
        acc=metrics.acc(R),
        class_il=[float(a) for a in state.R[i]],
        task_il=float(np.mean(state.R_task[i][:i])),
        forgetting=None if math.isnan(forgot) else forgot,
        routing=state.routing[i],
        seconds=float(state.seconds[i - 1]),
        skill=state.skills[i - 1],
        params=int(state.params[i - 1]),
        bytes=int(state.bytes[i - 1]),
    )


@dataclass(frozen=True)
class LogSetup:
    """What a sink needs to open: where the run writes and what it is."""

    out: Path | None  # None: the run writes no files
    run_id: str
    n_tasks: int
    resume: bool = False  # a resumed run appends to its files instead of starting them over
    config: dict[str, Any] = field(default_factory=dict)


class TaskLogger(Protocol):
    """A sink for task records; ``close`` once when the run ends (or fails)."""

    def log(self, record: TaskRecord) -> None: ...

    def close(self) -> None: ...


class CsvLogger:
    """``out/tasks.csv``: one row per task, learner and seed; header once, each row flushed."""

    FIELDS = (
        "run_id",
        "learner",
        "seed",
        "task",
        "task_name",
        "acc",
        "task_il",
        "forgetting",
        "routing",
        "seconds",
        "skill",
        "params",
        "bytes",
    )

    def __init__(self, setup: LogSetup) -> None:
        self.path = setup.out / CSV_NAME  # the caller skips this sink without a folder
        self.header = [*self.FIELDS, *(f"class_il_{j + 1}" for j in range(setup.n_tasks))]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not setup.resume or not self.path.is_file() or self.path.stat().st_size == 0
        if fresh:
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.header)

    def log(self, record: TaskRecord) -> None:
        values = asdict(record)
        row = [_cell(values[k]) for k in self.FIELDS] + [_cell(a) for a in record.class_il]
        with self.path.open("a", newline="") as f:  # closed (so flushed) after every row
            csv.writer(f).writerow(row)

    def close(self) -> None:
        pass


def _cell(value: Any) -> Any:
    return "" if value is None else value


class TensorBoardLogger:
    """Scalars under ``out/tensorboard``: ``<learner>/seed<seed>/<name>``, step = task."""

    def __init__(self, setup: LogSetup) -> None:
        if setup.out is None:
            raise sb.ConfigError("log 'tensorboard' writes under the run's out folder; set out")
        summary = _import("torch.utils.tensorboard", "tensorboard")
        self.writer = summary.SummaryWriter(log_dir=str(setup.out / TENSORBOARD_DIR))

    def log(self, record: TaskRecord) -> None:
        prefix = f"{record.learner}/seed{record.seed}"
        for name, value in record.scalars().items():
            self.writer.add_scalar(f"{prefix}/{name}", value, record.task)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """One Weights & Biases run per benchmark run (project ``$WANDB_PROJECT`` or skillbank)."""

    def __init__(self, setup: LogSetup) -> None:
        self.wandb = _import("wandb", "wandb")
        self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "skillbank"),
            name=setup.run_id,
            config=setup.config,
        )

    def log(self, record: TaskRecord) -> None:
        prefix = f"{record.learner}/seed{record.seed}"
        values = {f"{prefix}/{k}": v for k, v in record.scalars().items()}
        self.wandb.log({**values, f"{prefix}/task": record.task})

    def close(self) -> None:
        self.wandb.finish()


LOGGERS: dict[str, Callable[[LogSetup], TaskLogger]] = {
    "csv": CsvLogger,
    "tensorboard": TensorBoardLogger,
    "wandb": WandbLogger,
}
# The package each optional sink imports, installed by the pyproject extra of the same name.
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_names(names: Sequence[str] | str) -> list[str]:
    """``names`` (a list, or one comma-separated string) as a list of known sinks."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    unknown = sorted(set(names) - set(LOGGERS))
    if unknown:
        raise sb.ConfigError(f"unknown log {unknown}; choose from {sorted(LOGGERS)}")
    return list(dict.fromkeys(names))  # once each, in order


def check_installed(names: Sequence[str]) -> None:
    """A clear error, before any training, for an asked-for sink whose package is missing."""
    for name in names:
        if name in EXTRAS and importlib.util.find_spec(EXTRAS[name]) is None:
            raise _missing(name)


def check(names: Sequence[str] | str) -> list[str]:
    """``check_names``, then ``check_installed``: everything that can be wrong, up front."""
    names = check_names(names)
    check_installed(names)
    return names


def _missing(name: str) -> sb.ConfigError:
    return sb.ConfigError(
        f"log {name!r} needs the {EXTRAS[name]!r} package: pip install 'skillbank[{name}]'"
    )


def _import(module: str, name: str) -> Any:
    """``module`` for the sink ``name``, or the error saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing(name) from None


class Loggers:
    """Every sink of a run behind one ``log``; empty off rank 0 and for ``names=[]``."""

    def __init__(self, sinks: list[TaskLogger]) -> None:
        self.sinks = sinks

    def log(self, record: TaskRecord) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_loggers(names: Sequence[str] | str, setup: LogSetup) -> Loggers:
    """The run's sinks, checked on every rank (so all fail alike), opened on rank 0.
    Without an out folder the CSV is skipped: there is nowhere to write it."""
    names = check(names)
    if not distributed.is_main():
        return Loggers([])
    sinks: list[TaskLogger] = []
    try:
        for name in names:
            if name == "csv" and setup.out is None:
                continue
            sinks.append(LOGGERS[name](setup))
    except BaseException:
        Loggers(sinks).close()
        raise
    return Loggers(sinks)
