"""Routers: which skill(s) each row of a batch goes to, chosen by name.

Every router ranks skills from features of ONE bare forward (adapters off):
the L2-normalised pooled feature and, for ``stats``, a descriptor of
intermediate layers caught by hooks on that same pass. Candidates always come
from a FAISS retrieval in the router's own space, so a large bank is searched,
never scanned; routers with a finer score re-score only those candidates.

- ``examples``: nearest example embedding (mean + k-means centres), the 0.1.0
  behaviour; needs no statistics, so old banks keep routing.
- ``prototype``: nearest class mean by cosine (SimpleCIL); the class's skill wins.
- ``mahalanobis``: class means with one shared covariance of the bank, shrunk
  towards a scaled identity (FeCAM); candidates from the prototype space.
- ``stats``: a diagonal Gaussian per class of each skill over a layer
  descriptor (patch embedding by default) and, for images, a full Gaussian per
  class over the coarse pixel grid: domain shifts the pooled feature washes out.
- ``fused`` (the default): ``mahalanobis`` and ``stats`` summed class by class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from .bank import SkillBank
from .embed import EXAMPLES
from .errors import ConfigError, InvalidEmbedding
from .route_stats import (
    LAYER_STATS,
    PROTOTYPES,
    MissingStats,
    RouteStats,
    default_layers,
    shrunk_covariance,
)

Ranked = tuple[list[list[str]], list[list[float]]]  # per row: refs and scores, best first


class BaseRouter:
    """Ranks skills for each row. Subclasses set ``name`` and implement ``rank``."""

    name: ClassVar[str] = ""
    space: ClassVar[str] = EXAMPLES
    uses_layers: ClassVar[bool] = False
    uses_pooled: ClassVar[bool] = True  # False: the bare pass stops after the layers read
    reads_pixels: ClassVar[bool] = False  # scores ``pixel_features`` of the input (no forward)

    def __init__(
        self,
        bank: SkillBank,
        where: Mapping[str, Any] | None = None,
        *,
        space: str | None = None,
        candidates: int = 16,
        shrink: float = 0.1,
        layers: tuple[str, ...] | None = None,
        pixels: bool = True,
    ) -> None:
        check_options({"candidates": candidates, "shrink": shrink, "pixels": pixels})
        # pixels=False: a statistics router skips its pixel term (cheaper over a large bank)
        self.uses_pixels = self.reads_pixels and pixels
        self.bank, self.where = bank, where
        self.space = space or self.space
        self.candidates, self.shrink = candidates, shrink
        self._layers = None if layers is None else tuple(layers)
        self._generation: int | None = None
        self._stats: dict[str, RouteStats] = {}

    def layers(self, model: torch.nn.Module) -> tuple[str, ...]:
        """Intermediate modules whose outputs this router reads (hooked on the same pass)."""
        if not self.uses_layers:
            return ()
        if self._layers is None:
            self._layers = default_layers(model)
        return self._layers

    def _retrieve(
        self, query: torch.Tensor | np.ndarray, k: int, space: str | None = None
    ) -> Ranked:
        """The ``k`` nearest skills of each row in ``space`` (default: the router's)."""
        space = space or self.space
        q = np.asarray(query, dtype=np.float32)
        if not np.isfinite(q).all():
            raise InvalidEmbedding(f"{self.name} router: NaN or Inf in the routing features")
        try:
            hits = self.bank.retrieve(q, k=k, space=space, where=self.where)
        except InvalidEmbedding as err:
            if space != EXAMPLES and space not in self.bank.spaces():
                raise MissingStats(
                    f"the {self.name!r} router needs routing statistics and no skill in this "
                    f"bank has any ({err}); add skills with stats=sb.compute_stats(...) or "
                    "bank.put_stats(REF, ...), or use router='examples'"
                ) from None
            raise
        return [[str(h.ref) for h in row] for row in hits], [[h.score for h in row] for row in hits]

    def _fresh_stats(self) -> None:
        """Statistics of every routable skill, reloaded when the catalog changed;
        raises ``MissingStats`` naming the skills that have none."""
        gen = self.bank.generation()
        if gen != self._generation:
            self._stats = self.bank.route_stats(where=self.where)
            self._generation = gen
            self.refresh()

    def refresh(self) -> None:
        """Recompute what depends on the whole set of statistics (e.g. a shared covariance)."""

    def stats(self, ref: str) -> RouteStats:
        return self._stats[ref]

    def rank(
        self,
        pooled: torch.Tensor | None,
        desc: torch.Tensor | None,
        k: int,
        pixels: torch.Tensor | None = None,
    ) -> Ranked:
        """Each row's ``k`` best skills from its pooled feature, layer descriptor and
        pixel grid (each None when the router does not read it)."""
        raise NotImplementedError

    @staticmethod
    def _per_row(refs: list[list[str]], by_skill: np.ndarray) -> np.ndarray:
        """(rows x candidates) from (rows x ``_unique(refs)``); -inf past a row's candidates."""
        _, idx, valid = _columns(refs)
        return np.where(valid, np.take_along_axis(by_skill, idx, axis=1), -np.inf)

    @staticmethod
    def _layer_features(desc: torch.Tensor | None, name: str) -> np.ndarray:
        if desc is None:
            raise ConfigError(f"the {name} router needs layer features (Router passes them)")
        return desc.double().numpy()

    @staticmethod
    def _topk(refs: list[list[str]], scores: np.ndarray, k: int) -> Ranked:
        """Best ``k`` of each row's candidates by ``scores`` (rows x candidates, -inf = none)."""
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out_refs, out_scores = [], []
        for i, row in enumerate(order):
            keep = [j for j in row if np.isfinite(scores[i, j])]
            out_refs.append([refs[i][j] for j in keep])
            out_scores.append([float(scores[i, j]) for j in keep])
        return out_refs, out_scores


def _unique(refs: list[list[str]]) -> list[str]:
    """Every skill named in any row, in a fixed order."""
    return sorted({r for row in refs for r in row})


def _columns(refs: list[list[str]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``_unique(refs)``, each row's candidates as column indices into it (rows x
    the longest row, padded with 0) and which of those entries are real."""
    skills = _unique(refs)
    col = {r: j for j, r in enumerate(skills)}
    width = max(len(r) for r in refs)
    idx = np.zeros((len(refs), width), dtype=np.int64)
    valid = np.zeros((len(refs), width), dtype=bool)
    for i, row in enumerate(refs):
        idx[i, : len(row)] = [col[r] for r in row]
        valid[i, : len(row)] = True
    return skills, idx, valid


class ExamplesRouter(BaseRouter):
    name = "examples"

    def rank(self, pooled, desc, k, pixels=None):
        return self._retrieve(pooled, k)


class PrototypeRouter(BaseRouter):
    name = "prototype"
    space = PROTOTYPES

    def rank(self, pooled, desc, k, pixels=None):
        self._fresh_stats()  # every routable skill must have prototypes
        return self._retrieve(pooled, k)


class MahalanobisRouter(BaseRouter):
    name = "mahalanobis"
    space = PROTOTYPES

    def refresh(self) -> None:
        stats = list(self._stats.values())
        if not stats:
            self._precision = None
            return
        self._precision = np.linalg.inv(shrunk_covariance(stats, self.shrink, floor=1e-12))

    def class_distances(self, pooled: torch.Tensor, skills: list[str]) -> np.ndarray:
        """(rows, skills, most classes of one skill): squared Mahalanobis distance to each
        class mean of each skill, in the order of its statistics; +inf past its classes."""
        if pooled.shape[1] != self._precision.shape[0]:
            raise InvalidEmbedding(
                f"routing features are {pooled.shape[1]}-d, the bank's statistics "
                f"{self._precision.shape[0]}-d: a different backbone?"
            )
        means = [self.stats(r).means() for r in skills]
        owner = np.concatenate([np.full(len(m), j) for j, m in enumerate(means)])
        slot = np.concatenate([np.arange(len(m)) for m in means])
        mu = np.concatenate(means)  # (G, d) class means of every candidate
        f = pooled.double().numpy()
        fp, mp = f @ self._precision, mu @ self._precision
        dist = (fp * f).sum(1)[:, None] - 2 * fp @ mu.T + (mp * mu).sum(1)[None, :]
        out = np.full((len(f), len(skills), max(len(m) for m in means)), np.inf)
        out[:, owner, slot] = dist
        return out

    def distances(self, pooled: torch.Tensor, skills: list[str]) -> np.ndarray:
        """(rows, skills): squared Mahalanobis distance to each skill's nearest class mean."""
        return self.class_distances(pooled, skills).min(-1)

    def rank(self, pooled, desc, k, pixels=None):
        self._fresh_stats()
        refs, _ = self._retrieve(pooled, max(k, self.candidates))
        if self._precision is None:
            return refs, [[] for _ in refs]
        return self._topk(refs, self._per_row(refs, -self.distances(pooled, _unique(refs))), k)


class StatsRouter(BaseRouter):
    """A diagonal Gaussian per class of each skill over the layer descriptor (where a
    sample comes from *and* what it is: a rotated 3 is told from a rotated 8, which a
    Gaussian of the whole skill blurs together); a skill scores by its best class.
    Statistics stored by 0.2 give every class the skill's one Gaussian.

    For images, a full Gaussian per class over the pixel grid is added when every
    routable skill has one (older statistics have none): its covariance sees the
    orientation of strokes, which per-dimension variances do not."""

    name = "stats"
    space = LAYER_STATS
    uses_layers = True
    uses_pooled = False
    reads_pixels = True

    def refresh(self) -> None:
        self._moments: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for ref, st in self._stats.items():
            if tuple(st.layers) != tuple(self._layers or st.layers):
                raise InvalidEmbedding(
                    f"{ref} has statistics of layers {list(st.layers)}, the router reads "
                    f"{list(self._layers)}"
                )
            mean, var = st.class_layer_moments()
            var = (1 - self.shrink) * var + self.shrink * var.mean(1, keepdims=True) + 1e-8
            self._moments[ref] = (mean, var)
        self._pixels = bool(self._stats) and all(
            st.pixel_sums is not None for st in self._stats.values()
        )
        self._whitening: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def whitening(self, ref: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(W (C, p, p), W mu (C, p), log det of the covariance (C,)) of a skill's pixel
        Gaussians, W = L^-1 for cov = L L^T; made when the skill is first a candidate."""
        if ref not in self._whitening:
            mean, cov = self.stats(ref).pixel_gaussians(self.shrink)
            chol = np.linalg.cholesky(cov)
            w = np.linalg.inv(chol)
            logdet = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(1)
            self._whitening[ref] = (w, np.einsum("cpq,cq->cp", w, mean), logdet)
        return self._whitening[ref]

    def pixel_log_likelihoods(
        self, pixels: torch.Tensor | None, refs: list[list[str]]
    ) -> np.ndarray | None:
        """(rows, candidates, most classes): the full-Gaussian log-likelihood per
        dimension of each row's pixel grid under each class of each of its candidates
        (-inf past a skill's classes), or None when not every skill has pixel
        statistics. Rows are grouped by candidate skill: the cost follows what rows
        name, not the bank."""
        if pixels is None or not self._pixels or not self.uses_pixels:
            return None
        x = pixels.double().numpy()
        skills, idx, valid = _columns(refs)
        width = max(len(self.stats(r).classes) for r in skills)
        out = np.full((*idx.shape, width), -np.inf)
        for j, r in enumerate(skills):
            w, shift, logdet = self.whitening(r)
            c, p = shift.shape
            if x.shape[1] != p:
                raise InvalidEmbedding(
                    f"pixel features are {x.shape[1]}-d, {r}'s statistics {p}-d: "
                    "images of another size or channel count?"
                )
            rows, cols = np.nonzero((idx == j) & valid)
            z = x[rows] @ w.reshape(c * p, p).T - shift.reshape(-1)
            maha = (z.reshape(len(rows), c, p) ** 2).sum(-1)
            out[rows, cols, :c] = -0.5 * (maha + logdet) / p
        return out

    def log_likelihoods(
        self, x: np.ndarray, refs: list[list[str]], extra: np.ndarray | None = None
    ) -> np.ndarray:
        """(rows x candidates): each row's candidates' best class by the diagonal-Gaussian
        log-likelihood of the layer features ``x``, averaged per dimension, plus
        ``extra[row, candidate, class]`` (candidates as in ``refs``) when given.

        The cost follows the candidates, not the bank: few distinct candidates (a small
        bank, or rows that agree) are scored against every row by three matrix
        products; many, only where a row names them."""
        skills, idx, valid = _columns(refs)
        for r in skills:
            if self._moments[r][0].shape[1] != x.shape[1]:
                raise InvalidEmbedding(
                    f"layer features are {x.shape[1]}-d, {r}'s statistics "
                    f"{self._moments[r][0].shape[1]}-d"
                )
        width = max(len(self._moments[r][0]) for r in skills)
        mean = np.zeros((len(skills), width, x.shape[1]))
        var = np.ones_like(mean)
        real = np.zeros((len(skills), width), dtype=bool)
        for j, r in enumerate(skills):
            m, v = self._moments[r]
            mean[j, : len(m)], var[j, : len(m)], real[j, : len(m)] = m, v, True
        # sum (x - m)^2 / v + log v, expanded: x^2 . (1/v) - 2 x . (m/v) + const
        inv = 1.0 / var
        minv = mean * inv
        const = (mean * minv).sum(-1) + np.log(var).sum(-1)
        x2 = x * x
        if len(skills) * width <= 16 * idx.shape[1]:  # every row against every class: BLAS
            d = x.shape[1]
            quad = x2 @ inv.reshape(-1, d).T - 2.0 * (x @ minv.reshape(-1, d).T)
            by_class = (quad + const.reshape(-1)).reshape(len(x), *real.shape)
            by_class = -0.5 * np.take_along_axis(by_class, idx[:, :, None], axis=1) / d
            by_class = by_class + (0.0 if extra is None else extra)
            out = np.where(real[idx], by_class, -np.inf).max(-1)
        else:  # per candidate column: rows x classes x d at a time, never the whole bank
            out = np.empty(idx.shape)
            for c in range(idx.shape[1]):
                s = idx[:, c]
                quad = (inv[s] @ x2[:, :, None] - 2.0 * (minv[s] @ x[:, :, None]))[..., 0]
                score = -0.5 * (quad + const[s]) / x.shape[1]
                if extra is not None:
                    score = score + extra[:, c]
                out[:, c] = np.where(real[s], score, -np.inf).max(-1)
        return np.where(valid, out, -np.inf)

    def rank(self, pooled, desc, k, pixels=None):
        x = self._layer_features(desc, self.name)
        self._fresh_stats()
        refs, _ = self._retrieve(desc, max(k, self.candidates))
        extra = self.pixel_log_likelihoods(pixels, refs)
        return self._topk(refs, self.log_likelihoods(x, refs, extra=extra), k)

    def rank_batch(self, desc: torch.Tensor, k: int = 1) -> tuple[list[str], list[float]]:
        """The ``k`` skills most likely to have produced the whole batch (rows that share
        one domain, e.g. a test batch under one corruption): each candidate's
        log-likelihood averaged over the rows; candidates are every row's retrievals."""
        x = self._layer_features(desc, self.name)
        self._fresh_stats()
        refs, _ = self._retrieve(desc, self.candidates)
        pool = _unique(refs)
        if not pool:
            return [], []
        scores = self.log_likelihoods(x, [pool] * len(x)).mean(0)
        order = np.argsort(-scores, kind="stable")[:k]
        return [pool[j] for j in order], [float(scores[j]) for j in order]


class FusedRouter(StatsRouter, MahalanobisRouter):
    """``mahalanobis`` and ``stats`` together, class by class: what a sample is (its
    class under the pooled feature) and where it comes from (the layer and pixel
    statistics of that class in that skill); a skill scores by its best class.

    Each score is a Gaussian log-likelihood per dimension (the Mahalanobis term is
    ``-d^2 / 2d``), so neither outweighs the other by its width; candidates are the
    union of both spaces' retrievals.
    """

    name = "fused"
    space = PROTOTYPES
    uses_pooled = True

    def refresh(self) -> None:
        MahalanobisRouter.refresh(self)
        StatsRouter.refresh(self)

    def rank(self, pooled, desc, k, pixels=None):
        x = self._layer_features(desc, self.name)
        self._fresh_stats()
        by_class, _ = self._retrieve(pooled, max(k, self.candidates))
        by_domain, _ = self._retrieve(desc, max(k, self.candidates), LAYER_STATS)
        refs = [list(dict.fromkeys(a + b)) for a, b in zip(by_class, by_domain, strict=True)]
        _, idx, _ = _columns(refs)
        dist = np.take_along_axis(self.class_distances(pooled, _unique(refs)), idx[..., None], 1)
        extra = -dist / (2 * pooled.shape[1])
        pixel_ll = self.pixel_log_likelihoods(pixels, refs)
        if pixel_ll is not None:
            extra = extra + pixel_ll
        return self._topk(refs, self.log_likelihoods(x, refs, extra=extra), k)


ROUTERS: dict[str, type[BaseRouter]] = {
    r.name: r
    for r in (ExamplesRouter, PrototypeRouter, MahalanobisRouter, StatsRouter, FusedRouter)
}


#: What ``router_options`` may set (``BaseRouter``'s keywords; ``space`` is the Router's own).
ROUTER_OPTIONS = ("candidates", "shrink", "layers", "pixels")


def check_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Router options as keywords; names no router takes are a ConfigError, not a TypeError."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"router options must be a mapping, got {type(options).__name__}")
    unknown = sorted(set(options) - set(ROUTER_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown router options {unknown}; known: {list(ROUTER_OPTIONS)}")
    candidates, shrink = options.get("candidates", 1), options.get("shrink", 0.0)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ConfigError(f"candidates must be an int >= 1, got {candidates!r}")
    if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 <= shrink <= 1:
        raise ConfigError(f"shrink must be in [0, 1], got {shrink!r}")
    if not isinstance(options.get("pixels", True), bool):
        raise ConfigError(f"pixels must be true or false, got {options['pixels']!r}")
    return dict(options)


def make_router(
    name: str, bank: SkillBank, where: Mapping[str, Any] | None = None, **options: Any
) -> BaseRouter:
    """A router by name (see ``ROUTERS``)."""
    if name not in ROUTERS:
        raise ConfigError(f"unknown router {name!r}; choose from {sorted(ROUTERS)}")
    space = options.pop("space", None)
    return ROUTERS[name](bank, where, space=space, **check_options(options))


# The runner's default per scenario, chosen from the measurements in the README.
DEFAULT_ROUTERS = {"class": "fused", "task": "fused", "domain": "fused"}


def default_router(scenario: str) -> str:
    """The router the benchmark uses for a scenario when none is named."""
    return DEFAULT_ROUTERS.get(scenario, "examples")


__all__ = [
    "DEFAULT_ROUTERS",
    "ROUTERS",
    "ROUTER_OPTIONS",
    "BaseRouter",
    "check_options",
    "default_router",
    "make_router",
]
