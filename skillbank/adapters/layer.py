"""`AdapterLayer`: a frozen base module plus any number of named low-rank branches.

The base class owns everything that does not depend on the module kind: the
per-adapter state, the active set, merging (explicit and automatic in eval mode)
and dispatch between the unmerged, merged and mixed-batch paths. A kind
(Linear, Conv2d, MultiheadAttention in ``kinds.py``) supplies the shapes of its
factors, how to run its base op with a given weight, and how to add the
low-rank term to that op's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as P

from ..errors import AdapterNotFound, ConfigError, MergedError
from .calls import LayerCall, MixPlan, RowPlan, current
from .stacks import StackPool

FactorMap = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Site suffix -> (A: r x fan_in, B: fan_out x r): the form skills store."""


@dataclass(frozen=True)
class Factors:
    """One site's trained factors of one adapter, in its layer kind's own layout.

    ``A`` and ``B`` are views of the trained parameters (``B`` as trained, under any
    rank gate), so writes and gradients reach the adapter. The kind states where
    each keeps its rank, so callers never guess a layout from ``dim()``.

    Attributes:
        site: suffix of the skill key the site is saved under (``""``, or ``"[q]"``,
            ``"[k]"``, ``"[v]"`` for attention).
        A: the down factor, e.g. (r, in) for Linear, (r, c, kh, kw) for Conv2d.
        B: the up factor, e.g. (out, r) for Linear, (out, r, 1, 1) for Conv2d.
        rank_axis_A: the axis of ``A`` that indexes ranks.
        rank_axis_B: the axis of ``B`` that indexes ranks.
        scale: the adapter's ``s`` in ``s B A x``.
    """

    site: str
    A: torch.Tensor
    B: torch.Tensor
    rank_axis_A: int
    rank_axis_B: int
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[self.rank_axis_A]

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A: r x fan_in, B: fan_out x r), the form skills store; gradients flow through."""
        r = self.rank
        return (
            self.A.movedim(self.rank_axis_A, 0).reshape(r, -1),
            self.B.movedim(self.rank_axis_B, -1).reshape(-1, r),
        )

    def check(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> None:
        """Raise ConfigError unless the given factors have the shapes ``matrices`` returns.

        Args:
            a: r x fan_in, or None to skip.
            b: fan_out x r, or None to skip.
        """
        for given, want, what in zip((a, b), self.matrices(), "AB", strict=True):
            if given is not None and tuple(given.shape) != tuple(want.shape):
                raise ConfigError(
                    f"site {self.site!r}: {what} must have shape {tuple(want.shape)}, "
                    f"got {tuple(given.shape)}"
                )

    def copy_(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> None:
        """Write 2D factors (the form ``matrices`` returns) into ``A`` and ``B`` in place,
        shapes checked first; run it under ``torch.no_grad()`` on trainable factors.

        Args:
            a: r x fan_in, or None to leave A as it is.
            b: fan_out x r, or None to leave B as it is.
        """
        self.check(a, b)
        if a is not None:
            a_shape = self.A.movedim(self.rank_axis_A, 0).shape
            self.A.copy_(a.reshape(a_shape).movedim(0, self.rank_axis_A))
        if b is not None:
            b_shape = self.B.movedim(self.rank_axis_B, -1).shape
            self.B.copy_(b.reshape(b_shape).movedim(-1, self.rank_axis_B))


class _RankGate(nn.Module):
    """The parametrisation ``B -> B diag(fn())`` along B's rank axis."""

    def __init__(self, fn: nn.Module, axis: int) -> None:
        super().__init__()
        self.fn = fn
        self.axis = axis

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        shape = [1] * b.dim()
        shape[self.axis] = -1
        return b * self.fn().view(shape).to(b.dtype)


