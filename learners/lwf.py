"""Learning without Forgetting (Li & Hoiem, ECCV 2016; TPAMI 2018).

After each task the model is copied; while later tasks train, the current
model's logits on the classes seen so far are pulled towards the copy's on the
same batch: ``alpha * KL(softmax(old / T) || softmax(new / T))`` over those
classes (batch mean). ``alpha=1`` and ``T=2`` are Avalanche's ``LwFPlugin``
defaults, and its exact form (no ``T^2`` factor).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import skillbank as sb

from .references import Reference


def distillation(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(target / T) || softmax(logits / T))``, batch mean; ``target`` is the teacher."""
    return F.kl_div(
        F.log_softmax(logits / temperature, dim=1),
        F.softmax(target / temperature, dim=1),
        reduction="batchmean",
    )


@dataclass
class LwF(Reference):
    """Distillation from the model as it was after the previous task, on the classes seen so far."""

    name: ClassVar[str] = "lwf"

    alpha: float = 1.0
    temperature: float = 2.0
    old_model: nn.Module | None = field(default=None, init=False, repr=False)
    old_classes: tuple[int, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0 or self.temperature <= 0:
            raise sb.ConfigError(
                f"alpha must be >= 0 and temperature > 0, got {self.alpha}, {self.temperature}"
            )

    @torch.no_grad()
    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        """The previous model's logits on the old classes: what the current model is pulled to."""
        return self.old_model(x).float()[:, list(self.old_classes)]

    def loss_terms(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor | None:
        if self.old_model is None:
            return None
        old = list(self.old_classes)
        return self.alpha * distillation(logits[:, old], self.teacher(x), self.temperature)

    def finish(self, model: nn.Module, task, name: str) -> sb.Skill:
        skill = super().finish(model, task, name)
        self.old_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.old_classes = tuple(sorted({*self.old_classes, *task.y_train.unique().tolist()}))
        return skill
