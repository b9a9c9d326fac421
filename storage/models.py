"""ORM rows of the catalog (SQLAlchemy 2.x declarative).

Rows stay inside a session; ``to_entity()`` turns them into the frozen values of
``storage.entities``. The schema itself is created by the Alembic migrations in
``storage/migrations``, which deliberately do not import this module.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .entities import Ref, VersionRecord


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class SkillRow(Base):
    """A skill name; ``last_version`` is the highest number ever issued (never reused)."""

    __tablename__ = "skills"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VersionRow(Base):
    """One immutable version; only its aliases and tags change after insert."""

    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("skill_id", "version", name="uq_versions_skill_version"),
        Index("ix_versions_created", "created"),
        Index("ix_versions_learner_created", "learner", "created"),
        Index("ix_versions_base_id_created", "base_id", "created"),
        Index("ix_versions_digest", "digest"),
        {"sqlite_autoincrement": True},  # row ids feed FAISS ids: never reuse them
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    skill_id: Mapped[int] = mapped_column(ForeignKey("skills.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    ranks: Mapped[dict[str, int]] = mapped_column(JSON)
    targets: Mapped[list[str]] = mapped_column(JSON)
    base: Mapped[dict[str, Any]] = mapped_column(JSON)
    base_id: Mapped[str] = mapped_column(String(64))
    learner: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(Text)
    spaces: Mapped[list[str]] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    skill: Mapped[SkillRow] = relationship(lazy="joined", innerjoin=True)
    parents: Mapped[list[ParentRow]] = relationship(lazy="selectin", passive_deletes=True)
    aliases: Mapped[list[AliasRow]] = relationship(lazy="selectin", passive_deletes=True)
    tags: Mapped[list[TagRow]] = relationship(lazy="selectin", passive_deletes=True)

    def to_entity(self) -> VersionRecord:
        return VersionRecord(
            name=self.skill.name,
            version=self.version,
            digest=self.digest,
            size=self.size,
            ranks=dict(self.ranks),
            targets=list(self.targets),
            base=dict(self.base),
            base_id=self.base_id,
            learner=self.learner,
            config=dict(self.config),
            metrics=dict(self.metrics),
            description=self.description,
            parents=tuple(p.to_entity() for p in sorted(self.parents, key=lambda p: p.position)),
            created=_aware(self.created),
            aliases=tuple(sorted(a.alias for a in self.aliases)),
            tags={t.key: t.value for t in sorted(self.tags, key=lambda t: t.key)},
            spaces=tuple(self.spaces),
        )


class ParentRow(Base):
    """Lineage edge, kept by natural key so history survives removing the parent."""

    __tablename__ = "version_parents"
    __table_args__ = (Index("ix_version_parents_parent", "parent_name", "parent_version"),)
    child_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True
    )
    parent_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    parent_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, default=0)

    def to_entity(self) -> Ref:
        return Ref(self.parent_name, self.parent_version)


class AliasRow(Base):
    """A movable pointer ``name@alias`` -> one version of the same skill."""

    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("skill_id", "alias", name="uq_aliases_skill_alias"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    skill_id: Mapped[int] = mapped_column(ForeignKey("skills.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(String(200))
    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), index=True
    )


class TagRow(Base):
    """A mutable key/value label on a version; (key, value) is indexed for filters."""

    __tablename__ = "tags"
    __table_args__ = (Index("ix_tags_key_value", "key", "value"),)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class SpaceRow(Base):
    """An embedding space and its fixed dimension (set by its first vector)."""

    __tablename__ = "spaces"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    dim: Mapped[int] = mapped_column(Integer)


class EmbeddingRow(Base):
    """One float32 vector (L2-normalised) of a version in a space."""

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("version_id", "space", "row", name="uq_embeddings_version_space_row"),
        Index("ix_embeddings_space_id", "space", "id"),
        Index("ix_embeddings_version", "version_id"),
        {"sqlite_autoincrement": True},
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    space: Mapped[str] = mapped_column(String(200))
    row: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class StateRow(Base):
    """The single catalog-state row: a generation bumped by every embedding change.

    Writers update this one row inside their transaction, so generations follow
    commit order on every backend; the FAISS cache is stamped with one.
    """

    __tablename__ = "catalog_state"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid: Mapped[str] = mapped_column(String(32))
    generation: Mapped[int] = mapped_column(BigInteger, default=0)


class ChangeRow(Base):
    """Log of embedding additions/removals, so an index can catch up incrementally."""

    __tablename__ = "changes"
    __table_args__ = (Index("ix_changes_space_generation", "space", "generation"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger)
    space: Mapped[str] = mapped_column(String(200))
    op: Mapped[str] = mapped_column(String(8))  # "add" | "remove"
    version_id: Mapped[int] = mapped_column(Integer)


class StatsRow(Base):
    """One routing-statistics array of a version: raw bytes, dtype and shape (never pickled)."""

    __tablename__ = "version_stats"
    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[list[int]] = mapped_column(JSON)
    data: Mapped[bytes] = mapped_column(LargeBinary)
