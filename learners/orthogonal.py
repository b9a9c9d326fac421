"""`Orthogonal`: one model that keeps every task, all skills summed with no routing.

Default, InfLoRA (Liang & Li, CVPR 2024): each task's A is computed from its
data before training (the top principal directions of each layer's inputs
outside the memory M of past tasks' input subspaces, ``learners.inflora``) and
frozen; only B trains, so B A x stays ~0 on old tasks' inputs. M grows after
each task by DualGPM's energy rule and travels with the skills (``Skill.extras``),
so a later run that reads them (``bank_where``) continues it. ``init="lora"`` is
O-LoRA instead: a trainable A pushed away from the past A's by
lambda sum |A_old A_new^T| (lambda 0.5, the paper's). ``pego=True`` adds PEGO's term
(away from the pre-trained weight and from the other skills' updates).
``init="sdlora"`` is SD-LoRA (Wu et al., ICLR 2025): past skills are frozen
directions whose magnitudes (one scalar per skill, shared by all its layers)
train with the new task's LoRA, itself read as m_t B_t A_t with m_t from 0.8
(the official code's). A magnitude is relative to the skill as trained and
carries on to the next task, so the model is unchanged when a task starts (the
official code divides a past direction by ||B|| ||A|| instead, which makes the
sum jump at each task's start); the sum's weights are the magnitudes, kept in
the skills' metadata.

The head keeps old tasks too (``learners.heads``): a task trains only its own
classes' rows (``mask_logits``) and every other row is restored bit for bit
(``heads=True``); classifier alignment (``align=True``, SLCA / InfLoRA+CA)
then retrains the rows of every seen class a few epochs on features sampled
from class Gaussians, whose sums each skill carries as its ``"head"`` statistics
(``Skill.stats``: the bank keeps them in its statistics table with the version,
beside the routing set, so a later run continues them). Inference uses the sum
of every skill, merged into the weights (in eval mode, or for good with
``sb.merge``), and no task id (``inference = "direct"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

import skillbank as sb
from skillbank.embed import features
from skillbank.route_stats import HEAD, stats_from_features

from . import heads as classifier
from . import inflora
from .base import Learner
from .gates import param_groups as gated_groups
from .gates import raw_sites, remove_gates
from .regularisers import olora, overlap, pego

INITS = ("lora", "inflora", "sdlora")


def subspace_overlap(new: sb.Skill, past: list[sb.Skill]) -> float | None:
    """Mean over sites of ||A_old A_new^T||_F / (||A_old||_F ||A_new||_F), A_old all past
    skills' A stacked; None when no past skill shares a site with ``new``."""
    values = []
    for site, (a, _) in new.factors.items():
        old = [s.factors[site][0] for s in past if site in s.factors]
        if old:
            values.append(overlap(torch.cat(old).float(), a.float()))
    return sum(values) / len(values) if values else None


class Magnitude(nn.Module):
    """SD-LoRA's read of one adapter in one layer: a rank gate of the skill's magnitude,
    one Parameter shared by every layer the skill adapts."""

    def __init__(self, m: nn.Parameter, rank: int) -> None:
        super().__init__()
        self.m = m
        self.rank = rank

    def forward(self) -> torch.Tensor:
        return self.m.expand(self.rank)


