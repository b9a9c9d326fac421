"""What the field's continual-learning references (EWC, LwF, replay, SimpleCIL) share.

They are ``direct`` learners: one model, trained task after task and scored as it
stands (no routing, no task id). As in their papers and in Avalanche, they
fine-tune the whole backbone and the head by default (``tune="full"``);
``tune="lora"`` trains one LoRA adapter (named after the learner) and the head
instead, the way our ``finetune`` baseline does. A full-tuning skill has no
low-rank factors: it carries every weight of the model (its ``head`` holds the
whole state dict), i.e. the model after that task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

import skillbank as sb

from .base import Learner

TUNES = ("full", "lora")


def weights_skill(
    model: nn.Module, name: str, keys: list[str] | None = None, metadata: dict | None = None
) -> sb.Skill:
    """A skill of plain weights (``keys`` of the state dict, default all), no factors.

    The fingerprint covers every module with a weight, so the skill refuses a
    model of another shape.
    """
    state = model.state_dict()
    keys = list(state) if keys is None else keys
    paths = [
        p
        for p, m in model.named_modules()
        if p and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
    return sb.Skill(
        name,
        {},
        {},
        {"tune": "full", "weights": len(keys)},
        sb.fingerprint(model, paths),
        {k: state[k].detach().to("cpu", copy=True).contiguous() for k in keys},
        {},
        dict(metadata or {}),
    )


@dataclass
class Reference(Learner):
    """A direct learner over the whole model (or one LoRA adapter, ``tune="lora"``)."""

    inference: ClassVar[str] = "direct"
    restores_head: ClassVar[bool] = False
    schedule: ClassVar[str] = "sequential"
    resumable: ClassVar[bool] = False  # EWC's Fisher, LwF's old model, the buffer live here
    mask_logits: bool = False  # class-IL: cross-entropy over the whole head, as Avalanche does
    tune: str = "full"

    def __post_init__(self) -> None:
        if self.tune not in TUNES:
            raise sb.ConfigError(f"tune must be one of {TUNES}, got {self.tune!r}")

    def adapter_name(self, task) -> str:
        return self.name

    def prepare(self, model: nn.Module, task, bank, name: str) -> None:
        if self.tune == "full":
            model.requires_grad_(True)
            return
        if name not in sb.adapter_names(model):
            super().prepare(model, task, bank, name)
        sb.set_active(model, [name])

    @staticmethod
    def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the loop trains, by name (what EWC anchors, what replay updates)."""
        return {k: p for k, p in model.named_parameters() if p.requires_grad}

    def metadata(self, task) -> dict:
        return {"learner": self.name, "task": task.name, "classes": list(task.classes)}

    def finish(self, model: nn.Module, task, name: str) -> sb.Skill:
        if self.tune == "lora":
            return super().finish(model, task, name)
        return weights_skill(model, name, metadata={**self.metadata(task), "tune": "full"})


@dataclass
class Naive(Reference):
    """Fine-tuning task after task with nothing against forgetting: the field's lower bound
    (Avalanche's ``Naive``); our ``finetune`` baseline is its one-LoRA-adapter form."""

    name: ClassVar[str] = "naive"
