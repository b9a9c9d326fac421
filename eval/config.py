"""A benchmark run as data: from a YAML/JSON file and/or flags, validated before training."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import skillbank as sb
from eval import streams
from eval.data import digits, mnist

STREAMS = {
    "split-mnist": lambda d, c: streams.split(d, c.tasks, scenario=c.scenario, seed=c.data_seed),
    "rotated-mnist": lambda d, c: streams.rotated(d, c.tasks, seed=c.data_seed),
    "permuted-mnist": lambda d, c: streams.permuted(d, c.tasks, seed=c.data_seed),
    "corrupted-mnist": lambda d, c: streams.corrupted(d, severity=5, seed=c.data_seed),
    "split-digits": lambda d, c: streams.split(d, c.tasks, scenario=c.scenario, seed=c.data_seed),
}


# What a run measures. ``continual``: learners over a task stream (eval.runner);
# ``tta``: test-time adaptation over a corruption stream (eval.tta); ``transfer``:
# few-shot composition of banked skills (eval.transfer). Each protocol has its own
# default stream and learners; the module named runs it with ``bench_protocol(cfg, bank, console)``.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "continual": {"stream": "split-mnist", "learners": ["lora", "finetune", "joint", "frozen"]},
    "tta": {
        "stream": "corrupted-mnist",
        "learners": ["source", "bn_adapt", "tent", "vida"],
        "module": "eval.tta",
    },
    "transfer": {
        "stream": "composite-mnist",
        "learners": ["compose", "expand", "output", "lora", "merge", "nearest"],
        "module": "eval.transfer",
    },
}


@dataclass
class BenchConfig:
    """Everything that defines a run; the defaults are the README's main job."""

    protocol: str = "continual"
    stream: str | None = None  # default: the protocol's
    tasks: int = 5
    scenario: str = "class"  # for split streams: class | task
    backbone: str = "vit_micro"
    pretrain_epochs: int | None = None
    learners: list[str] | None = None  # default: the protocol's
    rank: int = 8
    learner_options: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # e.g. {"rank_selective": {"max_kappa": 0.1}}
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 64
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_seed: int = 0
    # Half of MNIST-5k pretrains the backbone: its features route test samples to
    # skills (91.9% at 0.5 against 86.7% at 0.3 in our runs), leaving 300 train images per task.
    source_fraction: float = 0.5
    device: str = "auto"
    bank: str = "skills"
    out: str = "runs/main"
    resume: bool = False
    shots: list[int] = field(default_factory=lambda: [5, 20])  # transfer: labelled images per class
    # Processes to train and score with (continual protocol); > 1 is started by
    # `skillbank bench --nproc N` or `torchrun --nproc-per-node N -m cli bench`.
    nproc: int = 1
    # How routed learners find skills: a name from skillbank.routers.ROUTERS, or None
    # for the scenario's default; rerank > 1 re-ranks that many candidates by the
    # adapted model's confidence (rerank extra adapted forwards per batch).
    router: str | None = None
    rerank: int = 0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise sb.ConfigError(
                f"unknown protocol {self.protocol!r}; choose from {sorted(PROTOCOLS)}"
            )
        defaults = PROTOCOLS[self.protocol]
        self.stream = self.stream or defaults["stream"]
        self.learners = (
            list(self.learners) if self.learners is not None else list(defaults["learners"])
        )
        if self.protocol == "continual" and self.stream not in STREAMS:
            raise sb.ConfigError(f"unknown stream {self.stream!r}; choose from {sorted(STREAMS)}")
        if self.scenario not in ("class", "task"):
            raise sb.ConfigError(f"scenario must be 'class' or 'task', got {self.scenario!r}")
        if not 0.0 < self.source_fraction < 1.0:
            raise sb.ConfigError(f"source_fraction must be in (0, 1), got {self.source_fraction}")
        if set(self.learner_options) - set(self.learners):
            raise sb.ConfigError(
                f"learner_options for learners not in the run: {sorted(set(self.learner_options) - set(self.learners))}"
            )
        if not self.learners or not self.seeds:
            raise sb.ConfigError("name at least one learner and one seed")
        if not self.shots or any(s <= 0 for s in self.shots):
            raise sb.ConfigError(f"shots must be positive counts per class, got {self.shots}")
        from skillbank.routers import ROUTERS

        if self.router is not None and self.router not in ROUTERS:
            raise sb.ConfigError(f"unknown router {self.router!r}; choose from {sorted(ROUTERS)}")
        if self.rerank < 0:
            raise sb.ConfigError(f"rerank must be >= 0, got {self.rerank}")
        for name in ("tasks", "rank", "epochs", "batch_size", "nproc"):
            if getattr(self, name) <= 0:
                raise sb.ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load(path: str | Path | None = None, **overrides: Any) -> BenchConfig:
    """Defaults, then the file (YAML or JSON), then non-None ``overrides`` (flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise sb.ConfigError(f"{path}: a config file holds one mapping of settings")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(BenchConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise sb.ConfigError(f"unknown config keys {unknown}; known: {sorted(known)}")
    return BenchConfig(**values)


def build_stream(cfg: BenchConfig) -> streams.Stream:
    load = digits if cfg.stream.endswith("digits") else mnist
    data = load(seed=cfg.data_seed, source_fraction=cfg.source_fraction)
    return STREAMS[cfg.stream](data, cfg)


def execute(cfg: BenchConfig, console=None, bank: sb.SkillBank | str | None = None) -> dict:
    """Run ``cfg``: the table on the console, results and plots under ``cfg.out``.
    ``bank`` (an open bank or a location) overrides ``cfg.bank``."""
    from rich.console import Console

    from learners import distributed

    created = (
        distributed.init_from_env()
    )  # under torchrun: join its process group (gloo on CPU, NCCL on CUDA)
    try:
        if cfg.nproc > 1 and not distributed.is_distributed():
            raise sb.ConfigError(
                f"nproc={cfg.nproc} needs that many processes: run `skillbank bench --nproc "
                f"{cfg.nproc}` or `torchrun --nproc-per-node {cfg.nproc} -m cli bench`"
            )
        return _execute(cfg, console or Console(stderr=True), bank)
    finally:
        distributed.shutdown(created)


def _execute(cfg: BenchConfig, console, bank) -> dict:
    from eval.report import print_table
    from eval.runner import bench, make_learner
    from learners import TrainConfig, distributed

    module = PROTOCOLS[cfg.protocol].get("module")
    if module is not None:
        if distributed.is_distributed():
            raise sb.ConfigError(
                f"protocol {cfg.protocol!r} runs in one process; only 'continual' uses several"
            )
        import importlib

        return importlib.import_module(module).bench_protocol(cfg, bank or cfg.bank, console)
    train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, device=cfg.device)
    kwargs = {
        n: {"train": train, "rank": cfg.rank, **cfg.learner_options.get(n, {})}
        for n in cfg.learners
    }
    for n in cfg.learners:  # unknown names fail here, before any data is loaded or trained
        make_learner(n, **kwargs[n])
    stream = build_stream(cfg)
    results = bench(
        stream,
        list(cfg.learners),
        backbone=cfg.backbone,
        bank=bank or cfg.bank,
        seeds=cfg.seeds,
        device=cfg.device,
        out=cfg.out,
        resume=cfg.resume,
        pretrain_epochs=cfg.pretrain_epochs,
        learner_kwargs=kwargs,
        progress=lambda msg: console.log(msg),
        router=cfg.router,
        rerank=cfg.rerank,
    )
    if distributed.is_main():
        print_table(results)
        console.print(
            f"results: {Path(cfg.out) / 'results.json'}; plots: {Path(cfg.out)}/*.png; "
            f"skills in bank {cfg.bank}"
            + (f"; {distributed.world_size()} processes" if distributed.is_distributed() else "")
        )
    return results
