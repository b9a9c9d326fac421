"""Learners: algorithms that turn a task's data into a skill.

Every learner has ``fit(model, task, bank=None) -> Skill``. ``create_learner``
builds one by its registered name (the runner and the CLI use it).
"""

from __future__ import annotations

from typing import Any

from .base import (
    DEFAULT_TARGETS,
    Learner,
    LoRALearner,
    TrainConfig,
    TrainingError,
    resolve_device,
    train,
)
from .ewc import EWC
from .increlora import IncreLoRA
from .lwf import LwF
from .orthogonal import Orthogonal, subspace_overlap
from .psec import PSEC
from .rank_selective import RankSelective
from .references import Naive, Reference
from .replay import Replay, ReservoirBuffer
from .simplecil import SimpleCIL
from .slicing import select_ranks, truncate
from .tta import (
    TTA_METHODS,
    BNAdapt,
    ResetGuard,
    SourceOnly,
    Tent,
    TTAMethod,
    create_method,
    list_methods,
    online,
)
from .vida import SourceStage, ViDA

REGISTRY: dict[str, type[Learner]] = {}


def register(cls: type[Learner]) -> type[Learner]:
    REGISTRY[cls.name] = cls
    return cls


for _cls in (LoRALearner, RankSelective, Orthogonal, IncreLoRA, PSEC):
    register(_cls)
for _cls in (Naive, EWC, LwF, Replay, SimpleCIL):  # the field's references (direct learners)
    register(_cls)


def list_learners() -> list[str]:
    return sorted(REGISTRY)


def create_learner(name: str, train: TrainConfig | dict | None = None, **kwargs: Any) -> Learner:
    """A learner by registered name; ``train`` may be a TrainConfig or its fields as a dict."""
    from skillbank import ConfigError

    if name not in REGISTRY:
        raise ConfigError(f"unknown learner {name!r}; choose from {list_learners()}")
    if isinstance(train, dict):
        train = TrainConfig(**train)
    return REGISTRY[name](**kwargs, **({"train": train} if train is not None else {}))


__all__ = [
    "DEFAULT_TARGETS",
    "REGISTRY",
    "TTA_METHODS",
    "BNAdapt",
    "EWC",
    "IncreLoRA",
    "Learner",
    "LoRALearner",
    "LwF",
    "Naive",
    "Orthogonal",
    "PSEC",
    "RankSelective",
    "Reference",
    "Replay",
    "ReservoirBuffer",
    "ResetGuard",
    "SimpleCIL",
    "SourceOnly",
    "SourceStage",
    "TTAMethod",
    "Tent",
    "TrainConfig",
    "TrainingError",
    "ViDA",
    "create_learner",
    "create_method",
    "list_learners",
    "list_methods",
    "online",
    "register",
    "resolve_device",
    "select_ranks",
    "subspace_overlap",
    "train",
    "truncate",
]
