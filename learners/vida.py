"""ViDA (Liu et al., ICLR 2024): continual test-time adaptation with high- and
low-rank domain adapters.

Every targeted layer (a ViT's attention ``qkv`` and ``proj``, or a ResNet's
block convolutions, by default) gets two parallel adapters,
``y = W x + s_l B_l A_l x + s_h B_h A_h x``: a low-rank one (r = 1,
domain-shared knowledge) and a high-rank one (r > d/8, domain-specific
knowledge), B = 0 and A ~ N(0, 1/r^2) at init. They are two
named branches of the same adapter layers; the scale factors are the
branches' active weights, set per batch.

Per test batch (homeostatic knowledge allotment, then a mean-teacher step):

1. the teacher predicts N augmented views of the batch in one batched forward;
   the uncertainty ``U = 0.1 * mean variance of those logits`` (clipped to
   [0, 1] so that no scale turns negative); ``U >= threshold`` gives
   ``s_h = 1 + U, s_l = 1 - U``, else the reverse, on teacher and student;
2. the teacher predicts the clean batch: that is the method's prediction;
3. the student takes one Adam step on the cross-entropy against the
   teacher's soft prediction (adapters at ``lr``; with ``train_backbone`` the
   other parameters too, at ``lr_other``);
4. the teacher becomes an EMA of the student (``ema``; adapters at
   ``ema_adapters`` when set, as the official code allows).

The source stage comes first, as the paper's code runs it: the adapters train
on the labelled source split with the backbone frozen (its weights and batch-norm
statistics stay bit for bit), part of each batch seen through the views'
augmentations (``source_steps``, ``source_augment``). Batch norms then
normalise with each test batch in student and teacher alike.

Note on step 3: student and teacher start equal and see the same batch, so the
loss's gradient (student softmax minus teacher softmax) is zero until they
differ, and they differ only by what the EMA lags behind (and by rounding, which
Adam's normalised step turns into small moves in no useful direction); the
official code has the same property. Measured here, ViDA's gain over its source
stage is the test-batch normalisation (BN-adapt's), not the update (README,
test-time adaptation).

Lifelong record: ``domain_skill`` snapshots the teacher's two adapters as one
skill (low and high rank side by side: rank r_l + r_h, usable as a plain LoRA
too); ``domain_stats`` gives the statistics stored with it; ``load_skill`` puts
such a skill back into both branches, so a later visit of a known domain starts
from it (``start_from_bank``: the ``stats`` router's likelihood of the batch,
then adapt). Learners read the bank; the caller writes to it.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import skillbank as sb

from .base import TrainConfig, train
from .tta import (
    GradientMethod,
    online,
    register_method,
    soft_cross_entropy,
    use_batch_statistics,
)

LOW, HIGH = "vida_low", "vida_high"
RESNET_CONVS = r"layer\d+\.\d+\.conv\d+"  # timm / torchvision ResNet block convolutions


# --------------------------------------------------------------------------- pure pieces


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """Where ViDA's adapters go when not told: a ViT's attention ``qkv`` and ``proj``
    (as the paper), else the convolutions of a ResNet's residual blocks."""
    paths = [n for n, _ in model.named_modules()]
    if any(p == "attn.qkv" or p.endswith(".attn.qkv") for p in paths):
        return ("attn.qkv", "attn.proj")
    if any(re.fullmatch(RESNET_CONVS, p) for p in paths):
        return ("re:" + RESNET_CONVS,)
    raise sb.ConfigError(
        "vida: no attention qkv/proj or ResNet block convolutions in this model; "
        "name the modules to adapt with targets=(...)"
    )


def uncertainty(view_logits: torch.Tensor, factor: float = 0.1) -> float:
    """``factor *`` the mean over samples and classes of the variance across views.

    ``view_logits``: (N views, B, classes).
    """
    return float(factor * view_logits.float().var(0).mean())


