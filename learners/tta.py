"""Test-time adaptation: the online loop every method shares, and the baselines.

A method adapts a model to an unlabelled stream, one batch at a time, and
predicts each batch as it goes (continual TTA: no reset between domains, no
labels ever). ``online(method, x)`` is the loop; a method supplies ``setup``
(take the source model) and ``step`` (adapt on a batch, return its logits).
Gradient methods (Tent, ViDA) share ``GradientMethod.step``: an ``objective``
gives the loss and the prediction, the shared code takes the optimizer step
(with the NaN guard) and calls ``after_update`` (ViDA's teacher update).
Every batch is checked before anything sees it (two images at least, all
finite). ``ResetGuard`` puts a method back to its start when its predictions
collapse (or periodically); ``online(..., guard=)`` consults it after each batch.

Baselines: ``SourceOnly`` (the source model as is), ``BNAdapt`` (batch-norm
statistics re-estimated on the test batches), ``Tent`` (entropy minimisation
on the affine parameters of the norm layers).

Domain skills: a method that learns something per domain (``bank_skills``:
Tent, ViDA) gives its adapted state as a skill (``domain_skill``) to be banked
with the domain's statistics at the end of each domain; with ``retrieve`` a
later visit of a known domain starts from the skill its first batch's
statistics find (``start_from_bank``: the ``stats`` router's likelihood of the
batch, read from the source model). Tent's skill holds no low-rank factors: its
adapted state is the norm layers' affine parameters, kept as the skill's extras.

Norm layers and BN-adapt: a LayerNorm ViT has no running statistics (each
token is normalised by its own mean and variance at train and test time
alike), so BN-adapt has nothing to re-estimate there and equals source-only;
``BNAdapt.setup`` records that in ``notes``. It adapts models with batch norms
(e.g. the ``resnet_micro`` preset). Tent works on any norm layer's affine
parameters (LayerNorm, GroupNorm, BatchNorm); on batch norms it also
normalises with the test batch's statistics, as Tent does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

import skillbank as sb
from skillbank.route_stats import default_layers, route_features
from skillbank.routers import StatsRouter

from .base import TrainingError, resolve_device

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def use_batch_statistics(model: nn.Module) -> None:
    """Every batch norm normalises with the batch it sees and keeps no running statistics."""
    for m in model.modules():
        if _is_bn(m):
            m.train()
            m.track_running_stats = False
            m.running_mean = m.running_var = None


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, NORMS)]


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights and biases of every norm layer (what Tent trains)."""
    return [
        p for m in norm_layers(model) for p in (m.weight, m.bias) if isinstance(p, nn.Parameter)
    ]


def domain_layers(model: nn.Module) -> tuple[str, ...]:
    """Where the statistics that find a domain again are read: a ViT's first block (its
    output tokens, past attention and MLP, keep what the linear patch embedding's
    statistics blur: at severity 3 those found 12-13 of 15 domains on two of three
    seeds, the first block 15), else the routers' default (a ResNet's stem)."""
    names = {n for n, _ in model.named_modules()}
    return ("blocks.0",) if "blocks.0" in names else default_layers(model)


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the soft prediction softmax(``target_logits``), per row."""
    return -(target_logits.softmax(1) * logits.log_softmax(1)).sum(1)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per row (Tent's loss)."""
    return soft_cross_entropy(logits, logits)


