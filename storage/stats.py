"""Routing statistics of versions as rows of plain arrays (numbers and strings only).

An array goes in as little-endian bytes plus dtype and shape and comes back
through ``np.frombuffer``; a dtype outside the allowed kinds is refused, so a
tampered row can never make the reader unpickle or allocate objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from .errors import CorruptFile, InvalidEmbedding
from .models import StatsRow

KINDS = "fiuU"  # float, int, unsigned, unicode: nothing that holds objects
MAX_KEY = 64


def encode(arrays: Mapping[str, np.ndarray]) -> list[dict]:
    """Rows for ``arrays`` (without version id); refuses object arrays and long keys."""
    rows = []
    for key, value in arrays.items():
        arr = np.asarray(value)
        if arr.dtype.kind not in KINDS or not 0 < len(key) <= MAX_KEY:
            raise InvalidEmbedding(f"statistics {key!r}: dtype {arr.dtype} or key not storable")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        rows.append(
            {
                "key": key,
                "dtype": arr.dtype.str,
                "shape": list(arr.shape),
                "data": np.ascontiguousarray(arr).tobytes(),
            }
        )
    return rows


def decode(row: StatsRow | tuple) -> np.ndarray:
    key, dtype, shape, data = (
        (row.key, row.dtype, row.shape, row.data) if isinstance(row, StatsRow) else row
    )
    try:
        dt = np.dtype(dtype)
        if dt.kind not in KINDS:
            raise TypeError(dtype)
        return np.frombuffer(data, dt).reshape(shape).copy()
    except (TypeError, ValueError) as err:
        raise CorruptFile(f"statistics {key!r}: stored bytes are not a {dtype} {shape}") from err


def insert_stats(
    s: Session, version_id: int, arrays: Mapping[str, np.ndarray], replace: bool
) -> None:
    rows = encode(arrays)
    if replace:
        s.execute(delete(StatsRow).where(StatsRow.version_id == version_id))
    if rows:
        s.execute(insert(StatsRow), [{"version_id": version_id, **r} for r in rows])


def stats_keys(s: Session, version_id: int) -> set[str]:
    """The keys a version's statistics hold, without reading the arrays."""
    return set(s.scalars(select(StatsRow.key).where(StatsRow.version_id == version_id)))


def read_stats(s: Session, version_ids: Iterable[int]) -> dict[int, dict[str, np.ndarray]]:
    """{version id: {key: array}} for the ids that have statistics."""
    ids = list(version_ids)
    out: dict[int, dict[str, np.ndarray]] = {}
    for start in range(0, len(ids), 500):  # stay under every backend's parameter limit
        stmt = select(
            StatsRow.version_id, StatsRow.key, StatsRow.dtype, StatsRow.shape, StatsRow.data
        ).where(StatsRow.version_id.in_(ids[start : start + 500]))
        for vid, *rest in s.execute(stmt):
            out.setdefault(vid, {})[rest[0]] = decode(tuple(rest))
    return out
