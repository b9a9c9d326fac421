"""How a model is scored on a task: directly, or with per-sample routing.

Both give class-IL accuracy (prediction over every class the model knows) and
task-IL accuracy (logits masked to the task's classes) in one pass; routing
also reports how often a sample reached the skill of its own task. Under a
process group each rank scores its shard of the test set (rows ``rank::world``)
and the counts are summed, so every rank gets the single-process score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from eval.data import Task
from eval.metrics import class_and_task_correct, class_mask, correct
from learners import distributed
from skillbank import Router


@dataclass(frozen=True)
class Score:
    class_il: float
    task_il: float
    routing: float | None = None


def _chunks(x: torch.Tensor, y: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def _shard(task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    part = distributed.shard(len(task.y_test))
    return task.x_test[part], task.y_test[part]


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


@torch.no_grad()
def score_direct(model: nn.Module, task: Task, batch_size: int = 512) -> Score:
    """The model as it is (whatever adapters are active)."""
    model.eval()
    device = next(model.parameters()).device
    cil = til = 0
    for xb, yb in _chunks(*_shard(task), batch_size):
        c, t = class_and_task_correct(model(_to(xb, device)).float().cpu(), yb, task.classes)
        cil, til = cil + c, til + t
    cil, til = distributed.all_sum([cil, til])
    n = len(task.y_test)
    return Score(cil / n, til / n)


@torch.no_grad()
def score_routed(
    router: Router, task: Task, skill_of_task: dict[int, str], batch_size: int = 512
) -> Score:
    """Each sample routed to a skill by retrieval (class-IL); the task's own skill for task-IL.

    ``skill_of_task`` maps task ids to bank refs of the skills trained so far; a
    sample is routed correctly when it reaches its own task's skill.
    """
    task_of_skill = {ref: t for t, ref in skill_of_task.items()}
    own = skill_of_task.get(task.task_id)
    device = next(router.model.parameters()).device
    cil = til = hit = 0
    for xb, yb in _chunks(*_shard(task), batch_size):
        xb = _to(xb, device)
        routed = router(xb)
        cil += correct(routed.logits.cpu(), yb)
        hit += sum(task_of_skill.get(r) == task.task_id for r in routed.refs)
        if own is not None:
            logits = router.forward(xb, [own] * len(xb)).cpu()
        else:  # no skill for this task yet: the bare base, masked to the task
            with router.disabled():
                logits = router.model(xb).float().cpu()
        til += correct(logits, yb, class_mask(task.classes, logits.shape[1]))
    cil, til, hit = distributed.all_sum([cil, til, hit])
    n = len(task.y_test)
    return Score(cil / n, til / n, hit / n)
