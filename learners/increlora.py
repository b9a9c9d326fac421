"""`IncreLoRA`: start at rank 1 and give ranks to the modules that matter.

Each rank is a triplet (a_i, e_i, b_i): dW = B diag(e) A * alpha / n_active.
Adapters are allocated at ``rank`` (the most a module may reach) and grown by
un-masking ranks of a per-module gate (``gates.py``): ranks < n are active (e
trains), rank n is the reserve (e = 1e-5 frozen while its a, b already train:
"advance learning"), the rest are off. After ``warmup``, every ``interval``
steps the ``top_h`` modules with the highest importance (AdaLoRA's smoothed
sensitivity x uncertainty) activate their reserve until the total ``budget`` is
spent. The saved skill holds the active ranks only (reserves are dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

import skillbank as sb

from .base import Learner, TrainConfig
from .gates import add_gates, param_groups, raw_sites, remove_gates
from .regularisers import orthogonality
from .slicing import select_ranks


@dataclass
class IncreLoRA(Learner):
    """Rank growth under a total budget of ``budget`` ranks per module on average.

    Differs from the paper: no separate LR warm-up per new rank group (one
    shared optimizer; Adam's normalised first steps are small already), and
    module importance uses the factor-level first-order term |theta * grad| of
    the module's A, e and B instead of |dW * dL/d(dW)|, which would need the
    dense weight gradient of every module at every step.
    """

    name: ClassVar[str] = "increlora"

    rank: int = 12  # allocated (largest possible) rank per module
    alpha: float | None = None  # default 16: dW scale alpha / n_active
    budget: float = 4.0  # total rank budget as a mean rank per module
    top_h: int = 2  # modules grown at each growth step
    interval: int | None = None  # default: spaced so the budget is spent by `final`
    warmup: float = 0.1  # fractions of training
    final: float = 0.7
    orth: float = 0.1
    beta1: float = 0.85
    beta2: float = 0.85
    reserve: float = 1e-5
    gate_lr: float | None = None  # default: B's rate (lr * b_ratio)

    _gates: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _n: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _ema: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _norm: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _adapter: str = field(default="", init=False, repr=False, compare=False)
    history: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (1.0 <= self.budget <= self.rank) or self.top_h < 1:
            raise sb.ConfigError(f"need 1 <= budget <= rank ({self.rank}) and top_h >= 1")
        if not (0.0 <= self.warmup < self.final <= 1.0):
            raise sb.ConfigError("need 0 <= warmup < final <= 1")

    def lora_config(self, task) -> sb.LoRAConfig:
        return sb.LoRAConfig(
            rank=self.rank, alpha=self.alpha or 16.0, targets=tuple(self.targets), head=self.head
        )

    def prepare(self, model: nn.Module, task, bank, name: str) -> None:
        super().prepare(model, task, bank, name)
        gen = torch.Generator().manual_seed(self.train.seed)
        with torch.no_grad():  # A, B ~ N(0, 0.02), e = 0
            for layer in sb.adapter_layers(model, name):
                for p in layer.adapter_parameters(name):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        self._adapter, self._ema, self.history = name, {}, []
        self._gates = add_gates(model, name, lambda layer, r: torch.zeros(r))
        self._n = dict.fromkeys(self._gates, 1)
        self._norm = {
            layer.path: math.sqrt(sum(b.shape[0] * a.shape[1] for a, b in raw_sites(layer, name)))
            for layer in self._layers(model)
        }
        for path in self._gates:
            self._refresh(path)

    def _layers(self, model: nn.Module) -> list:
        return [layer for layer in sb.adapter_layers(model) if layer.path in self._gates]

    @torch.no_grad()
    def _refresh(self, path: str) -> None:
        """Masks for n active ranks: scale r / n on them (alpha / n overall), reserve at index n."""
        g, n = self._gates[path], self._n[path]
        r = len(g.gate)
        c = r / n
        g.mask.zero_()[:n] = c
        g.bias.zero_()
        if n < r:
            g.bias[n] = c * self.reserve

    @property
    def total_budget(self) -> int:
        return min(len(self._gates) * self.rank, round(self.budget * len(self._gates)))

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        return param_groups(model, cfg.lr, cfg.b_ratio, cfg.weight_decay, self.gate_lr)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if not self.orth:
            return None
        terms = [
            orthogonality(a[: self._n[layer.path]], b[:, : self._n[layer.path]])
            for layer in self._layers(model)
            for a, b in raw_sites(layer, self._adapter)
        ]
        return self.orth * torch.stack(terms).mean()

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        scores = {}
        for layer in self._layers(model):
            params = (*layer.factor_parameters(self._adapter), self._gates[layer.path].gate)
            now = (
                sum(float((p * p.grad).abs().sum()) for p in params if p.grad is not None)
                / self._norm[layer.path]
            )
            i_bar, u_bar = self._ema.get(layer.path, (now, 0.0))
            i_bar = self.beta1 * i_bar + (1 - self.beta1) * now
            u_bar = self.beta2 * u_bar + (1 - self.beta2) * abs(now - i_bar)
            self._ema[layer.path] = (i_bar, u_bar)
            scores[layer.path] = i_bar * u_bar
        t_w, t_f = int(self.warmup * total), int(self.final * total)
        spent = sum(self._n.values())
        events = max(1, math.ceil((self.total_budget - len(self._gates)) / self.top_h))
        interval = self.interval or max(1, (t_f - t_w) // events)
        if step >= t_w and (step - t_w) % interval == 0 and spent < self.total_budget:
            room = [p for p in scores if self._n[p] < self.rank]
            for path in sorted(room, key=scores.get, reverse=True)[
                : min(self.top_h, self.total_budget - spent)
            ]:
                g, n = self._gates[path], self._n[path]
                # the reserve becomes an active rank; the next one is reserved
                g.gate[n] = self.reserve
                self._n[path] = n + 1
                self._refresh(path)
        self.history.append(sum(self._n.values()))

    def abort(self, model: nn.Module, name: str) -> None:
        remove_gates(model, name, fold=False)

    def finish(self, model: nn.Module, task, name: str) -> sb.Skill:
        for path in self._gates:  # zero the reserves: they are not part of the skill
            self._gates[path].bias.zero_()
        remove_gates(model, name, fold=True)
        full = super().finish(model, task, name)
        keep = {p: range(n) for p, n in self._n.items()}
        skill = select_ranks(
            full,
            keep,
            chosen_ranks=dict(self._n),
            r_max=self.rank,
            rank_budget=self.total_budget,
            rank_history=list(self.history),
        )
        sb.remove_adapter(model, name)
        sb.attach(model, skill, name, load_head=False)
        self._gates = {}
        return skill
