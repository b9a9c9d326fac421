"""Per-call adapter state: what a ``mixed_batch``, ``composed`` or ``disabled`` block asks
of each layer, held in a context variable and never written on the shared modules.

Every thread (and every asyncio task) has its own context, so threads serving one
model never see each other's rows. A nested block overlays the outer block's
plans with its own (the innermost call wins on a layer) and the outer plans
return on exit. A forward hook that must see only its own call's passes uses
``own_hooks``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn as nn


@dataclass(frozen=True)
class RowPlan:
    """One layer's share of a mixed batch.

    Attributes:
        names: the call's adapters this layer carries; row slot ``k + 1`` is ``names[k]``.
        local: per row, 0 (base only) or ``1 + k``: indexes stacks built for this call.
        slots: per row, a slot of the layer's shared ``StackPool`` (0: base only), or None
            when the call builds its own stacks (gradients wanted).
        held: the pool slots of ``names``, in order, held until the call ends.
    """

    names: tuple[str, ...]
    local: torch.Tensor
    slots: torch.Tensor | None
    held: tuple[int, ...] = ()


@dataclass(frozen=True)
class MixPlan:
    """One layer's share of a ``composed`` call: (rows, K) weights over ``names``."""

    names: tuple[str, ...]
    weights: torch.Tensor


@dataclass(frozen=True)
class LayerCall:
    """What the current call asks of one layer: per-row adapters, a per-row mixture, or
    the bare base (``off``, for ``disabled``)."""

    rows: RowPlan | None = None
    mix: MixPlan | None = None
    off: bool = False


_EMPTY: Mapping[nn.Module, LayerCall] = MappingProxyType({})
_CALLS: ContextVar[Mapping[nn.Module, LayerCall]] = ContextVar("skillbank_calls", default=_EMPTY)
_HOOKS: ContextVar[frozenset[object]] = ContextVar("skillbank_hooks", default=frozenset())


def current(layer: nn.Module) -> LayerCall | None:
    """What the calling context asks of ``layer`` (None: run as the layer stands)."""
    return _CALLS.get().get(layer)


@contextmanager
def calling(plans: Mapping[nn.Module, LayerCall | None]) -> Iterator[None]:
    """Within the block, ``plans`` hold for this context only, over any outer ones
    (a None plan: the layer runs as it stands, whatever an outer call asked)."""
    merged = {**_CALLS.get(), **plans}
    token = _CALLS.set(MappingProxyType({k: v for k, v in merged.items() if v is not None}))
    try:
        yield
    finally:
        _CALLS.reset(token)


@contextmanager
def own_hooks(
    modules: Sequence[nn.Module], fn: Callable[[int, tuple, object], None]
) -> Iterator[None]:
    """Forward hooks on ``modules`` that fire only for passes run in this block's context:
    ``fn(i, inputs, output)`` with ``i`` the module's position. Another thread's pass
    through the same modules (or an unrelated call) is not seen.
    """
    key = object()
    token = _HOOKS.set(_HOOKS.get() | {key})

    def hook(i: int):
        return lambda _m, inputs, output: fn(i, inputs, output) if key in _HOOKS.get() else None

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        _HOOKS.reset(token)
