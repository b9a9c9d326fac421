"""Heads that keep old tasks: per-task slices and classifier alignment.

A linear head's rows are per-class slices. A task trains only its own classes'
rows (its loss sees only its own logits, ``mask_logits``) and every other row is
put back bit for bit after training, so a later task never moves an old task's
slice; at inference all rows together are the concatenation of the tasks' heads
(InfLoRA's ``classifier_pool``). What this cannot fix is calibration between
slices trained at different times: the newest rows fire too strongly.
Classifier alignment (SLCA, InfLoRA+CA) retrains the rows of every seen class
for a few epochs on features sampled from class Gaussians (each class's mean,
its task's pooled within-class covariance), kept as ``RouteStats`` sums of the
features the head reads (a skill's ``"head"`` statistics).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import skillbank as sb
from skillbank.route_stats import RouteStats

from .base import class_mask


def linear_head(model: nn.Module, path: str | None, needs: str = "head slices need") -> nn.Linear:
    """The model's classifier at ``path``; anything but an ``nn.Linear`` is a ConfigError
    that starts with ``needs`` (who needs it)."""
    head = model.get_submodule(path) if path else None
    if not isinstance(head, nn.Linear):
        raise sb.ConfigError(
            f"{needs} a linear head; the model's {path!r} is {type(head).__name__}"
        )
    return head


def snapshot(head: nn.Linear) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


@torch.no_grad()
def restore_rows(head: nn.Linear, saved: dict[str, torch.Tensor], classes) -> None:
    """Every row of ``head`` outside ``classes`` back to ``saved`` (bit-identical)."""
    keep = torch.ones(head.out_features, dtype=torch.bool)
    keep[list(classes)] = False
    for k, t in head.state_dict().items():
        t[keep.to(t.device)] = saved[k][keep.to(saved[k].device)].to(t)


def gaussians(stats: list[RouteStats], jitter: float = 1e-4):
    """(class, mean (d,), Cholesky factor (d, d)) per class of each task's statistics."""
    out = []
    for s in stats:
        cov = s.within_scatter() / max(s.n - len(s.classes), 1.0)
        cov = cov + jitter * (np.trace(cov) / len(cov) + 1e-8) * np.eye(len(cov))
        chol = torch.linalg.cholesky(torch.from_numpy(cov).float())
        for c, mu in zip(s.classes, s.means(), strict=True):
            out.append((c, torch.from_numpy(mu).float(), chol))
    return out


def align(
    head: nn.Linear,
    stats: list[RouteStats],
    *,
    samples: int = 256,
    epochs: int = 5,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Retrain the rows of every class in ``stats`` on features drawn from their Gaussians
    (cross-entropy over those classes only; other rows untouched). Returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    parts = gaussians(stats)
    x = torch.cat(
        [mu + torch.randn(samples, len(mu), generator=gen) @ chol.T for _, mu, chol in parts]
    )
    y = torch.cat([torch.full((samples,), c) for c, _, _ in parts])
    classes = sorted({c for c, _, _ in parts})
    device = head.weight.device
    mask = class_mask(classes, head.out_features, device)
    saved = snapshot(head)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    losses = []
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(head(x[idx].to(device)) + mask, y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
    # momentum never moves a row without a gradient, but be exact
    restore_rows(head, saved, classes)
    return losses
