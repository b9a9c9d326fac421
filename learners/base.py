"""The one training loop every learner shares, and the `Learner` it serves.

Learners differ in how they parameterise the adapter, what they add to the
loss and what they do after each step; those are hooks (``prepare``,
``penalty``, ``after_step``, ``finish``). Everything else (device, bf16
autocast on CUDA, pinned memory, seeds, LoRA+ groups, schedule, clipping, the
NaN guard, progress) lives here once. Under a process group (``torchrun``) each
rank trains on its shard of every global batch and the gradients of the
trainable parameters are summed across ranks (see ``learners.distributed``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import skillbank as sb
from skillbank import SkillbankError

from . import distributed

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


class TrainingError(SkillbankError, RuntimeError):
    """Training stopped (e.g. a NaN loss); no skill was produced."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if str(device) == "auto":
        return distributed.device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for but CUDA is not available")
    return distributed.device(dev)  # under a process group: this rank's GPU


@dataclass(frozen=True)
class TrainConfig:
    """Knobs of the shared loop; ``steps`` (when set) overrides ``epochs``."""

    epochs: int = 5
    steps: int | None = None
    batch_size: int = 64
    lr: float = 3e-3
    b_ratio: float = 16.0  # LoRA+: B at lr * b_ratio (1.0 turns it off)
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast, on CUDA only
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise sb.ConfigError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.epochs <= 0 or (self.steps is not None and self.steps <= 0) or self.batch_size <= 0:
            raise sb.ConfigError("epochs, steps and batch_size must be positive")
        if not (self.lr > 0 and self.b_ratio > 0):
            raise sb.ConfigError("lr and b_ratio must be positive")


