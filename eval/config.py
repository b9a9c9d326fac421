"""A benchmark run as data: from a YAML/JSON file and/or flags, validated before training."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import skillbank as sb
from eval import registry, streams
from eval.data import ImageData, cifar100, digits, load_image_folder, mnist
from eval.errors import InvalidStream
from eval.logs import DEFAULT_LOGS
from eval.logs import check_names as check_log_names

STREAMS = {
    "split-mnist": lambda d, c: streams.split(d, c.tasks, scenario=c.scenario, seed=c.data_seed),
    "permuted-mnist-disjoint": lambda d, c: streams.permuted(
        d, c.tasks, seed=c.data_seed, keep_first=False, disjoint=True
    ),
    "domains-mnist": lambda d, c: streams.digit_domains(d, _first_domains(c.tasks), c.data_seed),
    "rotated-mnist": lambda d, c: streams.rotated(d, c.tasks, seed=c.data_seed),
    "permuted-mnist": lambda d, c: streams.permuted(d, c.tasks, seed=c.data_seed),
    "corrupted-mnist": lambda d, c: streams.corrupted(d, severity=5, seed=c.data_seed),
    "corrupted-mnist-s3": lambda d, c: streams.corrupted(d, severity=3, seed=c.data_seed),
    "split-digits": lambda d, c: streams.split(d, c.tasks, scenario=c.scenario, seed=c.data_seed),
}


def _first_domains(n: int) -> tuple[str, ...]:
    if n > len(streams.DIGIT_DOMAINS):
        raise sb.ConfigError(
            f"domains-mnist has {len(streams.DIGIT_DOMAINS)} domains "
            f"({', '.join(streams.DIGIT_DOMAINS)}), tasks={n} asks for more"
        )
    return streams.DIGIT_DOMAINS[:n]


@dataclass
class BenchConfig:
    """Everything that defines a run; the defaults are the README's main job."""

    protocol: str = "continual"  # a name in eval.registry.PROTOCOLS
    stream: str | None = None  # default: the protocol's
    tasks: int = 5
    scenario: str = "class"  # for split streams: class | task
    backbone: str = "vit_micro"
    pretrain_epochs: int | None = None
    learners: list[str] | None = None  # default: the protocol's
    rank: int = 8
    # e.g. {"rank_selective": {"max_kappa": 0.1}}
    learner_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs: int = 10
    lr: float = 3e-3
    batch_size: int = 64
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_seed: int = 0
    # Half of MNIST-5k pretrains the backbone: its features route test samples to
    # skills better than with a smaller source part, and the other half feeds the tasks.
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
    # Passed to the router: candidates (retrieved before re-scoring), shrink
    # (mahalanobis covariance), layers (stats), e.g. {"shrink": 0.2}.
    router_options: dict[str, Any] = field(default_factory=dict)
    # Per-task logs (continual protocol), names from eval.logs.LOGGERS: csv (out/tasks.csv),
    # tensorboard (out/tensorboard), wandb; a list or one comma-separated string.
    log: list[str] = field(default_factory=lambda: list(DEFAULT_LOGS))
    # --- standard benchmarks on your own data (configs/split-cifar100.yaml, configs/imagenet-r.yaml)
    data_root: str | None = None  # the data's folder (CIFAR-100: holds cifar-100-python/)
    download: bool = False  # split-cifar100: fetch the data into data_root (only when asked)
    class_order_seed: int | None = None  # shuffle classes as PyCIL does (seed 1993); None: sorted
    image_size: int | None = None  # image-folder: resize every image to this square side on load
    pretrained: bool = False  # a timm backbone with its published weights (from the hub)
    weights: str | None = None  # ... or read from a local file (safetensors, or weights_only torch)

    def __post_init__(self) -> None:
        defaults = registry.get_protocol(self.protocol)
        self.stream = self.stream or defaults.stream
        self.learners = (
            list(self.learners) if self.learners is not None else list(defaults.learners)
        )
        if self.protocol == "continual" and self.stream not in STREAMS:
            raise sb.ConfigError(f"unknown stream {self.stream!r}; choose from {sorted(STREAMS)}")
        if self.scenario not in ("class", "task"):
            raise sb.ConfigError(f"scenario must be 'class' or 'task', got {self.scenario!r}")
        with_weights = self.pretrained is True or self.weights is not None  # no source needed
        if not (0.0 < self.source_fraction < 1.0 or (with_weights and self.source_fraction == 0)):
            raise sb.ConfigError(f"source_fraction must be in (0, 1), got {self.source_fraction}")
        if set(self.learner_options) - set(self.learners):
            raise sb.ConfigError(
                f"learner_options for learners not in the run: {sorted(set(self.learner_options) - set(self.learners))}"
            )
        if not self.learners or not self.seeds:
            raise sb.ConfigError("name at least one learner and one seed")
        if not self.shots or any(s <= 0 for s in self.shots):
            raise sb.ConfigError(f"shots must be positive counts per class, got {self.shots}")
        from skillbank.routers import check_options

        if self.router is not None and self.router not in sb.ROUTERS:
            raise sb.ConfigError(
                f"unknown router {self.router!r}; choose from {sorted(sb.ROUTERS)}"
            )
        self.router_options = check_options(self.router_options)
        if self.rerank < 0:
            raise sb.ConfigError(f"rerank must be >= 0, got {self.rerank}")
        for name in ("tasks", "rank", "epochs", "batch_size", "nproc"):
            if getattr(self, name) <= 0:
                raise sb.ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        # per-task logs: known names only (a missing optional package fails when the run starts)
        self.log = check_log_names(self.log)
        self._check_standard()

    def _check_standard(self) -> None:
        """The keys of the standard benchmarks: each only where it means something."""
        from eval.backbones import check_weights_spec

        for name in ("download", "pretrained"):
            if not isinstance(getattr(self, name), bool):
                raise sb.ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.stream in USER_DATA:
            if not self.data_root:
                raise sb.ConfigError(
                    f"stream {self.stream!r} reads your copy of the data: set data_root in "
                    "the config file (e.g. data_root: ~/data)"
                )
        else:
            keys = ("data_root", "class_order_seed", "image_size")
            given = [k for k in keys if getattr(self, k) is not None]
            if given or self.download:
                raise sb.ConfigError(
                    f"{given or ['download']} apply to the streams {sorted(USER_DATA)}, "
                    f"not {self.stream!r}"
                )
        if self.download and self.stream != "split-cifar100":
            raise sb.ConfigError(
                f"download: true works for split-cifar100 only; put {self.stream!r} data "
                f"under data_root yourself"
            )
        if self.image_size is not None and (
            self.stream != "image-folder"
            or isinstance(self.image_size, bool)
            or self.image_size <= 0
        ):
            raise sb.ConfigError(
                f"image_size must be a positive int, for stream 'image-folder', got {self.image_size!r}"
            )
        check_weights_spec(self.backbone, self.pretrained, self.weights)

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
    if cfg.stream in USER_DATA:
        return STREAMS[cfg.stream](USER_DATA[cfg.stream](cfg), cfg)
    load = digits if cfg.stream.endswith("digits") else mnist
    data = load(seed=cfg.data_seed, source_fraction=cfg.source_fraction)
    return STREAMS[cfg.stream](data, cfg)