@dataclass
class Orthogonal(Learner):
    """InfLoRA (default), O-LoRA or SD-LoRA against every adapter already on the model (and,
    with ``bank_where``, the bank's skills on the same base matching those filters, attached
    and summed, whose InfLoRA memory, magnitudes and class statistics this learner continues).
    ``bank_where`` is opt-in because a bank usually holds skills of other runs that
    must not join this model's sum."""

    name: ClassVar[str] = "orthogonal"
    inference: ClassVar[str] = "direct"
    restores_head: ClassVar[bool] = False
    resumable: ClassVar[bool] = False  # memory and class statistics live in the learner

    lam: float = 0.5  # O-LoRA's lambda1
    init: str = "inflora"
    pego: bool = False
    pego_weight: float = 1e-3
    # InfLoRA: share of a task's input energy the memory keeps, eps_t = energy +
    # (energy_end - energy) t / n_tasks (the paper's 0.95 -> 1.0); constant when n_tasks is None
    energy: float = 0.95
    energy_end: float = 1.0
    n_tasks: int | None = None
    cov_batches: int = 8  # InfLoRA: batches of task data for the input covariance
    heads: bool = True  # restore every head row outside the task's classes after training
    align: bool = True  # classifier alignment from class Gaussians after each task
    align_samples: int = 256  # SLCA's features per class
    align_epochs: int = 5
    align_lr: float = 0.01
    bank_where: dict | None = None
    magnitude: float = 0.8  # SD-LoRA: a new skill's magnitude before training

    _past: list = field(default_factory=list, init=False, repr=False, compare=False)
    _old_a: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _old_delta: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _saved_head: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _adapter: str = field(default="", init=False, repr=False, compare=False)
    # InfLoRA's M per layer path (d_in x k, orthonormal columns)
    memory: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # RouteStats of the head's input features, one per task learned
    class_stats: list = field(default_factory=list, init=False, repr=False, compare=False)
    tasks_seen: int = field(default=0, init=False, repr=False, compare=False)
    # SD-LoRA: learned magnitude per skill name, and the live Parameters of this task's fit
    magnitudes: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _mags: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise sb.ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.lam < 0 or self.pego_weight < 0 or not (0 < self.energy <= self.energy_end <= 1):
            raise sb.ConfigError(
                "need lam >= 0, pego_weight >= 0 and 0 < energy <= energy_end <= 1"
            )
        if self.magnitude <= 0:
            raise sb.ConfigError(f"magnitude must be positive, got {self.magnitude}")
        if self.n_tasks is not None and self.n_tasks <= 0:
            raise sb.ConfigError(f"n_tasks must be positive or None, got {self.n_tasks}")
        if min(self.cov_batches, self.align_samples, self.align_epochs) <= 0 or self.align_lr <= 0:
            raise sb.ConfigError(
                "cov_batches, align_samples, align_epochs and align_lr must be positive"
            )

    # ------------------------------------------------------------- prepare
    def prepare(self, model: nn.Module, task, bank, name: str) -> None:
        super().prepare(model, task, bank, name)
        self._adapter = name
        if self.head is not None and (self.heads or self.align):
            self._saved_head = classifier.snapshot(classifier.linear_head(model, self.head))
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
        elif self.init == "sdlora":
            self._sdlora_gates(model, name)

    def _attach_from_bank(self, model: nn.Module, bank, name: str) -> None:
        paths = [layer.path for layer in sb.adapter_layers(model, name)]
        base_id = sb.fingerprint(model, paths).base_id()
        skills = []
        for rec in bank.list(base_id=base_id, **self.bank_where):
            skill = bank.get(str(rec.ref))
            if skill.name not in sb.adapter_names(model):
                sb.attach(model, skill, activate=False, load_head=False)
                skills.append(skill)
        self.continue_from(model, skills)
        # attaching froze everything but the attached adapter: train the new one (and the head) again
        for layer in sb.adapter_layers(model, name):
            for p in layer.adapter_parameters(name):
                p.requires_grad_(True)
        if self.head:
            model.get_submodule(self.head).requires_grad_(True)

    def continue_from(self, model: nn.Module, skills: list[sb.Skill]) -> None:
        """Take over the InfLoRA memory and class statistics that ``skills`` carry (skills of
        an earlier run on this base). Raises BaseMismatch, changing nothing, for skills of
        another base."""
        memory = inflora.memory_from_skills(model, skills)
        found = [s.stats.get(HEAD) for s in skills]
        for p, m in self.memory.items():
            memory[p] = inflora.union([m, memory[p]]) if p in memory else m
        self.memory = memory
        for s in skills:
            self.magnitudes.update(s.metadata.get("magnitudes") or {})
        self.class_stats += [s for s in found if s is not None]
        self.tasks_seen += len(skills)

    @torch.no_grad()
    def _inflora_init(self, model: nn.Module, task, layers: list, name: str) -> None:
        """A_t from the task's inputs outside the memory (``inflora.design_a``); frozen."""
        if not all(layer.linear_input for layer in layers):
            raise sb.ConfigError(
                "init='inflora' supports linear and attention modules (a matrix product on the "
                "input's last dim), not Conv2d"
            )
        covs = self._covariances(model, task, layers)
        for layer in layers:
            a = inflora.design_a(covs[layer.path], self._span(layer), layer.adapter_rank(name))
            for f in layer.adapter_factors(name):  # every site (q, k, v) reads the same inputs
                f.copy_(a=a)
            layer.factor_parameters(name)[0].requires_grad_(False)

    def _sdlora_gates(self, model: nn.Module, name: str) -> None:
        """Read every skill of the sum through its magnitude, a Parameter shared by its layers."""
        device = sb.adapter_layers(model, name)[0].base_weight().device
        self._mags = {
            n: nn.Parameter(torch.tensor(self.magnitudes.get(n, self.magnitude), device=device))
            for n in [*self._past, name]
        }
        for layer in sb.adapter_layers(model):
            for n in (n for n in layer.names() if n in self._mags):
                layer.add_rank_gate(n, Magnitude(self._mags[n], layer.adapter_rank(n)))

    def _drop_magnitudes(self, model: nn.Module, keep: bool) -> None:
        """Take the SD-LoRA gates off, B as trained; with ``keep`` the magnitudes are kept
        (they become the skills' weights in the sum)."""
        if keep:
            self.magnitudes |= {n: float(m.detach()) for n, m in self._mags.items()}
        for n in self._mags:
            remove_gates(model, n, fold=False)
        self._mags = {}

    def _covariances(self, model: nn.Module, task, layers: list) -> dict[str, torch.Tensor]:
        return inflora.input_covariances(
            model,
            layers,
            task.x_train,
            batch_size=self.train.batch_size,
            batches=self.cov_batches,
            seed=self.train.seed,
        )

    def _span(self, layer) -> torch.Tensor | None:
        """What A_t must avoid: the memory of past inputs and the past skills' A rows, so that
        consecutive skills read orthogonal input subspaces by construction."""
        parts = [self.memory[layer.path]] if layer.path in self.memory else []
        parts += [a.T for a in self._old_a.get(layer.path, [])]
        return inflora.union(parts) if parts else None

    def param_groups(self, model: nn.Module, cfg) -> list[dict]:
        """InfLoRA trains B alone, at ``lr``: LoRA+'s faster B balances a B against a training
        A, and with A frozen it only made B 16x faster, which (measured on split MNIST-5k)
        let B amplify old tasks' small residual inputs outside the memory and forget."""
        if self.init == "sdlora":  # magnitudes at the factors' rate, as SD-LoRA trains them
            return gated_groups(model, cfg.lr, cfg.b_ratio, cfg.weight_decay, gate_lr=cfg.lr)
        if self.init != "inflora":
            return sb.param_groups(
                model, cfg.lr, b_ratio=cfg.b_ratio, weight_decay=cfg.weight_decay
            )
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]

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
        self._saved_head = {}
        self._drop_magnitudes(model, keep=False)

    def finish(self, model: nn.Module, task, name: str) -> sb.Skill:
        if self.init == "sdlora":  # skills stay as trained; magnitudes weigh them in the sum
            self._drop_magnitudes(model, keep=True)
        # direct inference from here on, and the head's features (alignment) come from the sum
        self._activate_sum(model, name)
        head = classifier.linear_head(model, self.head) if self._saved_head else None
        if self.heads and head is not None:
            classifier.restore_rows(head, self._saved_head, task.classes)
        extras = {}
        if self.init == "inflora":  # DualGPM update from the inputs the trained model sees
            layers = sb.adapter_layers(model, name)
            covs = self._covariances(model, task, layers)
            eps = inflora.threshold(self.tasks_seen, self.n_tasks, self.energy, self.energy_end)
            for layer in layers:
                self.memory[layer.path] = inflora.extend(covs[layer.path], self._span(layer), eps)
            extras |= inflora.memory_extras(self.memory)
        aligned = stats = None
        if self.align and head is not None:
            feats = features(model, task.x_train, head=self.head, batch_size=256)
            stats = stats_from_features(feats, task.y_train)
            self.class_stats.append(stats)
            aligned = classifier.align(
                head,
                self.class_stats,
                samples=self.align_samples,
                epochs=self.align_epochs,
                lr=self.align_lr,
                seed=self.train.seed,
            )[-1]
        self._saved_head = {}
        self.tasks_seen += 1
        skill = super().finish(model, task, name)
        skill.extras.update(extras)
        if stats is not None:  # kept by the bank with the version, beside the routing set
            skill.stats[HEAD] = stats
        past = [sb.Skill.from_model(model, n) for n in self._past]
        skill.metadata.update(
            overlap=subspace_overlap(skill, past),
            past=list(self._past),
            init=self.init,
            pego=self.pego,
            memory={p: int(m.shape[1]) for p, m in self.memory.items()},
            align_loss=aligned,
        )
        if self.init == "sdlora":
            skill.metadata["magnitudes"] = dict(self.magnitudes)
        return skill

    def _activate_sum(self, model: nn.Module, name: str) -> None:
        """Direct inference: every skill, summed (SD-LoRA: weighted by its magnitude)."""
        names = [*self._past, name]
        weights = [self.magnitudes.get(n, 1.0) for n in names] if self.init == "sdlora" else None
        sb.set_active(model, names, weights)
