"""What routers know of a skill's data: sums and counts of bare-backbone features.

Computed once, with the adapters off, when a skill is added, and stored with its
version. Everything is kept as sums (per-class feature sums and counts, the
second-moment matrix, per-dimension sums of squares of a layer descriptor), so
the statistics of many skills combine by addition without revisiting any data:
a shared covariance over a whole bank is ``sum(scatter) - sum(n mu mu^T)``.

Two feature kinds come from the same bare forward:

- ``pooled``: the L2-normalised pre-logit feature (the one ``examples`` uses);
- ``layers``: a descriptor from intermediate modules (patch embedding, early
  blocks, or the input pixels as ``"input"``), their token maps average-pooled
  to at most a 4 x 4 grid, so domain shifts that the pooled feature washes out
  (rotations, permutations, corruptions) stay visible.

A third needs no forward at all: ``pixels``, the input image average-pooled to
at most 7 x 7 per channel, kept with a full second-moment matrix per class. A
diagonal Gaussian sees where ink is; the covariance also sees how it lies
(a stroke at 36 degrees against one at 72), which is what a rotation changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters.calls import own_hooks
from .embed import pre_logits
from .errors import ConfigError, InvalidEmbedding, SkillbankError

INPUT = "input"  # the pseudo-layer of the input pixels
GRID = 4  # token maps are pooled to at most GRID x GRID positions
PIXEL_GRID = 7  # images are pooled to at most PIXEL_GRID x PIXEL_GRID per channel
_ARRAYS = (
    "classes",
    "counts",
    "class_sums",
    "scatter",
    "layers",
    "layer_sums",
    "layer_squares",
    "pixel_sums",
    "pixel_scatter",
)


class MissingStats(SkillbankError, LookupError):
    """A router needs statistics a stored skill does not have (e.g. one added by 0.1.0)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """The patch embedding when the model has one (timm ViTs), else a ResNet's stem
    (timm's ``act1``: convolution, batch norm, ReLU), else the input pixels (whose
    4 x 4 averages miss shifts such as pixelation that the stem still sees)."""
    names = {n for n, _ in model.named_modules()}
    for layer in ("patch_embed", "act1"):
        if layer in names:
            return (layer,)
    return (INPUT,)


def _descriptor(out: torch.Tensor) -> torch.Tensor:
    """(N, e) from a module output: token maps pooled to at most GRID x GRID positions."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = out.float()
    if out.ndim == 4:  # (N, C, H, W)
        grid = out
    elif out.ndim == 3:  # (N, L, D) tokens, maybe with prefix (class) tokens first
        side = math.isqrt(out.shape[1])
        tokens = out[:, out.shape[1] - side * side :]
        grid = tokens.transpose(1, 2).reshape(len(out), out.shape[2], side, side)
    else:
        return out.flatten(1)
    size = (min(GRID, grid.shape[2]), min(GRID, grid.shape[3]))
    return F.adaptive_avg_pool2d(grid, size).flatten(1)


def pixel_features(x: torch.Tensor) -> torch.Tensor | None:
    """(N, channels x at most 7 x 7) float64 on the CPU: the image pooled to a coarse
    grid, or None when ``x`` is not a batch of images (N, C, H, W)."""
    if x.ndim != 4 or not x.is_floating_point():
        return None
    size = (min(PIXEL_GRID, x.shape[2]), min(PIXEL_GRID, x.shape[3]))
    return F.adaptive_avg_pool2d(x.detach().float(), size).flatten(1).double().cpu()


class _Caught(Exception):
    """Every hooked layer has given its output: the rest of the forward is not needed."""


@torch.no_grad()
def route_features(
    model: nn.Module,
    x: torch.Tensor,
    *,
    layers: Sequence[str] = (),
    head: str | None = None,
    batch_size: int = 256,
    pooled: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(pooled (N, d) L2-normalised, layer descriptor (N, e) or None) from ONE forward.

    Intermediate outputs are caught with forward hooks on the same pass that
    gives the pooled feature, so routing costs one backbone pass. With
    ``pooled=False`` (a router that reads layers only) the pass stops at the last
    of ``layers`` and the pooled feature is None: an early layer costs a fraction
    of the pass. Call it with the adapters off (``with sb.disabled(model):``).
    """
    if not pooled and not layers:
        raise ConfigError("route_features needs layers when the pooled feature is not wanted")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    mods = {n: model.get_submodule(n) for n in layers if n != INPUT}
    caught: dict[str, torch.Tensor] = {}
    names = list(mods)
    feats, desc = [], []

    def catch(j: int, _inputs, out) -> None:
        caught[names[j]] = out
        if not pooled and len(caught) == len(names):
            raise _Caught

    try:
        # hooks of this call only: another thread's pass through these modules is not caught
        with own_hooks(list(mods.values()), catch):
            for chunk in x.split(batch_size):
                chunk = chunk.to(device, non_blocking=True)
                caught.clear()
                if pooled:
                    feats.append(pre_logits(model, chunk, head).float().flatten(1))
                elif names:
                    try:
                        model(chunk)
                    except _Caught:
                        pass
                if layers:
                    desc.append(
                        torch.cat(
                            [_descriptor(chunk if n == INPUT else caught[n]) for n in layers], 1
                        )
                    )
    finally:
        if was_training:  # else eval() left it in eval mode: no second walk of the modules
            model.train()
    f = F.normalize(torch.cat(feats), dim=1).cpu() if pooled else None
    return f, (torch.cat(desc).cpu() if desc else None)


