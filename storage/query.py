"""SQL filters shared by ``Catalog.list`` and filtered retrieval.

Every value goes in as a bound parameter; names that look like SQL are data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import ColumnElement, Select, func, or_, select

from .errors import ConfigError
from .models import SkillRow, TagRow, VersionRow
from .names import like_pattern

SORTS = {
    "created": (VersionRow.created, VersionRow.id),
    "name": (SkillRow.name, VersionRow.version),
    "version": (VersionRow.version, VersionRow.id),
}
WHERE_KEYS = ("name", "learner", "base_id", "text", "tags")


def conditions(
    name: str | None = None,
    tags: Mapping[str, str] | None = None,
    learner: str | None = None,
    base_id: str | None = None,
    text: str | None = None,
) -> list[ColumnElement[bool]]:
    """WHERE clauses over ``versions JOIN skills``; each one can use an index."""
    out: list[ColumnElement[bool]] = []
    if name is not None:
        out.append(SkillRow.name.like(like_pattern(name), escape="\\"))
    for key, value in (tags or {}).items():
        sub = select(TagRow.version_id).where(TagRow.key == key, TagRow.value == value)
        out.append(VersionRow.id.in_(sub))
    if learner is not None:
        out.append(VersionRow.learner == learner)
    if base_id is not None:
        out.append(VersionRow.base_id == base_id)
    if text is not None:
        pattern = like_pattern(text)
        out.append(
            or_(
                SkillRow.name.ilike(pattern, escape="\\"),
                VersionRow.description.ilike(pattern, escape="\\"),
            )
        )
    return out


def split_where(where: Mapping[str, Any] | None) -> dict[str, Any]:
    """``retrieve(where=...)``: known keys are filters, any other key is a tag."""
    where = dict(where or {})
    tags = dict(where.pop("tags", None) or {})
    known = {k: where.pop(k) for k in list(where) if k in WHERE_KEYS}
    tags.update({str(k): v for k, v in where.items()})
    return {**known, "tags": tags}


def list_statement(
    conds: list[ColumnElement[bool]],
    latest_only: bool,
    sort: str,
    desc: bool,
    limit: int | None,
) -> Select[tuple[VersionRow]]:
    """Versions matching ``conds``; with ``latest_only``, the newest match per name."""
    if sort not in SORTS:
        raise ConfigError(f"sort must be one of {sorted(SORTS)}, got {sort!r}")
    stmt = select(VersionRow).join(SkillRow, SkillRow.id == VersionRow.skill_id)
    if latest_only:
        ranked = (
            select(
                VersionRow.id.label("vid"),
                func.row_number()
                .over(partition_by=VersionRow.skill_id, order_by=VersionRow.version.desc())
                .label("rn"),
            )
            .join(SkillRow, SkillRow.id == VersionRow.skill_id)
            .where(*conds)
            .subquery()
        )
        stmt = stmt.join(ranked, ranked.c.vid == VersionRow.id).where(ranked.c.rn == 1)
    else:
        stmt = stmt.where(*conds)
    keys = SORTS[sort]
    stmt = stmt.order_by(*(k.desc() if desc else k.asc() for k in keys))
    if limit is not None:
        stmt = stmt.limit(int(limit))
    return stmt
