"""Per-rank multipliers on a live adapter: dW = B diag(g) A.

CoDyRA's gates, AdaLoRA's singular values, IncreLoRA's e and DyLoRA's nested
rank masks all have this form. Rather than a second adapter layer, B is
re-parameterised (``torch.nn.utils.parametrize``): the adapter layer keeps
computing ``s B A x`` and reads ``B diag(gate * mask + bias)``; the gate trains
beside B when it is a Parameter and is folded into B before the skill is
saved, so saved skills are plain LoRA factors and need no new layer code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as P

import skillbank as sb
from skillbank import AdapterLayer


def rank_axis(param: torch.Tensor, factor: str = "B") -> int:
    """The rank dimension of a layer's own A or B parameter, for every adapter kind.

    Linear: A (r, in), B (out, r); Conv2d: A (r, c, kh, kw), B (out, r, 1, 1);
    MultiheadAttention: A (3, r, E), B (3, E, r).
    """
    if factor == "A":
        return 1 if param.dim() == 3 else 0
    return 1 if param.dim() == 4 else param.dim() - 1


def per_rank(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Mean of ``t`` over everything but the rank axis: one value per rank."""
    return t.movedim(axis, 0).reshape(t.shape[axis], -1).mean(1)


class RankScale(nn.Module):
    """The parametrisation ``B -> B diag(gate * mask + bias)`` along B's rank axis."""

    def __init__(self, gate: torch.Tensor, axis: int, trainable: bool) -> None:
        super().__init__()
        if trainable:
            self.gate = nn.Parameter(gate)
        else:
            self.register_buffer("gate", gate)
        self.register_buffer("mask", torch.ones_like(gate))
        self.register_buffer("bias", torch.zeros_like(gate))
        self.axis = axis

    def vector(self) -> torch.Tensor:
        return self.gate * self.mask + self.bias

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        shape = [1] * b.dim()
        shape[self.axis] = -1
        return b * self.vector().view(shape).to(b.dtype)


def add_gates(
    model: nn.Module,
    name: str,
    init: Callable[[AdapterLayer, int], torch.Tensor],
    trainable: bool = True,
) -> dict[str, RankScale]:
    """Gate every layer carrying adapter ``name``; ``init(layer, rank)`` gives the gate values."""
    gates = {}
    for layer in sb.adapter_layers(model):
        if name not in layer.lora_B:
            continue
        b = layer.lora_B[name]
        g = init(layer, layer.ranks[name]).to(device=b.device, dtype=b.dtype)
        gates[layer.path] = RankScale(g, rank_axis(b), trainable)
        P.register_parametrization(layer.lora_B, name, gates[layer.path], unsafe=True)
    return gates


def gated(layer: AdapterLayer, name: str) -> bool:
    return P.is_parametrized(layer.lora_B, name)


def raw_B(layer: AdapterLayer, name: str) -> torch.Tensor:
    """B as trained (the Parameter under the gate)."""
    return (
        layer.lora_B.parametrizations[name].original if gated(layer, name) else layer.lora_B[name]
    )


def remove_gates(model: nn.Module, name: str, fold: bool = True) -> None:
    """Take the gates off; with ``fold`` B keeps the gated values (B diag(g)), else the raw ones."""
    for layer in sb.adapter_layers(model):
        if name in layer.lora_B and gated(layer, name):
            P.remove_parametrizations(layer.lora_B, name, leave_parametrized=fold)


def raw_sites(layer: AdapterLayer, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(A: r x fan_in, B: fan_out x r) per site from the trained parameters (gates left out);
    attention modules give q, k and v separately."""
    a, b = layer.lora_A[name], raw_B(layer, name)
    if a.dim() == 3:
        yield from zip(a.unbind(0), b.unbind(0), strict=True)
    else:
        yield a.flatten(1), b.flatten(1)


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
        for n in layer.lora_B.keys():
            b_ids.add(id(raw_B(layer, n)))
            if gated(layer, n):
                for m in layer.lora_B.parametrizations[n]:
                    gate_ids.update(id(p) for p in m.parameters())
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
