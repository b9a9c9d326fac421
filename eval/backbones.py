"""Backbones for the evaluator: build one by name, pretrain it once on a source split, cache it.

Names resolve in this order: our presets (`PRESETS`, small timm ViTs and a
batch-norm ResNet sized for 28 x 28 inputs on a CPU), ``"open_clip:<model>"``
(an open_clip vision tower built with random weights plus a linear head), then
any timm model name.
Nothing here downloads unless asked: `create_backbone` and `pretrain` build timm
and open_clip models with random weights (or a local file); `from_weights` fetches
a timm model's published weights only with ``pretrained=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eval.data import Task
from learners.base import TrainConfig, resolve_device, train
from skillbank.embed import features  # noqa: F401  (re-exported: pooled pre-logits)
from skillbank.errors import ConfigError
from skillbank.files import atomic_path

# name -> (architecture, constructor kwargs). Sized for 28 x 28 inputs on a CPU.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # ~0.14 M parameters. Mean-pooled tokens (no class token) and, by default, a
    # 4 x 4 token grid (patch 7 on 28 x 28): on a small MNIST source split it
    # learns much faster than a finer grid (patch 4).
    "vit_micro": (
        "vit",
        dict(
            embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, global_pool="avg", class_token=False
        ),
    ),
    # For tests and smoke runs.
    "vit_nano": (
        "vit",
        dict(
            embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, global_pool="avg", class_token=False
        ),
    ),
    # Larger, for a GPU.
    "vit_mini": ("vit", dict(embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0)),
    # ~0.32 M parameters: a timm ResNet with batch norms (one basic block per stage,
    # widths 16-128), where BN-adapt and Tent have running statistics to work on.
    "resnet_micro": (
        "resnet",
        dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16),
    ),
}


def _preset(name: str, in_chans: int, img_size: Any, num_classes: int, patch_size: int, **kw: Any):
    arch, preset = PRESETS[name]
    if arch == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            **{**preset, **kw},
        )
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, in_chans=in_chans, num_classes=num_classes, **{**preset, **kw})
    model.pretrained_cfg = {"classifier": "fc"}  # built from the class, not timm's registry
    return model


CACHE_ENV = "SKILLBANK_CACHE"
DEFAULT_CACHE = "~/.cache/skillbank"
_CACHE_VERSION = 2  # bump when the training recipe changes, to invalidate old cache entries


class OpenCLIPClassifier(nn.Module):
    """An open_clip vision tower with a linear head, exposing timm's feature interface.

    Grayscale inputs are repeated to the three channels the tower expects.
    """

    def __init__(self, visual: nn.Module, embed_dim: int, num_classes: int, in_chans: int) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"open_clip towers take 1 (repeated) or 3 channels, not {in_chans}")
        self.visual = visual
        self.in_chans = in_chans
        self.num_features = embed_dim
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x.expand(-1, 3, -1, -1) if self.in_chans == 1 else x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _open_clip(
    model: str, in_chans: int, img_size: Any, num_classes: int, patch_size: int, **kw: Any
) -> nn.Module:
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model!r}; see open_clip.list_models()")
    vision = dict(cfg["vision_cfg"])
    vision["image_size"] = img_size
    if "patch_size" in vision and not vision.get("timm_model_name"):
        vision["patch_size"] = patch_size
    vision.update(kw)  # e.g. layers=2, width=128 for a small tower
    from open_clip.model import _build_vision_tower

    visual = _build_vision_tower(cfg["embed_dim"], vision, quick_gelu=cfg.get("quick_gelu", False))
    return OpenCLIPClassifier(visual, cfg["embed_dim"], num_classes, in_chans)


def check_name(name: str) -> None:
    """Refuse an unknown backbone name before anything is built or trained."""
    import timm

    if name in PRESETS or name.startswith("open_clip:") or timm.is_model(name):
        return
    raise ConfigError(
        f"unknown backbone {name!r}: not a preset ({', '.join(PRESETS)}), "
        "not 'open_clip:<name>', not a timm model"
    )


def create_backbone(
    name: str,
    *,
    in_chans: int = 1,
    img_size: int | tuple[int, int] = 28,
    num_classes: int = 10,
    patch_size: int | None = None,
    weights: str | Path | None = None,
    **kw: Any,
) -> nn.Module:
    """Build a backbone by name, with random weights unless ``weights`` names a local file.

    ``img_size`` and ``patch_size`` reach the models that take them (ViTs);
    others (ResNets, ...) are built without them. ``patch_size=None`` means
    ``min(img_size) // 4`` for our presets (a 4 x 4 token grid: 7 on 28 x 28, 2 on
    8 x 8) and 4 for timm / open_clip ViTs. Extra ``kw`` go to the model
    constructor (for open_clip: into its vision config).
    """
    import timm

    if patch_size is None:
        side = img_size if isinstance(img_size, int) else min(img_size)
        patch_size = max(1, side // 4) if name in PRESETS else 4
    if name in PRESETS:
        model: nn.Module = _preset(name, in_chans, img_size, num_classes, patch_size, **kw)
    elif name.startswith("open_clip:"):
        model = _open_clip(name.split(":", 1)[1], in_chans, img_size, num_classes, patch_size, **kw)
    else:
        check_name(name)
        base = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **kw)
        try:
            model = timm.create_model(name, img_size=img_size, patch_size=patch_size, **base)
        except TypeError as e:
            if "img_size" not in str(e) and "patch_size" not in str(e):
                raise
            model = timm.create_model(name, **base)  # a model without a patch grid (CNNs)
    if weights is not None:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local state dict strictly: safetensors, or .pt/.pth/.bin via ``weights_only=True``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights file {str(p)!r} not found")
    model.load_state_dict(_read_state(p), strict=True)
    return model


def _read_state(p: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file read with ``weights_only=True``."""
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    state = torch.load(p, map_location="cpu", weights_only=True)  # never unpickle code
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


