"""Per-row adapters in one batch: `mixed_batch` (one adapter or none per row) and
`composed` (per-row weights over several adapters, differentiable in the weights).

Both hand each layer a plan through a context variable (``calls.py``), never an
attribute of the shared modules: threads serving one model and nested blocks
each see their own rows. What is and is not safe to share between threads:

- safe: any number of threads running ``mixed_batch`` / ``composed`` / ``disabled``
  forwards (inference) through one model, and ``sb.Router`` calls;
- not safe while other threads run the model: training (optimizer steps change
  the factors the others read), ``add_adapter`` / ``remove_adapter`` / ``attach``
  outside a ``Router`` (which serialises its own), ``set_active``, ``merge`` /
  ``unmerge`` and ``set_adapter_scale`` (shared state by nature).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import ConfigError, MergedError
from .calls import LayerCall, MixPlan, calling
from .inject import _resolve, adapter_layers


def _unmerged(layers: list, what: str) -> None:
    if any(layer.merged is not None for layer in layers):
        raise MergedError(f"{what} needs unmerged adapters; call sb.unmerge(model)")


@contextmanager
def mixed_batch(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """Within the block, row ``i`` of the batch runs with adapter ``rows[i]`` (None: base only).

    Each layer gathers its stacked A/B factors by row and adds them with two
    batched matmuls (the S-LoRA/Punica BGMV form): the cost does not grow with
    the number of distinct adapters. The stacks are kept per layer between
    calls and updated a slot at a time (only adapters new to them, or changed,
    are written); with gradients on trainable factors the call builds its own.

    Args:
        model: the adapted model (unmerged).
        rows: per batch row, an adapter name or None for the base alone.
    """
    rows = list(rows)
    names = sorted({r for r in rows if r is not None})
    _resolve(model, names)
    layers = adapter_layers(model)
    _unmerged(layers, "mixed_batch")
    plans: dict[nn.Module, LayerCall] = {}
    try:
        for layer in layers:
            here = tuple(n for n in names if layer.has_adapter(n))
            # the shared stacks serve calls that need no gradient through the factors
            pooled = not layer._needs_grad_for(here)
            plans[layer] = LayerCall(rows=layer.plan_rows(here, rows, pooled))
        with calling(plans):
            yield
    finally:
        for layer, call in plans.items():
            layer.end_rows(call.rows)


@contextmanager
def composed(model: nn.Module, names: Sequence[str], weights: torch.Tensor) -> Iterator[None]:
    """Within the block, row ``i`` runs with ``sum_k weights[i, k] * adapter names[k]``.

    Parameter-space composition per sample (PSEC): each layer concatenates the
    factors of ``names`` once and scales the rank units of each row by its
    weights, so the cost is two products of rank ``sum of ranks`` whatever the
    batch. Gradients reach ``weights`` (a compositor can learn them) and any
    trainable adapter. Active adapters still apply on top.

    Args:
        model: the adapted model (unmerged).
        names: the K adapters to mix.
        weights: (rows, K) mixture weights, batch-first.
    """
    names = list(names)
    _resolve(model, names)
    if weights.dim() != 2 or weights.shape[1] != len(names):
        raise ConfigError(
            f"composed needs weights of shape (rows, {len(names)}), got {tuple(weights.shape)}"
        )
    layers = adapter_layers(model)
    _unmerged(layers, "composed")
    plans: dict[nn.Module, LayerCall | None] = {}
    for layer in layers:
        cols = [k for k, n in enumerate(names) if layer.has_adapter(n)]
        plans[layer] = None  # no mixed adapter here: the layer runs as it stands
        if cols:
            w = weights[:, cols].to(layer.base_weight().device)
            plans[layer] = LayerCall(mix=MixPlan(tuple(names[k] for k in cols), w))
    with calling(plans):
        yield
