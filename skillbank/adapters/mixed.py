"""`mixed_batch`: a different adapter (or none) for every row of one batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import MergedError
from .inject import _resolve, adapter_layers


@contextmanager
def mixed_batch(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """Within the block, row ``i`` of the batch runs with adapter ``rows[i]`` (None: base only).

    Each layer gathers its stacked A/B factors by row and adds them with two
    batched matmuls (the S-LoRA/Punica BGMV form): the cost does not grow with
    the number of distinct adapters.
    """
    names = sorted({r for r in rows if r is not None})
    _resolve(model, names)
    layers = adapter_layers(model)
    if any(layer.merged is not None for layer in layers):
        raise MergedError("mixed_batch needs unmerged adapters; call sb.unmerge(model)")
    try:
        for layer in layers:
            here = tuple(n for n in names if n in layer.lora_A)
            slot = {n: i for i, n in enumerate(here, start=1)}
            device = layer.base_weight().device
            layer.row_names = here
            layer.rows = torch.tensor([slot.get(r, 0) for r in rows], dtype=torch.long, device=device)
        yield
    finally:
        for layer in layers:
            layer.rows, layer.row_names = None, ()
