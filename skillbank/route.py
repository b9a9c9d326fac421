"""Per-sample routing: each input runs with the skill whose data it resembles.

Features of the batch come from the bare base (adapters off), so every
skill's example embedding and every query live in one space; the bank
returns the nearest skill per row; one ``mixed_batch`` forward then runs every
row with its own adapter, and each row's logits come from its skill's head.
With ``k > 1`` each row runs the score-weighted sum of its k nearest skills in
parameter space (``composed``), heads mixed with the same weights.

Which skill is nearest is the job of a router chosen by name (``router=``, see
``skillbank.routers``); ``rerank=m`` then runs each row's m best candidates and
keeps the one the adapted model is most confident on (m adapted forwards).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .adapters.inject import disabled
from .adapters.mixed import composed, mixed_batch
from .bank import SkillBank
from .embed import features
from .errors import ConfigError
from .resident import ResidentSet, ResidentStats, adapter_name_for  # noqa: F401 (its old home)
from .route_stats import pixel_features, route_features
from .routers import check_options, make_router
from .skill import Skill


@dataclass(frozen=True)
class Routed:
    """Outputs of a routed batch: logits, the chosen skill(s) per row and score(s).

    With ``k = 1`` ``refs[i]`` is a ref and ``scores[i]`` a float; with ``k > 1``
    both are lists of length k, best first."""

    logits: torch.Tensor
    refs: list
    scores: list


class Router:
    """Routes rows of a batch to skills of ``bank`` (optionally filtered by ``where``).

    Skills are attached to ``model`` (inactive) when a batch needs them; at most
    ``max_resident`` stay attached, the least recently used unpinned one leaving
    when room is needed, never one a batch in flight uses (``skillbank.resident``;
    the default cap keeps resident skills within the base model's size). ``pin``
    lists refs loaded at once and never evicted. A batch needing more skills than
    fit runs in several forwards (rows grouped by skill), outputs in row order.
    ``stats`` reports hits, misses, evictions and load time. One Router may serve
    many threads at once (inference only; see ``skillbank.adapters.mixed``).

    ``head`` names the module whose input is the pre-logit feature
    (timm models need no name). With ``mask_classes`` each row's prediction is
    limited to its skill's ``metadata["classes"]`` (class-incremental routing).
    ``router`` names how rows find skills (``examples``, ``prototype``,
    ``mahalanobis``, ``stats``; ``router_options`` go to it); ``rerank=m > 1``
    re-ranks each row's m best candidates by the adapted model's confidence.
    """

    def __init__(
        self,
        model: nn.Module,
        bank: SkillBank,
        *,
        space: str | None = None,
        where: Mapping[str, Any] | None = None,
        head: str = "head",
        mask_classes: bool = True,
        router: str = "examples",
        rerank: int = 0,
        router_options: Mapping[str, Any] | None = None,
        max_resident: int | None = None,
        pin: Sequence[str] = (),
    ) -> None:
        self.model, self.bank, self.space, self.where = model, bank, space, where
        self.head, self.mask_classes = head, mask_classes
        if rerank < 0:
            raise ConfigError(f"rerank must be >= 0, got {rerank}")
        self.rerank = rerank
        self.router = make_router(router, bank, where, space=space, **check_options(router_options))
        self.resident = ResidentSet(model, bank, max_resident, pin)  # last: it attaches pins

    @property
    def stats(self) -> ResidentStats:
        """Hits, misses, evictions, load time and resident counts so far (a snapshot)."""
        return self.resident.stats()

    def register(self, ref: str, adapter: str, skill: Skill) -> None:
        """Tell the router that ``ref`` is already on the model as adapter ``adapter``.

        Args:
            ref: The bank ref (``name@version``).
            adapter: The adapter name it has on the model.
            skill: The skill itself (its head and classes are used for scoring).
        """
        self.resident.register(ref, adapter, skill)

    def skill(self, ref: str) -> tuple[str, Skill]:
        """(adapter name, skill) of a ref, attaching it if it is not resident (a later
        batch may evict it again).

        Args:
            ref: A bank ref; fetched from the bank and attached (inactive) if new.
        """
        return self.resident.lookup(ref)

    def disabled(self):
        """The bare base, adapters off (where routing features come from)."""
        return self._planned(disabled)

    def _planned(self, call, *args):
        """``call(model, *args)`` entered while no skill is being attached or evicted (its
        plan walks the model); its forwards then run unlocked."""
        stack = ExitStack()
        with self.resident.lock:
            stack.enter_context(call(self.model, *args))
        return stack

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, k: int = 1) -> Routed:
        if k < 1:
            raise ConfigError(f"k must be positive, got {k}")
        refs, scores = self.rank(x, max(k, self.rerank))
        if any(not row for row in refs):
            raise ConfigError("no skill to route to (is the bank, or its where= filter, empty?)")
        if self.rerank > 1 and k == 1:
            return self._reranked(x, refs)
        if k == 1:
            refs, scores = [row[0] for row in refs], [row[0] for row in scores]
            return Routed(self.forward(x, refs), refs, scores)
        refs, scores = [row[:k] for row in refs], [row[:k] for row in scores]
        # cosine scores -> weights that sum to one per row (rows with fewer hits pad with zero)
        w = torch.zeros(len(x), k)
        for i, row in enumerate(scores):
            w[i, : len(row)] = torch.softmax(torch.tensor(row) / 0.05, 0)
        return Routed(self.mix(x, refs, w), refs, scores)

    @torch.no_grad()
    def rank(self, x: torch.Tensor, k: int) -> tuple[list[list[str]], list[list[float]]]:
        """Each row's ``k`` best skills and scores from the router (one bare forward, and
        the input's pixel grid for routers that read it)."""
        with self.disabled():
            pooled, desc = route_features(
                self.model,
                x,
                layers=self.router.layers(self.model),
                head=self.head,
                pooled=self.router.uses_pooled,
            )
        pixels = pixel_features(x) if self.router.uses_pixels else None
        return self.router.rank(pooled, desc, k, pixels)

    def _reranked(self, x: torch.Tensor, refs: list[list[str]]) -> Routed:
        """Each row's candidates all run (one mixed batch); the most confident one wins."""
        m = max(len(row) for row in refs)
        cand = [[row[min(j, len(row) - 1)] for row in refs] for j in range(m)]
        logits = self.forward(x.repeat(m, *([1] * (x.ndim - 1))), [r for c in cand for r in c])
        logits = logits.view(m, len(x), -1)
        conf = torch.softmax(logits.float(), -1).amax(-1)  # (m, N): each candidate's confidence
        best = conf.argmax(0)
        rows = torch.arange(len(x))
        chosen = [cand[int(j)][i] for i, j in enumerate(best)]
        return Routed(logits[best, rows], chosen, conf[best, rows].tolist())

    @torch.no_grad()
    def forward(self, x: torch.Tensor, refs: list[str]) -> torch.Tensor:
        """Logits of ``x`` with row i run by skill ``refs[i]`` (e.g. an oracle's choice).

        Args:
            x: A batch of inputs.
            refs: One bank ref per row.
        """
        if len(refs) != len(x):
            raise ConfigError(f"forward needs one ref per row: {len(x)} rows, {len(refs)} refs")
        chunks = self.resident.chunks(refs)
        if len(chunks) == 1:
            return self._forward(x, refs)
        out = None
        for rows in chunks:  # more skills than fit at once: a forward per group, rows in place
            logits = self._forward(x[rows], [refs[i] for i in rows])
            if out is None:
                out = logits.new_empty(len(x), *logits.shape[1:])
            out[torch.tensor(rows, device=out.device)] = logits
        return out

    def _forward(self, x: torch.Tensor, refs: list[str]) -> torch.Tensor:
        chosen = sorted(set(refs))
        slot = {r: i for i, r in enumerate(chosen)}
        with self.resident.holding(chosen) as held:
            with self._planned(mixed_batch, [held[r][0] for r in refs]):
                pre = features(self.model, x, head=self.head, batch_size=len(x), keep_device=True)
        w, b, m = self._heads([held[r][1] for r in chosen], pre)
        idx = torch.tensor([slot[r] for r in refs])
        return torch.bmm(w[idx], pre.unsqueeze(2)).squeeze(2) + b[idx] + m[idx]

    @torch.no_grad()
    def mix(self, x: torch.Tensor, refs: list[list[str]], weights: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` with row i run by ``sum_j weights[i, j] * skill refs[i][j]``
        (adapters and heads mixed in parameter space; classes: the union of the row's skills).

        Args:
            x: A batch of inputs.
            refs: Per row, the refs to mix.
            weights: (rows, k) mixing weights, aligned with ``refs``.
        """
        chosen = sorted({r for row in refs for r in row})
        slot = {r: i for i, r in enumerate(chosen)}
        mix = torch.zeros(len(x), len(chosen))
        for i, row in enumerate(refs):
            for j, r in enumerate(row):
                mix[i, slot[r]] += weights[i, j]
        with self.resident.holding(chosen) as held:
            with self._planned(composed, [held[r][0] for r in chosen], mix):
                pre = features(self.model, x, head=self.head, batch_size=len(x), keep_device=True)
        w, b, m = self._heads([held[r][1] for r in chosen], pre)
        mix = mix.to(pre.device, pre.dtype)
        allowed = torch.where(torch.isfinite(m), 1.0, 0.0)
        mask = torch.where((mix > 0).to(pre.dtype) @ allowed > 0, 0.0, float("-inf"))
        return torch.einsum("nk,kcd,nd->nc", mix, w, pre) + mix @ b + mask

    def _heads(
        self, skills: list[Skill], pre: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked head weights, biases and class masks of ``skills``, like ``pre``."""
        head = self.model.get_submodule(self.head)
        weights, biases, masks = [], [], []
        for skill in skills:
            weights.append(skill.head.get(f"{self.head}.weight", head.weight.detach().cpu()))
            biases.append(skill.head.get(f"{self.head}.bias", head.bias.detach().cpu()))
            mask = torch.zeros(weights[-1].shape[0])
            classes = skill.metadata.get("classes")
            if self.mask_classes and classes:
                mask.fill_(float("-inf"))
                mask[list(classes)] = 0.0
            masks.append(mask)
        w, b, m = (torch.stack(t).to(pre.device, pre.dtype) for t in (weights, biases, masks))
        return w, b, m


def route(model: nn.Module, bank: SkillBank, x: torch.Tensor, k: int = 1, **kwargs: Any) -> Routed:
    """Route every row of ``x`` to its nearest skill (or the weighted mix of its ``k``
    nearest) and run the whole batch in one forward.

    Args:
        model: The backbone the bank's skills were trained on.
        bank: Where the skills (and their routing statistics) are.
        x: A batch of inputs.
        k: Skills per row; above 1, the score-weighted mix of the k nearest.
        **kwargs: ``Router`` settings: ``router`` (``examples``, ``prototype``,
            ``mahalanobis``, ``stats``), ``rerank``, ``where``, ``head`` ...
    """
    return Router(model, bank, **kwargs)(x, k=k)
