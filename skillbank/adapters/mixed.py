"""Per-row adapters in one batch: `mixed_batch` (one adapter or none per row) and
`composed` (per-row weights over several adapters, differentiable in the weights)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import ConfigError, MergedError
from .inject import _resolve, adapter_layers


@contextmanager
def mixed_batch(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """Within the block, row ``i`` of the batch runs with adapter ``rows[i]`` (None: base only).

    Each layer gathers its stacked A/B factors by row and adds them with two
    batched matmuls (the S-LoRA/Punica BGMV form): the cost does not grow with
    the number of distinct adapters.

    Args:
        model: the adapted model (unmerged).
        rows: per batch row, an adapter name or None for the base alone.
    """
    names = sorted({r for r in rows if r is not None})
    _resolve(model, names)
    layers = adapter_layers(model)
    if any(layer.merged is not None for layer in layers):
        raise MergedError("mixed_batch needs unmerged adapters; call sb.unmerge(model)")
    try:
        for layer in layers:
            here = tuple(n for n in names if layer.has_adapter(n))
            slot = {n: i for i, n in enumerate(here, start=1)}
            device = layer.base_weight().device
            layer.row_names = here
            layer.rows = torch.tensor(
                [slot.get(r, 0) for r in rows], dtype=torch.long, device=device
            )
        yield
    finally:
        for layer in layers:
            layer.rows, layer.row_names = None, ()


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
    if any(layer.merged is not None for layer in layers):
        raise MergedError("composed needs unmerged adapters; call sb.unmerge(model)")
    try:
        for layer in layers:
            cols = [k for k, n in enumerate(names) if layer.has_adapter(n)]
            if cols:
                layer.mix_names = tuple(names[k] for k in cols)
                layer.mix = weights[:, cols].to(layer.base_weight().device)
        yield
    finally:
        for layer in layers:
            layer.mix, layer.mix_names = None, ()
