"""Experience replay with a reservoir buffer (Chaudhry et al. 2019, "On tiny episodic memories").

The buffer is a uniform sample of every training example seen so far: each
example gets an independent uniform random key when it arrives and the buffer
keeps the ``size`` largest keys (Avalanche's ``ReservoirSamplingBuffer``). It is
updated after each task, so a task trains with samples of the earlier ones only;
every batch of the current task then gets up to ``batch_size`` buffer samples
appended (drawn without replacement), as Avalanche's ``ReplayPlugin`` does with
its default ``batch_size_mem`` (the training batch size). 200 samples by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

import skillbank as sb

from .references import Reference


@dataclass
class ReservoirBuffer:
    """At most ``size`` examples, a uniform sample of all examples ever offered to ``add``."""

    size: int = 200
    seed: int = 0
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    keys: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    _gen: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise sb.ConfigError(f"the replay buffer needs a positive size, got {self.size}")
        self._gen = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer examples; each is kept with the same chance as every earlier one."""
        keys = torch.rand(len(x), generator=self._gen)
        if self.x is not None:
            x, y, keys = (
                torch.cat([self.x, x.cpu()]),
                torch.cat([self.y, y.cpu()]),
                torch.cat([self.keys, keys]),
            )
        top = keys.argsort(descending=True)[: self.size]
        self.x, self.y, self.keys = x[top].cpu(), y[top].cpu(), keys[top]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``min(n, len(self))`` distinct stored examples, drawn uniformly."""
        idx = torch.randperm(len(self), generator=self._gen)[:n]
        return self.x[idx], self.y[idx]


@dataclass
class Replay(Reference):
    """Each batch trains on the current task's samples plus as many stored ones."""

    name: ClassVar[str] = "replay"

    memory: int = 200
    buffer: ReservoirBuffer | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.buffer = ReservoirBuffer(self.memory, seed=self.train.seed)

    def batch_hook(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(self.buffer):
            return x, y
        bx, by = self.buffer.sample(len(y) or self.train.batch_size)
        return torch.cat([x, bx.to(x.device)]), torch.cat([y, by.to(y.device)])

    def finish(self, model: nn.Module, task, name: str) -> sb.Skill:
        skill = super().finish(model, task, name)
        self.buffer.add(task.x_train, task.y_train)
        return skill