@dataclass
class TTAMethod:
    """An online test-time adaptation method; ``online`` drives it.

    ``setup(model, source)`` takes the source model (the method owns it from
    then on; pass a copy to keep yours) and optionally the labelled source
    task (for a source stage). ``step(x)`` adapts on one unlabelled batch and
    returns its logits. ``notes`` collects facts worth reporting.
    """

    name: ClassVar[str] = "tta"

    seed: int = 0
    device: str = "auto"
    # The reset guard ``run_stream`` puts around the method: True for the defaults,
    # False for none, or ResetGuard options ({"every": 100, "max_drop": 0.2, ...}).
    reset: bool | dict[str, Any] = True
    # With a bank, the protocol banks the adapted state at the end of each domain
    # (methods that learn something: Tent, ViDA) and, on a second pass, starts each
    # domain from the skill its statistics retrieve.
    bank_skills: bool = False
    retrieve: bool = False
    notes: list[str] = field(default_factory=list, init=False, repr=False)
    model: nn.Module | None = field(default=None, init=False, repr=False)
    # the model as given, for the features that find domains again (its batch norms
    # keep their source statistics); kept only when the method banks skills
    source_model: nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        ResetGuard.from_option(self.reset)  # a bad guard option fails when the method is made

    def setup(self, model: nn.Module, source=None) -> None:
        if not isinstance(model, nn.Module):
            raise sb.ConfigError(
                f"{self.name}: setup needs an nn.Module, got {type(model).__name__}"
            )
        self.model = model.to(resolve_device(self.device)).eval()
        self.model.requires_grad_(False)
        if self.bank_skills:
            self.source_model = copy.deepcopy(self.model)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self.check_batch(x)
        with torch.no_grad():
            return self.model(x)

    @property
    def predictor(self) -> nn.Module:
        """The module whose output is the prediction (ViDA: the teacher)."""
        return self.model

    def _require_setup(self) -> None:
        if self.model is None:
            raise sb.ConfigError(f"{self.name}: call setup(model) before adapting")

    def check_batch(self, x: torch.Tensor) -> None:
        """Refuse a batch before anything sees it: batch statistics and entropies need
        two images or more, and a NaN or Inf image would poison every statistic."""
        self._require_setup()
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
            raise sb.ConfigError(f"{self.name}: a test batch is a floating-point tensor (N x ...)")
        if len(x) < 2:
            raise sb.ConfigError(
                f"{self.name}: a test batch of {len(x)} image(s); adaptation needs at least 2 "
                "(online() joins a single leftover image to the batch before it)"
            )
        if not torch.isfinite(x).all():
            raise sb.ConfigError(
                f"{self.name}: the test batch holds NaN or Inf values; nothing was adapted"
            )

    # ------------------------------------------------------- domain skills
    def domain_skill(self, name: str, metadata: dict | None = None) -> sb.Skill:
        """The adapted state as a skill, to bank at the end of a domain."""
        raise sb.ConfigError(f"{self.name} learns nothing per domain: it has no domain skill")

    def load_skill(self, skill: sb.Skill) -> None:
        """Start from ``skill`` (made by this method's ``domain_skill``)."""
        raise sb.ConfigError(f"{self.name} learns nothing per domain: it cannot load a skill")

    def domain_embedding(self, x: torch.Tensor, centres: int = 0):
        """Example embedding of ``x`` from the source model, as banks store."""
        return sb.example_embedding(self._source(), x, centres=centres, seed=self.seed)

    def domain_stats(self, x: torch.Tensor) -> sb.RouteStats:
        """Statistics of the domain ``x`` comes from, as the ``stats`` router reads them
        (the source model's ``domain_layers``), with the method's predictions standing
        in for the labels the stream never gives."""
        model = self._source()
        with torch.no_grad():
            pseudo = torch.cat([self.predictor(xb).argmax(1).cpu() for xb in batches(x, 256)])
        return sb.compute_stats(model, x, pseudo, layers=domain_layers(model))

    def start_from_bank(self, bank: sb.SkillBank, x: torch.Tensor, where: dict | None = None):
        """Find the banked skill of this method for the domain the batch ``x`` comes from
        (the ``stats`` router's likelihood of the batch's statistics, averaged over the
        batch) and load it; skills that do not fit (another source model, other ranks)
        are passed over. Its ref, or None when the bank has no skill that fits."""
        model = self._source()
        layers = domain_layers(model)
        router = StatsRouter(bank, where={"learner": self.name, **(where or {})}, layers=layers)
        _, desc = route_features(model, x, layers=layers)
        try:
            refs, _ = router.rank_batch(desc, k=router.candidates)
        except sb.MissingStats:  # nothing banked with statistics yet
            return None
        for ref in refs:  # the most likely skill that fits this model
            try:
                self.load_skill(bank.get(ref))
            except (sb.BaseMismatch, sb.ConfigError):
                continue
            return ref
        return None

    def _source(self) -> nn.Module:
        self._require_setup()
        if self.source_model is None:
            raise sb.ConfigError(f"{self.name}: set up with bank_skills=True to find domains")
        return self.source_model

    def modules(self) -> dict[str, nn.Module]:
        """The modules whose state is the method's adapted state (ViDA adds its teacher)."""
        return {"model": self.model}

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of the adapted state, to come back to with ``load_state``."""
        self._require_setup()
        return {
            n: {k: v.detach().clone() for k, v in m.state_dict().items()}
            for n, m in self.modules().items()
        }

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Back to ``state`` exactly; the optimizer (if any) starts afresh."""
        for n, m in self.modules().items():
            m.load_state_dict(state[n], strict=True)


