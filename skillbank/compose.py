"""Merging skills in parameter space, without a network.

Each method is a pure function ``(skills, weights, rank) -> Skill`` in the
``COMPOSE`` table. All of them return one skill at weight 1.0 unchanged (the
delta is reproduced up to float rounding), which PEFT's merging gets wrong for
rsLoRA. Work is done per site on the factors, scale folded in, so no method
forms a d_out x d_in matrix except TIES (whose trimming is defined on entries).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from .errors import BaseMismatch, ConfigError
from .fingerprint import Fingerprint
from .skill import Skill

Factor = tuple[torch.Tensor, torch.Tensor]


def _scaled(skill: Skill, site: str, w: float) -> Factor:
    """(A, B) with ``w * scale`` folded into B, in float32."""
    a, b = skill.factors[site]
    return a.float(), b.float() * (w * skill.scales[site])


def linear(parts: list[tuple[Skill, float]], site: str, rank: int | None) -> Factor:
    """Weighted sum of the factors themselves: A = sum sqrt|w s| A_i, B = sum sign(w) sqrt|w s| B_i.

    Cheap and rank-preserving, but cross terms B_i A_j make it an approximation of
    the sum of deltas unless the skills share A; needs equal ranks per site.

    Args:
        parts: (skill, weight) of every skill that adapts ``site``.
        site: The site key (``blocks.0.attn.qkv``, ``attn[q]``).
        rank: Ignored (the rank is the skills' own).
    """
    ranks = {s.factors[site][0].shape[0] for s, _ in parts}
    if len(ranks) > 1:
        raise ConfigError(
            f"linear composition needs equal ranks at {site!r}, got {sorted(ranks)}; use 'cat' or 'svd'"
        )
    a_sum = b_sum = 0
    for skill, w in parts:
        a, b = skill.factors[site]
        c = w * skill.scales[site]
        root = math.sqrt(abs(c))
        a_sum = a_sum + root * a.float()
        b_sum = b_sum + math.copysign(root, c) * b.float()
    return a_sum, b_sum


def cat(parts: list[tuple[Skill, float]], site: str, rank: int | None) -> Factor:
    """Exact weighted sum of deltas as stacked factors (rank = sum of ranks).

    Args:
        parts: (skill, weight) of every skill that adapts ``site``.
        site: The site key (``blocks.0.attn.qkv``, ``attn[q]``).
        rank: Ignored (the rank is the sum of the skills' ranks).
    """
    pairs = [_scaled(s, site, w) for s, w in parts]
    return torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs], dim=1)


def svd(parts: list[tuple[Skill, float]], site: str, rank: int | None) -> Factor:
    """Exact sum truncated to ``rank`` through QR of the stacked factors.

    With B_cat = Qb Rb and A_cat^T = Qa Ra the sum is Qb (Rb Ra^T) Qa^T, so only
    an R x R matrix (R = sum of ranks) is decomposed.

    Args:
        parts: (skill, weight) of every skill that adapts ``site``.
        site: The site key (``blocks.0.attn.qkv``, ``attn[q]``).
        rank: The rank wanted for the result (None: the largest input rank).
    """
    a_cat, b_cat = cat(parts, site, None)
    qb, rb = torch.linalg.qr(b_cat)
    qa, ra = torch.linalg.qr(a_cat.t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    k = min(rank or max(p[0].factors[site][0].shape[0] for p in parts), s.numel())
    root = s[:k].sqrt()
    return (root[:, None] * vh[:k]) @ qa.t(), (qb @ u[:, :k]) * root


def ties(
    parts: list[tuple[Skill, float]], site: str, rank: int | None, density: float = 0.2
) -> Factor:
    """TIES: trim each delta to its top ``density`` entries, elect signs by mass,
    average the agreeing entries; then factorise at ``rank`` by SVD.

    With a single skill there is nothing to resolve and the delta passes whole.

    Args:
        parts: (skill, weight) of every skill that adapts ``site``.
        site: The site key (``blocks.0.attn.qkv``, ``attn[q]``).
        rank: The rank wanted for the result (None: the largest input rank).
        density: The fraction of each delta's entries kept by the trim.
    """
    deltas = [b @ a for a, b in (_scaled(s, site, w) for s, w in parts)]
    if len(deltas) > 1:
        trimmed = []
        for d in deltas:
            k = max(1, int(density * d.numel()))
            cut = d.abs().flatten().kthvalue(d.numel() - k + 1).values
            trimmed.append(torch.where(d.abs() >= cut, d, torch.zeros_like(d)))
        stack = torch.stack(trimmed)
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        merged = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    else:
        merged = deltas[0]
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    k = min(rank or max(p[0].factors[site][0].shape[0] for p in parts), s.numel())
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root


COMPOSE: dict[str, Callable[..., Factor]] = {"linear": linear, "cat": cat, "svd": svd, "ties": ties}


def compose(
    skills: Sequence[Skill],
    weights: Sequence[float] | None = None,
    method: str = "linear",
    *,
    rank: int | None = None,
    name: str | None = None,
    **options,
) -> Skill:
    """One skill from several, merged site by site with ``COMPOSE[method]``.

    The skills must come from the same base (their fingerprints agree wherever
    they overlap); a site only some skills adapt takes the others as zero. Heads
    are not composed. The result records its sources in ``metadata["parents"]``.

    Args:
        skills: The skills to merge (at least one).
        weights: One finite weight per skill (default: equal, summing to 1).
        method: A name in ``COMPOSE``: "linear", "cat", "svd" or "ties".
        rank: The result's rank where the method truncates (svd, ties).
        name: The result's name (default: method and source names).
        **options: Options of the method (e.g. ``density`` for "ties").

    Returns:
        A new skill (scales folded into the factors) at the first skill's dtype.
    """
    if method not in COMPOSE:
        raise ConfigError(f"unknown composition method {method!r}; choose from {sorted(COMPOSE)}")
    if not skills:
        raise ConfigError("compose needs at least one skill")
    weights = [1.0 / len(skills)] * len(skills) if weights is None else [float(w) for w in weights]
    if len(weights) != len(skills) or not all(math.isfinite(w) for w in weights):
        raise ConfigError(
            f"need one finite weight per skill: {len(skills)} skills, weights {weights}"
        )
    if rank is not None and rank <= 0:
        raise ConfigError(f"rank must be positive, got {rank}")
    modules = {}
    for skill in skills:
        for path, sig in skill.fingerprint.modules.items():
            if path in modules and (modules[path].kind, modules[path].shape) != (
                sig.kind,
                sig.shape,
            ):
                raise BaseMismatch(
                    f"skills disagree on the base at '{path}': {modules[path].describe()} vs {sig.describe()}"
                )
            modules.setdefault(path, sig)
    fn = COMPOSE[method]
    try:
        inspect.signature(fn).bind([], "", rank, **options)
    except TypeError:
        raise ConfigError(f"composition {method!r} takes no option(s) {sorted(options)}") from None
    factors, scales = {}, {}
    for site in sorted({s for skill in skills for s in skill.factors}):
        parts = [(s, w) for s, w in zip(skills, weights, strict=True) if site in s.factors]
        a, b = fn(parts, site, rank, **options)
        dtype = skills[0].factors[next(iter(skills[0].factors))][0].dtype
        factors[site], scales[site] = (a.to(dtype).contiguous(), b.to(dtype).contiguous()), 1.0
    first = skills[0]
    config = dict(
        first.config, rank=max(a.shape[0] for a, _ in factors.values()), alpha=1.0, head=None
    )
    parents = list(dict.fromkeys(s.metadata.get("ref", s.name) for s in skills))
    name = name or f"{method}-" + "+".join(s.name for s in skills)
    return Skill(
        name[:200],
        factors,
        scales,
        config,
        Fingerprint(modules),
        {},
        {},
        {"parents": parents, "method": method, "weights": weights},
    )
