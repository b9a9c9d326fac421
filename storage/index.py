"""FAISS nearest-neighbour index over L2-normalised float32 vectors (cosine).

One ``VectorIndex`` per embedding space. Exact (``IndexFlatIP``) up to
``IndexParams.threshold`` vectors (50,000), HNSW (in memory) up to
``ivf_threshold`` (2,000,000), then IVF-PQ over memory-mapped files
(``storage.ivf``), which is built offline (``skillbank index build``) and takes
later adds into a small exact delta. An index built with an explicit ``kind`` is
*pinned*: it keeps that kind (and its settings) until the next explicit build.
FAISS ids pack the catalog's version row id
and the vector's row within that version (``version_id << 16 | row``), so a hit
names its version without a side table and a version can own several vectors
(e.g. k-means centres; its score is the best of them).

This module knows nothing about SQL: ``storage.library`` keeps it in step with
the catalog and stamps it with the catalog generation it reflects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .atomic import atomic_write
from .errors import ConfigError, InvalidEmbedding
from .faults import crash_point

ROW_BITS = 16
MAX_ROWS = 1 << ROW_BITS
FLAT, HNSW, IVFPQ = "flat", "hnsw", "ivfpq"
KINDS = (FLAT, HNSW, IVFPQ)
AUTO = "auto"  # an offline build that chooses the kind by size and pins nothing
REBUILD_WASTE = 0.2  # flat/HNSW: rebuild once this fraction of vectors is tombstoned


@dataclass(frozen=True)
class IndexParams:
    """How to index; HNSW settings chosen for recall@5 >= 0.95 at 1M vectors.

    IVF-PQ: ``nlist`` inverted lists (None: 4*sqrt(n) rounded down to a power of
    two), ``pq_m`` bytes per code (None: d/4, at most 64, a divisor of d),
    trained on ``train_per_list * nlist`` sampled vectors; a query scans
    ``nprobe`` lists and re-ranks the best ``rerank`` x fetch candidates exactly
    from the memory-mapped float32 vectors (0: PQ scores only).
    """

    threshold: int = 50_000  # above this many vectors: HNSW instead of exact
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 96
    kind: str | None = None  # force "flat", "hnsw" or "ivfpq"; None = by size
    ivf_threshold: int = 2_000_000  # above this many vectors: IVF-PQ instead of HNSW
    nlist: int | None = None
    pq_m: int | None = None
    nbits: int = 8
    nprobe: int = 32
    rerank: int = 8
    train_per_list: int = 64

    def __post_init__(self) -> None:
        if self.kind not in (None, *KINDS):
            raise ConfigError(f"index kind must be one of {KINDS} or None, got {self.kind!r}")
        if self.threshold < 0 or self.hnsw_m < 2 or self.ef_search < 1:
            raise ConfigError(f"bad index parameters: {self}")
        if (
            self.ivf_threshold < 0
            or (self.nlist is not None and self.nlist < 1)
            or (self.pq_m is not None and self.pq_m < 1)
            or not 1 <= self.nbits <= 16
            or self.nprobe < 1
            or self.rerank < 0
            or self.train_per_list < 39  # FAISS k-means warns below 39 points per centre
        ):
            raise ConfigError(f"bad IVF-PQ parameters: {self}")

    def kind_for(self, n: int) -> str:
        if self.kind:
            return self.kind
        return IVFPQ if n > self.ivf_threshold else HNSW if n > self.threshold else FLAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexParams:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def normalize(vectors: Any, dim: int | None = None) -> np.ndarray:
    """(d,) or (n, d) finite, non-zero vectors -> C-contiguous unit float32 (n, d)."""
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as e:  # strings, ragged rows, objects
        raise InvalidEmbedding(f"an embedding must be an array of numbers: {e}") from None
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

    pinned = False  # built with an explicit kind: keep it (see ``needs_rebuild``)

    def __init__(self, dim: int, kind: str, params: IndexParams | None = None) -> None:
        self.dim, self.kind = int(dim), kind
        self.params = params or IndexParams()
        self.pinned = self.params.kind is not None
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
        kind = params.kind_for(len(ids))
        if kind == IVFPQ:
            from .ivf import IVFPQIndex

            return IVFPQIndex.build(dim, ids, vectors, params)
        idx = cls(dim, kind, params)
        idx.add(ids, vectors)
        return idx

    def needs_rebuild(self, params: IndexParams) -> bool:
        """Whether a caught-up index should be rebuilt: a wrong kind for its size
        (unless pinned, or ``params`` ask for another kind) or too many tombstones."""
        want = params.kind or (self.kind if self.pinned else params.kind_for(self.ntotal))
        return self.kind != want or self.wasted() > REBUILD_WASTE

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
        todo, widen = np.arange(len(q)), 1
        while len(todo):
            with threads_for(len(todo)):
                scores, ids = self._search_raw(q[todo], fetch, widen)
            retry = []
            for qi, srow, irow in zip(todo, scores, ids, strict=True):
                out[qi] = self._dedupe(srow, irow, k, allowed)
                if len(out[qi]) < k and fetch < self.ntotal:
                    retry.append(qi)
            todo = np.asarray(retry, dtype=np.int64)
            fetch, widen = min(self.ntotal, fetch * 4), widen * 4
        return out

    def _search_raw(self, q: np.ndarray, fetch: int, widen: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS scores and packed ids of the ``fetch`` best vectors (``widen``: retry round)."""
        return self.index.search(q, fetch)

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
        raw = faiss.serialize_index(self.index).tobytes()
        atomic_write(directory / f"{space}.faiss", raw, written="index.write")
        crash_point("index.meta")
        full = {
            **stamp,
            "dim": self.dim,
            "kind": self.kind,
            "ntotal": self.ntotal,
            "sha256": hashlib.sha256(raw).hexdigest(),
            "tombstones": sorted(self.tombstones),
            "pinned": self.pinned,
            "params": self.params.to_dict(),
        }
        atomic_write(directory / f"{space}.json", json.dumps(full))
        from .ivf import prune

        prune(directory, space)  # IVF-PQ bases of an earlier kind, once past their grace

    @classmethod
    def load(
        cls, directory: Path, space: str, params: IndexParams | None = None
    ) -> tuple[VectorIndex, dict[str, Any]] | None:
        """The persisted index and its stamp, or None if missing or inconsistent."""
        target, meta = directory / f"{space}.faiss", directory / f"{space}.json"
        try:
            stamp = json.loads(meta.read_text())
            if isinstance(stamp, dict) and stamp.get("kind") == IVFPQ:
                from .ivf import IVFPQIndex

                return IVFPQIndex.load(directory, space, stamp, params)
            data = target.read_bytes()
            if (
                not isinstance(stamp, dict)
                or stamp.get("sha256") != hashlib.sha256(data).hexdigest()
            ):
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
        idx.params, idx.pinned = stamp_params(stamp, params)
        idx.index = faiss.downcast_index(raw) if not isinstance(raw, faiss.IndexIDMap2) else raw
        if not isinstance(idx.index, faiss.IndexIDMap2):
            return None
        idx._inner = faiss.downcast_index(idx.index.index)
        if idx.kind == HNSW:
            idx._inner.hnsw.efSearch = idx.params.ef_search
        idx.tombstones = {int(v) for v in stamp.get("tombstones", [])}
        return idx, stamp


