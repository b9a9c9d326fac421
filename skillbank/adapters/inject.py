"""Model surgery: put adapters on a live model, choose the active set, take them off.

Every function checks all of its input before it changes anything, so a bad
call leaves the model as it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch.nn as nn

from ..errors import (
    AdapterExists,
    AdapterNotFound,
    ConfigError,
    InvalidName,
    MergedError,
    NoTargetMatched,
    UnsupportedModule,
)
from .calls import LayerCall, calling
from .config import LoRAConfig
from .kinds import LinearAdapter, MultiheadAttentionAdapter, kind_for
from .layer import AdapterLayer

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-+]{0,199}")
_CONFIGS = "_skillbank_configs"  # attribute on the root model: adapter name -> LoRAConfig


@dataclass
class _Site:
    path: str
    module: nn.Module
    parent: nn.Module
    attr: str


def walk(model: nn.Module) -> Iterator[_Site]:
    """Every submodule with its original path; adapter wrappers are seen through.

    Args:
        model: any module, adapted or not.
    """

    def rec(module: nn.Module, prefix: str):
        inner = module.base if isinstance(module, AdapterLayer) else module
        for attr, child in inner.named_children():
            path = f"{prefix}.{attr}" if prefix else attr
            yield _Site(path, child, inner, attr)
            yield from rec(child, path)

    yield from rec(model, "")


def adapter_layers(model: nn.Module, name: str | None = None) -> list[AdapterLayer]:
    """The adapter layers of ``model`` in module order; with ``name``, those carrying it.

    Args:
        model: the adapted model.
        name: an adapter of ``model``; raises AdapterNotFound when it has none so named.
    """
    layers = [s.module for s in walk(model) if isinstance(s.module, AdapterLayer)]
    if name is None:
        return layers
    _resolve(model, name)
    return [layer for layer in layers if layer.has_adapter(name)]


def adapter_configs(model: nn.Module) -> dict[str, LoRAConfig]:
    """Adapter name -> the LoRAConfig it was added with (the live registry, not a copy).

    Args:
        model: the adapted model.
    """
    return model.__dict__.setdefault(_CONFIGS, {})


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters of ``model``, in the order they were added.

    Args:
        model: the adapted model.
    """
    return list(adapter_configs(model))