def allot(u: float, threshold: float) -> tuple[float, float]:
    """Homeostatic knowledge allotment: (s_low, s_high) from the uncertainty ``u``.

    Uncertain batches (``u >= threshold``) lean on the high-rank, domain-specific
    adapter; confident ones on the low-rank, domain-shared one.
    """
    u = min(max(u, 0.0), 1.0)
    return (1.0 - u, 1.0 + u) if u >= threshold else (1.0 + u, 1.0 - u)


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], rate: float) -> None:
    """``t <- rate * t + (1 - rate) * s`` for every pair, in place (one fused call)."""
    if teacher:
        torch._foreach_lerp_(teacher, student, 1.0 - rate)


def augment(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` randomly augmented copies of the batch ``x`` (N x C x H x W in [0, 1]), as one
    (n * N) batch, view-major: colour jitter (brightness, contrast), a small affine
    (rotation <= 10 deg, shift <= 1/14 of the side, scale 0.95-1.05), a Gaussian
    blur on half of the images, and Gaussian noise. No per-sample Python loop."""
    b = x.shape[0]
    m = n * b
    xs = x.unsqueeze(0).expand(n, *x.shape).reshape(m, *x.shape[1:])

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (torch.rand(m, *shape, generator=generator) * (hi - lo) + lo).to(x.device, x.dtype)

    mean = xs.mean(dim=(1, 2, 3), keepdim=True)
    xs = ((xs - mean) * u(0.8, 1.2, 1, 1, 1) + mean) * u(0.8, 1.2, 1, 1, 1)
    angle = u(-math.pi / 18, math.pi / 18)
    scale = u(0.95, 1.05)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, u(-1 / 7, 1 / 7)], 1),
            torch.stack([sin, cos, u(-1 / 7, 1 / 7)], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(xs.shape), align_corners=False)
    xs = F.grid_sample(xs, grid, mode="bilinear", padding_mode="border", align_corners=False)
    sigma = u(0.3, 1.0, 1, 1)
    k = torch.arange(-1, 2, device=x.device, dtype=x.dtype).view(1, 3)
    w = torch.exp(-(k**2) / (2 * sigma**2))
    w = w / w.sum(1, keepdim=True)  # (m, 3): a separable 3-tap kernel per image
    c = xs.shape[1]
    flat = xs.reshape(1, m * c, *xs.shape[2:])
    kh = w.repeat_interleave(c, 0).view(m * c, 1, 1, 3)
    blurred = F.conv2d(F.pad(flat, (1, 1, 0, 0), mode="replicate"), kh, groups=m * c)
    blurred = F.conv2d(
        F.pad(blurred, (0, 0, 1, 1), mode="replicate"), kh.transpose(2, 3), groups=m * c
    )
    use = (u(0, 1, 1, 1, 1) < 0.5).to(x.dtype)
    xs = use * blurred.view_as(xs) + (1 - use) * xs
    noise = torch.randn(xs.shape, generator=generator).to(x.device, x.dtype) * u(0.0, 0.05, 1, 1, 1)
    return (xs + noise).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- the method


@dataclass
class ViDA(GradientMethod):
    """ViDA: see the module docstring. The defaults are the values of the ViDA paper
    and its official code: N = 10 augmented views, U = 0.1 * mean variance of their
    logits, threshold 0.05 (the small-image value; 0.2 on ImageNet), teacher EMA 0.999,
    Adam at 1e-4 for the adapters and 1e-5 for the rest, low rank r_l = 1.
    ``high_rank`` is 16 for the 64-wide vit_micro (r > d/8) and the backbone stays
    frozen by default (so a domain skill is the whole adapted state). Higher rates,
    a faster teacher (EMA 0.99), a trained backbone, the views' mean as the target
    or an augmented view for the student all gave the same or worse mean error on
    corrupted MNIST-5k (seed 0, both presets), so the paper's values stay."""

    name: ClassVar[str] = "vida"

    low_rank: int = 1
    high_rank: int = 16  # > d/8 for d = 64 (vit_micro); the paper: 128 for d = 768
    # None: attention qkv and proj on a ViT, the residual blocks' convolutions on a ResNet
    targets: tuple[str, ...] | None = None
    views: int = 10
    unc_factor: float = 0.1
    threshold: float = 0.05  # small images (0.2 for ImageNet)
    ema: float = 0.999
    ema_adapters: float | None = None  # None: the adapters follow ``ema`` too
    lr: float = 1e-4  # adapters
    lr_other: float = 1e-5  # everything else, when ``train_backbone``
    train_backbone: bool = False
    # The source stage: the adapters train on the labelled source split, backbone
    # frozen, before any test-time step; ``source_augment`` of each batch is seen
    # through the views' augmentations. 0 steps skips it.
    source_steps: int = 300
    source_lr: float = 1e-3
    source_augment: float = 0.5
    # Set the branch scales per source batch by the same allotment as at test time
    # (the views' uncertainty under the current adapters), so that the adapters are
    # trained at the scales they will run at; off in the paper's code. Scales go back
    # to (1, 1) after the stage.
    source_allot: bool = False
    # Batch norms normalise with each test batch, in student and teacher alike (the
    # official code runs both in train mode); False keeps the source statistics.
    batch_stats: bool = True
    adapt: bool = True  # False: predict with the source-stage teacher, no test-time update
    bank_skills: bool = True  # the protocol banks the adapted state at the end of each domain
    retrieve: bool = True  # ... and, on a second pass, starts each domain from its skill

    teacher: nn.Module | None = field(default=None, init=False, repr=False)
    scales: tuple[float, float] = field(default=(1.0, 1.0), init=False)
    last_uncertainty: float = field(default=float("nan"), init=False)
    _gen: torch.Generator | None = field(default=None, init=False, repr=False)
    _pairs: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for what in ("low_rank", "high_rank", "views"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise sb.ConfigError(f"vida: {what} must be a positive int, got {v!r}")
        if self.views < 2:
            raise sb.ConfigError(
                f"vida: views must be at least 2 (a variance needs two), got {self.views}"
            )
        if self.low_rank >= self.high_rank:
            raise sb.ConfigError(
                f"vida: low_rank ({self.low_rank}) must be below high_rank ({self.high_rank})"
            )
        for what in ("ema", "ema_adapters"):
            v = getattr(self, what)
            if v is not None and not 0.0 <= v < 1.0:
                raise sb.ConfigError(f"vida: {what} must be in [0, 1), got {v}")
        if not (
            self.lr_other > 0 and self.source_lr > 0 and self.unc_factor > 0 and self.threshold >= 0
        ):
            raise sb.ConfigError(
                "vida: lr_other, source_lr and unc_factor must be positive, threshold >= 0"
            )
        if (
            isinstance(self.source_steps, bool)
            or not isinstance(self.source_steps, int)
            or self.source_steps < 0
        ):
            raise sb.ConfigError(
                f"vida: source_steps must be an int >= 0, got {self.source_steps!r}"
            )
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if self.targets is not None:
            self.targets = tuple(self.targets)
            if not self.targets:
                raise sb.ConfigError("vida: targets is empty")
        if not isinstance(self.source_allot, bool):
            raise sb.ConfigError(
                f"vida: source_allot must be true or false, got {self.source_allot!r}"
            )
        if isinstance(self.source_augment, bool) or not 0.0 <= self.source_augment <= 1.0:
            raise sb.ConfigError(
                f"vida: source_augment is a fraction in [0, 1], got {self.source_augment!r}"
            )

    # ------------------------------------------------------------ setup
    def setup(self, model: nn.Module, source=None) -> None:
        """Add both adapters to ``model`` (which this method then owns), warm them up on
        ``source`` (a labelled task) when given, and make the teacher."""
        super().setup(model, source)
        taken = {LOW, HIGH} & set(sb.adapter_names(self.model))
        if taken:
            raise sb.ConfigError(
                f"vida: the model already has adapters {sorted(taken)}; give it a fresh source model"
            )
        self._targets = self.targets or default_targets(self.model)
        # A's draw follows ``seed``; the caller's RNG is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for name, r in ((LOW, self.low_rank), (HIGH, self.high_rank)):
                sb.add_adapter(
                    self.model,
                    name,
                    sb.LoRAConfig(rank=r, alpha=float(r), targets=self._targets, init="gaussian"),
                    activate=False,
                )
        self._layers = sb.adapter_layers(self.model)
        for layer in self._layers:
            for p in layer.adapter_parameters(LOW) + layer.adapter_parameters(HIGH):
                p.requires_grad_(True)  # adding HIGH froze LOW
        self._gen = torch.Generator().manual_seed(self.seed)
        self._set_scales(self._layers, (1.0, 1.0))
        if source is not None and self.source_steps:
            train(
                self.model,
                source.x_train,
                source.y_train,
                TrainConfig(
                    steps=self.source_steps,
                    lr=self.source_lr,
                    b_ratio=1.0,
                    batch_size=64,
                    seed=self.seed,
                    device=self.device,
                    progress=False,
                    grad_clip=1.0,
                ),
                transform=(
                    self._source_transform if self.source_augment or self.source_allot else None
                ),
                desc="vida source stage",
            )
            self._set_scales(self._layers, (1.0, 1.0))
        if self.train_backbone:
            for p in self.model.parameters():
                p.requires_grad_(True)
        self.model.eval()
        self.teacher = copy.deepcopy(self.model).eval()
        self.teacher.requires_grad_(False)
        if self.batch_stats and self.adapt:
            use_batch_statistics(self.model)
            use_batch_statistics(self.teacher)
        self._teacher_layers = sb.adapter_layers(self.teacher)
        self.opt = None
        self._pairs = None

    def _source_transform(self, xb: torch.Tensor) -> torch.Tensor:
        k = round(self.source_augment * len(xb))
        xb = torch.cat([augment(xb[:k], 1, self._gen), xb[k:]]) if k else xb
        if self.source_allot:  # the model's norms are frozen here: no statistic moves
            with torch.no_grad():
                views = augment(xb, self.views, self._gen)
                u = uncertainty(self.model(views).view(self.views, len(xb), -1), self.unc_factor)
            self._set_scales(self._layers, allot(u, self.threshold))
        return xb

    @property
    def predictor(self) -> nn.Module:
        return self.teacher if self.teacher is not None else self.model

    def _adapter_ids(self, model: nn.Module) -> set[int]:
        return {
            id(p)
            for layer in sb.adapter_layers(model)
            for n in (LOW, HIGH)
            for p in layer.adapter_parameters(n)
        }

    def trainable(self, model: nn.Module) -> list[dict[str, Any]]:
        ids = self._adapter_ids(model)
        adapters = [p for p in model.parameters() if id(p) in ids]
        groups = [{"params": adapters, "lr": self.lr}]
        if self.train_backbone:
            groups.append(
                {"params": [p for p in model.parameters() if id(p) not in ids], "lr": self.lr_other}
            )
        return groups

    @staticmethod
    def _set_scales(layers, scales: tuple[float, float]) -> None:
        pairs = [(LOW, scales[0]), (HIGH, scales[1])]
        for layer in layers:
            layer.set_active(pairs)

    # ------------------------------------------------------------- step
    def step(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapt or self.teacher is None:
            return super().step(x)
        self.check_batch(x)
        with torch.no_grad():
            return self.teacher(x)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "teacher": self.teacher}

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.teacher is None:
            raise sb.ConfigError("vida: call setup(model) before adapting")
        with torch.no_grad():
            views = augment(x, self.views, self._gen)
            view_logits = self.teacher(views).view(self.views, x.shape[0], -1)
            self.last_uncertainty = uncertainty(view_logits, self.unc_factor)
            self.scales = allot(self.last_uncertainty, self.threshold)
            self._set_scales(self._layers, self.scales)
            self._set_scales(self._teacher_layers, self.scales)
            target = self.teacher(x)
        logits = self.model(x)
        return soft_cross_entropy(logits, target).mean(), target

    def after_update(self) -> None:
        if self._pairs is None:
            ids = self._adapter_ids(self.model)
            groups: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}
            for (_, t), (_, s) in zip(
                self.teacher.named_parameters(), self.model.named_parameters(), strict=True
            ):
                if s.requires_grad:
                    groups[id(s) in ids][0].append(t)
                    groups[id(s) in ids][1].append(s)
            self._pairs = groups
        rate_a = self.ema if self.ema_adapters is None else self.ema_adapters
        ema_update(*self._pairs[True], rate_a)
        ema_update(*self._pairs[False], self.ema)

    # ------------------------------------------------------- skills
    def domain_skill(self, name: str, metadata: dict | None = None) -> sb.Skill:
        """The teacher's adapters as one skill: per site ``A = [A_l; A_h]``, ``B = [B_l, B_h]``
        (scale 1), so ``attach`` gives a plain rank r_l + r_h LoRA at s_l = s_h = 1."""
        if self.teacher is None:
            raise sb.ConfigError("vida: nothing adapted yet; call setup(model) first")
        branches = [sb.Skill.from_model(self.teacher, n) for n in (LOW, HIGH)]
        # exact: factors side by side
        skill = sb.compose(branches, [1.0, 1.0], method="cat", name=name)
        r = self.low_rank + self.high_rank
        skill.config = sb.LoRAConfig(
            rank=r, alpha=float(r), targets=self._targets, init="gaussian"
        ).to_dict()
        skill.metadata = {
            "learner": self.name,
            "vida": {
                "ranks": [self.low_rank, self.high_rank],
                "last_scales": list(self.scales),
                "backbone_trained": self.train_backbone,
            },
            **(metadata or {}),
        }
        return skill

    def load_skill(self, skill: sb.Skill) -> None:
        """Start from ``skill`` (made by ``domain_skill``): both branches of student and
        teacher take its factors; the optimizer starts afresh."""
        if self.teacher is None:
            raise sb.ConfigError("vida: call setup(model) before loading a skill")
        info = skill.metadata.get("vida") if isinstance(skill.metadata, dict) else None
        if not isinstance(info, dict) or info.get("ranks") != [self.low_rank, self.high_rank]:
            raise sb.ConfigError(
                f"skill {skill.name!r} is not a ViDA skill with ranks "
                f"[{self.low_rank}, {self.high_rank}] (metadata: {info!r})"
            )
        paths = [layer.path for layer in sb.adapter_layers(self.model, LOW)]
        diff = skill.fingerprint.first_difference(sb.fingerprint(self.model, paths), strict=False)
        if diff or set(map(sb.site_module, skill.factors)) != set(paths):
            raise sb.BaseMismatch(
                f"skill {skill.name!r} does not fit this model ({diff or 'different sites'})"
            )
        skill.check_weights()
        r = self.low_rank
        for layers in (self._layers, self._teacher_layers):
            for layer in layers:
                sites = layer.get_factors(LOW).keys()
                pieces = {s: skill.factors[layer.path + s] for s in sites}
                with torch.no_grad():
                    layer.set_factors(
                        LOW,
                        {
                            s: (a[:r], b[:, :r] / layer.adapter_scale(LOW))
                            for s, (a, b) in pieces.items()
                        },
                    )
                    layer.set_factors(
                        HIGH,
                        {
                            s: (a[r:], b[:, r:] / layer.adapter_scale(HIGH))
                            for s, (a, b) in pieces.items()
                        },
                    )
        self.opt = None
        self._pairs = None

    # ------------------------------------------------------------- fit
    def fit(self, model: nn.Module, task, bank: sb.SkillBank | None = None) -> sb.Skill:
        """The learner contract: adapt a copy of ``model`` online on the task's unlabelled
        test inputs (starting from the banked skill of its domain when ``retrieve``) and
        return the adapted state as a skill. ``model`` is not changed."""
        self.setup(copy.deepcopy(model))
        if bank is not None and self.retrieve:
            self.start_from_bank(bank, task.x_test[:64])
        online(self, task.x_test)
        return self.domain_skill(task.name, {"task": task.name})


@dataclass
class SourceStage(ViDA):
    """ViDA's source stage alone: the same adapters trained on the same augmented source
    data, then no test-time update. ViDA's gain over this row is the gain from adapting;
    this row's gain over source-only is robustness bought on the source side."""

    name: ClassVar[str] = "source_stage"

    adapt: bool = False
    bank_skills: bool = False
    retrieve: bool = False


register_method(ViDA)
register_method(SourceStage)
