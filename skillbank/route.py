"""Per-sample routing: each input runs with the skill whose data it resembles.

Features of the batch come from the bare base (adapters off), so every
skill's example embedding and every query live in one space; the bank
returns the nearest skill per row; one ``mixed_batch`` forward then runs every
row with its own adapter, and each row's logits come from its skill's head.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters.inject import adapter_names, disabled
from .adapters.mixed import mixed_batch
from .bank import SkillBank
from .embed import EXAMPLES, features
from .skill import Skill, attach


@dataclass(frozen=True)
class Routed:
    """Outputs of a routed batch: logits, the chosen skill per row and its score."""

    logits: torch.Tensor
    refs: list[str]
    scores: list[float]


def adapter_name_for(ref: str) -> str:
    """A valid adapter name for a bank ref (``name@3`` -> ``name-v3``)."""
    return re.sub(r"[^A-Za-z0-9_\-+]", "_", ref.replace("@", "-v"))[:200]


class Router:
    """Routes rows of a batch to skills of ``bank`` (optionally filtered by ``where``).

    Skills are attached to ``model`` (inactive) the first time they are chosen
    and kept. ``head`` names the module whose input is the pre-logit feature
    (timm models need no name). With ``mask_classes`` each row's prediction is
    limited to its skill's ``metadata["classes"]`` (class-incremental routing).
    """

    def __init__(self, model: nn.Module, bank: SkillBank, *, space: str = EXAMPLES,
                 where: Mapping[str, Any] | None = None, head: str = "head", mask_classes: bool = True) -> None:
        self.model, self.bank, self.space, self.where = model, bank, space, where
        self.head, self.mask_classes = head, mask_classes
        self._skills: dict[str, tuple[str, Skill]] = {}

    def register(self, ref: str, adapter: str, skill: Skill) -> None:
        """Tell the router that ``ref`` is already on the model as adapter ``adapter``."""
        self._skills[ref] = (adapter, skill)

    def skill(self, ref: str) -> tuple[str, Skill]:
        """(adapter name, skill) of a ref, attaching it on first use."""
        if ref not in self._skills:
            skill = self.bank.get(ref)
            name = adapter_name_for(ref)
            if name not in adapter_names(self.model):
                attach(self.model, skill, name, load_head=False, activate=False)
            self._skills[ref] = (name, skill)
        return self._skills[ref]

    def disabled(self):
        """The bare base, adapters off (where routing features come from)."""
        return disabled(self.model)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> Routed:
        with self.disabled():
            query = F.normalize(features(self.model, x, head=self.head), dim=1)
        hits = self.bank.retrieve(query.numpy(), k=1, space=self.space, where=self.where)
        refs = [str(h[0].ref) for h in hits]
        return Routed(self.forward(x, refs), refs, [h[0].score for h in hits])

    @torch.no_grad()
    def forward(self, x: torch.Tensor, refs: list[str]) -> torch.Tensor:
        """Logits of ``x`` with row i run by skill ``refs[i]`` (e.g. an oracle's choice)."""
        chosen = sorted(set(refs))
        slot = {r: i for i, r in enumerate(chosen)}
        names = [self.skill(r)[0] for r in refs]
        self.model.eval()
        with mixed_batch(self.model, names):
            pre = features(self.model, x, head=self.head, batch_size=len(x), keep_device=True)
        head = self.model.get_submodule(self.head)
        weights, biases, masks = [], [], []  # per-row heads, gathered like the adapters
        for r in chosen:
            skill = self.skill(r)[1]
            weights.append(skill.head.get(f"{self.head}.weight", head.weight.detach().cpu()))
            biases.append(skill.head.get(f"{self.head}.bias", head.bias.detach().cpu()))
            mask = torch.zeros(weights[-1].shape[0])
            classes = skill.metadata.get("classes")
            if self.mask_classes and classes:
                mask.fill_(float("-inf"))
                mask[list(classes)] = 0.0
            masks.append(mask)
        idx = torch.tensor([slot[r] for r in refs])
        w, b, m = (torch.stack(t)[idx].to(pre.device, pre.dtype) for t in (weights, biases, masks))
        return torch.bmm(w, pre.unsqueeze(2)).squeeze(2) + b + m


def route(model: nn.Module, bank: SkillBank, x: torch.Tensor, **kwargs: Any) -> Routed:
    """Route every row of ``x`` to its nearest skill and run them in one mixed batch."""
    return Router(model, bank, **kwargs)(x)