def batches(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``x`` in stream order, ``batch_size`` rows each; a single leftover row joins the
    batch before it (no method can adapt on one image)."""
    parts = list(x.split(batch_size))
    if len(parts) > 1 and len(parts[-1]) == 1:
        parts[-2:] = [torch.cat(parts[-2:])]
    return parts


def online(
    method: TTAMethod,
    x: torch.Tensor,
    batch_size: int = 64,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    guard: ResetGuard | None = None,
) -> torch.Tensor:
    """Run ``method`` over the unlabelled stream ``x`` in order; the predicted labels (CPU).

    The one online loop: batches in stream order, one ``step`` each, no labels
    anywhere. ``on_batch(i, logits)`` sees each batch's prediction; ``guard``
    (attached to the method) may reset it after a batch.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise sb.ConfigError(
            "online() takes a floating-point tensor of inputs (N x ...), and only that"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise sb.ConfigError(f"batch_size must be an int >= 2, got {batch_size!r}")
    method._require_setup()
    device = next(method.predictor.parameters()).device
    preds = []
    for i, xb in enumerate(batches(x, batch_size)):
        xb = xb.to(device, non_blocking=True)
        logits = method.step(xb)
        if on_batch is not None:
            on_batch(i, logits)
        if guard is not None:
            guard.after_batch(xb, logits)
        preds.append(logits.argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


@dataclass
class ResetGuard:
    """Puts an online method back to its state right after setup when adapting goes wrong.

    RDumb (Press et al., 2023) showed that most continual TTA methods end below
    the model they started from on long streams, and that resetting does as well
    or better. Two triggers, either may be off (None):

    - ``every``: a reset every that many batches (RDumb: 1000);
    - ``max_drop``: collapse. Per batch, the diversity of the predictions (the
      entropy of the batch's mean predicted distribution, in nats) of the method
      and of a frozen copy of the method as it started; when the method's falls
      more than ``max_drop`` below its start's, averaged over the last
      ``window`` batches, the method resets. Entropy minimisation that drifts
      ends by predicting a few classes for everything; adaptation that helps
      keeps the classes apart (measured in the README). The prediction entropy
      alone cannot tell the two apart (Tent lowers it either way), nor can
      agreement with the source (a helpful method disagrees wherever the source
      is wrong). A method that does not adapt is never reset.

    ``resets`` lists (batch index, reason) of every reset.
    """

    every: int | None = None
    max_drop: float | None = 0.1
    window: int = 3

    resets: list[tuple[int, str]] = field(default_factory=list, init=False)
    _method: TTAMethod | None = field(default=None, init=False, repr=False)
    _start: nn.Module | None = field(default=None, init=False, repr=False)
    _state: dict | None = field(default=None, init=False, repr=False)
    _drops: list[float] = field(default_factory=list, init=False, repr=False)
    _batch: int = field(default=0, init=False)
    _since: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.every is not None and (
            isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1
        ):
            raise sb.ConfigError(
                f"reset guard: every must be a positive int or None, got {self.every!r}"
            )
        if self.max_drop is not None and not self.max_drop > 0:
            raise sb.ConfigError(
                f"reset guard: max_drop must be positive or None, got {self.max_drop}"
            )
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise sb.ConfigError(f"reset guard: window must be a positive int, got {self.window!r}")

    @classmethod
    def from_option(cls, option: bool | dict[str, Any]) -> ResetGuard | None:
        """A method's ``reset`` option as a guard (None when off)."""
        if option is False:
            return None
        if option is True:
            return cls()
        if not isinstance(option, dict):
            raise sb.ConfigError(
                f"reset must be true, false or a mapping of options, got {option!r}"
            )
        known = {"every", "max_drop", "window"}
        if set(option) - known:
            raise sb.ConfigError(
                f"reset: unknown options {sorted(set(option) - known)}; known: {sorted(known)}"
            )
        return cls(**option)

    def attach(self, method: TTAMethod) -> ResetGuard:
        """Watch ``method`` (set up already): its state now is what a reset restores, and
        (collapse trigger on) a frozen copy of its predictor is the reference."""
        self._method, self._state = method, method.state()
        if self.max_drop is not None:
            # eval(): batch norms keep the statistics they have now (BN-adapt's source
            # statistics; a batch-statistics norm has none and stays as it is)
            self._start = copy.deepcopy(method.predictor).eval().requires_grad_(False)
        return self

    @staticmethod
    def diversity(logits: torch.Tensor) -> float:
        """Entropy (nats) of the batch's mean predicted distribution."""
        p = logits.float().softmax(1).mean(0)
        return float(-(p * p.clamp_min(1e-12).log()).sum())

    def after_batch(self, x: torch.Tensor, logits: torch.Tensor) -> str | None:
        """Look at one batch's prediction; reset the method when a trigger fires (the reason)."""
        if self._method is None:
            raise sb.ConfigError("reset guard: attach(method) first")
        self._batch += 1
        self._since += 1
        reason = None
        if self._start is not None:
            with torch.no_grad():
                ref = self._start(x)
            drop = self.diversity(ref) - self.diversity(logits)
            self._drops = [*self._drops, drop][-self.window :]
            mean = sum(self._drops) / self.window
            if len(self._drops) == self.window and mean > self.max_drop:
                reason = f"diversity {mean:.2f} nats below the start's"
        if reason is None and self.every is not None and self._since >= self.every:
            reason = f"periodic ({self.every} batches)"
        if reason is not None:
            self._method.load_state(self._state)
            self.resets.append((self._batch - 1, reason))
            self._drops, self._since = [], 0
        return reason


# --------------------------------------------------------------------------- baselines


@dataclass
class SourceOnly(TTAMethod):
    """The source model, unchanged."""

    name: ClassVar[str] = "source"


@dataclass
class BNAdapt(TTAMethod):
    """Batch norms normalise with the test batch and fold it into their running statistics.

    ``momentum`` replaces each batch norm's momentum (None: a cumulative average
    over all test batches seen). Other norm layers have no statistics to
    re-estimate: on a model without batch norms this is source-only (noted).
    """

    name: ClassVar[str] = "bn_adapt"

    momentum: float | None = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.momentum is not None and not 0.0 < self.momentum <= 1.0:
            raise sb.ConfigError(
                f"bn_adapt: momentum must be in (0, 1] or None, got {self.momentum}"
            )

    def setup(self, model: nn.Module, source=None) -> None:
        super().setup(model, source)
        bns = [m for m in self.model.modules() if _is_bn(m)]
        if not bns:
            self.notes.append(
                "no batch-norm layers: nothing to re-estimate, BN-adapt equals source-only"
            )
        for m in bns:
            m.train()  # batch statistics in the forward, running statistics updated
            m.momentum = self.momentum


@dataclass
class GradientMethod(TTAMethod):
    """Shared by methods that take one optimizer step per batch.

    Subclasses give ``trainable(model)`` (the parameter groups), ``objective(x)``
    -> (loss, logits to predict with) and optionally ``after_update()``.
    """

    lr: float = 1e-3
    optimizer: str = "adam"
    opt: torch.optim.Optimizer | None = field(default=None, init=False, repr=False)
    steps: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lr > 0:
            raise sb.ConfigError(f"{self.name}: lr must be positive, got {self.lr}")
        if self.optimizer not in ("adam", "sgd"):
            raise sb.ConfigError(
                f"{self.name}: optimizer must be 'adam' or 'sgd', got {self.optimizer!r}"
            )

    def trainable(self, model: nn.Module) -> list[dict[str, Any]]:
        raise NotImplementedError

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def after_update(self) -> None:
        pass

    def make_optimizer(self) -> None:
        groups = [g for g in self.trainable(self.model) if g["params"]]
        if not groups:
            raise sb.ConfigError(f"{self.name}: the model has no parameter this method can adapt")
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        if self.optimizer == "adam":
            self.opt = torch.optim.Adam(groups, lr=self.lr, betas=(0.9, 0.999))
        else:
            self.opt = torch.optim.SGD(groups, lr=self.lr, momentum=0.9)

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        super().load_state(state)
        self.opt = None

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self.check_batch(x)
        if self.opt is None:
            self.make_optimizer()
        loss, logits = self.objective(x)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"{self.name}: loss became {loss.item()} at test batch {self.steps}"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.after_update()
        self.steps += 1
        return logits.detach()


@dataclass
class Tent(GradientMethod):
    """Tent (Wang et al., 2021): minimise the prediction entropy by training only
    the norm layers' affine parameters; predictions are that forward's output."""

    name: ClassVar[str] = "tent"

    lr: float = 1e-3
    bank_skills: bool = True
    retrieve: bool = True

    def setup(self, model: nn.Module, source=None) -> None:
        super().setup(model, source)
        use_batch_statistics(self.model)  # as in Tent
        self.opt = None

    def trainable(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": norm_affine_parameters(model)}]

    def _adapted(self) -> dict[str, nn.Parameter]:
        """What Tent trains, by parameter name."""
        self._require_setup()
        ids = {id(p) for p in norm_affine_parameters(self.model)}
        return {n: p for n, p in self.model.named_parameters() if id(p) in ids}

    def _fingerprint(self, names) -> sb.Fingerprint:
        return sb.fingerprint(self.model, sorted({n.rsplit(".", 1)[0] for n in names}))

    def domain_skill(self, name: str, metadata: dict | None = None) -> sb.Skill:
        """The norm layers' affine parameters as a skill with no low-rank factors (its
        extras); ``load_skill`` puts them back."""
        params = self._adapted()
        return sb.Skill(
            name=name,
            factors={},
            scales={},
            config={},
            fingerprint=self._fingerprint(params),
            metadata={"learner": self.name, "tent": {"params": len(params)}, **(metadata or {})},
            extras={n: p.detach().cpu().clone() for n, p in params.items()},
        )

    def load_skill(self, skill: sb.Skill) -> None:
        """Start from ``skill`` (made by ``domain_skill`` on the same architecture); the
        optimizer starts afresh. A skill of another method or model is refused."""
        params = self._adapted()
        if not isinstance(skill.metadata.get("tent"), dict) or set(skill.extras) != set(params):
            raise sb.ConfigError(
                f"skill {skill.name!r} is not a Tent skill of this model's norm layers"
            )
        diff = skill.fingerprint.first_difference(self._fingerprint(params), strict=False)
        if diff:
            raise sb.BaseMismatch(f"skill {skill.name!r} does not fit this model ({diff})")
        skill.check_weights()
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(skill.extras[n])
        self.opt = None

    def objective(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return softmax_entropy(logits).mean(), logits


TTA_METHODS: dict[str, type[TTAMethod]] = {}


def register_method(cls: type[TTAMethod]) -> type[TTAMethod]:
    TTA_METHODS[cls.name] = cls
    return cls


for _cls in (SourceOnly, BNAdapt, Tent):
    register_method(_cls)


def list_methods() -> list[str]:
    return sorted(TTA_METHODS)


def create_method(name: str, **kwargs: Any) -> TTAMethod:
    """A TTA method by registered name; unknown names or options raise ConfigError."""
    if name not in TTA_METHODS:
        raise sb.ConfigError(
            f"unknown test-time adaptation method {name!r}; choose from {list_methods()}"
        )
    cls = TTA_METHODS[name]
    known = {f for f in cls.__dataclass_fields__ if cls.__dataclass_fields__[f].init}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise sb.ConfigError(f"{name}: unknown options {unknown}; known: {sorted(known)}")
    return cls(**kwargs)


def copy_model(model: nn.Module) -> nn.Module:
    """A private copy for a method (the caller's model stays as it was)."""
    return copy.deepcopy(model)
