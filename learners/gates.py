"""Per-rank multipliers on a live adapter: dW = B diag(g) A.

CoDyRA's gates, AdaLoRA's singular values, IncreLoRA's e and DyLoRA's nested
rank masks all have this form. Rather than a second adapter layer, each layer
reads B through a rank gate (``AdapterLayer.add_rank_gate``): the adapter layer
keeps computing ``s B A x`` and reads ``B diag(gate * mask + bias)``; the gate
trains beside B when it is a Parameter and is folded into B before the skill is
saved, so saved skills are plain LoRA factors and need no new layer code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

import skillbank as sb
from skillbank import AdapterLayer


def per_rank(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean of ``t`` over everything but the rank axis: one value per rank."""
    return t.movedim(axis, 0).reshape(t.shape[axis], -1).mean(1)


class RankScale(nn.Module):
    """One multiplier per rank, ``gate * mask + bias``: the gate trains (or not), the mask
    and bias are set by the learner's schedule."""

    def __init__(self, gate: torch.Tensor, trainable: bool) -> None:
        super().__init__()
        if trainable:
            self.gate = nn.Parameter(gate)
        else:
            self.register_buffer("gate", gate)
        self.register_buffer("mask", torch.ones_like(gate))
        self.register_buffer("bias", torch.zeros_like(gate))

    def forward(self) -> torch.Tensor:
        return self.gate * self.mask + self.bias


def add_gates(
    model: nn.Module,
    name: str,
    init: Callable[[AdapterLayer, int], torch.Tensor],
    trainable: bool = True,
) -> dict[str, RankScale]:
    """Gate every layer carrying adapter ``name``; ``init(layer, rank)`` gives the gate values."""
    gates = {}
    for layer in sb.adapter_layers(model, name):
        _, b = layer.factor_parameters(name)
        g = init(layer, layer.adapter_rank(name)).to(device=b.device, dtype=b.dtype)
        gates[layer.path] = RankScale(g, trainable)
        layer.add_rank_gate(name, gates[layer.path])
    return gates


def remove_gates(model: nn.Module, name: str, fold: bool = True) -> None:
    """Take the gates off; with ``fold`` B keeps the gated values (B diag(g)), else the raw ones.
    Does nothing when the model no longer has the adapter (an aborted run may have removed it)."""
    if name not in sb.adapter_names(model):
        return
    for layer in sb.adapter_layers(model, name):
        layer.remove_rank_gates(name, fold=fold)


def raw_sites(layer: AdapterLayer, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(A: r x fan_in, B: fan_out x r) per site from the trained parameters (gates left out);
    attention modules give q, k and v separately."""
    for f in layer.adapter_factors(name):
        yield f.matrices()


def param_groups(
    model: nn.Module,
    lr: float,
    b_ratio: float,
    weight_decay: float = 0.0,
    gate_lr: float | None = None,
) -> list[dict]:
    """LoRA+ groups that see through gates: raw B at ``lr * b_ratio``; gates at ``gate_lr``
    (default ``lr * b_ratio``: a gate scales B's columns and, at A's rate, moved too little
    in a few hundred steps to tell ranks apart), without weight decay (decay would fight
    the sparsity the gates learn)."""
    b_ids, gate_ids = set(), set()
    for layer in sb.adapter_layers(model):
        for n in layer.names():
            b_ids.add(id(layer.factor_parameters(n)[1]))
            for g in layer.rank_gates(n):
                gate_ids.update(id(p) for p in g.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for p in trainable if id(p) not in b_ids | gate_ids],
            "lr": lr,
            "weight_decay": weight_decay,
        },
        {
            "params": [p for p in trainable if id(p) in b_ids],
            "lr": lr * b_ratio,
            "weight_decay": weight_decay,
        },
        {
            "params": [p for p in trainable if id(p) in gate_ids],
            "lr": gate_lr or lr * b_ratio,
            "weight_decay": 0.0,
        },
    ]
    return [g for g in groups if g["params"]]
