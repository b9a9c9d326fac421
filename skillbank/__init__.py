"""skillbank: lifelong low-rank skills for frozen PyTorch backbones."""

from storage import Hit, Ref, VerifyReport, VersionRecord

from .adapters import (
    AdapterLayer,
    FactorMap,
    Factors,
    LoRAConfig,
    active_adapters,
    adapter_layers,
    adapter_names,
    add_adapter,
    check_adapter_name,
    composed,
    disabled,
    merge,
    mixed_batch,
    param_groups,
    remove_adapter,
    set_active,
    unmerge,
)
from .bank import SkillBank
from .compose import COMPOSE, compose
from .embed import TextEmbedder, example_embedding, features
from .errors import *  # noqa: F403  (the error family is part of the public surface)
from .errors import __all__ as _errors
from .fingerprint import Fingerprint, fingerprint
from .resident import ResidentStats, default_max_resident
from .route import Routed, Router, route
from .route_stats import MissingStats, RouteStats, compute_stats
from .routers import ROUTERS
from .skill import Skill, attach, site_module

__version__ = "0.1.0"

__all__ = [
    "COMPOSE",
    "ResidentStats",
    "Routed",
    "Router",
    "default_max_resident",
    "route",
    "ROUTERS",
    "MissingStats",
    "RouteStats",
    "compute_stats",
    "disabled",
    "AdapterLayer",
    "FactorMap",
    "Factors",
    "Hit",
    "Ref",
    "SkillBank",
    "TextEmbedder",
    "VerifyReport",
    "VersionRecord",
    "compose",
    "composed",
    "example_embedding",
    "features",
    "Fingerprint",
    "LoRAConfig",
    "Skill",
    "attach",
    "check_adapter_name",
    "fingerprint",
    "site_module",
    "active_adapters",
    "adapter_layers",
    "adapter_names",
    "add_adapter",
    "merge",
    "mixed_batch",
    "param_groups",
    "remove_adapter",
    "set_active",
    "unmerge",
    *_errors,
]
