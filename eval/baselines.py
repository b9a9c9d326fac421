"""The runner's reference points beside the real learners.

- ``finetune``: one adapter and one head trained on task after task, used as
  is (no routing): the catastrophic-forgetting reference.
- ``joint``: one adapter and head trained once on all tasks together: the
  upper bound; every row of its accuracy matrix is that model.
- ``frozen``: the pretrained source model, untrained: every row is row 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import skillbank as sb
from eval.data import Task
from learners import Learner


@dataclass
class Finetune(Learner):
    name: ClassVar[str] = "finetune"
    inference: ClassVar[str] = "direct"
    restores_head: ClassVar[bool] = False
    schedule: ClassVar[str] = "sequential"
    mask_logits: bool = False

    def adapter_name(self, task) -> str:
        return "finetune"

    def prepare(self, model, task, bank, name) -> None:
        if name not in sb.adapter_names(model):
            super().prepare(model, task, bank, name)
        sb.set_active(model, [name])


@dataclass
class Joint(Finetune):
    name: ClassVar[str] = "joint"
    schedule: ClassVar[str] = "joint"

    def adapter_name(self, task) -> str:
        return "joint"


@dataclass
class Frozen(Finetune):
    name: ClassVar[str] = "frozen"
    schedule: ClassVar[str] = "none"


BASELINES: dict[str, type[Learner]] = {"finetune": Finetune, "joint": Joint, "frozen": Frozen}


def union(tasks: list[Task], name: str = "all-tasks") -> Task:
    """All tasks' data as one task (for ``joint``)."""
    cat = torch.cat
    return Task(
        name,
        cat([t.x_train for t in tasks]),
        cat([t.y_train for t in tasks]),
        cat([t.x_test for t in tasks]),
        cat([t.y_test for t in tasks]),
        tuple(sorted({c for t in tasks for c in t.classes})),
    )