class AdapterLayer(nn.Module):
    """Wraps ``base`` (frozen) and holds adapters keyed by name.

    Per-adapter parameters live in the ``nn.ParameterDict``s listed in
    ``adapter_param_names``; per-adapter plain values in the dicts listed in
    ``adapter_meta_names``. Generic code (add, remove, names) loops over these
    declarations, so a new kind only declares shapes.
    """

    adapter_param_names = ("lora_A", "lora_B")
    adapter_meta_names = ("scaling", "ranks")
    sites: tuple[str, ...] = ("",)  # suffixes of the skill keys this layer owns
    rank_axes: ClassVar[tuple[int, int]] = (0, 1)  # rank axis of the A and B parameters
    # True when the adapted op is ``x W^T`` on the input's last dim (A reads x[..., :fan_in]
    # as it is); False for ops like convolutions that unfold their input first.
    linear_input: ClassVar[bool] = False
    # Layout of the mixed-batch stacks: (K+1, in, r) and (K+1, r, out) when True (what a
    # batched x @ A^T reads without copies), else (K+1, r, in) and (K+1, out, r).
    stack_transposed: ClassVar[bool] = False

    def __init__(self, base: nn.Module, path: str) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.ranks: dict[str, int] = {}
        self.active: tuple[tuple[str, float], ...] = ()
        self.merged: tuple[tuple[str, float], ...] | None = None
        self.register_buffer("_stash", None, persistent=False)
        # Caches are replaced whole, never mutated, so a thread reading one sees it entire.
        self._eval_cache: tuple[Any, torch.Tensor] | None = None
        self._cat_cache: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._reads: tuple[Any, list[torch.Tensor]] | None = None  # see _active_reads
        self._pool = StackPool()  # mixed-batch stacks shared by calls (see stacks.py)

    # ------------------------------------------------------------ kind hooks
    @classmethod
    def check(cls, module: nn.Module, rank: int, path: str) -> None:
        """Raise ConfigError when ``module`` cannot carry a rank-``rank`` adapter.

        Args:
            module: the base module.
            rank: the rank asked for.
            path: the module's path, for the message.
        """
        fan_in, fan_out = cls.fans(module)
        if rank > min(fan_in, fan_out):
            raise ConfigError(
                f"rank {rank} for '{path}' exceeds min(d_in={fan_in}, d_out={fan_out}) of its "
                f"{type(module).__name__}"
            )

    @classmethod
    def fans(cls, module: nn.Module) -> tuple[int, int]:
        """(fan_in, fan_out) of ``module``'s adapted map."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        """The base weight adapters add to (and merging changes)."""
        return self.base.weight

    def new_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (A, B) in this kind's own shapes, B zero.

        Args:
            rank: the adapter's rank.
        """
        raise NotImplementedError

    def factors_2d(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter as one linear map, as the forward reads it: (A: r x fan_in,
        B: fan_out x r) with ``B @ A`` shaped like the flattened base weight
        (attention: q, k, v's A stacked and B block-diagonal).

        Args:
            name: an adapter this layer carries.
        """
        raise NotImplementedError

    def split_sites(self, name: str, a: torch.Tensor, b: torch.Tensor) -> list[Factors]:
        """(A, B) in this kind's parameter layout as one record per site (one site here).

        Args:
            name: the adapter (for its scale).
            a: A as a whole parameter (or what the forward reads in its place).
            b: B likewise.
        """
        return [Factors(self.sites[0], a, b, *self.rank_axes, self.scaling[name])]

    def run(self, weight: torch.Tensor, add, *args, **kwargs):
        """The base op with ``weight``; ``add(x, out)`` adds a low-rank term, if given."""
        raise NotImplementedError

    def lowrank_add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + sum_i w_i s_i B_i A_i drop(x)`` over the active adapters."""
        raise NotImplementedError

    def mixed_add(self, x: torch.Tensor, out: torch.Tensor, plan: RowPlan) -> torch.Tensor:
        """Per-row adapters from stacked factors (``row_stacks(plan)``)."""
        raise NotImplementedError

    def mix_add(self, x: torch.Tensor, out: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """``out + sum_k w[row, k] s_k B_k A_k x`` from the concatenated factors of ``plan.names``."""
        raise NotImplementedError

    # ------------------------------------------------------- per-call state
    @property
    def call(self) -> LayerCall | None:
        """What the calling context's ``mixed_batch`` / ``composed`` / ``disabled`` asks of
        this layer (None outside them); never stored on the layer."""
        return current(self)

    @property
    def rows(self) -> RowPlan | None:
        """This context's mixed-batch plan for the layer, or None."""
        call = current(self)
        return None if call is None else call.rows

    @property
    def mix(self) -> MixPlan | None:
        """This context's composition plan for the layer, or None."""
        call = current(self)
        return None if call is None else call.mix

    # ------------------------------------------------------- adapter state
    def add(self, name: str, rank: int, scale: float, dropout: float, init: str) -> None:
        """A fresh adapter on this layer (``sb.add_adapter`` validates and calls this).

        Args:
            name: the adapter's name.
            rank: its rank.
            scale: its ``s``.
            dropout: dropout on its input, 0 for none.
            init: how A starts (``kaiming``, ``gaussian`` or ``zeros``); B starts at zero.
        """
        a, b = self.new_factors(rank)
        w = self.base_weight()
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        a, b = a.to(device=w.device, dtype=dtype), b.to(device=w.device, dtype=dtype)
        if init == "kaiming":
            nn.init.kaiming_uniform_(a.view(rank, -1), a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / rank)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = float(scale)
        self.ranks[name] = int(rank)
        self._drop_caches()

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` from this layer (``sb.remove_adapter`` calls this).

        Args:
            name: an adapter this layer carries.
        """
        for attr in self.adapter_param_names + ("lora_dropout",):
            del getattr(self, attr)[name]
        for attr in self.adapter_meta_names:
            getattr(self, attr).pop(name, None)
        self._drop_caches()
        self._pool.forget(name)
        self.set_active([(n, w) for n, w in self.active if n != name])

    def names(self) -> list[str]:
        """The adapters this layer carries, in the order they were added."""
        return list(self.lora_A.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """A and B as the forward reads them (B through any rank gate).

        Args:
            name: an adapter this layer carries.
        """
        return [getattr(self, attr)[name] for attr in self.adapter_param_names]

    # ------------------------------------------------- public per-adapter API
    def has_adapter(self, name: str) -> bool:
        """Whether this layer carries adapter ``name``.

        Args:
            name: an adapter name.
        """
        return name in self.lora_A

    def _require(self, name: str) -> None:
        if name not in self.lora_A:
            raise AdapterNotFound(f"'{self.path}' has no adapter {name!r}; it has {self.names()}")

    def adapter_rank(self, name: str) -> int:
        """The rank of adapter ``name`` here.

        Args:
            name: an adapter this layer carries.
        """
        self._require(name)
        return self.ranks[name]

    def adapter_scale(self, name: str) -> float:
        """The scale ``s`` of adapter ``name`` here (its update is ``s B A x``).

        Args:
            name: an adapter this layer carries.
        """
        self._require(name)
        return self.scaling[name]

    def set_adapter_scale(self, name: str, scale: float) -> None:
        """Replace the scale of adapter ``name`` here.

        Args:
            name: an adapter this layer carries.
            scale: the new ``s``, a finite number.
        """
        self._require(name)
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
        ):
            raise ConfigError(f"scale must be a finite number, got {scale!r}")
        if self.merged is not None:
            raise MergedError(f"'{self.path}' is merged; unmerge before changing a scale")
        self.scaling[name] = float(scale)
        self._drop_caches()

    def factor_parameters(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """A and B as trained: the Parameters themselves (B under any rank gate), in this
        kind's layout, with their rank axes in ``rank_axes``.

        Args:
            name: an adapter this layer carries.
        """
        self._require(name)
        b = (
            self.lora_B.parametrizations[name].original
            if P.is_parametrized(self.lora_B, name)
            else self.lora_B[name]
        )
        return self.lora_A[name], b

    def adapter_factors(self, name: str) -> list[Factors]:
        """The trained factors of adapter ``name``, one record per site (views of
        ``factor_parameters``: writes and gradients reach the adapter).

        Args:
            name: an adapter this layer carries.
        """
        return self.split_sites(name, *self.factor_parameters(name))

    def get_factors(self, name: str) -> FactorMap:
        """Per-site 2D factors as the forward reads them (B through any rank gate): the form
        skills store, and what ``set_factors`` takes back.

        Args:
            name: an adapter this layer carries.
        """
        self._require(name)
        sites = self.split_sites(name, self.lora_A[name], self.lora_B[name])
        return {f.site: f.matrices() for f in sites}

    def set_factors(self, name: str, factors: FactorMap) -> None:
        """Copy per-site 2D factors into the trained A and B; every shape is checked before
        anything is written.

        Args:
            name: an adapter this layer carries.
            factors: site suffix -> (A: r x fan_in, B: fan_out x r), for every site.
        """
        sites = self.adapter_factors(name)
        missing = [f.site for f in sites if f.site not in factors]
        if missing:
            raise ConfigError(f"'{self.path}': no factors given for sites {missing}")
        for f in sites:
            f.check(*factors[f.site])
        with torch.no_grad():
            for f in sites:
                f.copy_(*factors[f.site])

    def add_rank_gate(self, name: str, gate: nn.Module) -> None:
        """From now on the layer reads B as ``B diag(gate())``, along B's own rank axis.

        CoDyRA's gates, AdaLoRA's singular values, IncreLoRA's e and DyLoRA's masks
        all have this form. B is re-parameterised (``torch.nn.utils.parametrize``):
        the trained B stays the Parameter ``factor_parameters`` returns, and gates stack.
        Take gates off before ``copy.deepcopy`` of the model: torch's parametrize shares
        one generated class between the copies, so removing gates from one breaks the other.

        Args:
            name: an adapter this layer carries.
            gate: a module whose ``forward()`` returns one multiplier per rank; its
                parameters train with B when they require grad.
        """
        self._require(name)
        with torch.no_grad():
            shape = tuple(gate().shape)
        if shape != (self.ranks[name],):
            raise ConfigError(
                f"'{self.path}': a rank gate for adapter {name!r} must return "
                f"({self.ranks[name]},) values, got {shape}"
            )
        gate = _RankGate(gate, self.rank_axes[1])
        P.register_parametrization(self.lora_B, name, gate, unsafe=True)
        self._drop_caches()

    def rank_gates(self, name: str) -> list[nn.Module]:
        """The gates ``add_rank_gate`` put on adapter ``name``, first added first.

        Args:
            name: an adapter this layer carries.
        """
        self._require(name)
        if not P.is_parametrized(self.lora_B, name):
            return []
        return [m.fn for m in self.lora_B.parametrizations[name]]

    def remove_rank_gates(self, name: str, fold: bool = True) -> None:
        """Take every rank gate off adapter ``name``.

        Args:
            name: an adapter this layer carries.
            fold: keep the gated values in B (``B diag(g)``); else B reverts to the
                trained values.
        """
        self._require(name)
        if P.is_parametrized(self.lora_B, name):
            P.remove_parametrizations(self.lora_B, name, leave_parametrized=fold)
            self._drop_caches()

    def _state_key(self, names) -> tuple:
        """Scales and tensor versions of all the forward reads for ``names`` (trained
        factors, rank gates): a cache keyed on it is rebuilt after any change to them."""
        tensors = self._forward_reads(names)
        scales = tuple(self.scaling[n] for n in names)
        # inference tensors (made under torch.inference_mode) cannot change: no version
        return scales, tuple((0 if t.is_inference() else t._version, t.data_ptr()) for t in tensors)

    def _forward_reads(self, names) -> list[torch.Tensor]:
        """The tensors the forward reads for ``names``: trained factors and rank gates."""
        if not P.is_parametrized(self.lora_B):  # no rank gate on the layer: A and B alone
            return [t for n in names for t in (self.lora_A[n], self.lora_B[n])]
        tensors = []
        for n in names:
            tensors += self.factor_parameters(n)
            for g in self.rank_gates(n):
                tensors += [*g.parameters(), *g.buffers()]
        return tensors

    def _active_reads(self) -> list[torch.Tensor]:
        """``_forward_reads`` of the active set, looked up once per active set: the
        merged-weight check runs every eval forward, and the lookups (parametrizations,
        ParameterDicts) cost more than the base layer itself on small models."""
        if self._reads is None or self._reads[0] != self.active:
            self._reads = (self.active, self._forward_reads([n for n, _ in self.active]))
        return self._reads[1]

    def _drop_caches(self) -> None:
        self._eval_cache = self._cat_cache = self._reads = None

    def set_active(self, pairs: list[tuple[str, float]]) -> None:
        """The active set of this layer; names it does not carry are skipped.

        Args:
            pairs: (adapter name, weight) for each active adapter.
        """
        if self.merged is not None:
            raise MergedError(f"'{self.path}' is merged; unmerge before changing the active set")
        self.active = tuple((n, float(w)) for n, w in pairs if n in self.lora_A)
        self._eval_cache = None

    # ----------------------------------------------------------- merging
    def delta_weight(self, pairs: tuple[tuple[str, float], ...]) -> torch.Tensor:
        """``sum_i w_i s_i B_i A_i`` in the base weight's shape (the merge math, once).

        Args:
            pairs: (adapter name, weight) for each adapter to sum.
        """
        w = self.base_weight()
        delta = torch.zeros(w.shape[0], w[0].numel(), device=w.device, dtype=torch.float32)
        for name, weight in pairs:
            a, b = self.factors_2d(name)
            delta.addmm_(b.float(), a.float(), alpha=weight * self.scaling[name])
        return delta.view(w.shape).to(w.dtype)

    def merge(self) -> None:
        if self.merged is not None or not self.active:
            return
        w = self.base_weight()
        with torch.no_grad():
            self._stash = w.detach().clone()
            w.add_(self.delta_weight(self.active))
        self.merged = self.active

    def unmerge(self) -> None:
        # Restoring the saved weight (not subtracting the delta) makes unmerge exact
        # however many times it runs.
        if self.merged is None:
            return
        with torch.no_grad():
            self.base_weight().copy_(self._stash)
        self._stash = None
        self.merged = None

    def _eval_weight(self) -> torch.Tensor:
        # Eval mode with a fixed active set costs what the base costs: the merged
        # weight is cached beside the (untouched) base weight and rebuilt when the
        # active set, any factor or the base weight changes.
        w = self.base_weight()
        key = (
            self.active,
            w._version,
            w.data_ptr(),
            w.dtype,
            tuple(self.scaling[n] for n, _ in self.active),
            tuple((t._version, t.data_ptr()) for t in self._active_reads()),
        )
        cache = self._eval_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = self._eval_cache = (key, w + self.delta_weight(self.active))
        return cache[1]

    def train(self, mode: bool = True):
        if mode:
            self._eval_cache = None
        return super().train(mode)

    # ------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        call = current(self)
        if call is not None:
            if self.merged is not None:
                raise MergedError(
                    "mixed_batch, composed and disabled need unmerged adapters; call "
                    "sb.unmerge(model)"
                )
            if call.off:
                return self.run(self.base_weight(), None, *args, **kwargs)
            if call.mix is not None:
                plan = call.mix
                return self.run(
                    self.base_weight(),
                    lambda x, out: self.composed_add(x, out, plan),
                    *args,
                    **kwargs,
                )
            plan = call.rows
            if not plan.names:  # none of the call's adapters is on this layer
                return self.run(self.base_weight(), None, *args, **kwargs)
            return self.run(
                self.base_weight(), lambda x, out: self.mixed_add(x, out, plan), *args, **kwargs
            )
        if not self.active or self.merged is not None:
            return self.run(self.base_weight(), None, *args, **kwargs)
        if not self.training and not self._needs_grad():
            return self.run(self._eval_weight(), None, *args, **kwargs)
        return self.run(self.base_weight(), self.lowrank_add, *args, **kwargs)

    def _needs_grad(self) -> bool:
        return self._needs_grad_for([n for n, _ in self.active])

    def _needs_grad_for(self, names: Sequence[str]) -> bool:
        return torch.is_grad_enabled() and any(
            p.requires_grad for n in names for p in self.adapter_parameters(n)
        )

    def composed_add(self, x: torch.Tensor, out: torch.Tensor, plan: MixPlan) -> torch.Tensor:
        """The active adapters as usual, plus the per-row composition of ``plan.names``."""
        if self.active:
            out = self.lowrank_add(x, out)
        self._check_rows("composed was given weights for", plan.weights.shape[0], x)
        return self.mix_add(x, out, plan)

    def _check_rows(self, what: str, rows: int, x: torch.Tensor) -> None:
        if rows != x.shape[0]:
            raise ConfigError(
                f"{what} {rows} rows but '{self.path}' sees a batch of {x.shape[0]} on dim 0 "
                "(inputs must be batch-first)"
            )

    def concatenated(
        self, names: tuple[str, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Factors of ``names`` side by side, scale folded into B: A (R, fan_in),
        B (fan_out, R) with R the sum of ranks, and the skill index of each rank unit.

        A per-row mixture sum_k w_k B_k A_k x is then ``B ((A x) * w[unit])``: two
        products of rank R, no per-row matrices. Cached while no factor changes.
        """
        params = [p for n in names for p in self.adapter_parameters(n)]
        key = (names, self._state_key(names))
        cache = self._cat_cache
        if cache is not None and cache[0] == key:
            return cache[1:]
        pairs = [self.slot_factors(n) for n in names]
        a = torch.cat([a for a, _ in pairs])
        b = torch.cat([b for _, b in pairs], dim=1)
        unit = torch.cat(
            [
                torch.full((a_.shape[0],), k, dtype=torch.long, device=a.device)
                for k, (a_, _) in enumerate(pairs)
            ]
        )
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._cat_cache = (key, a, b, unit)
        return a, b, unit

    def slot_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A: r x fan_in, s * B: fan_out x r): one adapter as a mixed-batch slot holds it."""
        a, b = self.factors_2d(name)
        return a, b * self.scaling[name]

    def plan_rows(
        self, names: tuple[str, ...], rows: Sequence[str | None], pooled: bool
    ) -> RowPlan:
        """This layer's share of a mixed batch over ``rows``; with ``pooled`` its adapters
        hold slots of the shared stacks until ``end_rows``."""
        device = self.base_weight().device
        local = {n: i for i, n in enumerate(names, start=1)}
        idx = torch.tensor([local.get(r, 0) for r in rows], dtype=torch.long, device=device)
        if not (pooled and names):
            return RowPlan(names, idx, None)
        held = tuple(self._pool.acquire(self, names))
        slot = dict(zip(names, held, strict=True))
        slots = torch.tensor([slot.get(r, 0) for r in rows], dtype=torch.long, device=device)
        return RowPlan(names, idx, slots, held)

    def end_rows(self, plan: RowPlan) -> None:
        """Release the slots ``plan_rows`` acquired."""
        self._pool.release(plan.held)

    def row_stacks(self, plan: RowPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A stack, B stack, per-row index into them) for a mixed batch: the shared pool
        when it holds the plan's adapters as they are and no gradient is wanted, else
        stacks built for this call (differentiable)."""
        if plan.slots is not None and not self._needs_grad_for(plan.names):
            pooled = self._pool.current(self, plan.names, plan.held)
            if pooled is not None:
                return pooled[0], pooled[1], plan.slots
        return (*self.stacks(plan.names, self.stack_transposed), plan.local)

    def stacks(
        self, names: tuple[str, ...], transposed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of ``names`` stacked, slot 0 all zeros, scale folded into B:
        A (K+1, r, fan_in) and B (K+1, fan_out, r), or both transposed (contiguous).

        Ranks are zero-padded to the largest, so one gather serves every row.
        Built per call (differentiable); mixed batches without gradients read the
        layer's ``StackPool`` instead.
        """
        pairs = [self.slot_factors(n) for n in names]
        a0, b0 = self.factors_2d(self.names()[0])
        r = max([a.shape[0] for a, _ in pairs], default=1)
        a_stack = torch.stack(
            [a0.new_zeros(r, a0.shape[1])] + [F.pad(a, (0, 0, 0, r - a.shape[0])) for a, _ in pairs]
        )
        b_stack = torch.stack(
            [b0.new_zeros(b0.shape[0], r)] + [F.pad(b, (0, r - b.shape[1])) for _, b in pairs]
        )
        if transposed:
            a_stack, b_stack = (
                a_stack.transpose(1, 2).contiguous(),
                b_stack.transpose(1, 2).contiguous(),
            )
        return a_stack, b_stack

    def __getattr__(self, name: str):
        # Code that reads e.g. ``mlp.c_fc.weight.dtype`` keeps working on a wrapped model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, adapters={self.ranks}, active={[n for n, _ in self.active]}"
