"""Low-rank adapters on live modules: config, layers, surgery, mixed batches."""

from .config import LoRAConfig
from .inject import (
    active_adapters,
    adapter_configs,
    adapter_layers,
    adapter_names,
    add_adapter,
    disabled,
    merge,
    param_groups,
    remove_adapter,
    set_active,
    unmerge,
)
from .kinds import ADAPTER_KINDS, register_kind
from .layer import AdapterLayer
from .mixed import composed, mixed_batch

__all__ = [
    "ADAPTER_KINDS",
    "AdapterLayer",
    "LoRAConfig",
    "active_adapters",
    "adapter_configs",
    "adapter_layers",
    "adapter_names",
    "add_adapter",
    "disabled",
    "merge",
    "composed",
    "mixed_batch",
    "param_groups",
    "register_kind",
    "remove_adapter",
    "set_active",
    "unmerge",
]
