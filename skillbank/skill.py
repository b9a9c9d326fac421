"""`Skill`: one task's adapter as plain data, and the way back onto a model.

A skill is tensors plus JSON: per-site low-rank factors (A: r x fan_in,
B: fan_out x r) with their scale, the config that made them, a fingerprint of
the base, an optional head (parameters by their path in the model), optional
task embeddings and free metadata. It is stored as one safetensors file whose
metadata holds the JSON; nothing is ever pickled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save as _save

from storage.atomic import atomic_write

from .adapters.config import LoRAConfig
from .adapters.inject import adapter_configs, adapter_layers, add_adapter, remove_adapter, walk
from .adapters.kinds import MultiheadAttentionAdapter
from .adapters.layer import AdapterLayer
from .errors import AdapterNotFound, BaseMismatch, CorruptFile
from .fingerprint import Fingerprint, fingerprint
from .safefile import check_finite, check_path, read_safetensors, real_number

if TYPE_CHECKING:
    from .route_stats import RouteStats

FORMAT = 1
_SITE = re.compile(r"(.*?)(\[[qkv]\])?")


def site_module(site: str) -> str:
    """The module path a site key belongs to (``attn[q]`` -> ``attn``).

    Args:
        site: A key of ``Skill.factors``.
    """
    return _SITE.fullmatch(site).group(1)


@dataclass
class Skill:
    """One task's adapter as plain data.

    Args:
        name: The skill's own name (a bank may store it under another).
        factors: Site -> (A: r x fan_in, B: fan_out x r).
        scales: Site -> the scale applied to ``B @ A``.
        config: The ``LoRAConfig`` (as a dict) that made the factors.
        fingerprint: The base model's modules the factors fit.
        head: Head parameters by their path in the model.
        embeddings: Space -> task embedding rows, stored with the skill.
        metadata: Free JSON (learner, parents, source, ...).
        extras: Tensors a learner needs beyond factors and head.
        stats: Statistics of the task's data by what they describe (``"head"``: the
            features the classifier reads, for classifier alignment). ``bank.add``
            keeps them in the catalog with the version and ``bank.get`` gives them
            back; the file never holds them (one store for every statistic).
    """

    name: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]
    config: dict[str, Any]
    fingerprint: Fingerprint
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    # tensors a learner needs beyond factors and head (e.g. PSEC's compositor)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, RouteStats] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------ facts
    @property
    def ranks(self) -> dict[str, int]:
        return {s: a.shape[0] for s, (a, _) in self.factors.items()}

    @property
    def targets(self) -> list[str]:
        return sorted({site_module(s) for s in self.factors})

    @property
    def factor_params(self) -> int:
        """Parameters of the low-rank factors alone (what attaching adds to the adapted layers)."""
        return sum(a.numel() + b.numel() for a, b in self.factors.values())

    @property
    def num_params(self) -> int:
        return (
            self.factor_params
            + sum(t.numel() for t in self.head.values())
            + sum(t.numel() for t in self.extras.values())
        )

    def delta(self, site: str) -> torch.Tensor:
        """The dense update ``scale * B @ A`` of one site, shaped (fan_out, fan_in).

        Args:
            site: A key of ``factors``.
        """
        a, b = self.factors[site]
        return self.scales[site] * (b.float() @ a.float())

    def base_difference(self, model: nn.Module, strict: bool = True) -> str | None:
        """Where ``model`` differs from the base this skill was trained on, or None.

        ``strict`` also compares dtypes and, when the skill recorded them, weight
        hashes; ``strict=False`` compares module kinds and shapes only.
        """
        modules = self.fingerprint.modules
        hashed = strict and any(s.sha256 for s in modules.values())
        return self.fingerprint.first_difference(
            fingerprint(model, list(modules), hash_weights=hashed), strict
        )

    # ------------------------------------------------------- from a model
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        name: str,
        *,
        hash_weights: bool = False,
        metadata: dict | None = None,
    ) -> Skill:
        """Snapshot adapter ``name`` (and its config's head) from a live model.

        Args:
            model: The model carrying the adapter.
            name: The adapter to snapshot.
            hash_weights: Also fingerprint the base weights' sha256 (strict attach).
            metadata: Free JSON to keep with the skill.
        """
        configs = adapter_configs(model)
        if name not in configs:
            raise AdapterNotFound(f"no adapter named {name!r}; the model has {sorted(configs)}")
        factors, scales, paths = {}, {}, []
        for layer in adapter_layers(model):
            if name not in layer.lora_A:
                continue
            paths.append(layer.path)
            for site, (a, b) in layer.get_factors(name).items():
                factors[layer.path + site] = (_snap(a), _snap(b))
                scales[layer.path + site] = layer.scaling[name]
        cfg = configs[name]
        head = {}
        if cfg.head:
            head = {
                f"{cfg.head}.{k}": _snap(v)
                for k, v in _module(model, cfg.head).state_dict().items()
            }
        return cls(
            name,
            factors,
            scales,
            cfg.to_dict(),
            fingerprint(model, paths, hash_weights),
            head,
            {},
            dict(metadata or {}),
        )

    # --------------------------------------------------------------- files
    def to_bytes(self) -> bytes:
        """The skill as one safetensors file (the JSON header in its metadata)."""
        tensors = {}
        for site, (a, b) in self.factors.items():
            tensors[f"A:{site}"], tensors[f"B:{site}"] = a.contiguous(), b.contiguous()
        for key, t in self.head.items():
            tensors[f"head:{key}"] = t.contiguous()
        for key, t in self.extras.items():
            tensors[f"extra:{key}"] = t.contiguous()
        for space, v in self.embeddings.items():
            tensors[f"emb:{space}"] = torch.from_numpy(
                np.ascontiguousarray(np.atleast_2d(v), dtype=np.float32)
            )
        header = {
            "format": FORMAT,
            "name": self.name,
            "scales": self.scales,
            "config": self.config,
            "fingerprint": self.fingerprint.to_dict(),
            "metadata": self.metadata,
        }
        return _save(tensors, {"skillbank": json.dumps(header)})

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "skill") -> Skill:
        """A skill from untrusted bytes, checked (header, shapes, finite weights) before use.

        Args:
            data: A safetensors file written by ``to_bytes``.
            what: How errors name the source.
        """
        tensors, meta = read_safetensors(data, what)
        if "skillbank" not in meta:
            raise CorruptFile(
                f"{what} is a safetensors file but not a skillbank skill (no 'skillbank' metadata)"
            )
        try:
            header = json.loads(meta["skillbank"])
            if not isinstance(header, dict):
                raise CorruptFile(f"{what}: the skill header is not a JSON object")
            if header.get("format") != FORMAT:
                raise CorruptFile(
                    f"{what} has skill format {header.get('format')!r}; this skillbank reads {FORMAT}"
                )
            _expect(
                what, header, {"name": str, "scales": dict, "config": dict, "fingerprint": dict}
            )
            _expect(what, {"metadata": header.get("metadata", {})}, {"metadata": dict})
            factors = {}
            for site, scale in header["scales"].items():
                a, b = tensors[f"A:{site}"], tensors[f"B:{site}"]
                real_number(scale, f"{what}: scale of site {site!r}")
                if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                    raise CorruptFile(
                        f"{what}: site {site!r} has factors {tuple(a.shape)} and {tuple(b.shape)}, not (r, in) and (out, r)"
                    )
                factors[site] = (a, b)
            head = {k[5:]: t for k, t in tensors.items() if k.startswith("head:")}
            emb = {k[4:]: t.numpy() for k, t in tensors.items() if k.startswith("emb:")}
            extras = {k[6:]: t for k, t in tensors.items() if k.startswith("extra:")}
            skill = cls(
                header["name"],
                factors,
                {k: float(v) for k, v in header["scales"].items()},
                header["config"],
                Fingerprint.from_dict(header["fingerprint"]),
                head,
                emb,
                header.get("metadata", {}),
                extras,
            )
        except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as e:
            if isinstance(e, CorruptFile):
                raise
            raise CorruptFile(f"{what}: malformed skill header ({type(e).__name__}: {e})") from None
        check_finite(tensors, what)
        skill.check_shapes()
        return skill

    def check_weights(self) -> None:
        """Finite factors, head and scales: a NaN skill is refused, never stored or attached."""
        what = f"skill {self.name!r}"
        check_finite(
            {f"{s}.{i}": t for s, ab in self.factors.items() for i, t in enumerate(ab)}, what
        )
        check_finite(self.head, f"{what} head")
        check_finite(self.extras, f"{what} extras")
        for site, scale in self.scales.items():
            real_number(scale, f"{what}: scale of site {site!r} (NaN or Inf?)")

    def save(self, path: str | Path) -> Path:
        """Write atomically (``storage.atomic``) so a crash never leaves half a skill;
        a skill with NaN/Inf weights is refused before anything is written.

        Args:
            path: The file to write (its directory must exist); an existing one is replaced.
        """
        path = check_path(path, "skill file path")
        self.check_weights()
        return atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Skill:
        """A skill from a file ``save`` wrote (checked as untrusted input).

        Args:
            path: The skill's safetensors file.
        """
        path = check_path(path, "skill file path")
        if not path.is_file():
            raise CorruptFile(f"no skill file at {path}")
        return cls.from_bytes(path.read_bytes(), str(path))

    @classmethod
    def from_peft(cls, path: str | Path, name: str | None = None) -> Skill:
        """A skill from a Hugging Face PEFT LoRA folder (safetensors only).

        Args:
            path: The PEFT folder.
            name: The skill's name (default: the folder's).
        """
        from .peft_io import read_peft

        return read_peft(check_path(path, "PEFT folder"), name)

    def to_peft(self, path: str | Path) -> Path:
        """Write a PEFT LoRA folder that ``PeftModel.from_pretrained`` loads.

        Args:
            path: The folder (created if missing).
        """
        from .peft_io import write_peft

        return write_peft(self, check_path(path, "PEFT folder"))

    def check_shapes(self) -> None:
        """Factors must fit the fingerprinted modules (catches hand-edited files)."""
        for site, (a, b) in self.factors.items():
            sig = self.fingerprint.modules.get(site_module(site))
            if sig is None:
                raise CorruptFile(f"site {site!r} has no fingerprinted module")
            fan_out = sig.shape[0] // 3 if site.endswith("]") else sig.shape[0]
            fan_in = int(np.prod(sig.shape[1:]))
            if (b.shape[0], a.shape[1]) != (fan_out, fan_in):
                raise CorruptFile(
                    f"site {site!r}: factors give ({b.shape[0]}, {a.shape[1]}), module is ({fan_out}, {fan_in})"
                )

    def __repr__(self) -> str:
        return f"Skill({self.name!r}, sites={len(self.factors)}, params={self.num_params}, ranks={sorted(set(self.ranks.values()))})"


def _expect(what: str, header: dict, types: dict[str, type]) -> None:
    for key, kind in types.items():
        if not isinstance(header[key], kind):
            raise CorruptFile(
                f"{what}: skill header field {key!r} must be a {kind.__name__}, "
                f"got {type(header[key]).__name__}"
            )


def _snap(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _module(model: nn.Module, path: str) -> nn.Module:
    for s in walk(model):
        if s.path == path:
            return s.module.base if isinstance(s.module, AdapterLayer) else s.module
    raise CorruptFile(f"the model has no module {path!r}")


def attach(
    model: nn.Module,
    skill: Skill,
    name: str | None = None,
    *,
    strict: bool = True,
    load_head: bool = True,
    activate: bool = True,
) -> str:
    """Add ``skill`` to ``model`` as adapter ``name`` (default: the skill's name) with its weights.

    Refuses (BaseMismatch, naming the first differing module) a model the skill
    was not trained on. On any error the model is left as it was.

    Args:
        model: The base model.
        skill: The skill to attach.
        name: The adapter's name (default: the skill's).
        strict: Also compare base weight hashes when the skill has them; False
            checks only module kinds and shapes.
        load_head: Copy the skill's head parameters into the model.
        activate: Make the new adapter active.

    Returns:
        The adapter's name.
    """
    name = name or skill.name
    diff = skill.base_difference(model, strict)
    if diff:
        raise BaseMismatch(f"cannot attach skill {skill.name!r}: base model differs at {diff}")
    skill.check_shapes()
    skill.check_weights()
    head_params = {}
    if load_head and skill.head:
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        for key, t in skill.head.items():
            if key not in named or named[key].shape != t.shape:
                got = tuple(named[key].shape) if key in named else "nothing"
                raise BaseMismatch(
                    f"skill head {key!r} {tuple(t.shape)} does not fit the model ({got})"
                )
            head_params[key] = named[key]
        check_finite(skill.head, f"skill {skill.name!r} head")
    ranks: dict[str, set] = {}
    for site, r in skill.ranks.items():
        ranks.setdefault(site_module(site), set()).add(r)
    uneven = [p for p, rs in ranks.items() if len(rs) > 1]
    if uneven:
        raise CorruptFile(f"skill {skill.name!r}: q, k, v of '{uneven[0]}' have different ranks")
    exact = {p: "re:" + re.escape(p) for p in ranks}
    cfg = LoRAConfig(
        rank=max(r for rs in ranks.values() for r in rs),
        alpha=1.0,
        targets=tuple(exact.values()),
        rank_pattern={exact[p]: next(iter(rs)) for p, rs in ranks.items()},
        head=skill.config.get("head") if load_head and skill.head else None,
    )
    add_adapter(model, name, cfg, activate=activate)
    try:
        for layer in adapter_layers(model):
            if name not in layer.lora_A:
                continue
            sites = (
                MultiheadAttentionAdapter.sites
                if isinstance(layer, MultiheadAttentionAdapter)
                else ("",)
            )
            # an out_proj that came with its attention module
            if layer.path + sites[0] not in skill.factors:
                raise BaseMismatch(
                    f"the model adapts '{layer.path}' alongside the skill's modules but the skill has no weights for it"
                )
            layer.set_factors(name, {s: skill.factors[layer.path + s] for s in sites})
            layer.scaling[name] = skill.scales[layer.path + sites[0]]
        with torch.no_grad():
            for key, p in head_params.items():
                p.copy_(skill.head[key])
    except Exception:
        remove_adapter(model, name)
        raise
    adapter_configs(model)[name] = (
        LoRAConfig.from_dict(skill.config) if _config_ok(skill.config) else cfg
    )
    return name


def _config_ok(d: dict) -> bool:
    try:
        LoRAConfig.from_dict(d)
        return True
    except Exception:
        return False
