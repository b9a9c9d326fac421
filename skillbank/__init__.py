"""skillbank: lifelong low-rank skills for frozen PyTorch backbones."""

from .adapters import (
    AdapterLayer,
    LoRAConfig,
    active_adapters,
    adapter_layers,
    adapter_names,
    add_adapter,
    merge,
    mixed_batch,
    param_groups,
    remove_adapter,
    set_active,
    unmerge,
)
from .errors import *  # noqa: F403  (the error family is part of the public surface)
from .fingerprint import Fingerprint, fingerprint
from .skill import Skill, attach
from .errors import __all__ as _errors

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer",
    "Fingerprint",
    "LoRAConfig",
    "Skill",
    "attach",
    "fingerprint",
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