# --------------------------------------------------------------------------- published weights

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def check_weights_spec(name: str, pretrained: bool, weights: str | Path | None) -> None:
    """Refuse a bad ``pretrained`` / ``weights`` pair before any data is read."""
    if pretrained and weights is not None:
        raise ConfigError("set either pretrained: true (weights from the hub) or weights: PATH")
    if not (pretrained or weights is not None):
        return
    if name in PRESETS or name.startswith("open_clip:"):
        raise ConfigError(
            f"pretrained/weights need a timm model name with published weights, not {name!r}"
        )
    check_name(name)
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise ConfigError(f"weights file {str(p)!r} not found")
        if p.suffix not in WEIGHT_SUFFIXES:
            raise ConfigError(
                f"weights file {str(p)!r}: expected one of {', '.join(WEIGHT_SUFFIXES)} "
                "(safetensors, or a torch state dict readable with weights_only=True)"
            )


class InputAdapter:
    """A forward pre-hook on ``patch_embed``: resize images to the size the weights were
    trained at and normalise them as they were, so streams keep small [0, 1] images
    in memory (CIFAR stays 32 x 32) and every path into the model (forward,
    forward_features) sees the same input."""

    def __init__(self, size: tuple[int, int], mean: Any, std: Any) -> None:
        self.size = tuple(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.device, x.dtype)) / self.std.to(x.device, x.dtype)
        return (x, *args[1:])


def from_weights(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **kw: Any,
) -> nn.Module:
    """A timm model at its native input size with published weights and a fresh head.

    ``pretrained`` fetches the weights from the hub (a clear error when offline);
    ``weights`` reads a local file (safetensors, or a torch state dict through
    ``weights_only=True``; never unpickled). Every weight but the classifier must
    match. The head is initialised from ``seed``. Returns the model in eval mode
    with ``pretrain_info`` like `pretrain`'s (nothing trained, so no accuracy).
    """
    import timm

    check_weights_spec(name, pretrained, weights)
    if not (pretrained or weights is not None):
        raise ConfigError("from_weights needs pretrained=True or weights=PATH")
    with torch.random.fork_rng(devices=[]):  # seed the head without touching the caller's RNG
        torch.default_generator.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kw)
        except (OSError, RuntimeError, ValueError) as e:  # hub errors subclass these
            if not pretrained:
                raise
            raise ConfigError(
                f"could not fetch the pretrained weights of {name!r} ({type(e).__name__}: {e}); "
                "when offline, download them once elsewhere and set weights: PATH "
                "(a .safetensors file) instead of pretrained: true"
            ) from e
    if weights is not None:
        _load_backbone_weights(model, Path(weights).expanduser())
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    grid = getattr(getattr(model, "patch_embed", None), "img_size", None)  # what the model takes
    size = tuple(grid) if grid is not None else tuple(cfg.get("input_size", (3, 224, 224))[1:])
    adapter = InputAdapter(size, cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3))
    # ViTs: on the patch embedding, so forward_features adapts too; other models: on forward.
    getattr(model, "patch_embed", model).register_forward_pre_hook(adapter)
    source = str(weights) if weights is not None else f"hub:{name}"
    model.pretrain_info = {
        "cached": True,
        "path": source,
        "key": hashlib.sha256(source.encode()).hexdigest()[:20],
        "test_acc": float("nan"),
        "train_seconds": 0.0,
    }
    return model.to(resolve_device(device)).eval()