def stamp_params(stamp: dict[str, Any], params: IndexParams | None) -> tuple[IndexParams, bool]:
    """The settings a loaded index runs with: a pinned index keeps the ones it was
    built with unless the opener asks for a kind explicitly."""
    params = params or IndexParams()
    pinned = bool(stamp.get("pinned"))
    if pinned and params.kind is None:
        try:
            return IndexParams.from_dict(stamp.get("params") or {}), True
        except (TypeError, ValueError):
            return params, False
    return params, pinned and params.kind == stamp.get("kind")


def rebuild_params(directory: Path, space: str, params: IndexParams) -> IndexParams:
    """``params``, or the settings of the pinned index on disk when ``params`` name no kind,
    so that rebuilding a stale cache keeps the kind ``skillbank index build`` chose."""
    if params.kind is not None:
        return params
    try:
        stamp = json.loads((directory / f"{space}.json").read_text())
    except (OSError, ValueError):
        return params
    if not isinstance(stamp, dict) or not stamp.get("pinned"):
        return params
    return stamp_params(stamp, params)[0]


def describe(directory: Path, space: str) -> dict[str, Any] | None:
    """What the index cache of ``space`` holds, from its stamp and file sizes (no loading)."""
    try:
        stamp = json.loads((Path(directory) / f"{space}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict):
        return None
    files = [f"{space}.delta.faiss" if stamp.get("kind") == IVFPQ else f"{space}.faiss"]
    size = sum(
        (Path(directory) / f).stat().st_size for f in files if (Path(directory) / f).exists()
    )
    size += sum((stamp.get("base_bytes") or {}).values())
    info = {k: stamp.get(k) for k in ("kind", "ntotal", "dim", "uid", "generation", "pinned")}
    info.update(bytes=size, tombstones=len(stamp.get("tombstones", [])))
    if stamp.get("kind") == IVFPQ:
        params = stamp.get("params") or {}
        info.update(
            base_ntotal=stamp.get("base_ntotal"),
            delta=int(stamp.get("ntotal", 0)) - int(stamp.get("base_ntotal") or 0),
            nlist=stamp.get("nlist"),
            pq_m=stamp.get("pq_m"),
            nprobe=params.get("nprobe"),
            rerank=params.get("rerank"),
        )
    return info
