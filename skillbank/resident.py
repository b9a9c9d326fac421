"""`ResidentSet`: the bank skills a served model carries, at most ``max_resident`` at once.

A skill is fetched from the bank and attached (inactive) the first time a batch
needs it; when the set is full, the least recently used skill that is neither
pinned nor needed by a batch in flight is removed from the model (its
mixed-batch stack slot is freed with it). Batches *hold* their skills from
planning to the end of their forward, so a skill is never evicted mid-batch;
a thread whose batch needs room that other threads hold waits for them.

Adapters the caller put on the model (``register``, or an adapter of the same
name already there) are theirs: never counted, never removed.

Sizing: every resident skill costs its factors twice (the adapter and its
stack slot), so the default cap keeps resident skills within the base model's
own parameter count, between 8 and 256 skills (``default_max_resident``). Serve
a working set (the skills most batches need) that fits, and pin the few every
batch needs.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from storage import SkillNotFound

from .adapters.inject import adapter_names, remove_adapter
from .bank import SkillBank
from .errors import ConfigError
from .skill import Skill, attach

Held = dict[str, tuple[str, Skill]]  # ref -> (adapter name on the model, skill)

MIN_DEFAULT, MAX_DEFAULT = 8, 256


@dataclass(frozen=True)
class ResidentStats:
    """A snapshot of what a ``Router``'s resident set did so far.

    Attributes:
        hits: skill lookups a resident adapter served.
        misses: skills fetched from the bank and attached.
        evictions: skills removed from the model to make room (or gone from the bank).
        load_seconds: time spent fetching and attaching skills.
        resident: skills attached now (pinned included, registered ones not).
        max_resident: the cap.
        pinned: skills that are never evicted.
        chunks: extra forwards run because a batch needed more skills than fit at once.
        adapter_bytes: bytes of the resident skills' factors on the model.
    """

    hits: int
    misses: int
    evictions: int
    load_seconds: float
    resident: int
    max_resident: int
    pinned: int
    chunks: int
    adapter_bytes: int

    @property
    def hit_rate(self) -> float:
        """Share of lookups served without loading (0 before any lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def skill_bytes(skill: Skill) -> int:
    """Bytes of a skill's factors as attached (float32 unless the base is float64)."""
    return sum(a.nbytes + b.nbytes for a, b in skill.factors.values())


def default_max_resident(model: nn.Module, skill: Skill) -> int:
    """The cap when none is given: resident skills (factors plus their stack slot, so
    twice their size) within the base model's parameter count, in [8, 256]."""
    base = sum(p.numel() for p in model.parameters())
    fit = base // max(1, 2 * skill.factor_params)
    return int(min(MAX_DEFAULT, max(MIN_DEFAULT, fit)))


def check_max_resident(value: object) -> int | None:
    """``value`` as a cap (None: the default); anything else than an int >= 1 is a ConfigError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"max_resident must be an integer >= 1 (or None), got {value!r}")
    return value


class ResidentSet:
    """The bounded, least-recently-used set of bank skills attached to ``model``."""

    def __init__(
        self,
        model: nn.Module,
        bank: SkillBank,
        max_resident: int | None = None,
        pin: Sequence[str] = (),
    ) -> None:
        cap = check_max_resident(max_resident)
        if isinstance(pin, str):
            raise ConfigError(f"pin takes a list of refs, got the string {pin!r}")
        pins = list(dict.fromkeys(str(bank.record(r).ref) for r in pin))  # exact versions
        if cap is not None and len(pins) > cap:
            raise ConfigError(
                f"{len(pins)} pinned skills do not fit max_resident={cap}; raise the cap or "
                "pin fewer"
            )
        self.model, self.bank = model, bank
        self.lock = threading.RLock()
        self._freed = threading.Condition(self.lock)
        self._cap = cap
        self._pinned = frozenset(pins)
        self._resident: OrderedDict[str, tuple[str, Skill]] = OrderedDict()  # LRU first
        self._external: Held = {}
        self._in_use: Counter[str] = Counter()
        self._generation = bank.generation()
        self._hits = self._misses = self._evictions = self._chunks = 0
        self._load_seconds = 0.0
        skills = [(r, bank.get(r)) for r in pins]
        if self._cap is None and skills:
            self._cap = default_max_resident(model, skills[0][1])
            if len(pins) > self._cap:
                raise ConfigError(
                    f"{len(pins)} pinned skills do not fit the default max_resident="
                    f"{self._cap} for this model; pass max_resident"
                )
        try:
            for ref, skill in skills:
                self._attach(ref, skill)
        except BaseException:
            for ref in list(self._resident):
                self._detach(ref)
            raise

    # ----------------------------------------------------------- queries
    @property
    def max_resident(self) -> int | None:
        """The cap (None until the default is fixed by the first skill loaded)."""
        return self._cap

    @property
    def pinned(self) -> frozenset[str]:
        return self._pinned

    def resident(self) -> list[str]:
        """Refs attached now, least recently used first."""
        with self.lock:
            return list(self._resident)

    def stats(self) -> ResidentStats:
        with self.lock:
            return ResidentStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                load_seconds=self._load_seconds,
                resident=len(self._resident),
                max_resident=self._cap or 0,
                pinned=len(self._pinned),
                chunks=self._chunks,
                adapter_bytes=sum(skill_bytes(s) for _, s in self._resident.values()),
            )

    # ----------------------------------------------------------- changes
    def register(self, ref: str, adapter: str, skill: Skill) -> None:
        """``ref`` is on the model already as the caller's adapter ``adapter``."""
        with self.lock:
            self._external[ref] = (adapter, skill)

    def chunks(self, refs: Sequence[str]) -> list[list[int]]:
        """Row indices of ``refs`` in groups that each need at most the free room (the
        cap minus the pins): one group when the batch fits."""
        with self.lock:
            fixed = self._pinned | set(self._external)
            loose = sorted({r for r in refs if r not in fixed}, key=self._order)
            room = self._room(loose[:1])
            if len(loose) <= room:
                return [list(range(len(refs)))]
            if room < 1:
                raise ConfigError(
                    f"all {self._cap} resident slots are pinned; no room for {loose[0]!r}"
                )
            groups = [set(loose[i : i + room]) for i in range(0, len(loose), room)]
            self._chunks += len(groups) - 1
        out = [[i for i, r in enumerate(refs) if r in g] for g in groups]
        out[0] += [i for i, r in enumerate(refs) if r in fixed]
        return [sorted(rows) for rows in out]

    @contextmanager
    def holding(self, refs: Sequence[str]) -> Iterator[Held]:
        """``refs`` resident (loaded and others evicted as needed) and held, so that no
        eviction removes them, until the block ends."""
        with self.lock:
            held = self._acquire(sorted(set(refs)))
        try:
            yield held
        finally:
            with self.lock:
                for r in held:
                    self._in_use[r] -= 1
                    if self._in_use[r] <= 0:
                        del self._in_use[r]
                self._freed.notify_all()

    def lookup(self, ref: str) -> tuple[str, Skill]:
        """(adapter, skill) of ``ref``, made resident; a later batch may evict it."""
        with self.holding([ref]) as held:
            return held[ref]

    # ----------------------------------------------------------- internals
    def _order(self, ref: str) -> tuple[int, str]:
        return (ref not in self._resident, ref)  # resident ones first: they are hits

    def _room(self, sample: Sequence[str]) -> int:
        if self._cap is None and sample:
            self._cap = default_max_resident(self.model, self.bank.get(sample[0]))
        return (self._cap or 1) - len(self._pinned)

    def _acquire(self, refs: list[str]) -> Held:
        self._drop_removed(refs)
        needed = [r for r in refs if r not in self._external]  # what counts against the cap
        missing = self._make_room(needed) if needed else []
        self._hits += len(needed) - len(missing)
        held: Held = {r: self._external[r] for r in refs if r in self._external}
        for r in needed:
            if r in self._resident:
                self._resident.move_to_end(r)
                held[r] = self._resident[r]
        for r in missing:
            start = time.perf_counter()
            held[r] = self._attach(r, self.bank.get(r))
            self._load_seconds += time.perf_counter() - start
            self._misses += 1
        for r in held:
            self._in_use[r] += 1
        return held

    def _make_room(self, needed: list[str]) -> list[str]:
        """Evict least recently used skills until ``needed`` fits; the ones to load."""
        self._room(needed)  # fixes the default cap on first use
        if len(set(needed) | self._pinned) > self._cap:
            raise ConfigError(
                f"a batch needs {len(needed)} skills at once; max_resident is {self._cap} with "
                f"{len(self._pinned)} pinned (Router.forward splits larger batches)"
            )
        while True:  # wait while batches in flight hold the candidates
            missing = [r for r in needed if r not in self._resident]
            excess = len(self._resident) + len(missing) - self._cap
            victims = [
                r
                for r in self._resident
                if r not in self._pinned and r not in self._in_use and r not in needed
            ][: max(excess, 0)]
            if len(victims) >= excess:
                break
            self._freed.wait()
        for r in victims:
            self._detach(r)
            self._evictions += 1
        return missing

    def _drop_removed(self, refs: Sequence[str]) -> None:
        """Skills gone from the bank leave the model (once no batch holds them); asking
        for one is a SkillNotFound."""
        gen = self.bank.generation()
        if gen == self._generation:
            return
        for r in list(self._resident):
            try:
                self.bank.record(r)
            except SkillNotFound:
                if r in refs:
                    raise SkillNotFound(
                        f"skill {r!r} was removed from the bank while resident"
                    ) from None
                if r not in self._in_use:
                    self._detach(r)
                    self._evictions += 1
        self._generation = gen

    def _attach(self, ref: str, skill: Skill) -> tuple[str, Skill]:
        name = adapter_name_for(ref)
        if name in adapter_names(self.model):  # the caller's own adapter: theirs to keep
            self._external[ref] = (name, skill)
            return self._external[ref]
        with torch.inference_mode(False):  # normal tensors, whatever mode the caller is in
            attach(self.model, skill, name, load_head=False, activate=False)
        self._resident[ref] = (name, skill)
        return self._resident[ref]

    def _detach(self, ref: str) -> None:
        name, _ = self._resident.pop(ref)
        remove_adapter(self.model, name)


def adapter_name_for(ref: str) -> str:
    """A valid adapter name for a bank ref (``name@3`` -> ``name-v3``)."""
    return re.sub(r"[^A-Za-z0-9_\-+]", "_", ref.replace("@", "-v"))[:200]
