"""Penalties that learners add to the loss, as pure functions of factors.

A (r x fan_in) and B (fan_out x r) are one site's factors in the saved form.
"""

from __future__ import annotations

import torch


def orthogonality(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||A A^T - I||_F + ||B^T B - I||_F (AdaLoRA, IncreLoRA): keeps the rank-one
    triplets independent so that masking one removes only its own direction."""
    eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
    return torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)


def olora(a_old: torch.Tensor, a_new: torch.Tensor) -> torch.Tensor:
    """O-LoRA: sum |A_old A_new^T| (entry-wise L1), zero when the new input
    subspace is orthogonal to the past ones."""
    return (a_old @ a_new.T).abs().sum()


def pego(w0: torch.Tensor, delta_new: torch.Tensor, deltas_old: list[torch.Tensor]) -> torch.Tensor:
    """PEGO's terms that involve the new update: |W0 dW^T|_1 + sum_old |dW_old dW^T|_1."""
    loss = (w0 @ delta_new.T).abs().sum()
    for d in deltas_old:
        loss = loss + (d @ delta_new.T).abs().sum()
    return loss


def overlap(a_old: torch.Tensor, a_new: torch.Tensor) -> float:
    """||A_old A_new^T||_F / (||A_old||_F ||A_new||_F): 0 for orthogonal input subspaces,
    1 when both are the same single direction."""
    denom = torch.linalg.matrix_norm(a_old) * torch.linalg.matrix_norm(a_new)
    if float(denom) == 0.0:
        return 0.0
    return float(torch.linalg.matrix_norm(a_old @ a_new.T) / denom)
