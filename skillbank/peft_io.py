"""Hugging Face PEFT LoRA folders in and out (``adapter_config.json`` + safetensors).

Weights only travel as safetensors: a folder that holds only the pickled
``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file

from storage.atomic import atomic_path, atomic_write

from .adapters.config import matches
from .errors import ConfigError, CorruptFile, UnsafeFile
from .fingerprint import Fingerprint, ModuleSig
from .safefile import check_finite, json_object, read_safetensors, real_number
from .skill import Skill, site_module

_PREFIX = "base_model.model."
_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D bases)"}


def _pattern(patterns: dict, path: str, default):
    hits = [k for k in patterns if matches(k, path)]
    return patterns[max(hits, key=len)] if hits else default


def _lora_numbers(cfg: dict, cfg_path: Path) -> tuple[int, float, dict, dict]:
    """r, lora_alpha and their per-module patterns, typed as PEFT writes them.

    A string "8", a float 2.5, a bool or a non-positive rank is refused, not
    coerced: a hand-edited config that says something odd should be looked at.
    """
    if "r" not in cfg or "lora_alpha" not in cfg:
        raise CorruptFile(f"{cfg_path}: malformed LoRA config (needs 'r' and 'lora_alpha')")
    r = real_number(cfg["r"], f"{cfg_path}: 'r'", positive_int=True)
    alpha = float(real_number(cfg["lora_alpha"], f"{cfg_path}: 'lora_alpha'"))
    patterns = []
    for key, ints in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise CorruptFile(
                f"{cfg_path}: '{key}' must be an object, got {type(pattern).__name__}"
            )
        for module, value in pattern.items():
            real_number(value, f"{cfg_path}: {key}[{module!r}]", positive_int=ints)
        patterns.append(dict(pattern))
    return r, alpha, patterns[0], patterns[1]


def read_peft(folder: Path, name: str | None = None) -> Skill:
    """A skill from a PEFT LoRA folder, checked like any other untrusted file.

    Args:
        folder: Holds ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: The skill's name (default: the folder's).
    """
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise ConfigError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        cfg = json_object(cfg_path.read_bytes())
    except OSError as e:
        raise CorruptFile(f"cannot read {cfg_path}: {e.strerror}") from None
    if cfg is None:
        raise CorruptFile(f"{cfg_path} is not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(
            f"{folder} holds a PEFT {cfg.get('peft_type')!r} adapter; only LORA can become a skill"
        )
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ConfigError(f"{folder}: PEFT LoRA with {what} is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise ConfigError(
            f"{folder}: PEFT LoRA with trained biases (bias={cfg.get('bias')!r}) is not supported"
        )
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise UnsafeFile(
                f"{folder} holds only adapter_model.bin (a pickle); skillbank reads safetensors only"
            )
        raise ConfigError(f"{folder} has no adapter_model.safetensors")
    r_default, alpha_default, rank_pattern, alpha_pattern = _lora_numbers(cfg, cfg_path)

    tensors, _ = read_safetensors(weights)
    check_finite(tensors, str(weights))
    factors, scales, head, mods = {}, {}, {}, {}
    for key, t in tensors.items():
        path = key.removeprefix(_PREFIX)
        for part in ("lora_A", "lora_B"):
            if f".{part}." in path:
                break
        else:
            if ".lora_" in path:
                raise ConfigError(
                    f"{weights}: unsupported LoRA tensor {key!r} (e.g. DoRA magnitudes, embeddings)"
                )
            head[path] = t
            continue
        module = path.split(f".{part}.")[0]
        if part == "lora_B":
            continue
        a, b = t, tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise CorruptFile(f"{weights}: {key!r} has no matching lora_B")
        r = a.shape[0]
        if b.shape[1] != r:
            raise CorruptFile(
                f"{weights}: {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}"
            )
        kind = "Conv2d" if a.dim() == 4 else "Linear"
        mods[module] = ModuleSig(kind, (b.shape[0], *a.shape[1:]))
        factors[module] = (a.reshape(r, -1).contiguous(), b.reshape(b.shape[0], r).contiguous())
        alpha = float(_pattern(alpha_pattern, module, alpha_default))
        scales[module] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        if r != _pattern(rank_pattern, module, r_default):
            raise CorruptFile(
                f"{weights}: {module!r} has rank {r}, the config says {_pattern(rank_pattern, module, r_default)}"
            )
    if not factors:
        raise CorruptFile(f"{weights} holds no LoRA tensors")
    heads = sorted({k.rpartition(".")[0] for k in head})
    config = {
        "rank": r_default,
        "alpha": alpha_default,
        "targets": sorted(mods),
        "use_rslora": bool(cfg.get("use_rslora")),
        "dropout": float(cfg.get("lora_dropout") or 0.0),
        "head": heads[0] if len(heads) == 1 else None,
    }
    skill = Skill(
        name or folder.name,
        factors,
        scales,
        config,
        Fingerprint(mods),
        head,
        {},
        {"source": "peft", "base_model_name_or_path": cfg.get("base_model_name_or_path")},
    )
    skill.check_shapes()
    return skill


def write_peft(skill: Skill, folder: Path) -> Path:
    """A folder ``peft.PeftModel.from_pretrained(model, folder)`` loads with equal outputs.

    Refuses a NaN/Inf skill before creating anything; each file is replaced atomically.

    Args:
        skill: The skill to export (no ``nn.MultiheadAttention`` q/k/v sites).
        folder: The output folder (created if missing).
    """
    skill.check_weights()
    if any(site != site_module(site) for site in skill.factors):
        raise ConfigError("PEFT export of nn.MultiheadAttention q/k/v adapters is not supported")
    ranks = skill.ranks
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = {m: skill.scales[m] * ranks[m] for m in skill.factors}
    alpha_default = Counter(alpha.values()).most_common(1)[0][0]
    tensors = {}
    for module, (a, b) in skill.factors.items():
        shape = skill.fingerprint.modules[module].shape
        conv = len(shape) == 4
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = (
            a.reshape(a.shape[0], *shape[1:]) if conv else a
        ).contiguous()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = (
            b.reshape(*b.shape, 1, 1) if conv else b
        ).contiguous()
    for key, t in skill.head.items():
        tensors[f"{_PREFIX}{key}"] = t.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": skill.metadata.get("base_model_name_or_path"),
        "r": r,
        "lora_alpha": alpha_default,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted(skill.factors),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: a for m, a in alpha.items() if a != alpha_default},
        "modules_to_save": sorted({k.rpartition(".")[0] for k in skill.head}) or None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_write(folder / "adapter_config.json", json.dumps(config, indent=2))
    return folder
