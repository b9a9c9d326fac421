"""The SQL catalog: names, immutable versions, aliases, tags, lineage, embeddings.

Returns frozen entities only; every call is one short transaction through
``session_scope``. Blobs and the FAISS cache live in ``storage.library``.
"""

from __future__ import annotations

import difflib
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.orm import Session

from . import query, writes
from .entities import NewVersion, Ref, VersionRecord
from .errors import InvalidEmbedding, SkillExists, SkillNotFound
from .faults import crash_point
from .index import MAX_ROWS
from .models import (
    AliasRow,
    ChangeRow,
    EmbeddingRow,
    ParentRow,
    SkillRow,
    SpaceRow,
    StateRow,
    TagRow,
    VersionRow,
)
from .names import base_id as fingerprint_id
from .names import check_alias, check_name, check_tag, parse_ref
from .session import make_engine, migrate, session_scope
from .stats import insert_stats, read_stats, stats_keys

ADD_RETRIES = 50


class Catalog:
    """SQL metadata of a skill library (SQLite file or any SQLAlchemy URL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url_or_dir: str | os.PathLike[str]) -> Catalog:
        """Connect and bring the schema up to date (refusing a newer one)."""
        engine = make_engine(url_or_dir)
        migrate(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    # --- resolving ----------------------------------------------------------

    def _not_found(self, s: Session, name: str, what: str) -> SkillNotFound:
        names = s.scalars(select(SkillRow.name)).all()
        close = difflib.get_close_matches(name, names, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return SkillNotFound(f"{what}{hint}")

    def _skill(self, s: Session, name: str) -> SkillRow:
        skill = s.scalar(select(SkillRow).where(SkillRow.name == name))
        if skill is None:
            raise self._not_found(s, name, f"no skill named {name!r}")
        return skill

    def _resolve(self, s: Session, ref: str | Ref) -> VersionRow:
        name, sel = parse_ref(ref)
        skill = self._skill(s, name)
        stmt = select(VersionRow).where(VersionRow.skill_id == skill.id)
        if sel is None:
            row = s.scalar(stmt.order_by(VersionRow.version.desc()).limit(1))
        elif isinstance(sel, int):
            row = s.scalar(stmt.where(VersionRow.version == sel))
        else:
            row = s.scalar(
                stmt.join(AliasRow, AliasRow.version_id == VersionRow.id).where(
                    AliasRow.skill_id == skill.id, AliasRow.alias == sel
                )
            )
        if row is None:
            have = s.scalars(
                select(VersionRow.version).where(VersionRow.skill_id == skill.id)
            ).all()
            aliases = s.scalars(select(AliasRow.alias).where(AliasRow.skill_id == skill.id)).all()
            raise SkillNotFound(
                f"{ref!s} not found: {name!r} has versions {sorted(have)}"
                + (f" and aliases {sorted(aliases)}" if aliases else "")
            )
        return row

    # --- writing ------------------------------------------------------------

    def add_version(
        self,
        name: str,
        digest: str,
        size: int,
        new: NewVersion,
        *,
        embeddings: Mapping[str, np.ndarray] | None = None,
        allow_base_change: bool = False,
        before_commit: Callable[[], object] | None = None,
        on_checked: Callable[[], object] | None = None,
        stats: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[Ref, int]:
        """Insert the next version of ``name``; returns its ref and row id.

        ``embeddings`` must already be normalised (n, d) float32 arrays. Version
        numbers come from ``skills.last_version``; concurrent writers that collide
        on the unique (skill, version) key roll back and retry, so numbers stay
        1..n without gaps or duplicates. ``before_commit`` runs last inside the
        transaction (the library waits there for its blob to be durable);
        ``on_checked`` once the version passed its checks (see ``writes``).
        ``stats`` (routing statistics, plain arrays) go in the same transaction.
        """
        name = check_name(name)
        tag_items = [check_tag(k, v) for k, v in (new.tags or {}).items()]
        embeddings = _checked_vectors(embeddings)
        base = dict(new.base or {})
        fields = dict(
            digest=digest,
            size=int(size),
            ranks={str(k): int(v) for k, v in (new.ranks or {}).items()},
            targets=list(new.targets or []),
            base=base,
            base_id=fingerprint_id(base),
            learner=str(new.learner),
            config=dict(new.config or {}),
            metrics=dict(new.metrics or {}),
            description=str(new.description),
            spaces=sorted(embeddings),
        )
        parent_refs = list(new.parents or ())
        for attempt in range(ADD_RETRIES):
            try:
                with session_scope(self.engine, write=True) as s:
                    out = writes.insert_version(
                        self._resolve,
                        s,
                        name,
                        fields,
                        tag_items,
                        parent_refs,
                        embeddings,
                        allow_base_change,
                        on_checked,
                    )
                    if stats:
                        insert_stats(s, out[1], stats, replace=False)
                    s.flush()
                    if before_commit is not None:
                        before_commit()
                    crash_point("commit.before")
                crash_point("commit.after")
                return out
            except SkillExists:
                if attempt == ADD_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def alias(self, ref: str | Ref, alias: str) -> Ref:
        """Point ``name@alias`` at ``ref`` (moving it if it pointed elsewhere)."""
        alias = check_alias(alias)
        with session_scope(self.engine, write=True) as s:
            row = self._resolve(s, ref)
            existing = s.scalar(
                select(AliasRow).where(AliasRow.skill_id == row.skill_id, AliasRow.alias == alias)
            )
            if existing is None:
                s.add(AliasRow(skill_id=row.skill_id, alias=alias, version_id=row.id))
            else:
                existing.version_id = row.id
            return Ref(row.skill.name, row.version)

    def unalias(self, name: str, alias: str) -> Ref:
        """Drop ``name@alias``; returns the version it pointed at."""
        with session_scope(self.engine, write=True) as s:
            row = self._resolve(s, f"{check_name(name)}@{check_alias(alias)}")
            s.execute(
                delete(AliasRow).where(AliasRow.skill_id == row.skill_id, AliasRow.alias == alias)
            )
            return Ref(row.skill.name, row.version)

    def tag(self, ref: str | Ref, key: str, value: str) -> None:
        key, value = check_tag(key, value)
        with session_scope(self.engine, write=True) as s:
            row = self._resolve(s, ref)
            existing = s.get(TagRow, (row.id, key))
            if existing is None:
                s.add(TagRow(version_id=row.id, key=key, value=value))
            else:
                existing.value = value

    def untag(self, ref: str | Ref, key: str) -> None:
        with session_scope(self.engine, write=True) as s:
            row = self._resolve(s, ref)
            s.execute(delete(TagRow).where(TagRow.version_id == row.id, TagRow.key == key))

    def remove(self, ref: str | Ref) -> list[Ref]:
        """Remove one version (``name@3``, ``name@alias``) or every version (``name``).

        Aliases, tags and embeddings go with the rows; blobs stay until ``gc``.
        """
        name, sel = parse_ref(ref)
        with session_scope(self.engine, write=True) as s:
            skill = self._skill(s, name)
            if sel is None:
                rows = s.scalars(select(VersionRow).where(VersionRow.skill_id == skill.id)).all()
            else:
                rows = [self._resolve(s, ref)]
            refs = sorted(Ref(name, r.version) for r in rows)
            writes.log_changes(s, "remove", [(r.id, sp) for r in rows for sp in r.spaces])
            ids = [r.id for r in rows]
            s.execute(delete(VersionRow).where(VersionRow.id.in_(ids)))
            left = s.scalar(select(func.count()).where(VersionRow.skill_id == skill.id))
            if not left:
                s.execute(delete(SkillRow).where(SkillRow.id == skill.id))
            s.expunge_all()
            return refs

    # --- reading ------------------------------------------------------------

    def get(self, ref: str | Ref) -> VersionRecord:
        with session_scope(self.engine) as s:
            return self._resolve(s, ref).to_entity()

    def versions(self, name: str) -> list[VersionRecord]:
        with session_scope(self.engine) as s:
            skill = self._skill(s, check_name(name))
            rows = s.scalars(
                select(VersionRow)
                .where(VersionRow.skill_id == skill.id)
                .order_by(VersionRow.version)
            )
            return [r.to_entity() for r in rows]

    def names(self) -> list[str]:
        with session_scope(self.engine) as s:
            return list(s.scalars(select(SkillRow.name).order_by(SkillRow.name)))

    def list(
        self,
        name: str | None = None,
        tags: Mapping[str, str] | None = None,
        learner: str | None = None,
        base_id: str | None = None,
        text: str | None = None,
        latest_only: bool = True,
        sort: str = "created",
        desc: bool = True,
        limit: int | None = None,
    ) -> list[VersionRecord]:
        """Versions matching every given filter (``name`` is a substring or a glob)."""
        conds = query.conditions(name, tags, learner, base_id, text)
        stmt = query.list_statement(conds, latest_only, sort, desc, limit)
        with session_scope(self.engine) as s:
            return [r.to_entity() for r in s.scalars(stmt)]

    def lineage(self, ref: str | Ref) -> list[Ref]:
        """Ancestors of ``ref``, breadth-first, each once (removed ones end the walk)."""
        with session_scope(self.engine) as s:
            start = self._resolve(s, ref)
            out: list[Ref] = []
            seen = {Ref(start.skill.name, start.version)}
            todo = deque([start.id])
            while todo:
                child = todo.popleft()
                edges = s.scalars(
                    select(ParentRow)
                    .where(ParentRow.child_id == child)
                    .order_by(ParentRow.position)
                )
                for edge in edges:
                    pref = edge.to_entity()
                    if pref in seen:
                        continue
                    seen.add(pref)
                    out.append(pref)
                    vid = s.scalar(
                        select(VersionRow.id)
                        .join(SkillRow)
                        .where(SkillRow.name == pref.name, VersionRow.version == pref.version)
                    )
                    if vid is not None:
                        todo.append(vid)
            return out

    def version_ids(self, where: Mapping[str, Any] | None) -> set[int]:
        """Row ids of every version matching a ``retrieve(where=...)`` filter."""
        conds = query.conditions(**query.split_where(where))
        stmt = select(VersionRow.id).join(SkillRow, SkillRow.id == VersionRow.skill_id)
        with session_scope(self.engine) as s:
            return set(s.scalars(stmt.where(*conds)))

    def refs(self, version_ids: Iterable[int]) -> dict[int, Ref]:
        ids = list(version_ids)
        if not ids:
            return {}
        stmt = (
            select(VersionRow.id, SkillRow.name, VersionRow.version)
            .join(SkillRow, SkillRow.id == VersionRow.skill_id)
            .where(VersionRow.id.in_(ids))
        )
        with session_scope(self.engine) as s:
            return {vid: Ref(n, v) for vid, n, v in s.execute(stmt)}

    def referenced_digests(self) -> set[str]:
        with session_scope(self.engine) as s:
            return set(s.scalars(select(VersionRow.digest).distinct()))

    def digest_owners(self) -> dict[str, list[Ref]]:
        stmt = select(VersionRow.digest, SkillRow.name, VersionRow.version).join(SkillRow)
        out: dict[str, list[Ref]] = {}
        with session_scope(self.engine) as s:
            for digest, n, v in s.execute(stmt):
                out.setdefault(digest, []).append(Ref(n, v))
        return out

    # --- embeddings and the index's view of the catalog ---------------------

    def space_dims(self) -> dict[str, int]:
        with session_scope(self.engine) as s:
            return {r.name: r.dim for r in s.scalars(select(SpaceRow))}

    def state(self) -> tuple[str, int]:
        """(catalog uid, generation): what an index stamp must match to be fresh."""
        with session_scope(self.engine) as s:
            row = s.get(StateRow, 1)
            return row.uid, int(row.generation)

    def vectors(
        self, space: str, version_ids: Iterable[int] | None = None, s: Session | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(version_ids, rows, vectors (n, d)) of a space, optionally for some versions."""
        if s is None:
            with session_scope(self.engine) as s2:
                return self.vectors(space, version_ids, s2)
        stmt = select(EmbeddingRow.version_id, EmbeddingRow.row, EmbeddingRow.vector).where(
            EmbeddingRow.space == space
        )
        if version_ids is not None:
            ids = list(version_ids)
            if not ids:
                return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
            stmt = stmt.where(EmbeddingRow.version_id.in_(ids))
        rows = s.execute(stmt.order_by(EmbeddingRow.id)).all()
        vids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        nums = np.fromiter((r[1] for r in rows), np.int64, len(rows))
        vecs = (
            np.frombuffer(b"".join(r[2] for r in rows), np.float32).reshape(len(rows), -1)
            if rows
            else np.zeros((0, 0), np.float32)
        )
        return vids, nums, vecs

    def snapshot(self, space: str) -> tuple[str, int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(uid, generation, vectors of ``space``) read in one snapshot, for a rebuild.

        Read apart, a version committed in between would be both in the vectors
        and in the next catch-up's log, and enter the index twice.
        """
        with session_scope(self.engine, snapshot=True) as s:
            row = s.get(StateRow, 1)
            return row.uid, int(row.generation), self.vectors(space, None, s)

    def changes(self, space: str, after: int) -> tuple[int, list[tuple[str, int]], tuple]:
        """Changes to ``space`` after generation ``after``, in one snapshot.

        Returns (generation now, [(op, version_id)], vectors of the added versions).
        """
        with session_scope(self.engine, snapshot=True) as s:
            gen = int(s.scalar(select(StateRow.generation).where(StateRow.id == 1)))
            log = [
                (op, vid)
                for op, vid in s.execute(
                    select(ChangeRow.op, ChangeRow.version_id)
                    .where(
                        ChangeRow.space == space,
                        ChangeRow.generation > after,
                        ChangeRow.generation <= gen,
                    )
                    .order_by(ChangeRow.generation, ChangeRow.id)
                )
            ]
            added = {vid for op, vid in log if op == "add"}
            return gen, log, self.vectors(space, added, s)

    # --- routing statistics -------------------------------------------------

    def put_stats(
        self,
        ref: str | Ref,
        stats: Mapping[str, np.ndarray],
        embeddings: Mapping[str, np.ndarray] | None = None,
    ) -> Ref:
        """Give a version statistics it lacks (e.g. routing statistics for one written by
        0.1.0), with vectors in new spaces (normalised (n, d) float32), in one transaction.

        A version's statistics never change once set: refused when it already holds
        one of the keys, or vectors in one of ``embeddings``' spaces."""
        embeddings = _checked_vectors(embeddings)
        with session_scope(self.engine, write=True) as s:
            row = self._resolve(s, ref)
            out = Ref(row.skill.name, row.version)
            clash = sorted(set(embeddings) & set(row.spaces))
            held = sorted(set(stats) & stats_keys(s, row.id))
            if held or clash:
                raise SkillExists(
                    f"{out} already has statistics {held}"
                    f"{f' or vectors in {clash}' if clash else ''}"
                    "; versions are immutable: add a new version to change them"
                )
            writes.insert_embeddings(s, row.id, embeddings)
            row.spaces = sorted({*row.spaces, *embeddings})
            insert_stats(s, row.id, stats, replace=False)
            return out

    def stats(self, refs: Iterable[str | Ref]) -> dict[Ref, dict[str, np.ndarray] | None]:
        """Statistics of versions as stored arrays (None for a version without any)."""
        with session_scope(self.engine) as s:
            ids = {}
            for r in refs:
                row = self._resolve(s, r)
                ids[row.id] = Ref(row.skill.name, row.version)
            found = read_stats(s, ids)
            return {ref: found.get(v) for v, ref in ids.items()}

    def stats_of_ids(self, version_ids: Iterable[int]) -> dict[Ref, dict[str, np.ndarray] | None]:
        """Routing statistics by row id (e.g. every version a ``where`` filter allows)."""
        ids = list(version_ids)
        names = self.refs(ids)
        with session_scope(self.engine) as s:
            found = read_stats(s, ids)
        return {ref: found.get(v) for v, ref in names.items()}


def _checked_vectors(embeddings: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """A version's vectors by space: space names checked, 1..MAX_ROWS rows each."""
    embeddings = dict(embeddings or {})
    for space, vecs in embeddings.items():
        check_name(space)
        if not 0 < len(vecs) <= MAX_ROWS:
            raise InvalidEmbedding(f"space {space!r}: 1..{MAX_ROWS} vectors per version")
    return embeddings


__all__ = ["Catalog"]
