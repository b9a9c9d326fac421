"""What a skill knows of the base model it was trained on, to refuse the wrong one."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from storage.names import base_id as _base_id

from .adapters.inject import walk
from .adapters.layer import AdapterLayer
from .errors import MergedError


@dataclass(frozen=True)
class ModuleSig:
    """One adapted module: class, weight shape and dtype, optionally a weight hash."""

    kind: str
    shape: tuple[int, ...]
    dtype: str | None = None
    sha256: str | None = None

    def describe(self) -> str:
        return f"{self.kind} {tuple(self.shape)} {self.dtype or '?'}"


@dataclass(frozen=True)
class Fingerprint:
    modules: dict[str, ModuleSig] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {p: {**asdict(s), "shape": list(s.shape)} for p, s in sorted(self.modules.items())}

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprint:
        return cls(
            {
                p: ModuleSig(s["kind"], tuple(s["shape"]), s.get("dtype"), s.get("sha256"))
                for p, s in d.items()
            }
        )

    def structure(self) -> dict:
        """``to_dict`` without weight hashes: what the catalog compares bases by."""
        return {
            p: {k: v for k, v in sig.items() if k != "sha256"} for p, sig in self.to_dict().items()
        }

    def base_id(self) -> str:
        """The catalog's id of this base (``SkillBank.list(base_id=...)`` filters by it)."""
        return _base_id(self.structure())

    def digest(self) -> str:
        """Hash of the structure (paths, kinds, shapes): equal for the same architecture."""
        core = {p: [s.kind, list(s.shape)] for p, s in sorted(self.modules.items())}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def first_difference(self, actual: Fingerprint, strict: bool = True) -> str | None:
        """Where ``actual`` (a model) differs from this (a skill's) fingerprint, or None.

        Unknown fields (a dtype or hash the skill did not record) are not compared;
        ``strict=False`` compares kind and shape only.

        Args:
            actual: the fingerprint of the model to check.
            strict: also compare dtypes and weight hashes where both sides have them.
        """
        for path, want in sorted(self.modules.items()):
            have = actual.modules.get(path)
            if have is None:
                return f"'{path}': the skill adapts it but the model has no such module"
            if (want.kind, tuple(want.shape)) != (have.kind, tuple(have.shape)):
                return f"'{path}': skill expects {want.describe()}, model has {have.describe()}"
            if strict and want.dtype and have.dtype and want.dtype != have.dtype:
                return f"'{path}': skill expects dtype {want.dtype}, model has {have.dtype}"
            if strict and want.sha256 and have.sha256 and want.sha256 != have.sha256:
                return f"'{path}': base weights differ (sha256 {have.sha256[:12]} != {want.sha256[:12]})"
        return None


def _weight(module: nn.Module) -> torch.Tensor:
    return module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight


def fingerprint(
    model: nn.Module, paths: list[str] | None = None, hash_weights: bool = False
) -> Fingerprint:
    """Fingerprint of ``paths`` (default: every adapted module) of ``model``.

    Args:
        model: the model (unmerged).
        paths: module paths to include; None for every adapted module.
        hash_weights: record a sha256 of each base weight (slow on large models).
    """
    mods = {}
    for site in walk(model):
        module = site.module
        if isinstance(module, AdapterLayer):
            if module.merged is not None:
                raise MergedError(
                    "fingerprint of a merged model would hash merged weights; unmerge first"
                )
            module = module.base
        if (paths is None and not isinstance(site.module, AdapterLayer)) or (
            paths is not None and site.path not in paths
        ):
            continue
        w = _weight(module)
        digest = (
            hashlib.sha256(w.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()
            if hash_weights
            else None
        )
        mods[site.path] = ModuleSig(
            type(module).__name__, tuple(w.shape), str(w.dtype).removeprefix("torch."), digest
        )
    return Fingerprint(mods)
