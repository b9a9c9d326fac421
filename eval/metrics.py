"""Continual-learning metrics as pure functions of the accuracy matrix.

``R`` is a (T+1) x T array: ``R[i, j]`` is the accuracy on task j after training
tasks 0..i-1, i.e. row 0 is measured before any training (``b_j = R[0, j]``) and
row i (1 <= i <= T) after training the i-th task. In the formulas below tasks
are numbered 1..T as in the papers, so "R[i][j]" means ``R[i, j - 1]`` in code.
Accuracies are fractions in [0, 1]. Metrics that average over an empty set
(BWT, FWT and forgetting with T = 1) are NaN: undefined, not zero.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _check(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[1] < 1 or R.shape[0] != R.shape[1] + 1:
        raise ValueError(
            f"R must be a (T+1) x T matrix with row 0 measured before training, got shape {R.shape}"
        )
    return R


def acc(R: np.ndarray) -> float:
    """Final average accuracy: ACC = 1/T sum_{j=1..T} R[T][j]."""
    R = _check(R)
    return float(R[-1].mean())


def avg_incremental_acc(R: np.ndarray) -> float:
    """Average incremental accuracy: 1/T sum_{i=1..T} ( 1/i sum_{j<=i} R[i][j] ).

    The mean, over the stream, of the accuracy on the tasks seen so far.
    """
    R = _check(R)
    T = R.shape[1]
    return float(np.mean([R[i, :i].mean() for i in range(1, T + 1)]))


def bwt(R: np.ndarray) -> float:
    """Backward transfer (GEM): BWT = 1/(T-1) sum_{j=1..T-1} (R[T][j] - R[j][j]).

    Negative = forgetting; 0 = perfect retention; NaN when T = 1.
    """
    R = _check(R)
    T = R.shape[1]
    if T < 2:
        return math.nan
    return float(np.mean([R[T, j - 1] - R[j, j - 1] for j in range(1, T)]))


def fwt(R: np.ndarray) -> float:
    """Forward transfer (GEM): FWT = 1/(T-1) sum_{j=2..T} (R[j-1][j] - b_j), b_j = R[0][j].

    How much training on earlier tasks helps a task before it is trained on,
    relative to the untrained model. NaN when T = 1.
    """
    R = _check(R)
    T = R.shape[1]
    if T < 2:
        return math.nan
    return float(np.mean([R[j - 1, j - 1] - R[0, j - 1] for j in range(2, T + 1)]))


def forgetting(R: np.ndarray, variant: str = "chaudhry") -> float:
    """Average forgetting of the tasks before the last.

    - ``"chaudhry"`` (Chaudhry et al. 2018, the default):
      f_j = max_{l=1..T-1} R[l][j] - R[T][j], F = 1/(T-1) sum_{j=1..T-1} f_j.
      The max runs over every row after some training (l >= 1), including rows
      before task j was trained, as in the paper; row 0 (b_j) is excluded.
    - ``"avalanche"`` (Avalanche's ``forgetting``): f_j = R[j][j] - R[T][j], the drop
      from just after training task j; then F = -BWT.

    NaN when T = 1.
    """
    R = _check(R)
    T = R.shape[1]
    if T < 2:
        return math.nan
    if variant == "chaudhry":
        f = [R[1:T, j - 1].max() - R[T, j - 1] for j in range(1, T)]
    elif variant == "avalanche":
        f = [R[j, j - 1] - R[T, j - 1] for j in range(1, T)]
    else:
        raise ValueError(f"variant must be 'chaudhry' or 'avalanche', got {variant!r}")
    return float(np.mean(f))


def summary(R: np.ndarray) -> dict[str, float]:
    """{"acc", "avg_acc", "forgetting" (Chaudhry), "bwt", "fwt"} of one accuracy matrix."""
    return {
        "acc": acc(R),
        "avg_acc": avg_incremental_acc(R),
        "forgetting": forgetting(R),
        "bwt": bwt(R),
        "fwt": fwt(R),
    }


# --------------------------------------------------------------------------- per-batch helpers


def class_mask(
    classes: tuple[int, ...] | list[int], n_classes: int, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean (n_classes,) mask that is True on a task's classes (task-IL evaluation)."""
    m = torch.zeros(n_classes, dtype=torch.bool, device=device)
    m[list(classes)] = True
    return m


def accuracy(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of rows whose arg-max logit equals y.

    ``mask`` (bool, (C,) or (N, C)) restricts the arg-max to the True classes:
    pass the task's `class_mask` for task-IL accuracy, None for class-IL.
    """
    return correct(logits, y, mask) / max(1, len(y))


def correct(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """Number of correct predictions (sums across batches without rounding error)."""
    if logits.ndim != 2 or y.ndim != 1 or len(logits) != len(y):
        raise ValueError(
            f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(y.shape)}"
        )
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device, torch.bool), float("-inf"))
    return int((logits.argmax(dim=1) == y.to(logits.device)).sum())


def class_and_task_correct(
    logits: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...] | list[int]
) -> tuple[int, int]:
    """(class-IL correct, task-IL correct) from one forward pass over a task's batch."""
    mask = class_mask(classes, logits.shape[1], logits.device)
    return correct(logits, y), correct(logits, y, mask)
