"""Low-rank adapters on live modules: config, layers, surgery, mixed batches.

Learners reach adapter state only through this surface: ``adapter_layers(model,
name)`` and the per-adapter methods of ``AdapterLayer`` (``adapter_factors``,
``factor_parameters``, ``get_factors``/``set_factors``, ``adapter_rank``,
``adapter_scale``, ``add_rank_gate`` ...), each kind declaring its own layout.
"""

from .config import LoRAConfig
from .inject import (
    active_adapters,
    adapter_configs,
    adapter_layers,
    adapter_names,
    add_adapter,
    check_name,
    disabled,
    merge,
    param_groups,
    remove_adapter,
    set_active,
    unmerge,
)
from .kinds import ADAPTER_KINDS, register_kind
from .layer import AdapterLayer, FactorMap, Factors
from .mixed import composed, mixed_batch

check_adapter_name = check_name

__all__ = [
    "ADAPTER_KINDS",
    "AdapterLayer",
    "FactorMap",
    "Factors",
    "LoRAConfig",
    "active_adapters",
    "adapter_configs",
    "adapter_layers",
    "adapter_names",
    "add_adapter",
    "check_adapter_name",
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