def _load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Every weight but the classifier, strictly; the classifier keeps its fresh init."""
    import pickle

    try:
        state = _read_state(path)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError) as e:
        raise ConfigError(
            f"weights file {str(path)!r} is not a plain state dict (safetensors, or torch "
            f"tensors readable with weights_only=True); refusing it: {e}"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    head = _classifier(model)
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(f"{head}.")}
    missing = sorted(k for k in own if not k.startswith(f"{head}.") and k not in body)
    unexpected = sorted(k for k in body if k not in own)
    wrong = sorted(k for k in body if k in own and own[k].shape != body[k].shape)
    if missing or unexpected or wrong:
        raise ConfigError(
            f"weights file {str(path)!r} does not fit {type(model).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    model.load_state_dict(body, strict=False)


# --------------------------------------------------------------------------- pretraining


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Explicit ``cache_dir``, else ``$SKILLBANK_CACHE/backbones``, else ``~/.cache/skillbank/backbones``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE)).expanduser() / "backbones"


def pretrain(
    name: str,
    source_task: Task,
    *,
    epochs: int = 60,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    augment: bool = False,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    **kw: Any,
) -> nn.Module:
    """Train backbone ``name`` fully on ``source_task`` (AdamW, cosine schedule), cached.

    The weights are saved as safetensors under a key hashing everything that
    determines them (name, constructor kwargs, the data's fingerprint, epochs,
    seed, optimiser settings), so a second call with the same inputs loads the
    file instead of training. ``in_chans`` and ``img_size`` default to the
    task's. The backbone always trains with the source's own classes, so one
    cached file serves every stream over that source; a wider ``num_classes``
    (a stream with classes the source lacks) then gets zero rows appended to the
    head: those classes start at logit 0 until a learner trains them. Returns
    the model in eval mode, on ``device``, with
    ``model.pretrain_info`` = {"cached", "path", "key", "test_acc", "train_seconds"}.
    """
    c, h, w = source_task.image_shape
    width = kw.pop("num_classes", None)
    build = {
        "in_chans": c,
        "img_size": h if h == w else (h, w),
        "num_classes": 1 + max(source_task.classes),
        **kw,
    }
    if width is not None and width < build["num_classes"]:
        raise ConfigError(
            f"num_classes={width} is fewer than the source's {build['num_classes']} classes"
        )
    recipe = {
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "augment": augment,
        "version": _CACHE_VERSION,
    }
    config = {"name": name, "build": build, "recipe": recipe, "data": source_task.fingerprint()}
    blob = json.dumps(config, sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:20]
    path = cache_root(cache_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{key}.safetensors"
    dev = resolve_device(device)

    from safetensors import safe_open
    from safetensors.torch import load_model, save_model

    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.default_generator.manual_seed(seed)  # CPU generator only
        model = create_backbone(name, **build)
    if path.is_file():
        load_model(model, str(path), strict=True)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        info = {
            "cached": True,
            "path": str(path),
            "key": key,
            "test_acc": float(meta.get("test_acc", "nan")),
            "train_seconds": float(meta.get("train_seconds", "nan")),
        }
    else:
        model.to(dev)
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        steps = math.ceil(len(source_task.x_train) / batch_size)
        cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            b_ratio=1.0,
            warmup_steps=max(1, min(steps, epochs * steps // 10)),
            grad_clip=None,
            seed=seed,
            device=str(dev),
            progress=False,
        )
        train(
            model,
            source_task.x_train,
            source_task.y_train,
            cfg,
            transform=(lambda xb: _shift(xb, gen)) if augment else None,
            desc=f"pretrain {name}",
        )
        seconds = time.perf_counter() - t0
        test_acc = _evaluate(model, source_task, dev)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # concurrent pretrainers each write whole files
            save_model(
                model.cpu(),
                str(tmp),
                metadata={
                    "skillbank_config": blob,
                    "test_acc": repr(test_acc),
                    "train_seconds": repr(seconds),
                },
            )
        info = {
            "cached": False,
            "path": str(path),
            "key": key,
            "test_acc": test_acc,
            "train_seconds": seconds,
        }
    if width is not None and width > build["num_classes"]:
        _widen_head(model, width)
    model.to(dev).eval()
    model.pretrain_info = info
    return model


def _classifier(model: nn.Module) -> str:
    """The name of the model's classifier module (timm's ``pretrained_cfg``, else ``head``)."""
    return (getattr(model, "pretrained_cfg", {}) or {}).get("classifier", "head")


def _widen_head(model: nn.Module, width: int) -> None:
    """Append zero rows to the linear classifier so it has ``width`` outputs."""
    name = _classifier(model)
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"cannot widen the {type(old).__name__} head {name!r} of the backbone")
    new = nn.Linear(old.in_features, width, bias=old.bias is not None).to(old.weight)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: old.out_features] = old.weight
        if old.bias is not None:
            new.bias.zero_()
            new.bias[: old.out_features] = old.bias
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    if hasattr(model, "num_classes"):
        model.num_classes = width


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero fill): cheap augmentation for digits."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy.view(n, 1, 1) + torch.arange(h).view(1, h, 1)).to(x.device)
    cols = (dx.view(n, 1, 1) + torch.arange(w).view(1, 1, w)).to(x.device)
    idx = (rows * (w + 2 * max_shift) + cols).view(n, 1, h * w).expand(n, x.shape[1], h * w)
    return pad.flatten(2).gather(2, idx).view_as(x)


def _evaluate(model: nn.Module, task: Task, device: torch.device, batch_size: int = 512) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(task.x_test), batch_size):
            logits = model(task.x_test[i : i + batch_size].to(device))
            correct += int((logits.argmax(1).cpu() == task.y_test[i : i + batch_size]).sum())
    return correct / len(task.x_test)