def freeze_norm_statistics(model: nn.Module) -> None:
    """Batch norms whose parameters are frozen keep their running statistics:
    a frozen base must not drift while adapters train."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in m.parameters()
        ):
            m.eval()


def shards(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
):
    """Endless shuffled global batches, as ``(x, y, global batch size)`` of this rank's part;
    pinned and copied without blocking on CUDA.

    Every rank draws the same seeded permutation, so the parts (``distributed.shard``:
    rows ``rank::world``, all rows in one process) of one global batch add up to the
    batch one process would take.
    """
    pin = device.type == "cuda"
    while True:
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            n = len(idx)
            idx = idx[distributed.shard(n)]
            xb, yb = x[idx], y[idx]
            if pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True), n


def class_mask(classes, n_classes: int, device) -> torch.Tensor:
    """Additive logit mask: 0 on ``classes``, -inf elsewhere."""
    mask = torch.full((n_classes,), float("-inf"), device=device)
    mask[list(classes)] = 0.0
    return mask


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    classes=None,
    penalty=None,
    after_step=None,
    transform=None,
    desc: str = "train",
    groups=None,
    batch_hook=None,
    loss_terms=None,
) -> list[float]:
    """Train the parameters of ``model`` that require grad; returns the loss per step.

    ``classes`` restricts the cross-entropy to those logits (a task's own head);
    ``transform(x) -> x`` augments each batch;
    ``penalty(model) -> tensor`` is added to the loss; ``after_step(model, step,
    total)`` runs after every optimizer step (gradients of that step are still
    there); ``groups(model, cfg) -> list[dict]`` replaces the LoRA+ optimizer groups;
    ``batch_hook(x, y) -> (x, y)`` replaces each batch after ``transform`` (experience
    replay appends stored samples); ``loss_terms(model, x, y, logits) -> tensor | None``
    adds a batch-mean term computed from the batch and its logits (LwF's distillation).
    A non-finite loss raises ``TrainingError`` before the step is taken.
    """
    device = resolve_device(cfg.device)
    model.to(device)
    # Seeded for reproducibility, inside a fork so the caller's RNG is left alone.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        hooks = {"batch_hook": batch_hook, "loss_terms": loss_terms}
        return _train(
            model, x, y, cfg, device, classes, penalty, after_step, transform, desc, groups, **hooks
        )


def _train(
    model, x, y, cfg, device, classes, penalty, after_step, transform, desc, make_groups, **hooks
) -> list[float]:
    batch_hook, loss_terms = hooks.get("batch_hook"), hooks.get("loss_terms")
    gen = torch.Generator().manual_seed(cfg.seed)
    if make_groups is not None:
        groups = [g for g in make_groups(model, cfg) if g["params"]]
    else:
        groups = sb.param_groups(model, cfg.lr, b_ratio=cfg.b_ratio, weight_decay=cfg.weight_decay)
    if not groups:
        raise TrainingError("nothing to train: no parameter of the model requires grad")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    # every rank starts from rank 0's trainable weights, as DDP does
    distributed.broadcast_tensors(params)
    total = cfg.steps or cfg.epochs * math.ceil(len(x) / cfg.batch_size)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (
            1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    mask = None  # built from the first batch's logits, whose width is the head's
    autocast = device.type == "cuda" and cfg.amp
    model.train()
    freeze_norm_statistics(model)
    losses: list[float] = []
    data = shards(x, y, cfg.batch_size, gen, device)
    world = distributed.world_size()
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        console=console,
        # a live bar only on a terminal: redrawn into a log file it leaves blank lines
        disable=not (cfg.progress and distributed.is_main() and console.is_terminal),
        transient=True,
    ) as bar:
        job = bar.add_task(desc, total=total, loss=float("nan"))
        for step in range(total):
            xb, yb, n = next(data)
            if transform is not None and len(xb):
                xb = transform(xb)
            if batch_hook is not None:
                added = -len(yb)
                xb, yb = batch_hook(xb, yb)
                n += (added + len(yb)) * world  # every rank adds as many rows to the global batch
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                if len(yb):
                    logits = model(xb)
                    if classes is not None:
                        mask = (
                            class_mask(classes, logits.shape[-1], logits.device)
                            if mask is None
                            else mask
                        )
                        logits = logits + mask
                    # this rank's share of the global mean, so that summing over ranks gives the mean
                    logits = (
                        logits.float()
                        if logits.dtype in (torch.float16, torch.bfloat16)
                        else logits
                    )
                    loss = (
                        F.cross_entropy(logits, yb)
                        if len(yb) == n
                        else F.cross_entropy(logits, yb, reduction="sum") / n
                    )
                    term = loss_terms(model, xb, yb, logits) if loss_terms is not None else None
                    if term is not None:  # a batch mean: this rank's share, as for the loss
                        loss = loss + term * (len(yb) / n)
                else:  # more ranks than rows in a short last batch
                    loss = torch.zeros((), device=device)
                extra = penalty(model) if penalty is not None else None
                if extra is not None:
                    loss = loss + (extra / world if world > 1 else extra)
            opt.zero_grad(set_to_none=True)
            if len(yb) or loss.requires_grad:  # an empty shard without a penalty has nothing to add
                loss.backward()
            # the global loss; grads summed over ranks
            value = distributed.sync_gradients(params, loss)
            if not torch.isfinite(value):  # the same verdict on every rank
                raise TrainingError(
                    f"{desc}: loss became {value.item()} at step {step}; no skill was written"
                )
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model, step, total)
            losses.append(value.item())
            bar.update(job, advance=1, loss=losses[-1])
    model.eval()
    return losses


@dataclass
class Learner:
    """Turns a task into a skill: ``fit(model, task, bank=None) -> Skill``.

    ``fit`` adds one adapter (named after the task) to ``model``, trains it and
    the head, and returns the skill. The model's own head is restored after, so
    the base stays as it was; the skill carries the trained head. ``inference``
    tells the runner how skills are used at test time: ``route`` (one skill per
    sample, chosen by retrieval or the task id) or ``direct`` (the model as is).
    """

    name: ClassVar[str] = "lora"
    inference: ClassVar[str] = "route"
    # Whether a run can continue mid-stream from the bank alone (``--resume``). A learner
    # that carries state between tasks outside its skills (a Fisher, an old model, a
    # replay buffer) sets it False, and the runner starts its unfinished seeds over.
    resumable: ClassVar[bool] = True

    rank: int = 8
    alpha: float | None = None  # default 2 * rank
    targets: tuple[str, ...] = DEFAULT_TARGETS
    head: str | None = "head"
    mask_logits: bool = True  # train the head on the task's own classes only
    train: TrainConfig = field(default_factory=TrainConfig)

    def with_train(self, **kw: Any) -> Learner:
        return replace(self, train=replace(self.train, **kw))

    # ------------------------------------------------------------- hooks
    def lora_config(self, task) -> sb.LoRAConfig:
        return sb.LoRAConfig(
            rank=self.rank,
            alpha=self.alpha or 2.0 * self.rank,
            targets=tuple(self.targets),
            head=self.head,
        )

    def adapter_name(self, task) -> str:
        sb.check_adapter_name(task.name)
        return task.name

    def prepare(self, model: nn.Module, task, bank, name: str) -> None:
        sb.add_adapter(model, name, self.lora_config(task))

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        pass

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict] | None:
        """Optimizer groups; None keeps the LoRA+ groups of ``sb.param_groups``."""
        return None

    def batch_hook(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each training batch, replaced (e.g. stored samples appended); the default keeps it."""
        return x, y

    def loss_terms(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor | None:
        """A batch-mean term added to the loss, from the batch and its logits (none by default)."""
        return None

    def _overrides(self, hook: str) -> bool:
        """Whether this learner overrides ``hook``: the loop skips the hooks nobody uses."""
        return getattr(type(self), hook) is not getattr(Learner, hook)

    def abort(self, model: nn.Module, name: str) -> None:
        """Undo what ``prepare`` added beyond the adapter itself (training failed)."""

    def finish(self, model: nn.Module, task, name: str) -> sb.Skill:
        return sb.Skill.from_model(
            model,
            name,
            metadata={"learner": self.name, "task": task.name, "classes": list(task.classes)},
        )

    # --------------------------------------------------------------- fit
    def fit(self, model: nn.Module, task, bank: sb.SkillBank | None = None) -> sb.Skill:
        name = self.adapter_name(task)
        head = model.get_submodule(self.head) if self.head else None
        saved_head = copy.deepcopy(head.state_dict()) if head is not None else None
        self.prepare(model, task, bank, name)
        try:
            penalty = self.penalty if type(self).penalty is not Learner.penalty else None
            groups = (
                self.param_groups if type(self).param_groups is not Learner.param_groups else None
            )
            train(
                model,
                task.x_train,
                task.y_train,
                self.train,
                penalty=penalty,
                after_step=self.after_step,
                classes=task.classes if self.mask_logits else None,
                desc=f"{self.name}:{task.name}",
                groups=groups,
                batch_hook=self.batch_hook if self._overrides("batch_hook") else None,
                loss_terms=self.loss_terms if self._overrides("loss_terms") else None,
            )
            skill = self.finish(model, task, name)
        except Exception:
            self.abort(model, name)
            if name in sb.adapter_names(model):
                sb.remove_adapter(model, name)
            raise
        finally:
            if saved_head is not None and self.restores_head:
                head.load_state_dict(saved_head)
        return skill

    restores_head: ClassVar[bool] = True


@dataclass
class LoRALearner(Learner):
    """Plain LoRA at a fixed rank: one adapter and head per task.

    ``nested=True`` trains DyLoRA-style nested ranks: each step draws b ~ U{1..r}
    and runs only A[:b], B[:, :b] at scale alpha / b (a per-rank mask on B), so
    every prefix works alone and ``learners.truncate(skill, k)`` picks any rank
    k <= r after training. Ranks below b are not detached (DyLoRA's "frozen"
    mode): they keep training, which here cost nothing in accuracy.
    """

    name: ClassVar[str] = "lora"

    nested: bool = False
    _draw: Any = field(default=None, init=False, repr=False, compare=False)

    def prepare(self, model: nn.Module, task, bank, name: str) -> None:
        super().prepare(model, task, bank, name)
        if self.nested:
            from .gates import add_gates

            self._draw = (
                add_gates(model, name, lambda layer, r: torch.ones(r), trainable=False),
                torch.Generator().manual_seed(self.train.seed),
            )
            self._nest()

    def _nest(self) -> None:
        gates, gen = self._draw
        r_max = max(len(g.gate) for g in gates.values())
        b = int(torch.randint(1, r_max + 1, (1,), generator=gen))
        for g in gates.values():
            r = len(g.gate)
            k = min(b, r)
            g.mask.zero_()[:k] = r / k

    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        if self.nested:
            self._nest()

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict] | None:
        from .gates import param_groups

        return param_groups(model, cfg.lr, cfg.b_ratio, cfg.weight_decay)

    def abort(self, model: nn.Module, name: str) -> None:
        self.finish_nesting(model, name)

    def finish_nesting(self, model: nn.Module, name: str) -> None:
        if self.nested and self._draw is not None:
            from .gates import remove_gates

            remove_gates(model, name, fold=False)  # the mask was a training device, not part of B
            self._draw = None

    def finish(self, model: nn.Module, task, name: str) -> sb.Skill:
        self.finish_nesting(model, name)
        skill = super().finish(model, task, name)
        if self.nested:
            skill.metadata["nested"] = True
        return skill
