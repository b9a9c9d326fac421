"""`StackPool`: one layer's stacked factors for mixed batches, kept between calls and
updated a slot at a time.

Slot 0 is all zeros (rows without an adapter); every other slot holds one
adapter's factors (scale folded into B, rank zero-padded to the pool's rank) in
the layout the layer kind's batched product reads. A mixed batch *acquires* the
slots of its adapters, writing only those that are missing or whose adapter
changed since, and releases them on exit. An acquired slot is never
overwritten, so threads share one pool; a slot whose adapter changed or left
while in use is recycled when its last user releases it. Removing an adapter
frees its slot, and the pool grows (doubling) only when every slot holds an
adapter still on the layer: its size follows the adapters on the layer, never
the number ever served.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .layer import AdapterLayer


class StackPool:
    """Slots of stacked (A, B) factors of one ``AdapterLayer``; see the module docstring."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (A, B) read together: (C+1, in, R), (C+1, R, out) for linear maps (transposed),
        # (C+1, R, in), (C+1, out, R) otherwise
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.entries: dict[str, tuple[int, Any]] = {}  # adapter -> (slot, state key)
        self.users: Counter[int] = Counter()
        self.free: list[int] = []
        self.retired: set[int] = set()  # slots whose adapter changed or left while in use

    def __deepcopy__(self, memo) -> StackPool:
        return StackPool()  # a cache: a copied layer starts with its own, empty

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @property
    def capacity(self) -> int:
        """Adapter slots allocated (slot 0 not counted)."""
        return 0 if self.tensors is None else self.tensors[0].shape[0] - 1

    def nbytes(self) -> int:
        """Bytes the stacks hold (a second copy of every pooled adapter's factors)."""
        return sum(t.numel() * t.element_size() for t in self.tensors or ())

    def acquire(self, layer: AdapterLayer, names: Sequence[str]) -> list[int]:
        """The slots of ``names`` (written if missing or stale), held until ``release``."""
        with self.lock, torch.inference_mode(False), torch.no_grad():
            if names and self.tensors is not None and not self.users:
                first, a = layer.factor_parameters(names[0])[0], self.tensors[0]
                if (a.device, a.dtype) != (first.device, first.dtype):
                    self._clear()  # the model moved (device or dtype): start over
            slots = []
            try:
                for n in names:
                    slots.append(self._slot(layer, n))
                    self.users[slots[-1]] += 1
            except BaseException:
                self._release(slots)
                raise
            return slots

    def release(self, slots: Sequence[int]) -> None:
        """Give back slots from ``acquire``."""
        with self.lock:
            self._release(slots)

    def forget(self, name: str) -> None:
        """Adapter ``name`` left the layer: its slot is free (once no call holds it)."""
        with self.lock:
            entry = self.entries.pop(name, None)
            if entry is not None:
                self._retire(entry[0])

    def current(
        self, layer: AdapterLayer, names: Sequence[str], slots: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stacks, if ``slots`` still hold ``names`` as they are now (else None: a
        factor changed inside the call, so the caller builds its own stacks)."""
        with self.lock:
            for n, s in zip(names, slots, strict=True):
                if self.entries.get(n) != (s, layer._state_key([n])):
                    return None
            return self.tensors

    # ------------------------------------------------------------ internals
    def _slot(self, layer: AdapterLayer, name: str) -> int:
        key = layer._state_key([name])
        entry = self.entries.get(name)
        if entry is not None and entry[1] == key:
            return entry[0]
        if entry is not None:
            del self.entries[name]
            self._retire(entry[0])
        a, b = layer.slot_factors(name)
        slot = self._take(a, b, layer.stack_transposed)
        self._write(slot, a, b, layer.stack_transposed)
        self.entries[name] = (slot, key)
        return slot

    def _retire(self, slot: int) -> None:
        if self.users[slot]:
            self.retired.add(slot)
        else:
            self.free.append(slot)

    def _release(self, slots: Sequence[int]) -> None:
        for s in slots:
            self.users[s] -= 1
            if self.users[s] <= 0:
                del self.users[s]
                if s in self.retired:
                    self.retired.discard(s)
                    self.free.append(s)

    def _clear(self) -> None:
        self.tensors, self.entries, self.free, self.retired = None, {}, [], set()

    def _take(self, a: torch.Tensor, b: torch.Tensor, transposed: bool) -> int:
        """A free slot for a rank ``a.shape[0]`` adapter, growing the stacks if needed."""
        rank = a.shape[0]
        cap = self.capacity
        have = 0 if self.tensors is None else self.tensors[0].shape[2 if transposed else 1]
        if not self.free or rank > have:
            grow = not self.free
            self._resize(
                cap * 2 if grow and cap else max(cap, 1), max(rank, have), a, b, transposed
            )
            if grow:
                self.free.extend(range(self.capacity, cap, -1))
        return self.free.pop()

    def _resize(
        self, cap: int, rank: int, a: torch.Tensor, b: torch.Tensor, transposed: bool
    ) -> None:
        fan_in, fan_out = a.shape[1], b.shape[0]
        shapes = (
            ((fan_in, rank), (rank, fan_out)) if transposed else ((rank, fan_in), (fan_out, rank))
        )
        new = tuple(a.new_zeros(cap + 1, *s) for s in shapes)
        if self.tensors is not None:
            for old, t in zip(self.tensors, new, strict=True):
                t[: old.shape[0], : old.shape[1], : old.shape[2]] = old
        self.tensors = new  # one assignment: readers see the old pair or the new one

    def _write(self, slot: int, a: torch.Tensor, b: torch.Tensor, transposed: bool) -> None:
        a_stack, b_stack = self.tensors
        a, b = (a.t(), b.t()) if transposed else (a, b)
        for stack, f in ((a_stack, a), (b_stack, b)):
            dst = stack[slot]
            dst.zero_()
            dst[: f.shape[0], : f.shape[1]] = f.to(dst.dtype)
