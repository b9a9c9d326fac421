"""FAISS nearest-neighbour index over L2-normalised float32 vectors (cosine).

One ``VectorIndex`` per embedding space. Exact (``IndexFlatIP``) while small,
HNSW above ``IndexParams.threshold``. FAISS ids pack the catalog's version row id
and the vector's row within that version (``version_id << 16 | row``), so a hit
names its version without a side table and a version can own several vectors
(e.g. k-means centres; its score is the best of them).

This module knows nothing about SQL: ``storage.library`` keeps it in step with
the catalog and stamps it with the catalog generation it reflects.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .errors import InvalidEmbedding
from .faults import crash_point

ROW_BITS = 16
MAX_ROWS = 1 << ROW_BITS
FLAT, HNSW = "flat", "hnsw"


@dataclass(frozen=True)
class IndexParams:
    """How to index; HNSW settings chosen for recall@5 >= 0.95 at 1M vectors."""

    threshold: int = 50_000  # above this many vectors: HNSW instead of exact
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 96
    kind: str | None = None  # force "flat" or "hnsw"; None = by threshold

    def __post_init__(self) -> None:
        if self.kind not in (None, FLAT, HNSW):
            raise ValueError(f"index kind must be 'flat', 'hnsw' or None, got {self.kind!r}")
        if self.threshold < 0 or self.hnsw_m < 2 or self.ef_search < 1:
            raise ValueError(f"bad index parameters: {self}")

    def kind_for(self, n: int) -> str:
        return self.kind or (HNSW if n > self.threshold else FLAT)


def normalize(vectors: Any, dim: int | None = None) -> np.ndarray:
    """(d,) or (n, d) finite, non-zero vectors -> C-contiguous unit float32 (n, d)."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidEmbedding(
            f"an embedding must be (d,) or (n, d) and non-empty, got {arr.shape}"
        )
    if dim is not None and arr.shape[1] != dim:
        raise InvalidEmbedding(f"embedding has dimension {arr.shape[1]}, this space uses {dim}")
    if not np.isfinite(arr).all():
        raise InvalidEmbedding("embedding contains NaN or Inf")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidEmbedding("embedding contains an all-zero vector (no direction)")
    return np.ascontiguousarray(arr / norms, dtype=np.float32)