def check_name(name: str) -> None:
    """Raise InvalidName unless ``name`` can name an adapter (it becomes part of refs).

    Args:
        name: the proposed adapter name.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidName(
            f"adapter name {name!r} must be 1-200 characters of letters, digits, '_', '-' or '+'"
        )


def add_adapter(model: nn.Module, name: str, config: LoRAConfig, *, activate: bool = True) -> None:
    """Wrap every module ``config`` selects and give it a fresh adapter ``name``.

    The base model is frozen; the new adapter (and ``config.head``) train, other
    adapters are frozen.

    Args:
        model: the model to adapt in place.
        name: the new adapter's name (see ``check_name``).
        config: what to adapt and how.
        activate: make the new adapter the active set.
    """
    check_name(name)
    if not isinstance(config, LoRAConfig):
        raise ConfigError(f"config must be a LoRAConfig, got {type(config).__name__}")
    if name in adapter_configs(model):
        raise AdapterExists(f"the model already has an adapter named {name!r}")
    plan = _plan(model, config)
    head = _find(model, config.head) if config.head else None
    if any(isinstance(s.module, AdapterLayer) and s.module.merged is not None for s, _ in plan):
        raise MergedError("the model is merged; call sb.unmerge(model) before adding an adapter")

    for site, kind in plan:
        layer = site.module
        if not isinstance(layer, AdapterLayer):
            layer = kind(site.module, site.path)
            layer.train(site.module.training)
            setattr(site.parent, site.attr, layer)
        layer.add(
            name,
            config.rank_for(site.path, layer.base),
            config.scale_for(site.path, layer.base),
            config.dropout,
            config.init,
        )
    adapter_configs(model)[name] = config

    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_layers(model, name):
        for p in layer.adapter_parameters(name):
            p.requires_grad_(True)
    if head is not None:
        head.requires_grad_(True)
    if activate:
        set_active(model, [name])


def _find(model: nn.Module, path: str) -> nn.Module:
    for s in walk(model):
        if s.path == path:
            return s.module.base if isinstance(s.module, AdapterLayer) else s.module
    raise ConfigError(f"head {path!r} is not a module of this model")


def _plan(model: nn.Module, config: LoRAConfig) -> list[tuple[_Site, type[AdapterLayer]]]:
    """The modules to adapt, each with its layer kind; raises before any change."""
    sites = list(walk(model))
    plan: dict[str, tuple[_Site, type[AdapterLayer]]] = {}
    mha_paths = set()
    for site in sites:
        module = site.module.base if isinstance(site.module, AdapterLayer) else site.module
        if not config.selects(site.path, module):
            continue
        kind = kind_for(module)
        if kind is None:
            if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) or not list(
                module.parameters(recurse=False)
            ):
                continue  # containers match suffixes by accident; only leaves with weights count
            raise UnsupportedModule(
                f"'{site.path}' is a {type(module).__name__}; adapters support nn.Linear, nn.Conv2d "
                "and nn.MultiheadAttention (and their subclasses)"
            )
        plan[site.path] = (site, kind)
        if kind is MultiheadAttentionAdapter:
            mha_paths.add(site.path)
    for site in sites:  # an attention module's out_proj comes with it, and only with it
        parent = site.path.rpartition(".")[0]
        if isinstance(site.parent, nn.MultiheadAttention) and site.attr == "out_proj":
            if parent in mha_paths:
                plan[site.path] = (site, LinearAdapter)
            elif site.path in plan:
                raise UnsupportedModule(
                    f"'{site.path}' is the output projection of nn.MultiheadAttention '{parent}'; "
                    "target the attention module itself (it adapts q, k, v and out_proj)"
                )
    if not plan:
        candidates = [
            s.path for s in sites if kind_for(s.module) or isinstance(s.module, AdapterLayer)
        ]
        raise NoTargetMatched(
            f"no module matched targets {list(config.targets)}; adaptable modules here include "
            f"{candidates[:8]}{' ...' if len(candidates) > 8 else ''}"
        )
    for site, kind in plan.values():
        module = site.module.base if isinstance(site.module, AdapterLayer) else site.module
        kind.check(module, config.rank_for(site.path, module), site.path)
    return list(plan.values())


def _resolve(model: nn.Module, names: str | Sequence[str] | None) -> list[str]:
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    known = adapter_configs(model)
    for n in names:
        if n not in known:
            raise AdapterNotFound(f"no adapter named {n!r}; the model has {sorted(known)}")
    return names


def set_active(
    model: nn.Module, names: str | Sequence[str] | None, weights: Sequence[float] | None = None
) -> None:
    """Make ``names`` the active set (their outputs add up, scaled by ``weights``).

    Args:
        model: the adapted model.
        names: one adapter, several, or None / [] for the bare base.
        weights: one weight per name (default 1.0 each).
    """
    names = _resolve(model, names)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ConfigError(f"{len(names)} adapters but {len(weights)} weights")
    layers = adapter_layers(model)
    if any(layer.merged is not None for layer in layers):
        raise MergedError(
            "the model is merged; call sb.unmerge(model) before changing the active set"
        )
    for layer in layers:
        layer.set_active(list(zip(names, weights, strict=True)))


def active_adapters(model: nn.Module) -> list[tuple[str, float]]:
    """(name, weight) of every active adapter.

    Args:
        model: the adapted model.
    """
    seen: dict[str, float] = {}
    for layer in adapter_layers(model):
        seen.update(layer.active)
    return list(seen.items())


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run the bare base inside the block (e.g. for routing features); the active set returns after.

    Args:
        model: the adapted model.
    """
    layers = adapter_layers(model)
    if any(layer.merged is not None for layer in layers):
        raise MergedError("the model is merged; call sb.unmerge(model) before sb.disabled")
    # a per-call plan, not a change of the shared active sets: other threads keep theirs
    with calling(dict.fromkeys(layers, LayerCall(off=True))):
        yield


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name``; modules left with no adapter get their base back.

    Args:
        model: the adapted model.
        name: an adapter of ``model``.
    """
    _resolve(model, name)
    sites = [s for s in walk(model) if isinstance(s.module, AdapterLayer)]
    if any(s.module.merged is not None for s in sites):
        raise MergedError("the model is merged; call sb.unmerge(model) before removing an adapter")
    for s in sites:
        if s.module.has_adapter(name):
            s.module.remove(name)
        if not s.module.names():
            setattr(s.parent, s.attr, s.module.base)
    del adapter_configs(model)[name]


def merge(model: nn.Module) -> None:
    """Fold the active adapters into the base weights (exactly undone by ``unmerge``).

    Args:
        model: the adapted model.
    """
    layers = adapter_layers(model)
    if any(layer.call is not None for layer in layers):
        raise MergedError("cannot merge inside mixed_batch, composed or disabled")
    for layer in layers:
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Restore the base weights ``merge`` changed (a no-op when nothing is merged).

    Args:
        model: the adapted model.
    """
    for layer in adapter_layers(model):
        layer.unmerge()


def param_groups(
    model: nn.Module, lr: float, b_ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer groups for LoRA+: B matrices at ``lr * b_ratio``, everything else at ``lr``.

    Args:
        model: the adapted model; only parameters that require grad are grouped.
        lr: the base learning rate.
        b_ratio: B's rate as a multiple of ``lr``.
        weight_decay: for every group.
    """
    if lr <= 0 or b_ratio <= 0:
        raise ConfigError(f"lr and b_ratio must be positive, got lr={lr}, b_ratio={b_ratio}")
    b_ids = {id(p) for layer in adapter_layers(model) for p in layer.lora_B.values()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for p in trainable if id(p) not in b_ids],
            "lr": lr,
            "weight_decay": weight_decay,
        },
        {
            "params": [p for p in trainable if id(p) in b_ids],
            "lr": lr * b_ratio,
            "weight_decay": weight_decay,
        },
    ]
    return [g for g in groups if g["params"]]
