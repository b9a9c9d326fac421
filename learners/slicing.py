"""Keep some ranks of a skill: pruning after rank selection, DyLoRA truncation.

Works on the saved form (per-site 2D factors), so it is the same for every
module kind. The result is an ordinary skill whose config records the rank of
every module exactly (``rank_pattern``) and an alpha per module that
reproduces its scale, so ``sb.attach`` and re-creation from the config agree.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch

import skillbank as sb
from skillbank import site_module


def select_ranks(
    skill: sb.Skill,
    keep: dict[str, Sequence[int]],
    scale: dict[str, float] | None = None,
    **metadata,
) -> sb.Skill:
    """A copy of ``skill`` with only the rank indices ``keep[module]`` of each module.

    Modules left with no rank are dropped from the skill (their update is zero),
    except attention modules and their ``out_proj``, which ``sb.attach`` adapts
    together: those keep rank 0. ``scale`` overrides
    the scale of a module.
    """
    factors, scales, ranks = {}, {}, {}
    mha = {p for p, sig in skill.fingerprint.modules.items() if sig.kind == "MultiheadAttention"}
    for site, (a, b) in skill.factors.items():
        module = site_module(site)
        idx = list(keep.get(module, range(a.shape[0])))
        if not idx and (module in mha or module.rpartition(".")[0] in mha):
            idx = [0]
        if not idx:
            continue
        ix = torch.as_tensor(idx, dtype=torch.long)
        factors[site] = (a[ix].contiguous(), b[:, ix].contiguous())
        scales[site] = float((scale or {}).get(module, skill.scales[site]))
        ranks[module] = len(idx)
    if not factors:
        raise sb.ConfigError(f"selecting ranks of skill {skill.name!r} left no rank in any module")
    out = copy.copy(skill)
    out.factors, out.scales = factors, scales
    out.config = _exact_config(skill.config, ranks, {site_module(s): v for s, v in scales.items()})
    out.metadata = {**skill.metadata, **metadata}
    return out


def truncate(skill: sb.Skill, rank: int) -> sb.Skill:
    """The first ``rank`` ranks of every module, at DyLoRA's scale alpha / rank.

    Meant for skills trained with nested ranks (``LoRALearner(nested=True)``),
    whose every prefix was trained to work alone at scale alpha / b.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise sb.ConfigError(f"rank must be a positive integer, got {rank!r}")
    keep, scale = {}, {}
    for site, (a, _) in skill.factors.items():
        module, r = site_module(site), a.shape[0]
        k = min(rank, r)
        keep[module] = range(k)
        scale[module] = skill.scales[site] * r / k
    return select_ranks(skill, keep, scale, truncated_rank=rank)


def _exact_config(config: dict, ranks: dict[str, int], scales: dict[str, float]) -> dict:
    """A LoRAConfig naming each kept module exactly with its rank and an alpha giving its scale."""
    exact = {p: "re:" + re.escape(p) for p in ranks}
    try:
        head = sb.LoRAConfig.from_dict(config).head
    except Exception:
        head = config.get("head")
    return sb.LoRAConfig(
        rank=max(ranks.values()),
        alpha=1.0,
        targets=tuple(exact.values()),
        rank_pattern={exact[p]: r for p, r in ranks.items()},
        alpha_pattern={exact[p]: scales[p] * r for p, r in ranks.items()},
        head=head,
    ).to_dict()
