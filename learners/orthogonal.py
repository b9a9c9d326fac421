"""`Orthogonal`: each task's skill in a subspace of its own, all skills summed.

O-LoRA: the new A is pushed away from the A's of past skills (entry-wise L1 of
A_old A_new^T), old adapters stay frozen and active, and inference uses their
sum with no task id (``inference = "direct"``). Options: InfLoRA's
initialisation (A_t from the task's input covariance with the span of past
inputs removed, then frozen; only B trains) and PEGO's term (away from the
pre-trained weight and from the other skills' updates).

The head is shared across tasks (``restores_head = False``) and trained with the
"labels trick" (logits masked to the task's classes, ``mask_logits=True``): in
class-incremental streams the cross-entropy of a new task then never pushes
the logits of old classes down, which is the main source of forgetting in the
head. In domain-incremental streams every task has all classes and the mask
is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

import skillbank as sb

from .base import Learner
from .gates import raw_sites
from .regularisers import olora, overlap, pego

INITS = ("lora", "inflora")


def subspace_overlap(new: sb.Skill, past: list[sb.Skill]) -> float | None:
    """Mean over sites of ||A_old A_new^T||_F / (||A_old||_F ||A_new||_F), A_old all past
    skills' A stacked; None when no past skill shares a site with ``new``."""
    values = []
    for site, (a, _) in new.factors.items():
        old = [s.factors[site][0] for s in past if site in s.factors]
        if old:
            values.append(overlap(torch.cat(old).float(), a.float()))
    return sum(values) / len(values) if values else None


