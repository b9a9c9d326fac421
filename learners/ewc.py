"""Online EWC (Kirkpatrick et al., PNAS 2017; online form: Schwarz et al., ICML 2018).

After each task the diagonal Fisher of the trained weights is estimated on the
task's training data (mean over mini-batches of the squared gradient of the batch
loss, as Avalanche's ``EWCPlugin`` does) and folded into one running Fisher,
``F <- decay * F + F_task``; the weights become the new anchor ``w*``. While
later tasks train, ``lambda / 2 * sum F (w - w*)^2`` is added to the loss.
Defaults follow Avalanche's online-EWC example (``ewc_lambda=0.4``,
``decay_factor=0.1``): Avalanche adds ``ewc_lambda * sum F (w - w*)^2``, which is
our penalty at ``ewc_lambda = 2 * 0.4``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import skillbank as sb

from .base import resolve_device
from .references import Reference


def fisher_diagonal(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Mean over mini-batches (in order) of the squared gradient of the batch cross-entropy,
    in eval mode (as Avalanche computes it)."""
    device = next(model.parameters()).device
    fisher = {k: torch.zeros_like(p) for k, p in params.items()}
    batches = 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            model.zero_grad(set_to_none=True)
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            F.cross_entropy(model(xb).float(), yb).backward()
            for k, p in params.items():
                if p.grad is not None:
                    fisher[k] += p.grad.detach() ** 2
            batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {k: f / max(1, batches) for k, f in fisher.items()}


@dataclass
class EWC(Reference):
    """Online EWC over the trained weights (the whole model by default; see ``Reference``)."""

    name: ClassVar[str] = "ewc"

    ewc_lambda: float = 0.8
    decay: float = 0.1
    fisher: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)
    anchor: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ewc_lambda < 0 or not 0.0 <= self.decay <= 1.0:
            raise sb.ConfigError(
                f"ewc_lambda must be >= 0 and decay in [0, 1], got {self.ewc_lambda}, {self.decay}"
            )

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """``lambda / 2 * sum F (w - w*)^2`` over the anchored weights; None before the first task."""
        if self.fisher is None:
            return None
        params = self.trainable(model)
        total = sum(
            (self.fisher[k] * (params[k] - self.anchor[k]) ** 2).sum()
            for k in self.anchor
            if k in params
        )
        return 0.5 * self.ewc_lambda * total

    def finish(self, model: nn.Module, task, name: str) -> sb.Skill:
        params = self.trainable(model)
        device = resolve_device(self.train.device)
        fresh = fisher_diagonal(
            model.to(device), params, task.x_train, task.y_train, self.train.batch_size
        )
        old = self.fisher or {}
        self.fisher = {k: self.decay * old[k] + f if k in old else f for k, f in fresh.items()}
        self.anchor = {k: p.detach().clone() for k, p in params.items()}
        model.eval()
        return super().finish(model, task, name)