# --------------------------------------------------------------------------- standard benchmarks


def _user_split(data: ImageData, cfg: BenchConfig) -> streams.Stream:
    """Class groups in PyCIL's order when ``class_order_seed`` is set, else sorted."""
    seed = cfg.class_order_seed
    order = None if seed is None else streams.legacy_order(data.classes, seed)
    try:
        return streams.split(data, cfg.tasks, scenario=cfg.scenario, class_order=order)
    except InvalidStream as e:
        raise sb.ConfigError(str(e)) from e


def _image_folder(cfg: BenchConfig) -> ImageData:
    root = Path(cfg.data_root).expanduser()
    if not root.is_dir():
        raise sb.ConfigError(
            f"image folder {str(root)!r} not found: data_root must hold one folder per class "
            "(root/<class>/*.jpg) or root/train/<class>/ and root/test/<class>/; nothing is "
            "downloaded for this stream"
        )
    size = cfg.image_size
    return load_image_folder(
        root,
        seed=cfg.data_seed,
        source_fraction=cfg.source_fraction,
        size=None if size is None else (size, size),
        mode="RGB",
    )


# Streams over data the user keeps (or downloads on request) under data_root: name -> loader.
USER_DATA = {
    "split-cifar100": lambda c: cifar100(
        c.data_root, download=c.download, seed=c.data_seed, source_fraction=c.source_fraction
    ),
    "image-folder": _image_folder,
}
STREAMS.update({name: _user_split for name in USER_DATA})


def execute(cfg: BenchConfig, console=None, bank: sb.SkillBank | str | None = None) -> dict:
    """Run ``cfg``: the table on the console, results and plots under ``cfg.out``.
    ``bank`` (an open bank or a location) overrides ``cfg.bank``."""
    from rich.console import Console

    from learners import distributed

    # under torchrun: join its process group (gloo on CPU, NCCL on CUDA)
    created = distributed.init_from_env()
    try:
        if cfg.nproc > 1 and not distributed.is_distributed():
            raise sb.ConfigError(
                f"nproc={cfg.nproc} needs that many processes: run `skillbank bench --nproc "
                f"{cfg.nproc}` or `torchrun --nproc-per-node {cfg.nproc} -m cli bench`"
            )
        return _execute(cfg, console or Console(stderr=True, log_path=False, soft_wrap=True), bank)
    finally:
        distributed.shutdown(created)


def _execute(cfg: BenchConfig, console, bank) -> dict:
    from learners import distributed

    protocol = registry.get_protocol(cfg.protocol)
    if distributed.is_distributed() and not protocol.multi_process:
        several = sorted(repr(p.name) for p in registry.PROTOCOLS.values() if p.multi_process)
        raise sb.ConfigError(
            f"protocol {cfg.protocol!r} runs in one process; only {', '.join(several)} uses several"
        )
    return protocol.run(cfg, bank or cfg.bank, console)
