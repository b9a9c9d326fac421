"""SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained models", IJCV 2024).

No training: the backbone stays frozen and the head becomes a prototype
classifier. For every class of a task, the row of the head is the normalised
mean of the class's pre-logit features (bias 0), so the predicted class is the
one whose mean has the largest cosine with the sample's features: the nearest
class mean under cosine distance. Classes without a prototype yet are switched
off (weight 0, bias ``UNSEEN``), as if the classifier had no row for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import skillbank as sb
from skillbank.embed import features

from .heads import linear_head
from .references import Reference, weights_skill

UNSEEN = -1e4  # the bias of a class without a prototype: below any cosine logit


def class_sums(feats: torch.Tensor, y: torch.Tensor) -> dict[int, tuple[torch.Tensor, int]]:
    """The summed feature vector and the count of each class present in ``y``."""
    return {int(c): (feats[y == c].sum(0), int((y == c).sum())) for c in y.unique()}


@dataclass
class SimpleCIL(Reference):
    """Prototype classifier on the frozen backbone: the head's rows are normalised class means."""

    name: ClassVar[str] = "simplecil"

    started: bool = field(default=False, init=False)
    sums: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict, init=False, repr=False)

    def head_module(self, model: nn.Module) -> nn.Linear:
        return linear_head(model, self.head, needs="simplecil replaces")

    def fit(self, model: nn.Module, task, bank: sb.SkillBank | None = None) -> sb.Skill:
        head = self.head_module(model)
        feats = features(model, task.x_train, head=self.head, batch_size=self.train.batch_size * 4)
        for c, (total, n) in class_sums(feats, task.y_train).items():
            old, m = self.sums.get(c, (0.0, 0))
            self.sums[c] = (total + old, n + m)
        with torch.no_grad():
            if not self.started:  # forget the pretrained classifier: only prototypes predict
                head.weight.zero_()
                if head.bias is not None:
                    head.bias.fill_(UNSEEN)
                self.started = True
            for c in task.y_train.unique().tolist():
                total, n = self.sums[c]
                head.weight[c] = F.normalize(total / n, dim=0).to(head.weight)
                if head.bias is not None:
                    head.bias[c] = 0.0
        keys = [f"{self.head}.{k}" for k in head.state_dict()]
        return weights_skill(model, self.adapter_name(task), keys, self.metadata(task))
