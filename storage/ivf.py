"""IVF-PQ over memory-mapped files: the index kind for millions of task embeddings.

On disk, for embedding space ``s`` in the index directory::

    s.ivfpq-<token>/index.faiss   IndexIVFPQ over unit vectors (L2 ranks like cosine), ids = positions
    s.ivfpq-<token>/vectors.npy   float32 (n, d): exact re-ranking of the PQ shortlist
    s.ivfpq-<token>/ids.npy       int64 (n,): position -> packed (version << 16 | row) id
    s.delta.faiss                 exact index of the vectors added since the build
    s.json                        the stamp: catalog state, base token, delta sha256, tombstones

The base is built offline (``skillbank index build``, or a rebuild of a stale
cache), written once into a fresh directory and renamed into place, never
modified, and opened with ``IO_FLAG_MMAP`` (read-only inverted lists paged in on
demand; the vectors and ids as numpy memory maps), so a 1e7-vector index costs
little resident memory and opens in milliseconds. Later adds go to a small exact
delta, removals become tombstones; both are rewritten with the stamp. A query
scans ``nprobe`` lists, re-scores the best ``rerank`` x fetch PQ candidates
exactly, and merges them with the delta's exact hits.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .atomic import atomic_dir, atomic_write, temp_glob
from .errors import ConfigError
from .faults import crash_point
from .index import FLAT, IVFPQ, IndexParams, VectorIndex, stamp_params, version_of

MIN_BASE = 1024  # fewer vectors than this: everything stays in the exact delta
DELTA_CAP = 100_000  # rebuild once the delta holds more than max(MIN_BASE, min(base, this))
MAX_WASTE = 0.5  # ... or once this fraction of the base is tombstoned
BASE_GRACE = 3600.0  # seconds an unreferenced base directory survives (readers may map it)
CHUNK = 262_144
# No precomputed residual tables: at nlist=8192, m=16 they cost 128 MiB of RAM and
# 120 ms per open for no measurable gain in one-query latency (1.39 vs 1.37 ms at 1e7).
NO_TABLES = -1
FILES = ("index.faiss", "vectors.npy", "ids.npy")


def auto_nlist(n: int) -> int:
    """4*sqrt(n) rounded down to a power of two, with at least 39 vectors per list."""
    target = min(4 * np.sqrt(max(n, 1)), max(n // 39, 1))
    return int(2 ** np.floor(np.log2(max(target, 1))))


def auto_m(dim: int) -> int:
    """Bytes per PQ code: the largest divisor of ``dim`` up to min(64, dim/4)."""
    cap = max(1, min(64, dim // 4))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def _random_access(arr: np.ndarray) -> None:
    raw = getattr(arr, "_mmap", None)
    if raw is not None and hasattr(raw, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        raw.madvise(mmap.MADV_RANDOM)


def _flat(dim: int, raw: faiss.Index | None = None) -> VectorIndex:
    """An exact VectorIndex, empty or around a deserialised IndexIDMap2."""
    idx = VectorIndex(dim, FLAT)
    if raw is not None:
        idx.index = raw
        idx._inner = faiss.downcast_index(raw.index)
    return idx


class IVFPQIndex(VectorIndex):
    """A read-only IVF-PQ base (memory-mapped once saved) + an exact delta + tombstones."""

    def __init__(self, dim: int, params: IndexParams | None = None) -> None:
        self.dim, self.kind = int(dim), IVFPQ
        self.params = params or IndexParams(kind=IVFPQ)
        self.pinned = self.params.kind is not None
        self.base: faiss.IndexIVFPQ | None = None
        self.base_vectors: np.ndarray | None = None
        self.base_ids = np.zeros(0, np.int64)
        self.token: str | None = None  # name of the base directory once written
        self.home: Path | None = None
        self.delta = _flat(self.dim)
        self.tombstones: set[int] = set()
        self._waste: float | None = None

    # --- building -----------------------------------------------------------

    @classmethod
    def build(
        cls, dim: int, ids: np.ndarray, vectors: np.ndarray, params: IndexParams | None = None
    ) -> IVFPQIndex:
        """Train on a sample, add in chunks; the arrays are kept (not copied) for re-ranking."""
        idx = cls(dim, params)
        ids = np.ascontiguousarray(ids, np.int64)
        vecs = np.ascontiguousarray(vectors, np.float32).reshape(len(ids), idx.dim)
        n = len(ids)
        if n < MIN_BASE:
            idx.delta.add(ids, vecs)
            return idx
        p = idx.params
        nlist = min(p.nlist or auto_nlist(n), n)
        m = p.pq_m or auto_m(idx.dim)
        if idx.dim % m:
            raise ConfigError(f"pq_m={m} must divide the dimension {idx.dim}")
        quantizer = faiss.IndexFlatL2(idx.dim)
        base = faiss.IndexIVFPQ(quantizer, idx.dim, nlist, m, p.nbits)
        base.referenced_objects = [quantizer]  # the Python side owns the quantizer
        base.use_precomputed_table = NO_TABLES
        rng = np.random.default_rng(0)
        n_train = min(n, max(p.train_per_list * nlist, 256 << max(p.nbits - 8, 0)))
        pick = np.sort(rng.choice(n, n_train, replace=False)) if n_train < n else slice(None)
        base.train(np.ascontiguousarray(vecs[pick]))
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            base.add_with_ids(vecs[lo:hi], np.arange(lo, hi, dtype=np.int64))
        idx.base, idx.base_vectors, idx.base_ids = base, vecs, ids
        return idx

    # --- the VectorIndex interface -----------------------------------------

    @property
    def ntotal(self) -> int:
        return len(self.base_ids) + self.delta.ntotal

    @property
    def nlist(self) -> int:
        return int(self.base.nlist) if self.base is not None else 0

    def ids(self) -> np.ndarray:
        return np.concatenate([np.asarray(self.base_ids, np.int64), self.delta.ids()])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.delta.add(ids, vectors)

    def remove_versions(self, version_ids: list[int]) -> None:
        """Tombstones for the read-only base; the delta deletes for real."""
        if not version_ids:
            return
        self.tombstones.update(int(v) for v in version_ids)
        self.delta.remove_versions(version_ids)
        self._waste = None

    def wasted(self) -> float:
        """Fraction of the base's vectors that belong to tombstoned versions."""
        if self._waste is None:
            if not self.tombstones or not len(self.base_ids):
                self._waste = 0.0
            else:
                dead = np.fromiter(self.tombstones, np.int64)
                self._waste = float(np.isin(version_of(self.base_ids), dead).mean())
        return self._waste

    def needs_rebuild(self, params: IndexParams) -> bool:
        want = params.kind or (IVFPQ if self.pinned else params.kind_for(self.ntotal))
        delta_cap = max(MIN_BASE, min(len(self.base_ids), DELTA_CAP))
        return want != IVFPQ or self.wasted() > MAX_WASTE or self.delta.ntotal > delta_cap

    def _search_raw(self, q: np.ndarray, fetch: int, widen: int) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        if self.base is not None:
            parts.append(self._search_base(q, fetch, widen))
        if self.delta.ntotal:
            parts.append(self.delta.index.search(q, min(fetch, self.delta.ntotal)))
        if not parts:
            return np.full((len(q), 0), -np.inf, np.float32), np.full((len(q), 0), -1, np.int64)
        scores = np.concatenate([s for s, _ in parts], axis=1)
        ids = np.concatenate([i for _, i in parts], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :fetch]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def _search_base(self, q: np.ndarray, fetch: int, widen: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores and packed ids of the base's best ``fetch`` per query (-1: none)."""
        p = self.params
        cand = min(len(self.base_ids), fetch * max(1, p.rerank))
        sp = faiss.SearchParametersIVF()
        sp.nprobe = min(self.nlist, p.nprobe * widen)  # a retry also looks further
        dist, pos = self.base.search(q, cand, params=sp)
        if p.rerank:
            scores = np.full(pos.shape, -np.inf, np.float32)
            for lo in range(0, len(q), 256):  # gather the candidates' exact vectors
                block = pos[lo : lo + 256]
                vecs = self.base_vectors[np.maximum(block, 0).ravel()].reshape(
                    *block.shape, self.dim
                )
                exact = np.einsum("qcd,qd->qc", vecs, q[lo : lo + 256])
                scores[lo : lo + 256] = np.where(block >= 0, exact, -np.inf)
        else:  # unit vectors: |q - x|^2 = 2 - 2 cos
            scores = np.where(pos >= 0, 1.0 - dist / 2.0, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :fetch]
        scores, pos = np.take_along_axis(scores, order, 1), np.take_along_axis(pos, order, 1)
        ids = np.where(pos >= 0, np.asarray(self.base_ids)[np.maximum(pos, 0)], -1)
        return scores, ids

    # --- persistence --------------------------------------------------------

    def base_dir(self, directory: Path, space: str) -> Path | None:
        return directory / f"{space}.ivfpq-{self.token}" if self.token else None

    def save(self, directory: Path, space: str, stamp: dict[str, Any]) -> None:
        """Write the base once (into its own directory), then the delta and the stamp.

        A process never writes a stamp naming a base that is gone (pruned after a
        newer build): it leaves the newer cache alone instead.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.base is not None and (self.token is None or self.home != directory):
            self._write_base(directory, space)
        base = self.base_dir(directory, space)
        if base is not None and not base.is_dir():
            return
        raw = faiss.serialize_index(self.delta.index).tobytes()
        atomic_write(directory / f"{space}.delta.faiss", raw)
        crash_point("index.meta")
        full = {
            **stamp,
            "dim": self.dim,
            "kind": IVFPQ,
            "ntotal": self.ntotal,
            "base": self.token,
            "base_ntotal": len(self.base_ids),
            "base_bytes": self.base_bytes(directory, space),
            "nlist": self.nlist,
            "pq_m": int(self.base.pq.M) if self.base is not None else 0,
            "delta_sha256": hashlib.sha256(raw).hexdigest(),
            "tombstones": sorted(self.tombstones),
            "pinned": self.pinned,
            "params": self.params.to_dict(),
        }
        atomic_write(directory / f"{space}.json", json.dumps(full))
        self._prune(directory, space)

    def base_bytes(self, directory: Path, space: str) -> dict[str, int]:
        base = self.base_dir(directory, space)
        if base is None or not base.is_dir():
            return {}
        return {f: (base / f).stat().st_size for f in FILES}

    def _write_base(self, directory: Path, space: str) -> None:
        """index.faiss, vectors.npy, ids.npy published as one directory; then mapped."""
        token = uuid.uuid4().hex[:12]
        final = directory / f"{space}.ivfpq-{token}"
        with atomic_dir(final, written="index.write") as tmp:
            old = self.base_dir(self.home, space) if self.home is not None else None
            if old is not None and old.is_dir():  # saving into another directory: copy
                for f in FILES:
                    shutil.copyfile(old / f, tmp / f)
            else:
                faiss.write_index(self.base, str(tmp / "index.faiss"))
                np.save(tmp / "vectors.npy", self.base_vectors)
                np.save(tmp / "ids.npy", self.base_ids)
        self._map(final)
        self.token, self.home = token, directory

    def _map(self, base: Path) -> None:
        """Swap the in-memory base for memory maps of the files (frees the build's RAM)."""
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
        self.base = faiss.read_index(str(base / "index.faiss"), flags)
        self.base.use_precomputed_table = NO_TABLES
        self.base_vectors = np.load(base / "vectors.npy", mmap_mode="r")
        self.base_ids = np.load(base / "ids.npy", mmap_mode="r")
        for arr in (self.base_vectors, self.base_ids):  # re-ranking reads scattered rows:
            _random_access(arr)  # no read-ahead of neighbouring pages
        self._waste = None

    def _prune(self, directory: Path, space: str) -> None:
        prune(directory, space, self.base_dir(directory, space))

    @classmethod
    def load(
        cls, directory: Path, space: str, stamp: dict[str, Any], params: IndexParams | None = None
    ) -> tuple[IVFPQIndex, dict[str, Any]] | None:
        """The index a stamp describes, memory-mapped; None if any part is missing or torn."""
        try:
            raw = (directory / f"{space}.delta.faiss").read_bytes()
            if stamp.get("delta_sha256") != hashlib.sha256(raw).hexdigest():
                return None
            delta = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
            dim = int(stamp["dim"])
            if not isinstance(delta, faiss.IndexIDMap2) or delta.d != dim:
                return None
            params, pinned = stamp_params(stamp, params)
            idx = cls(dim, params)
            idx.pinned = pinned
            idx.delta = _flat(dim, delta)
            if stamp.get("base"):
                idx.token, idx.home = str(stamp["base"]), Path(directory)
                base = idx.base_dir(directory, space)
                if idx.base_bytes(directory, space) != stamp.get("base_bytes"):
                    return None  # a file cut short (e.g. by a crash before it reached disk)
                idx._map(base)
                n = int(stamp["base_ntotal"])
                if (idx.base.ntotal, idx.base.d, len(idx.base_ids)) != (n, dim, n) or (
                    idx.base_vectors.shape != (n, dim)
                ):
                    return None
                os.utime(base)  # in use: keep it out of a concurrent prune's reach
        except (OSError, ValueError, RuntimeError, KeyError, TypeError):
            return None
        if idx.ntotal != stamp.get("ntotal"):
            return None
        idx.tombstones = {int(v) for v in stamp.get("tombstones", [])}
        return idx, stamp


def prune(directory: Path, space: str, keep: Path | None = None) -> None:
    """Delete bases of ``space`` other than ``keep`` (and abandoned builds) once older
    than the grace period: a reader may still be about to map the previous one."""
    cutoff = time.time() - BASE_GRACE
    for path in [
        *directory.glob(f"{space}.ivfpq-*"),
        *directory.glob(temp_glob(f"{space}.ivfpq-")),  # builds a killed process left
        *directory.glob(f".{space}.ivfpq-*.building"),  # the same, from earlier releases
    ]:
        try:
            if path != keep and path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            pass
