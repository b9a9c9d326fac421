"""PSEC: a new task from a learned, per-sample mixture of banked skills.

A small compositor network maps a context (pooled features of the input on the
bare base, or the task's example embedding) to weights alpha over K frozen
skills; the adapted model runs ``W0 x + sum_k alpha_k(x) s_k B_k A_k x`` per
sample (``sb.composed``: the skills' factors side by side, rank units scaled
per row) and the heads are mixed with the same alpha. Modes:

- ``compose``: only the compositor trains (few-shot transfer);
- ``expand``: a new LoRA and a residual head train with it; the result is a
  new skill whose lineage names the skills it used.

``space="output"`` is the baseline the paper compares with: the same
compositor weighting the K skills' *outputs* (one mixed-batch forward of K
copies of the batch) instead of their parameters. The compositor is stored in
the skill (``Skill.extras``); ``restore`` rebuilds the composition from a bank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import skillbank as sb
from skillbank.embed import pre_logits

from .base import Learner, TrainConfig, train

MODES = ("compose", "expand")
SPACES = ("parameter", "output")
CONTEXTS = ("features", "task")
WEIGHTINGS = ("linear", "softmax")


class Compositor(nn.Module):
    """context (d) -> alpha (K): a two-layer MLP started at the uniform mixture 1/K.

    ``linear`` (the default here, as in the official code) returns the raw outputs;
    ``softmax`` keeps alpha on the simplex. ``PSEC`` passes ``weighting="softmax"``
    by default: on our few-shot MNIST transfer softmax reached 74% where raw outputs
    reached 36-52% (their scale drifts with few shots)."""

    def __init__(self, dim: int, k: int, hidden: int = 64, weighting: str = "linear") -> None:
        super().__init__()
        self.weighting = weighting
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, k))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, 1.0 / k if weighting == "linear" else 0.0)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        out = self.net(F.normalize(context.float(), dim=-1))
        return out.softmax(-1) if self.weighting == "softmax" else out


class Composition(nn.Module):
    """``model`` with adapters ``names`` (frozen skills) mixed per sample.

    ``heads`` stacks the skills' head weights (K, C, D) and biases (K, C);
    ``task_context`` (D,) replaces per-input features when the context is the
    task. Any active adapter of ``model`` (expand mode's new LoRA) and
    ``residual`` (its head) add on top.
    """

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        heads: tuple[torch.Tensor, torch.Tensor],
        compositor: Compositor,
        *,
        head: str = "head",
        space: str = "parameter",
        task_context: torch.Tensor | None = None,
        residual: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.model, self.names, self.compositor, self.head_name, self.space = (
            model,
            list(names),
            compositor,
            head,
            space,
        )
        self.register_buffer("head_w", heads[0])
        self.register_buffer("head_b", heads[1])
        self.register_buffer("task_context", task_context)
        self.residual = residual

    def alpha(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, K) mixture weights of ``x``."""
        if self.task_context is not None:
            return self.compositor(self.task_context.expand(len(x), -1))
        with torch.no_grad(), sb.disabled(self.model):
            context = pre_logits(self.model, x, self.head_name)
        return self.compositor(context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha(x)
        if self.space == "output":
            return self._output_mixture(x, alpha)
        with sb.composed(self.model, self.names, alpha):
            f = pre_logits(self.model, x, self.head_name)
        logits = torch.einsum("nk,kcd,nd->nc", alpha, self.head_w, f) + alpha @ self.head_b
        return logits + self.residual(f) if self.residual is not None else logits

    def _output_mixture(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        # The K skills' logits from one mixed batch of K copies of x, then mixed by alpha.
        k, n = len(self.names), len(x)
        rows = [name for name in self.names for _ in range(n)]
        with sb.mixed_batch(self.model, rows):
            f = pre_logits(self.model, x.repeat(k, *([1] * (x.dim() - 1))), self.head_name).view(
                k, n, -1
            )
        logits = torch.einsum("kcd,knd->knc", self.head_w, f) + self.head_b[:, None]
        return torch.einsum("nk,knc->nc", alpha, logits)

    @torch.no_grad()
    def mean_alpha(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            return torch.cat([self.alpha(c) for c in x.split(batch_size)]).mean(0).cpu()
        finally:
            self.train(was)


def attach_skills(
    model: nn.Module, bank: sb.SkillBank, refs: list[str], prefix: str, head: str
) -> tuple[list[str], tuple[torch.Tensor, torch.Tensor]]:
    """Attach the skills ``refs`` frozen and inactive as ``<prefix>-k<i>``; their adapter
    names and stacked heads. Nothing stays active, so only a composition uses them."""
    skills = [bank.get(r) for r in refs]
    names = [f"{prefix}-k{i}" for i in range(len(refs))]
    for n, s in zip(names, skills, strict=True):
        sb.attach(model, s, n, load_head=False, activate=False)
    sb.set_active(model, [])
    return names, stack_heads(skills, model, head)


def stack_heads(
    skills: list[sb.Skill], model: nn.Module, head: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head weights (K, C, D) and biases (K, C) of ``skills``; the model's own head stands
    in for a skill stored without one."""
    own = model.get_submodule(head)
    w = [s.head.get(f"{head}.weight", own.weight.detach().cpu()) for s in skills]
    b = [s.head.get(f"{head}.bias", own.bias.detach().cpu()) for s in skills]
    shapes = {tuple(t.shape) for t in w}
    if len(shapes) > 1:
        raise sb.ConfigError(
            f"the skills' heads differ in shape ({sorted(shapes)}); PSEC mixes heads of one shape"
        )
    dev = own.weight.device
    return torch.stack(w).float().to(dev), torch.stack(b).float().to(dev)


@dataclass
class PSEC(Learner):
    """Few-shot transfer by composing banked skills (see the module docstring).

    ``skills`` names the bank refs to compose; when None the ``k`` skills whose
    example embeddings are nearest to the task's data are retrieved (filtered
    by ``where``). The returned skill holds, in ``compose`` mode, the exact
    (``cat``) merge of the skills at the task's mean alpha, usable alone with
    ``sb.attach``; in ``expand`` mode the new LoRA. Either way the compositor,
    the skills used (``metadata["psec"]``, ``metadata["parents"]``) and the
    task context travel with it, so ``restore`` rebuilds the per-sample model.
    """

    name: ClassVar[str] = "psec"
    inference: ClassVar[str] = "direct"

    mode: str = "compose"
    space: str = "parameter"
    context: str = "features"
    weighting: str = "softmax"
    skills: tuple[str, ...] | None = None
    k: int = 4
    where: dict | None = None
    hidden: int = 64
    compositor_lr: float = 1e-2
    # The new LoRA learns from a handful of images: a small rate, no LoRA+ ratio
    # (at 3e-3 with ratio 16 it overfitted and cost 30 points against compose).
    expand_lr: float = 1e-3
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=1, steps=200, batch_size=64, lr=3e-3)
    )

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.mode, MODES, "mode"),
            (self.space, SPACES, "space"),
            (self.context, CONTEXTS, "context"),
            (self.weighting, WEIGHTINGS, "weighting"),
        ):
            if value not in allowed:
                raise sb.ConfigError(f"PSEC {what} must be one of {allowed}, got {value!r}")
        if self.mode == "expand" and self.space == "output":
            raise sb.ConfigError(
                "expand trains a LoRA inside the model: it needs space='parameter'"
            )
        if self.k < 1:
            raise sb.ConfigError(f"k must be positive, got {self.k}")
        if self.skills is not None:
            self.skills = tuple(self.skills)

    # ------------------------------------------------------------------ fit
    def fit(self, model: nn.Module, task, bank: sb.SkillBank | None = None) -> sb.Skill:
        if bank is None:
            raise sb.ConfigError("PSEC composes skills from a bank: pass bank=")
        name = self.adapter_name(task)
        refs = self.choose(model, task, bank)
        before = set(sb.adapter_names(model))
        active = sb.active_adapters(model)
        try:
            comp = self.build(model, task, bank, refs, name)
            desc = f"psec-{self.mode}:{task.name}"
            groups = [{"params": list(comp.compositor.parameters()), "lr": self.compositor_lr}]

            def fit() -> None:
                train(
                    comp,
                    task.x_train,
                    task.y_train,
                    self.train,
                    desc=desc,
                    groups=lambda m, c: groups,
                )

            fit()
            # then the new LoRA joins, from a compositor that already works
            if self.mode == "expand":
                self.expand(model, comp, name)
                groups += sb.param_groups(model, self.expand_lr, b_ratio=1.0)
                groups.append({"params": list(comp.residual.parameters()), "lr": self.expand_lr})
                fit()
            return self._skill(model, task, comp, refs, name)
        finally:
            for added in set(sb.adapter_names(model)) - before:
                sb.remove_adapter(model, added)
            kept = [(n, w) for n, w in active if n in sb.adapter_names(model)]
            sb.set_active(model, [n for n, _ in kept], weights=[w for _, w in kept])

    def choose(self, model: nn.Module, task, bank: sb.SkillBank) -> list[str]:
        """The refs to compose: ``skills`` as given (resolved to exact versions), or the
        ``k`` nearest to the task's examples."""
        if self.skills:
            return [str(bank.record(r).ref) for r in self.skills]
        with sb.disabled(model):
            emb = sb.example_embedding(model, task.x_train)
        hits = bank.retrieve(emb[:1], k=self.k, where=self.where)[0]
        if not hits:
            raise sb.ConfigError("the bank has no skill with an example embedding to compose")
        return [str(h.ref) for h in hits]

    def build(
        self, model: nn.Module, task, bank: sb.SkillBank, refs: list[str], name: str
    ) -> Composition:
        """Attach the skills (frozen, inactive) and a fresh compositor over them."""
        names, heads = attach_skills(model, bank, refs, name, self.head)
        for p in model.parameters():
            p.requires_grad_(False)
        d = heads[0].shape[-1]
        context = None
        if self.context == "task":
            with sb.disabled(model):
                context = torch.as_tensor(sb.example_embedding(model, task.x_train)[0]).to(
                    heads[0].device
                )
        comp = Composition(
            model,
            names,
            heads,
            Compositor(d, len(refs), self.hidden, self.weighting),
            head=self.head,
            space=self.space,
            task_context=context,
        )
        return comp.to(heads[0].device)

    def expand(self, model: nn.Module, comp: Composition, name: str) -> None:
        """Add the new LoRA (trainable, active) and a zero residual head to ``comp``."""
        sb.add_adapter(
            model,
            name,
            sb.LoRAConfig(
                rank=self.rank, alpha=self.alpha or 2.0 * self.rank, targets=tuple(self.targets)
            ),
        )
        d, c = comp.head_w.shape[-1], comp.head_w.shape[1]
        comp.residual = nn.Linear(d, c).to(comp.head_w.device)
        nn.init.zeros_(comp.residual.weight)
        nn.init.zeros_(comp.residual.bias)

    def _skill(
        self, model: nn.Module, task, comp: Composition, refs: list[str], name: str
    ) -> sb.Skill:
        alpha = comp.mean_alpha(task.x_train)
        if self.mode == "expand":
            skill = sb.Skill.from_model(model, name)
            skill.head = {
                f"{self.head}.{k}": v.detach().cpu().clone()
                for k, v in comp.residual.state_dict().items()
            }
        else:  # the exact merge of the skills at the task's mean weights: usable without the compositor
            parts = [sb.Skill.from_model(model, n) for n in comp.names]
            skill = sb.compose(parts, alpha.tolist(), method="cat")
            skill.name = name
            skill.head = {
                f"{self.head}.weight": torch.einsum("k,kcd->cd", alpha, comp.head_w.cpu()),
                f"{self.head}.bias": alpha @ comp.head_b.cpu(),
            }
        skill.extras = {
            f"compositor.{k}": v.detach().cpu().clone()
            for k, v in comp.compositor.state_dict().items()
        }
        if comp.task_context is not None:
            skill.extras["context"] = comp.task_context.detach().cpu().clone()
        skill.metadata.update(
            {
                "learner": self.name,
                "task": task.name,
                "classes": list(task.classes),
                "parents": refs,
                "psec": {
                    "mode": self.mode,
                    "space": self.space,
                    "context": self.context,
                    "weighting": self.weighting,
                    "hidden": self.hidden,
                    "skills": refs,
                    "mean_alpha": [round(float(a), 4) for a in alpha],
                },
            }
        )
        return skill


def restore(
    model: nn.Module, skill: sb.Skill, bank: sb.SkillBank, head: str = "head"
) -> Composition:
    """The per-sample composition a PSEC skill was trained as, rebuilt on ``model`` from
    ``bank`` (the skills it names are attached frozen, under the skill's name)."""
    meta = skill.metadata.get("psec")
    if not isinstance(meta, dict):
        raise sb.ConfigError(f"skill {skill.name!r} was not made by PSEC (no 'psec' metadata)")
    refs = list(meta["skills"])
    names, heads = attach_skills(model, bank, refs, skill.name, head)
    d, c = heads[0].shape[-1], heads[0].shape[1]
    comp_state = {
        k[len("compositor.") :]: v for k, v in skill.extras.items() if k.startswith("compositor.")
    }
    compositor = Compositor(d, len(refs), int(meta["hidden"]), meta["weighting"])
    compositor.load_state_dict(comp_state)
    residual = None
    if meta["mode"] == "expand":
        sb.attach(model, skill, skill.name, load_head=False)
        residual = nn.Linear(d, c)
        residual.load_state_dict(
            {"weight": skill.head[f"{head}.weight"], "bias": skill.head[f"{head}.bias"]}
        )
    comp = Composition(
        model,
        names,
        heads,
        compositor,
        head=head,
        space=meta["space"],
        task_context=skill.extras.get("context"),
        residual=residual,
    )
    return comp.to(heads[0].device).eval()
