"""Plain frozen values the storage layer hands to callers.

ORM rows never leave a session; callers get these instead, so nothing they hold
can lazy-load, expire or write back behind their back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, order=True)
class Ref:
    """A natural key of one version: ``name@version``."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class NewVersion:
    """What describes a version being added; its blob and embeddings travel beside it.

    Declared once here, so the library, the catalog and the write path pass it
    whole instead of forwarding each field by name.
    """

    ranks: Mapping[str, int] = field(default_factory=dict)
    targets: Sequence[str] = ()
    base: Mapping[str, Any] = field(default_factory=dict)
    learner: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    parents: Sequence[str | Ref] = ()


@dataclass(frozen=True)
class VersionRecord:
    """Everything the catalog knows about one immutable version."""

    name: str
    version: int
    digest: str
    size: int
    ranks: dict[str, int]
    targets: list[str]
    base: dict[str, Any]
    base_id: str
    learner: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    description: str
    parents: tuple[Ref, ...]
    created: datetime
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    spaces: tuple[str, ...] = ()

    @property
    def ref(self) -> Ref:
        return Ref(self.name, self.version)


@dataclass(frozen=True)
class Hit:
    """One retrieval result; ``score`` is a cosine similarity (higher is closer)."""

    name: str
    version: int
    score: float

    @property
    def ref(self) -> Ref:
        return Ref(self.name, self.version)


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found; orphan blobs are harmless garbage, the rest is damage."""

    missing_blobs: tuple[str, ...] = ()
    corrupt_blobs: tuple[str, ...] = ()
    orphan_blobs: tuple[str, ...] = ()
    index_without_rows: tuple[str, ...] = ()
    rows_without_index: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (
            self.missing_blobs
            or self.corrupt_blobs
            or self.index_without_rows
            or self.rows_without_index
        )
