"""`RankSelective`: train at a generous rank, keep only the ranks the task needs.

Both methods put a value per rank on the adapter, dW = B diag(g) A (see
``gates.py``), and end with some of those values at zero; the saved skill
holds the surviving ranks only, with the gate folded into B, so the rank
differs per module.

- ``codyra`` (default): gates w ~ N(0, 1), a proximal L1 step after each
  optimizer step in the second half of training, w <- sign(w) max(|w| - kappa, 0),
  kappa ramping linearly to ``max_kappa`` in ``increments`` steps.
- ``adalora``: AdaLoRA's importance pruning: EMAs of |theta * grad| (sensitivity
  and uncertainty) score each triplet (a_i, e_i, b_i); a cubic schedule shrinks
  the total budget from ``rank`` to ``target_rank`` per module, masking the
  lowest triplets every ``delta_t`` steps; orthogonal regulariser on A and B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

import skillbank as sb

from .base import Learner, TrainConfig
from .gates import add_gates, param_groups, per_rank, raw_sites, remove_gates
from .regularisers import orthogonality
from .slicing import select_ranks

METHODS = ("codyra", "adalora")


@dataclass
class RankSelective(Learner):
    """Dynamic rank: ``rank`` is the most a module may keep; what is kept is learned.

    ``alpha`` defaults to ``rank`` (scale 1: CoDyRA has no alpha / r, the gate
    carries the magnitude). CoDyRA's ``max_kappa`` was 5e-3 per step over runs
    of thousands of steps; our tasks train for a few hundred, so the default is
    larger: the ramp's total shrinkage, not its per-step value, is what prunes.
    """

    name: ClassVar[str] = "rank_selective"

    rank: int = 16
    method: str = "codyra"
    max_kappa: float = 5e-2
    increments: int = 50
    start: float = 0.5  # fraction of training before thresholding begins
    gate_lr: float | None = None  # default: lr (codyra), lr * b_ratio (adalora)
    # adalora
    target_rank: float = 4.0  # mean kept rank per module at the end
    orth: float = 0.5
    beta1: float = 0.85
    beta2: float = 0.85
    delta_t: int = 10
    warmup: float = 0.1  # fractions of training: full budget before, final budget after 1 - final
    final: float = 0.2

    _gates: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _ema: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _keep: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _adapter: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise sb.ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (0.0 <= self.start < 1.0) or self.max_kappa < 0 or self.increments < 1:
            raise sb.ConfigError("need 0 <= start < 1, max_kappa >= 0 and increments >= 1")
        if not (0 < self.target_rank <= self.rank) or self.delta_t < 1:
            raise sb.ConfigError(f"need 0 < target_rank <= rank ({self.rank}) and delta_t >= 1")

    def lora_config(self, task) -> sb.LoRAConfig:
        return sb.LoRAConfig(
            rank=self.rank,
            alpha=self.alpha or float(self.rank),
            targets=tuple(self.targets),
            head=self.head,
        )

    def prepare(self, model: nn.Module, task, bank, name: str) -> None:
        super().prepare(model, task, bank, name)
        gen = torch.Generator().manual_seed(self.train.seed)
        self._ema, self._keep, self._adapter = {}, {}, name
        if self.method == "codyra":
            self._gates = add_gates(model, name, lambda layer, r: torch.randn(r, generator=gen))
            return
        # AdaLoRA: P, Q ~ N(0, 0.02), singular values E = 0 (so dW starts at zero)
        with torch.no_grad():
            for layer in sb.adapter_layers(model, name):
                for p in layer.adapter_parameters(name):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        self._gates = add_gates(model, name, lambda layer, r: torch.zeros(r))

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        # CoDyRA's gates start at N(0, 1) and train at A's rate; AdaLoRA's E starts at 0 and
        # needs B's rate to matter within a few hundred steps.
        gate_lr = self.gate_lr or (cfg.lr if self.method == "codyra" else None)
        return param_groups(model, cfg.lr, cfg.b_ratio, cfg.weight_decay, gate_lr)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if self.method != "adalora" or not self.orth:
            return None
        terms = [
            orthogonality(a, b)
            for layer in self._layers(model)
            for a, b in raw_sites(layer, self._adapter)
        ]
        return self.orth * torch.stack(terms).mean()

    def _layers(self, model: nn.Module) -> list:
        return [layer for layer in sb.adapter_layers(model) if layer.path in self._gates]

    # ------------------------------------------------------------ schedule
    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        with torch.no_grad():
            if self.method == "codyra":
                self._threshold(step, total)
            else:
                self._prune(model, step, total)

    def _threshold(self, step: int, total: int) -> None:
        t0 = int(self.start * total)
        if step < t0:
            return
        k = min(self.increments, math.ceil(self.increments * (step - t0 + 1) / max(1, total - t0)))
        # A proximal step is lr-sized: with the cosine schedule's lr near zero at the end, a
        # constant kappa would keep shrinking gates that gradients can no longer defend.
        decay = (
            0.5 * (1 + math.cos(math.pi * step / total)) if self.train.schedule == "cosine" else 1.0
        )
        kappa = self.max_kappa * k / self.increments * decay
        for g in self._gates.values():
            w = g.gate
            w.copy_(w.sign() * (w.abs() - kappa).clamp_min(0))

    def _prune(self, model: nn.Module, step: int, total: int) -> None:
        scores = {}
        for layer in self._layers(model):
            a, b = layer.factor_parameters(self._adapter)
            e = self._gates[layer.path].gate
            s = [
                self._importance(f"{layer.path}:{k}", p) for k, p in (("A", a), ("B", b), ("E", e))
            ]
            axis_a, axis_b = layer.rank_axes
            scores[layer.path] = s[2] + per_rank(s[0], axis_a) + per_rank(s[1], axis_b)
        t_i, t_f = int(self.warmup * total), int((1 - self.final) * total)
        if step < t_i or (step % self.delta_t and step != total - 1):
            return
        start, end = self.rank * len(scores), self.target_rank * len(scores)
        frac = min(1.0, (step - t_i) / max(1, t_f - t_i))
        budget = int(round(end + (start - end) * (1 - frac) ** 3))
        flat = torch.cat(list(scores.values()))
        if budget >= len(flat):
            return
        threshold = flat.kthvalue(len(flat) - budget).values
        for path, s in scores.items():
            keep = s > threshold
            self._keep[path] = keep
            self._gates[path].gate.masked_fill_(~keep, 0.0)

    def _importance(self, key: str, p: torch.Tensor) -> torch.Tensor:
        """AdaLoRA's smoothed sensitivity x uncertainty of every element of ``p``."""
        if p.grad is None:
            i_now = torch.zeros_like(p)
        else:
            i_now = (p * p.grad).abs()
        if key not in self._ema:
            self._ema[key] = (torch.zeros_like(p), torch.zeros_like(p))
        i_bar, u_bar = self._ema[key]
        i_bar.mul_(self.beta1).add_(i_now, alpha=1 - self.beta1)
        u_bar.mul_(self.beta2).add_((i_now - i_bar).abs(), alpha=1 - self.beta2)
        return i_bar * u_bar

    # --------------------------------------------------------------- end
    def abort(self, model: nn.Module, name: str) -> None:
        remove_gates(model, name, fold=False)

    def finish(self, model: nn.Module, task, name: str) -> sb.Skill:
        keep: dict[str, Any] = {}
        for path, g in self._gates.items():
            kept = (
                g.gate != 0
                if self.method == "codyra"
                else self._keep.get(path, torch.ones_like(g.gate, dtype=bool))
            )
            keep[path] = torch.nonzero(kept).flatten().tolist()
        remove_gates(model, name, fold=True)
        full = super().finish(model, task, name)
        chosen = {p: len(k) for p, k in keep.items()}
        if not any(chosen.values()):  # everything pruned: keep each module's strongest rank
            keep = {p: [int(g.gate.abs().argmax())] for p, g in self._gates.items()}
        skill = select_ranks(full, keep, chosen_ranks=chosen, r_max=self.rank, method=self.method)
        # the live model carries exactly what was saved
        sb.remove_adapter(model, name)
        sb.attach(model, skill, name, load_head=False)
        self._gates, self._ema, self._keep = {}, {}, {}
        return skill