def pack_ids(version_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return (np.asarray(version_ids, np.int64) << ROW_BITS) | np.asarray(rows, np.int64)


def version_of(ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, np.int64) >> ROW_BITS


@contextmanager
def threads_for(n_queries: int) -> Iterator[None]:
    """One thread for a single query (OpenMP start-up costs more than it saves)."""
    if n_queries > 1:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class VectorIndex:
    """A FAISS index plus the set of removed versions it must never return."""

    def __init__(self, dim: int, kind: str, params: IndexParams | None = None) -> None:
        self.dim, self.kind = int(dim), kind
        self.params = params or IndexParams()
        if kind == FLAT:
            inner = faiss.IndexFlatIP(self.dim)
        else:
            inner = faiss.IndexHNSWFlat(self.dim, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.params.ef_construction
            inner.hnsw.efSearch = self.params.ef_search
        self._inner = inner  # keep a Python reference: IndexIDMap2 does not own it
        self.index = faiss.IndexIDMap2(inner)
        self.tombstones: set[int] = set()

    @classmethod
    def build(
        cls, dim: int, ids: np.ndarray, vectors: np.ndarray, params: IndexParams | None = None
    ) -> VectorIndex:
        params = params or IndexParams()
        idx = cls(dim, params.kind_for(len(ids)), params)
        idx.add(ids, vectors)
        return idx

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def live_versions(self) -> set[int]:
        return set(np.unique(version_of(self.ids())).tolist()) - self.tombstones

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add unit vectors (already normalised) under packed ids."""
        if len(ids) == 0:
            return
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        with threads_for(len(ids)):
            self.index.add_with_ids(vecs, np.ascontiguousarray(ids, dtype=np.int64))

    def remove_versions(self, version_ids: list[int]) -> None:
        """Flat: delete the vectors. HNSW cannot delete, so it keeps tombstones."""
        if not version_ids:
            return
        if self.kind == FLAT:
            for vid in version_ids:
                lo = int(vid) << ROW_BITS
                self.index.remove_ids(faiss.IDSelectorRange(lo, lo + MAX_ROWS))
        else:
            self.tombstones.update(int(v) for v in version_ids)

    def wasted(self) -> float:
        """Fraction of stored vectors that belong to tombstoned versions."""
        if not self.tombstones or not self.ntotal:
            return 0.0
        dead = np.isin(version_of(self.ids()), np.fromiter(self.tombstones, np.int64))
        return float(dead.mean())

    def search(
        self, queries: np.ndarray, k: int, allowed: set[int] | None = None
    ) -> list[list[tuple[int, float]]]:
        """Per query, up to ``k`` (version_id, score), best first, one entry per version.

        Over-fetches and widens until ``k`` distinct live (and ``allowed``) versions
        are found or the index is exhausted, because several vectors may belong to
        one version and removed or filtered versions are skipped after the search.
        """
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        out: list[list[tuple[int, float]]] = [[] for _ in range(len(q))]
        if self.ntotal == 0 or k <= 0:
            return out
        fetch = min(self.ntotal, max(4 * k, 16))
        todo = np.arange(len(q))
        while len(todo):
            with threads_for(len(todo)):
                scores, ids = self.index.search(q[todo], fetch)
            retry = []
            for qi, srow, irow in zip(todo, scores, ids, strict=True):
                out[qi] = self._dedupe(srow, irow, k, allowed)
                if len(out[qi]) < k and fetch < self.ntotal:
                    retry.append(qi)
            todo = np.asarray(retry, dtype=np.int64)
            fetch = min(self.ntotal, fetch * 4)
        return out

    def _dedupe(
        self, scores: np.ndarray, ids: np.ndarray, k: int, allowed: set[int] | None
    ) -> list[tuple[int, float]]:
        seen: dict[int, float] = {}
        for score, fid in zip(scores.tolist(), ids.tolist(), strict=True):
            if fid < 0:
                continue
            vid = fid >> ROW_BITS
            if (
                vid in seen
                or vid in self.tombstones
                or (allowed is not None and vid not in allowed)
            ):
                continue
            seen[vid] = score
            if len(seen) == k:
                break
        return list(seen.items())

    # --- persistence --------------------------------------------------------

    def save(self, directory: Path, space: str, stamp: dict[str, Any]) -> None:
        """Write ``<space>.faiss`` then ``<space>.json`` atomically (temp + rename).

        The two renames are not one step (a crash or another process may land in
        between), so the stamp carries the sha256 of the index file it describes
        and ``load`` refuses a pair that does not match.
        """
        directory.mkdir(parents=True, exist_ok=True)
        target, meta = directory / f"{space}.faiss", directory / f"{space}.json"
        raw = faiss.serialize_index(self.index).tobytes()
        tmp = directory / f".{space}.faiss.{os.getpid()}-{threading.get_ident()}.tmp"
        tmp.write_bytes(raw)
        crash_point("index.write")
        os.replace(tmp, target)
        crash_point("index.meta")
        full = {
            **stamp,
            "dim": self.dim,
            "kind": self.kind,
            "ntotal": self.ntotal,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "tombstones": sorted(self.tombstones),
            "params": {
                "hnsw_m": self.params.hnsw_m,
                "ef_construction": self.params.ef_construction,
            },
        }
        tmp_meta = directory / f".{space}.json.{os.getpid()}-{threading.get_ident()}.tmp"
        tmp_meta.write_text(json.dumps(full))
        os.replace(tmp_meta, meta)

    @classmethod
    def load(
        cls, directory: Path, space: str, params: IndexParams | None = None
    ) -> tuple[VectorIndex, dict[str, Any]] | None:
        """The persisted index and its stamp, or None if missing or inconsistent."""
        target, meta = directory / f"{space}.faiss", directory / f"{space}.json"
        try:
            stamp = json.loads(meta.read_text())
            data = target.read_bytes()
            if not isinstance(stamp, dict) or stamp.get("sha256") != hashlib.sha256(data).hexdigest():
                return None  # torn pair: the stamp describes another index file
            raw = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except (OSError, ValueError, RuntimeError):
            return None
        if not isinstance(stamp, dict) or stamp.get("kind") not in (FLAT, HNSW):
            return None
        if raw.d != stamp.get("dim") or raw.ntotal != stamp.get("ntotal"):
            return None
        idx = cls.__new__(cls)
        idx.dim, idx.kind = int(raw.d), stamp["kind"]
        idx.params = params or IndexParams()
        idx.index = faiss.downcast_index(raw) if not isinstance(raw, faiss.IndexIDMap2) else raw
        if not isinstance(idx.index, faiss.IndexIDMap2):
            return None
        idx._inner = faiss.downcast_index(idx.index.index)
        if idx.kind == HNSW:
            idx._inner.hnsw.efSearch = idx.params.ef_search
        idx.tombstones = {int(v) for v in stamp.get("tombstones", [])}
        return idx, stamp
