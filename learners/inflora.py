"""InfLoRA's subspace memory (Liang & Li, CVPR 2024), as functions of covariances and bases.

Per adapted layer, ``M`` (d_in x k, orthonormal columns) spans the inputs of the
tasks learned so far. A new task's A is the top-r principal directions of its
inputs with M projected out, so B A x is ~0 for old inputs x (they lie in M)
and training B cannot disturb old tasks. After the task, M grows by the new
inputs' principal directions outside M until a share ``energy`` of the task's
input energy is covered (DualGPM's rule, as InfLoRA's official code does it).
The memory travels with the skills (``Skill.extras``) so that a later run
continues it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import skillbank as sb
from skillbank import BaseMismatch

MEMORY = "inflora.memory:"  # Skill.extras key prefix, followed by the layer path


@torch.no_grad()
def input_covariances(
    model: nn.Module, layers: list, x: torch.Tensor, *, batch_size: int, batches: int, seed: int
) -> dict[str, torch.Tensor]:
    """Mean ``x x^T`` of each layer's input (all tokens) over ``batches`` seeded batches of ``x``,
    with the model as it stands (eval mode)."""
    sums: dict[str, list] = {}

    def hook(layer):
        def collect(module, args):
            a = args[0].detach().float().reshape(-1, args[0].shape[-1])
            acc = sums.setdefault(layer.path, [0.0, 0])
            acc[0] = acc[0] + a.T @ a
            acc[1] += len(a)

        return collect

    handles = [layer.register_forward_pre_hook(hook(layer)) for layer in layers]
    was = model.training
    model.eval()
    try:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        device = next(model.parameters()).device
        for i in range(min(batches, -(-len(order) // batch_size))):
            model(x[order[i * batch_size : (i + 1) * batch_size]].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {path: s / n for path, (s, n) in sums.items()}


def complement(m: torch.Tensor | None, d: int, device=None) -> torch.Tensor:
    """Orthonormal basis (d x (d - k)) of the complement of span(M)."""
    if m is None or m.shape[1] == 0:
        return torch.eye(d, device=device)
    q, _ = torch.linalg.qr(m, mode="complete")
    return q[:, m.shape[1] :]


def design_a(cov: torch.Tensor, m: torch.Tensor | None, rank: int) -> torch.Tensor:
    """A (rank x d): the top principal directions of ``cov`` outside span(M), / sqrt(3)
    (InfLoRA's scale). When fewer than ``rank`` directions are left, the rest are zero
    rows: a full memory leaves the new skill no room rather than overlapping old tasks."""
    d = len(cov)
    q = complement(m, d, cov.device)
    vals, vecs = torch.linalg.eigh(q.T @ cov @ q)
    top = (q @ vecs[:, vals.argsort(descending=True)[:rank]]).T
    a = torch.zeros(rank, d, device=cov.device)
    a[: len(top)] = top
    return a / 3**0.5


def extend(cov: torch.Tensor, m: torch.Tensor | None, energy: float) -> torch.Tensor:
    """M with the task's principal directions outside it appended until ``energy`` of the
    task's input energy (trace of ``cov``) lies in the span (DualGPM)."""
    d = len(cov)
    q = complement(m, d, cov.device)
    outside = q.T @ cov @ q
    total = float(torch.trace(cov))
    kept = total - float(torch.trace(outside))
    vals, vecs = torch.linalg.eigh(outside)
    vals, vecs = vals.flip(0).clamp_min(0), (q @ vecs).flip(1)
    target = energy * total
    k = 0 if kept >= target else int((kept + torch.cumsum(vals, 0) < target).sum()) + 1
    new = vecs[:, : min(k, len(vals))]
    return new if m is None else torch.cat([m, new], dim=1)


def threshold(task_index: int, n_tasks: int | None, start: float, end: float) -> float:
    """InfLoRA's schedule eps_t = start + (end - start) t / T; ``start`` when T is unknown."""
    if not n_tasks:
        return start
    return start + (end - start) * min(task_index, n_tasks) / n_tasks


def memory_extras(memory: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The memory as ``Skill.extras`` tensors (empty spans are left out)."""
    return {MEMORY + p: m.detach().cpu().contiguous() for p, m in memory.items() if m.shape[1]}


def memory_from_skills(model: nn.Module, skills: list[sb.Skill]) -> dict[str, torch.Tensor]:
    """The union of the memories ``skills`` carry, as one orthonormal basis per layer of
    ``model``. Refuses (BaseMismatch) a skill trained on another base, or a memory whose
    width is not the layer's input width."""
    layers = {layer.path: layer for layer in sb.adapter_layers(model)}
    parts: dict[str, list[torch.Tensor]] = {}
    for skill in skills:
        held = {k[len(MEMORY) :]: t for k, t in skill.extras.items() if k.startswith(MEMORY)}
        if not held:
            continue
        diff = skill.base_difference(model, strict=False)
        if diff:
            raise BaseMismatch(
                f"skill {skill.name!r} carries an InfLoRA memory of another base model "
                f"(differs at {diff}); it cannot constrain this model"
            )
        for path, m in held.items():
            layer = layers.get(path)
            fan_in = layer.fans(layer.base)[0] if layer is not None else None
            if layer is None or m.dim() != 2 or m.shape[0] != fan_in:
                raise BaseMismatch(
                    f"skill {skill.name!r}: InfLoRA memory for {path!r} is {tuple(m.shape)}, "
                    f"the model's layer takes {fan_in or 'no'} inputs"
                )
            parts.setdefault(path, []).append(m.float())
    return {path: union(ms) for path, ms in parts.items()}


def union(bases: list[torch.Tensor]) -> torch.Tensor:
    """One orthonormal basis of the span of several (memories are nested, so usually the largest)."""
    u, s, _ = torch.linalg.svd(torch.cat([b.float() for b in bases], dim=1), full_matrices=False)
    return u[:, s > 1e-5 * s.max()]
