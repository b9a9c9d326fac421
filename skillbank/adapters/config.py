"""`LoRAConfig`: what to adapt and how, validated once and passed whole."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from ..errors import ConfigError

INIT_METHODS = ("kaiming", "gaussian", "zeros")


def _normalise_target(t: Any) -> str:
    if isinstance(t, type) and issubclass(t, nn.Module):
        return f"type:{t.__name__}"
    if isinstance(t, str) and t.strip():
        if t.startswith("re:"):
            try:
                re.compile(t[3:])
            except re.error as e:
                raise ConfigError(f"target {t!r} is not a valid regular expression: {e}") from None
        return t
    raise ConfigError(
        f"target {t!r} must be a module name, 're:<regex>', 'type:<Class>' or an nn.Module class"
    )


def matches(pattern: str, path: str, module: nn.Module | None = None) -> bool:
    """One rule for targets and rank/alpha patterns.

    ``name`` matches the exact path or a dotted suffix (``attn.qkv`` matches
    ``blocks.0.attn.qkv``); ``re:<regex>`` must match the whole path;
    ``type:<Class>`` matches modules with that class anywhere in their MRO.

    Args:
        pattern: a target or rank/alpha pattern key.
        path: the module's dotted path.
        module: the module itself (needed for ``type:`` patterns).
    """
    if pattern.startswith("type:"):
        return module is not None and any(c.__name__ == pattern[5:] for c in type(module).__mro__)
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    return path == pattern or path.endswith("." + pattern)


@dataclass(frozen=True)
class LoRAConfig:
    """A low-rank adapter: ``y = W x + (alpha / r) * B A x`` on every targeted module.

    ``targets`` entries are exact module paths, dotted suffixes, ``re:<regex>``
    or module classes (stored as ``type:<Class>``). ``rank_pattern`` and
    ``alpha_pattern`` override rank and alpha per module with the same rules.
    ``head`` names a module (e.g. the classifier) that trains fully with the
    adapter and travels with its skill.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    head: str | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, (str, type)) else tuple(self.targets)
        if not targets:
            raise ConfigError("targets is empty: name at least one module to adapt")
        object.__setattr__(self, "targets", tuple(_normalise_target(t) for t in targets))
        excl = (self.exclude,) if isinstance(self.exclude, (str, type)) else tuple(self.exclude)
        object.__setattr__(self, "exclude", tuple(_normalise_target(t) for t in excl))
        _check_rank("rank", self.rank)
        _check_alpha("alpha", self.alpha)
        for k, r in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{k!r}]", r)
        for k, a in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{k!r}]", a)
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INIT_METHODS:
            raise ConfigError(f"init must be one of {INIT_METHODS}, got {self.init!r}")

    def rank_for(self, path: str, module: nn.Module | None = None) -> int:
        """The rank of the module at ``path`` (``rank_pattern`` first, then ``rank``).

        Args:
            path: the module's dotted path.
            module: the module (for ``type:`` patterns).
        """
        return _lookup(self.rank_pattern, path, module, self.rank)

    def scale_for(self, path: str, module: nn.Module | None = None) -> float:
        """The scale of the module at ``path``: alpha / r, or alpha / sqrt(r) with rsLoRA.

        Args:
            path: the module's dotted path.
            module: the module (for ``type:`` patterns).
        """
        r = self.rank_for(path, module)
        a = _lookup(self.alpha_pattern, path, module, self.alpha)
        return a / math.sqrt(r) if self.use_rslora else a / r

    def selects(self, path: str, module: nn.Module) -> bool:
        """Whether ``targets`` match the module and ``exclude`` does not.

        Args:
            path: the module's dotted path.
            module: the module.
        """
        if any(matches(p, path, module) for p in self.exclude):
            return False
        return any(matches(p, path, module) for p in self.targets)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"], d["exclude"] = list(self.targets), list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        """The config ``to_dict`` wrote; unknown fields raise ConfigError.

        Args:
            d: the fields as ``to_dict`` returns them.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown LoRAConfig fields: {sorted(unknown)}")
        return cls(**d)


def _lookup(pattern: dict, path: str, module: nn.Module | None, default):
    # The longest matching key wins, so "blocks.0.attn.qkv" beats "qkv".
    hits = [k for k in pattern if matches(k, path, module)]
    return pattern[max(hits, key=len)] if hits else default


def _check_rank(what: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {r!r}")


def _check_alpha(what: str, a: Any) -> None:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
        raise ConfigError(f"{what} must be a positive finite number, got {a!r}")