@dataclass
class Orthogonal(Learner):
    """O-LoRA against every adapter already on the model (and, with ``bank_where``,
    the bank's skills on the same base matching those filters, attached inactive-
    then-active). ``bank_where`` is opt-in because a bank usually holds skills of
    other runs that must not join this model's sum."""

    name: ClassVar[str] = "orthogonal"
    inference: ClassVar[str] = "direct"
    restores_head: ClassVar[bool] = False

    lam: float = 0.5  # O-LoRA's lambda1
    init: str = "lora"
    pego: bool = False
    pego_weight: float = 1e-3
    energy: float = 0.95  # InfLoRA: share of input energy the past subspace keeps
    cov_batches: int = 8  # InfLoRA: batches of task data for the input covariance
    bank_where: dict | None = None

    _past: list = field(default_factory=list, init=False, repr=False, compare=False)
    _old_a: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _old_delta: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _cov: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _adapter: str = field(default="", init=False, repr=False, compare=False)
    # InfLoRA's M per module
    memory: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise sb.ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.lam < 0 or self.pego_weight < 0 or not (0 < self.energy <= 1):
            raise sb.ConfigError("need lam >= 0, pego_weight >= 0 and 0 < energy <= 1")

    # ------------------------------------------------------------- prepare
    def prepare(self, model: nn.Module, task, bank, name: str) -> None:
        super().prepare(model, task, bank, name)
        self._adapter = name
        if bank is not None and self.bank_where is not None:
            self._attach_from_bank(model, bank, name)
        self._past = [n for n in sb.adapter_names(model) if n != name]
        sb.set_active(model, self._past + [name])
        layers = sb.adapter_layers(model, name)
        with torch.no_grad():
            self._old_a = {}
            for layer in layers:
                past = [list(raw_sites(layer, n)) for n in self._past if layer.has_adapter(n)]
                if past:  # per site, the past skills' A stacked
                    self._old_a[layer.path] = [
                        torch.cat([a for a, _ in site]).detach() for site in zip(*past, strict=True)
                    ]
            self._old_delta = (
                {
                    layer.path: [
                        layer.delta_weight(((n, 1.0),)).flatten(1).detach()
                        for n in self._past
                        if layer.has_adapter(n)
                    ]
                    for layer in layers
                }
                if self.pego
                else {}
            )
        if self.init == "inflora":
            self._inflora_init(model, task, layers, name)

    def _attach_from_bank(self, model: nn.Module, bank, name: str) -> None:
        paths = [layer.path for layer in sb.adapter_layers(model, name)]
        base_id = sb.fingerprint(model, paths).base_id()
        for rec in bank.list(base_id=base_id, **self.bank_where):
            skill = bank.get(str(rec.ref))
            if skill.name not in sb.adapter_names(model):
                sb.attach(model, skill, activate=False, load_head=False)
        # attaching froze everything but the attached adapter: train the new one (and the head) again
        for layer in sb.adapter_layers(model, name):
            for p in layer.adapter_parameters(name):
                p.requires_grad_(True)
        if self.head:
            model.get_submodule(self.head).requires_grad_(True)

    @torch.no_grad()
    def _inflora_init(self, model: nn.Module, task, layers: list, name: str) -> None:
        """A_t = top-r eigenvectors of the input covariance outside the past span M, / sqrt(3); frozen."""
        if not all(layer.linear_input for layer in layers):
            raise sb.ConfigError(
                "init='inflora' supports linear and attention modules (a matrix product on the "
                "input's last dim), not Conv2d"
            )
        sums: dict[str, list] = {}

        def hook(layer):
            def collect(module, args):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                acc = sums.setdefault(layer.path, [0.0, 0])
                acc[0] = acc[0] + x.T @ x
                acc[1] += len(x)

            return collect

        handles = [layer.register_forward_pre_hook(hook(layer)) for layer in layers]
        was = model.training
        model.eval()
        try:
            gen = torch.Generator().manual_seed(self.train.seed)
            order = torch.randperm(len(task.x_train), generator=gen)
            device = next(model.parameters()).device
            bs = self.train.batch_size
            for i in range(min(self.cov_batches, -(-len(order) // bs))):
                model(task.x_train[order[i * bs : (i + 1) * bs]].to(device))
        finally:
            for h in handles:
                h.remove()
            model.train(was)
        self._cov = {}
        for layer in layers:
            s, n = sums[layer.path]
            cov = s / n
            self._cov[layer.path] = cov
            m = self._span(layer)
            proj = torch.eye(len(cov), device=cov.device) - (m @ m.T if m is not None else 0)
            vals, vecs = torch.linalg.eigh(proj @ cov @ proj)
            a = vecs[:, vals.argsort(descending=True)[: layer.adapter_rank(name)]].T / 3**0.5
            for f in layer.adapter_factors(name):  # every site (q, k, v) reads the same inputs
                f.copy_(a=a)
            layer.factor_parameters(name)[0].requires_grad_(False)

    def _span(self, layer) -> torch.Tensor | None:
        """Orthonormal basis of past inputs: kept from earlier tasks, else the past A's row space."""
        if layer.path in self.memory:
            return self.memory[layer.path]
        olds = self._old_a.get(layer.path)
        if not olds:
            return None
        q, _ = torch.linalg.qr(torch.cat(olds).T.float())
        return q

    @torch.no_grad()
    def _extend_memory(self, layer) -> None:
        """Add the new task's principal input directions until ``energy`` of it is covered."""
        cov, m = self._cov[layer.path], self._span(layer)
        total = float(torch.trace(cov))
        kept = float(torch.trace(m.T @ cov @ m)) if m is not None else 0.0
        proj = torch.eye(len(cov), device=cov.device) - (m @ m.T if m is not None else 0)
        vals, vecs = torch.linalg.eigh(proj @ cov @ proj)
        vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
        target = self.energy * total
        k = (
            0
            if kept >= target
            else min(len(vals), int((kept + torch.cumsum(vals, 0) < target).sum()) + 1)
        )
        new = vecs[:, :k]
        self.memory[layer.path] = new if m is None else torch.cat([m, new], dim=1)

    # ------------------------------------------------------------- penalty
    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        terms = []
        for layer in sb.adapter_layers(model, self._adapter):
            sites = list(raw_sites(layer, self._adapter))
            if self.lam and self.init == "lora" and layer.path in self._old_a:
                terms.append(
                    self.lam
                    * sum(
                        olora(old, a)
                        for old, (a, _) in zip(self._old_a[layer.path], sites, strict=True)
                    )
                )
            if self.pego:
                a, b = layer.factors_2d(self._adapter)
                delta = layer.adapter_scale(self._adapter) * (b @ a)
                w0 = layer.base_weight().detach().flatten(1)
                terms.append(
                    self.pego_weight * pego(w0, delta, self._old_delta.get(layer.path, []))
                )
        return torch.stack(terms).sum() if terms else None

    # -------------------------------------------------------------- finish
    def abort(self, model: nn.Module, name: str) -> None:
        self._cov = {}

    def finish(self, model: nn.Module, task, name: str) -> sb.Skill:
        skill = super().finish(model, task, name)
        past = [sb.Skill.from_model(model, n) for n in self._past]
        skill.metadata.update(
            overlap=subspace_overlap(skill, past),
            past=list(self._past),
            init=self.init,
            pego=self.pego,
        )
        if self.init == "inflora":
            for layer in sb.adapter_layers(model):
                if layer.path in self._cov:
                    self._extend_memory(layer)
            self._cov = {}
        sb.set_active(model, self._past + [name])  # direct inference: every skill, summed
        return skill