@dataclass(frozen=True)
class RouteStats:
    """Sufficient statistics of one skill's data (float64 sums, combinable by addition).

    ``classes[i]`` is the label of row i of ``class_sums`` / ``counts``;
    ``scatter`` is ``sum f f^T`` over every sample's pooled feature f;
    ``layer_sums`` / ``layer_squares`` are per-dimension sums of the layer
    descriptor from ``layers`` (None when no layer was asked for), one row per
    class like ``class_sums`` ((C, e); statistics stored by 0.2 have the
    skill's sums alone, (e,)).
    """

    classes: tuple[int, ...]
    counts: np.ndarray
    class_sums: np.ndarray
    scatter: np.ndarray
    layers: tuple[str, ...] = ()
    layer_sums: np.ndarray | None = None
    layer_squares: np.ndarray | None = None
    pixel_sums: np.ndarray | None = None
    pixel_scatter: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.class_sums.shape[1])

    @property
    def n(self) -> float:
        return float(self.counts.sum())

    def means(self) -> np.ndarray:
        """(C, d) class means of the pooled feature."""
        return self.class_sums / self.counts[:, None]

    def within_scatter(self) -> np.ndarray:
        """(d, d) scatter around each class mean: ``scatter - sum_c n_c mu_c mu_c^T``."""
        return self.scatter - (self.class_sums.T / self.counts) @ self.class_sums

    def layer_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, variance) per dimension of the layer descriptor over all the skill's data."""
        if self.layer_sums is None:
            raise MissingStats("these statistics were computed without layers")
        sums, squares = (a.reshape(-1, a.shape[-1]).sum(0) for a in self._layer_arrays())
        mean = sums / self.n
        return mean, np.maximum(squares / self.n - mean**2, 0.0)

    def class_layer_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(means, variances), (C, e): the layer descriptor per class (domain *and* class:
        a rotated 3 is told from a rotated 8). Statistics stored by 0.2 hold the skill's
        sums alone: every class then gets the skill's moments."""
        sums, squares = self._layer_arrays()
        if sums.ndim == 1:
            mean, var = self.layer_moments()
            return np.tile(mean, (len(self.classes), 1)), np.tile(var, (len(self.classes), 1))
        mean = sums / self.counts[:, None]
        return mean, np.maximum(squares / self.counts[:, None] - mean**2, 0.0)

    def pixel_gaussians(self, shrink: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
        """(means (C, p), covariances (C, p, p)) of the pixel grid per class, each
        covariance shrunk towards (trace/p) I (a class has fewer samples than a
        full covariance has entries)."""
        if self.pixel_sums is None:
            raise MissingStats("these statistics were computed without pixels")
        n = self.counts[:, None]
        mean = self.pixel_sums / n
        cov = self.pixel_scatter / n[:, :, None] - mean[:, :, None] * mean[:, None, :]
        return mean, shrink_to_identity(cov, shrink, floor=1e-8)

    def _layer_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self.layer_sums is None:
            raise MissingStats("these statistics were computed without layers")
        return self.layer_sums, self.layer_squares

    def check(self, what: str = "statistics") -> RouteStats:
        """Shapes agree and every number is finite and sane; raises InvalidEmbedding."""
        c, d = self.class_sums.shape if self.class_sums.ndim == 2 else (-1, -1)
        problems = []
        if c < 1 or len(self.classes) != c or self.counts.shape != (c,):
            problems.append(
                f"{len(self.classes)} classes, counts {self.counts.shape}, "
                f"class sums {self.class_sums.shape}"
            )
        elif self.scatter.shape != (d, d):
            problems.append(f"scatter is {self.scatter.shape}, features are {d}-d")
        elif (self.counts <= 0).any():
            problems.append("a class with no samples")
        if (self.layer_sums is None) != (not self.layers) or (
            self.layers
            and (
                self.layer_sums.shape != self.layer_squares.shape
                or self.layer_sums.ndim not in (1, 2)
                or (self.layer_sums.ndim == 2 and len(self.layer_sums) != c)
            )
        ):
            problems.append("layer sums do not match the layer names and classes")
        if (self.pixel_sums is None) != (self.pixel_scatter is None) or (
            self.pixel_sums is not None
            and (
                self.pixel_sums.ndim != 2
                or len(self.pixel_sums) != c
                or self.pixel_scatter.shape != (c, *self.pixel_sums.shape[1:] * 2)
            )
        ):
            problems.append("pixel sums and second moments do not match the classes")
        arrays = [self.counts, self.class_sums, self.scatter]
        arrays += [self.layer_sums, self.layer_squares] if self.layers else []
        arrays += [self.pixel_sums, self.pixel_scatter] if self.pixel_sums is not None else []
        if not problems and not all(np.isfinite(a).all() for a in arrays):
            problems.append("NaN or Inf in the features")
        if problems:
            raise InvalidEmbedding(f"{what}: " + "; ".join(problems))
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for the catalog (numbers and strings only; nothing pickled)."""
        out = {
            "classes": np.asarray(self.classes, np.int64),
            "counts": self.counts,
            "class_sums": self.class_sums,
            "scatter": self.scatter,
        }
        if self.layers:
            out |= {
                "layers": np.asarray(self.layers, dtype=str),
                "layer_sums": self.layer_sums,
                "layer_squares": self.layer_squares,
            }
        if self.pixel_sums is not None:
            out |= {"pixel_sums": self.pixel_sums, "pixel_scatter": self.pixel_scatter}
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], what: str = "statistics") -> RouteStats:
        missing = sorted({"classes", "counts", "class_sums", "scatter"} - set(arrays))
        if missing or set(arrays) - set(_ARRAYS):
            raise InvalidEmbedding(f"{what}: stored arrays {sorted(arrays)} (missing {missing})")
        layers = tuple(str(s) for s in arrays.get("layers", ()))
        f64 = lambda k: None if k not in arrays else np.asarray(arrays[k], np.float64)  # noqa: E731
        return cls(
            tuple(int(c) for c in arrays["classes"]),
            f64("counts"),
            f64("class_sums"),
            f64("scatter"),
            layers,
            f64("layer_sums"),
            f64("layer_squares"),
            f64("pixel_sums"),
            f64("pixel_scatter"),
        ).check(what)


def compute_stats(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    layers: Sequence[str] | None = None,
    head: str | None = None,
    batch_size: int = 256,
) -> RouteStats:
    """Statistics of a skill's data from the bare base (adapters off, one pass).

    ``layers`` defaults to ``default_layers(model)``; pass ``()`` for none. Image
    batches also get their pixel statistics (``pixel_features``).
    Raises ``InvalidEmbedding`` on empty data, mismatched labels or NaN features.
    """
    from .adapters.inject import disabled

    y = torch.as_tensor(y).reshape(-1).long()
    if len(x) == 0 or len(x) != len(y):
        raise InvalidEmbedding(
            f"stats need examples with one label each, got {len(x)} and {len(y)}"
        )
    layers = tuple(default_layers(model) if layers is None else layers)
    with disabled(model):
        f, desc = route_features(model, x, layers=layers, head=head, batch_size=batch_size)
    if not torch.isfinite(f).all() or (desc is not None and not torch.isfinite(desc).all()):
        raise InvalidEmbedding("stats: the backbone gave NaN or Inf features for this data")
    pix = pixel_features(x)
    if pix is not None and not torch.isfinite(pix).all():
        raise InvalidEmbedding("stats: NaN or Inf in the images")
    return stats_from_features(f, y, layers=layers, desc=desc, pixels=pix)


def stats_from_features(
    f: torch.Tensor,
    y: torch.Tensor,
    *,
    layers: Sequence[str] = (),
    desc: torch.Tensor | None = None,
    pixels: torch.Tensor | None = None,
) -> RouteStats:
    """The sums of features ``f`` (N, d) by label ``y``; ``desc`` is the layer descriptor
    of ``layers`` and ``pixels`` the ``pixel_features`` (routing), or None. Learners use it for class Gaussians of the
    features their head reads (classifier alignment)."""
    y = torch.as_tensor(y).reshape(-1).long()
    f64 = f.detach().double().cpu()
    classes = torch.unique(y)
    onehot = (y[:, None] == classes[None, :]).double()
    d = None if desc is None else desc.detach().double().cpu()
    px = None if pixels is None else pixels.detach().double().cpu()
    return RouteStats(
        tuple(int(c) for c in classes),
        onehot.sum(0).numpy(),
        (onehot.T @ f64).numpy(),
        (f64.T @ f64).numpy(),
        layers,
        None if d is None else (onehot.T @ d).numpy(),
        None if d is None else (onehot.T @ (d * d)).numpy(),
        None if px is None else (onehot.T @ px).numpy(),
        None if px is None else torch.einsum("nc,np,nq->cpq", onehot, px, px).numpy(),
    ).check()


ROUTE = "route"  # the set routers read: bare-backbone features, stored under plain keys
HEAD = "head"  # the features a skill's classifier reads (the adapted model's), for alignment
_SEP = ":"  # a set other than ROUTE is stored under "<set>:<key>"


def sets_to_arrays(sets: Mapping[str, RouteStats]) -> dict[str, np.ndarray]:
    """One flat key -> array mapping of named statistics sets for the catalog: the
    routing set under its own keys (as 0.2 stored it), every other under ``set:key``."""
    out: dict[str, np.ndarray] = {}
    for name, stats in sets.items():
        if not isinstance(stats, RouteStats):
            raise ConfigError(f"statistics {name!r} must be RouteStats, got {type(stats).__name__}")
        if not name.isidentifier():
            raise ConfigError(f"a statistics set needs an identifier for a name, got {name!r}")
        prefix = "" if name == ROUTE else name + _SEP
        out |= {prefix + k: v for k, v in stats.check(f"statistics {name!r}").to_arrays().items()}
    return out


def sets_from_arrays(
    arrays: Mapping[str, np.ndarray], what: str, keep: Callable[[str], bool] = lambda _: True
) -> dict[str, RouteStats]:
    """The named sets ``sets_to_arrays`` stored (a version may hold any of them); only
    the sets whose name ``keep`` accepts are read and checked."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        name, _, field_ = key.rpartition(_SEP)
        grouped.setdefault(name or ROUTE, {})[field_] = value
    return {n: RouteStats.from_arrays(a, f"{n} {what}") for n, a in grouped.items() if keep(n)}


PROTOTYPES = "prototypes"  # FAISS space of class means (pooled feature), one row per class
LAYER_STATS = "layer-stats"  # FAISS space of each skill's mean layer descriptor


def stats_vectors(stats: RouteStats) -> dict[str, np.ndarray]:
    """The vectors a skill's statistics put into retrieval spaces (normalised by the index)."""
    out = {PROTOTYPES: stats.means().astype(np.float32)}
    if stats.layers:
        out[LAYER_STATS] = stats.layer_moments()[0][None].astype(np.float32)
    return out


def pooled_within(stats: Sequence[RouteStats]) -> tuple[np.ndarray, float]:
    """(summed within-class scatter, degrees of freedom) over several skills' statistics."""
    dims = {s.dim for s in stats}
    if len(dims) != 1:
        raise InvalidEmbedding(f"statistics of different feature dimensions {sorted(dims)}")
    scatter = sum(s.within_scatter() for s in stats)
    dof = sum(s.n - len(s.classes) for s in stats)
    return scatter, max(dof, 1.0)


def shrink_to_identity(cov: np.ndarray, shrink: float, floor: float = 0.0) -> np.ndarray:
    """``(1 - shrink) cov + shrink (trace/d + floor) I`` for one covariance (d, d) or a
    stack (..., d, d): what few samples leave of a full covariance stays invertible."""
    d = cov.shape[-1]
    scale = np.trace(cov, axis1=-2, axis2=-1)[..., None, None] / d + floor
    return (1 - shrink) * cov + shrink * scale * np.eye(d)


def shrunk_covariance(
    stats: Sequence[RouteStats], shrink: float = 0.1, floor: float = 0.0
) -> np.ndarray:
    """Shared covariance of the pooled feature over skills, shrunk towards (trace/d) I."""
    scatter, dof = pooled_within(stats)
    return shrink_to_identity(scatter / dof, shrink, floor)


__all__ = [
    "HEAD",
    "INPUT",
    "LAYER_STATS",
    "PROTOTYPES",
    "ROUTE",
    "MissingStats",
    "RouteStats",
    "compute_stats",
    "default_layers",
    "pixel_features",
    "pooled_within",
    "route_features",
    "sets_from_arrays",
    "sets_to_arrays",
    "shrink_to_identity",
    "shrunk_covariance",
    "stats_from_features",
    "stats_vectors",
]
