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
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, MergedError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


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
        self._eval_cache: tuple[Any, torch.Tensor] | None = None
        self._stack_cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        self.rows: torch.Tensor | None = None  # mixed batch: stack slot per row
        self.row_names: tuple[str, ...] = ()
        self.mix: torch.Tensor | None = None  # composition: (rows, K) weights over mix_names
        self.mix_names: tuple[str, ...] = ()
        self._cat_cache: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------ kind hooks
    @classmethod
    def check(cls, module: nn.Module, rank: int, path: str) -> None:
        """Raise ConfigError when ``module`` cannot carry a rank-``rank`` adapter."""
        fan_in, fan_out = cls.fans(module)
        if rank > min(fan_in, fan_out):
            raise ConfigError(
                f"rank {rank} for '{path}' exceeds min(d_in={fan_in}, d_out={fan_out}) of its "
                f"{type(module).__name__}"
            )

    @classmethod
    def fans(cls, module: nn.Module) -> tuple[int, int]:
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        return self.base.weight

    def new_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (A, B) in this kind's own shapes, B zero."""
        raise NotImplementedError

    def factors_2d(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A: r x fan_in, B: fan_out x r) with ``B @ A`` shaped like the base weight."""
        raise NotImplementedError

    def get_factors(self, name: str) -> Factors:
        """Per-site 2D factors, the form skills store."""
        return {"": self.factors_2d(name)}

    def set_factors(self, name: str, factors: Factors) -> None:
        a, b = factors[""]
        self.lora_A[name].data.copy_(a.reshape(self.lora_A[name].shape))
        self.lora_B[name].data.copy_(b.reshape(self.lora_B[name].shape))

    def run(self, weight: torch.Tensor, add, *args, **kwargs):
        """The base op with ``weight``; ``add(x, out)`` adds a low-rank term, if given."""
        raise NotImplementedError

    def lowrank_add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + sum_i w_i s_i B_i A_i drop(x)`` over the active adapters."""
        raise NotImplementedError

    def mixed_add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Per-row adapters from stacked factors (``self.rows`` indexes the stacks)."""
        raise NotImplementedError

    def mix_add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + sum_k mix[row, k] s_k B_k A_k x`` from the concatenated factors of ``mix_names``."""
        raise NotImplementedError

    # ------------------------------------------------------- adapter state
    def add(self, name: str, rank: int, scale: float, dropout: float, init: str) -> None:
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

    def remove(self, name: str) -> None:
        for attr in self.adapter_param_names + ("lora_dropout",):
            del getattr(self, attr)[name]
        for attr in self.adapter_meta_names:
            getattr(self, attr).pop(name, None)
        self.set_active([(n, w) for n, w in self.active if n != name])

    def names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [getattr(self, attr)[name] for attr in self.adapter_param_names]

    def set_active(self, pairs: list[tuple[str, float]]) -> None:
        if self.merged is not None:
            raise MergedError(f"'{self.path}' is merged; unmerge before changing the active set")
        self.active = tuple((n, float(w)) for n, w in pairs if n in self.lora_A)
        self._eval_cache = None

    # ----------------------------------------------------------- merging
    def delta_weight(self, pairs: tuple[tuple[str, float], ...]) -> torch.Tensor:
        """``sum_i w_i s_i B_i A_i`` in the base weight's shape (the merge math, once)."""
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
        params = [p for n, _ in self.active for p in self.adapter_parameters(n)]
        key = (
            self.active,
            w._version,
            w.data_ptr(),
            w.dtype,
            tuple((p._version, p.data_ptr()) for p in params),
        )
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                self._eval_cache = (key, w + self.delta_weight(self.active))
        return self._eval_cache[1]

    def train(self, mode: bool = True):
        if mode:
            self._eval_cache = None
        return super().train(mode)

    # ------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        if self.mix is not None:
            if self.merged is not None:
                raise MergedError("composed needs unmerged adapters; call sb.unmerge(model)")
            return self.run(self.base_weight(), self.composed_add, *args, **kwargs)
        if self.rows is not None:
            if self.merged is not None:
                raise MergedError("mixed_batch needs unmerged adapters; call sb.unmerge(model)")
            return self.run(self.base_weight(), self.mixed_add, *args, **kwargs)
        if not self.active or self.merged is not None:
            return self.run(self.base_weight(), None, *args, **kwargs)
        if not self.training and not self._needs_grad():
            return self.run(self._eval_weight(), None, *args, **kwargs)
        return self.run(self.base_weight(), self.lowrank_add, *args, **kwargs)

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            p.requires_grad for n, _ in self.active for p in self.adapter_parameters(n)
        )

    def composed_add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The active adapters as usual, plus the per-row composition of ``mix_names``."""
        if self.active:
            out = self.lowrank_add(x, out)
        if self.mix.shape[0] != x.shape[0]:
            raise ConfigError(
                f"composed was given weights for {self.mix.shape[0]} rows but '{self.path}' sees a "
                f"batch of {x.shape[0]} on dim 0 (inputs must be batch-first)"
            )
        return self.mix_add(x, out)

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Factors of ``mix_names`` side by side, scale folded into B: A (R, fan_in),
        B (fan_out, R) with R the sum of ranks, and the skill index of each rank unit.

        A per-row mixture sum_k w_k B_k A_k x is then ``B ((A x) * w[unit])``: two
        products of rank R, no per-row matrices. Cached while no factor changes.
        """
        names = self.mix_names
        params = [p for n in names for p in self.adapter_parameters(n)]
        key = (names, tuple((p._version, p.data_ptr()) for p in params))
        if self._cat_cache is not None and self._cat_cache[0] == key:
            return self._cat_cache[1:]
        pairs = [self.factors_2d(n) for n in names]
        a = torch.cat([a for a, _ in pairs])
        b = torch.cat([b * self.scaling[n] for n, (_, b) in zip(names, pairs, strict=True)], dim=1)
        unit = torch.cat(
            [
                torch.full((a_.shape[0],), k, dtype=torch.long, device=a.device)
                for k, (a_, _) in enumerate(pairs)
            ]
        )
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._cat_cache = (key, a, b, unit)
        return a, b, unit

    def stacks(self, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of ``row_names`` stacked, slot 0 all zeros, scale folded into B:
        A (K+1, r, fan_in) and B (K+1, fan_out, r), or both transposed (contiguous).

        Ranks are zero-padded to the largest, so one gather serves every row.
        Cached while no factor changes and gradients are off.
        """
        names = self.row_names
        params = [p for n in names for p in self.adapter_parameters(n)]
        key = (names, transposed, tuple((p._version, p.data_ptr()) for p in params))
        if self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1], self._stack_cache[2]
        pairs = [
            (a, b * self.scaling[n])
            for n, (a, b) in zip(names, map(self.factors_2d, names), strict=True)
        ]
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
        if not torch.is_grad_enabled():
            self._stack_cache = (key, a_stack, b_stack)
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
