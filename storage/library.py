"""A skill library on disk: SQL catalog + blob store + per-space FAISS cache.

The catalog is the source of truth. A blob is made durable before the row that
references it is committed; the index is a cache stamped with the catalog
generation it reflects and caught up (or rebuilt) before every search, so a
removed version can never be returned.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import remove_stale
from .blobs import BlobStore, sha256
from .catalog import Catalog
from .entities import Hit, NewVersion, Ref, VerifyReport, VersionRecord
from .errors import ConfigError, InvalidEmbedding
from .index import (
    AUTO,
    KINDS,
    IndexParams,
    VectorIndex,
    describe,
    normalize,
    pack_ids,
    rebuild_params,
)
from .names import check_name

EXACT_BELOW = 4096  # a filter leaving fewer vectors than this is answered exactly


class Library:
    """Catalog, blobs and index of one skill library; the door ``SkillBank`` uses."""

    def __init__(
        self,
        catalog: Catalog,
        blobs: BlobStore,
        index_dir: str | os.PathLike[str],
        params: IndexParams | None = None,
        save_every: int = 1000,
    ) -> None:
        self.catalog, self.blobs = catalog, blobs
        self.index_dir = Path(index_dir)
        self.params = params or IndexParams()
        self.save_every = save_every
        self._indexes: dict[str, tuple[VectorIndex, int, int]] = {}  # space -> (idx, gen, dirty)
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skillbank-blob")
        self._space_dims: dict[str, int] = {}

    @classmethod
    def open(
        cls,
        url_or_dir: str | os.PathLike[str],
        blobs: str | os.PathLike[str] | None = None,
        index_dir: str | os.PathLike[str] | None = None,
        params: IndexParams | None = None,
    ) -> Library:
        """A directory means ``<dir>/catalog.db``, ``<dir>/blobs/``, ``<dir>/index/``.

        A URL (``postgresql+psycopg://...``) needs ``blobs``; the index cache then
        defaults to ``<blobs>/../index``.
        """
        text = os.fspath(url_or_dir)
        if "://" in text:
            if blobs is None:
                raise ConfigError(f"a catalog URL ({text}) needs blobs= (a shared directory)")
            home = Path(blobs).parent
        else:
            home = Path(text)
            home.mkdir(parents=True, exist_ok=True)
        catalog = Catalog.open(text)
        return cls(
            catalog,
            BlobStore(blobs if blobs is not None else home / "blobs"),
            index_dir if index_dir is not None else home / "index",
            params,
        )

    def close(self) -> None:
        """Persist index changes not yet on disk and release the database."""
        self.flush()
        self._pool.shutdown(wait=True)
        self.catalog.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ------------------------------------------------------------

    def add_version(
        self,
        name: str,
        data: bytes,
        *,
        embeddings: Mapping[str, Any] | None = None,
        allow_base_change: bool = False,
        stats: Mapping[str, np.ndarray] | None = None,
        **fields: Any,
    ) -> Ref:
        """Store the blob durably, then commit the next version of ``name``.

        ``fields`` are those of ``NewVersion`` (ranks, targets, base, learner,
        config, metrics, description, tags, parents); ``stats`` are routing
        statistics stored with the version (see ``storage.stats``)."""
        new = NewVersion(**fields)
        check_name(name)
        vecs = {}
        for space, value in (embeddings or {}).items():
            check_name(space)
            vecs[space] = normalize(value, self._dim(space))
        data = bytes(data)
        # The blob's fsyncs overlap the SQL inserts; the commit waits for them. The
        # write starts only once the catalog accepted the version (base, parents,
        # dimensions), so a refused add leaves no blob; a retry reuses the write.
        pending: list[Future[str]] = []

        def start_blob() -> None:
            if not pending:
                pending.append(self._pool.submit(self.blobs.put, data))

        def blob_durable() -> None:
            start_blob()
            pending[0].result()

        try:
            ref, _ = self.catalog.add_version(
                name,
                sha256(data),
                len(data),
                new,
                embeddings=vecs,
                allow_base_change=allow_base_change,
                before_commit=blob_durable,
                on_checked=start_blob,
                stats=stats,
            )
        finally:
            wait(pending)  # never leave a write running behind an error
        return ref

    def generation(self) -> int:
        """The catalog's embedding-change counter (bumped by every add, remove and stats write)."""
        return self.catalog.state()[1]

    def space_dims(self) -> dict[str, int]:
        """Embedding space -> dimension, for every space that ever held a vector."""
        return self.catalog.space_dims()

    def _dim(self, space: str) -> int | None:
        """Space dimensions never change once set, so a cached copy only grows."""
        if space not in self._space_dims:
            self._space_dims = self.catalog.space_dims()
        return self._space_dims.get(space)

    def put_stats(
        self,
        ref: str | Ref,
        stats: Mapping[str, np.ndarray],
        embeddings: Mapping[str, Any] | None = None,
    ) -> Ref:
        """Routing statistics (and vectors in new spaces) for a version that has none."""
        vecs = {}
        for space, value in (embeddings or {}).items():
            check_name(space)
            vecs[space] = normalize(value, self._dim(space))
        return self.catalog.put_stats(ref, stats, vecs)

    def stats(
        self, refs: list[str | Ref] | None = None, where: Mapping[str, Any] | None = None
    ) -> dict[Ref, dict[str, np.ndarray] | None]:
        """Routing statistics of ``refs``, or of every version ``where`` allows (all when
        both are None); None for a version without statistics."""
        if refs is not None:
            return self.catalog.stats(refs)
        return self.catalog.stats_of_ids(self.catalog.version_ids(where))

    def remove(self, ref: str | Ref) -> list[Ref]:
        """Remove versions; their vectors leave the index before the next search."""
        return self.catalog.remove(ref)

    def alias(self, ref: str | Ref, alias: str) -> Ref:
        return self.catalog.alias(ref, alias)

    def unalias(self, name: str, alias: str) -> Ref:
        return self.catalog.unalias(name, alias)

    def tag(self, ref: str | Ref, key: str, value: str) -> None:
        self.catalog.tag(ref, key, value)

    def untag(self, ref: str | Ref, key: str) -> None:
        self.catalog.untag(ref, key)

    # --- reading ------------------------------------------------------------

    def get(self, ref: str | Ref) -> VersionRecord:
        return self.catalog.get(ref)

    def read(self, ref: str | Ref) -> bytes:
        """The blob of ``ref``, checked against its digest."""
        return self.blobs.get(self.catalog.get(ref).digest)

    def list(self, name: str | None = None, **filters: Any) -> list[VersionRecord]:
        """See ``Catalog.list``."""
        return self.catalog.list(name, **filters)

    def versions(self, name: str) -> list[VersionRecord]:
        return self.catalog.versions(name)

    def lineage(self, ref: str | Ref) -> list[Ref]:
        return self.catalog.lineage(ref)

    # --- maintenance --------------------------------------------------------

    def gc(self, dry_run: bool = False, min_age: float = 60.0) -> list[str]:
        """Delete blobs no version references (older than ``min_age`` seconds).

        Temp files a killed writer left (blob or index) go too, once as old.
        """
        removed = self.blobs.gc(self.catalog.referenced_digests(), dry_run=dry_run, min_age=min_age)
        if not dry_run and self.index_dir.is_dir():
            remove_stale(self.index_dir.iterdir(), time.time() - min_age)
        return removed

    def blob_bytes(self, digests: Iterable[str]) -> int:
        """Bytes the given blobs take on disk (missing ones count 0), e.g. what gc frees."""
        return sum(self.blobs.size(d) for d in digests)

    def verify(self) -> VerifyReport:
        """Re-hash every referenced blob and compare each index with the catalog."""
        owners = self.catalog.digest_owners()
        missing, corrupt = [], []
        for digest in sorted(owners):
            problem = self.blobs.check(digest)
            if problem == "missing":
                missing.append(digest)
            elif problem == "corrupt":
                corrupt.append(digest)
        orphans = sorted(set(self.blobs.digests()) - set(owners))
        extra, absent = [], []
        for space in sorted(self.catalog.space_dims()):
            idx = self._fresh(space)
            vids, _, _ = self.catalog.vectors(space)
            rows = set(vids.tolist())
            live = idx.live_versions()
            names = self.catalog.refs(rows - live)
            extra += [f"{space}:version-row-{v}" for v in sorted(live - rows)]
            absent += [f"{space}:{names.get(v, v)}" for v in sorted(rows - live)]
        return VerifyReport(
            tuple(missing), tuple(corrupt), tuple(orphans), tuple(extra), tuple(absent)
        )

    # --- the index ----------------------------------------------------------

    def _fresh(self, space: str) -> VectorIndex:
        """The index of ``space`` reflecting the catalog now: load, catch up or rebuild."""
        with self._lock:
            entry = self._indexes.get(space)
            if entry is None:
                uid, _ = self.catalog.state()
                loaded = VectorIndex.load(self.index_dir, space, self.params)
                if loaded is not None and loaded[1].get("uid") == uid:
                    entry = (loaded[0], int(loaded[1].get("generation", -1)), 0)
            if entry is not None:
                entry = self._catch_up(space, *entry)
            if entry is None:
                entry = self._rebuild(space)
            self._indexes[space] = entry
            if entry[2] >= self.save_every:
                self._save(space)
            return self._indexes[space][0]

    def _catch_up(self, space, idx, gen, dirty):
        now, log, (vids, rows, vecs) = self.catalog.changes(space, gen)
        if now < gen:  # catalog restored from an older backup: the cache is from the future
            return None
        if not log:
            return idx, now, dirty
        idx.remove_versions(sorted({vid for op, vid in log if op == "remove"}))
        if len(vids):
            idx.add(pack_ids(vids, rows), vecs)
        if idx.needs_rebuild(self.params):
            return None  # crossed a size threshold, too many tombstones, or delta full
        return idx, now, dirty + len(log)

    def rebuild_index(self, space: str, params: IndexParams | None = None) -> VectorIndex:
        """Rebuild the index of ``space`` from the catalog now and save it (offline
        maintenance: ``skillbank index build``); ``params`` pins a kind and settings."""
        with self._lock:
            self._indexes.pop(space, None)
            return self._rebuild(space, params)[0]

    def build_params(self, space: str, kind: str | None = None, **settings: Any) -> IndexParams:
        """The settings an offline build of ``space`` uses.

        ``kind`` "auto" chooses by size (unpinned), None keeps the pinned kind (and
        settings) of the index on disk, "flat"/"hnsw"/"ivfpq" pins that kind;
        ``settings`` override single fields of ``IndexParams`` (nlist, pq_m, ...).
        """
        if kind not in (None, AUTO, *KINDS):
            raise ConfigError(f"index kind {kind!r}: expected {AUTO}, {', '.join(KINDS)}")
        fields = {f.name for f in dataclasses.fields(IndexParams)} - {"kind"}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise ConfigError(f"unknown index setting(s) {unknown}; known: {sorted(fields)}")
        if kind == AUTO:
            base = IndexParams()
        elif kind:
            base = IndexParams(kind=kind)
        else:
            base = rebuild_params(self.index_dir, space, self.params)
        return dataclasses.replace(base, **settings)

    def index_info(self, space: str) -> dict[str, Any] | None:
        """What the index cache of ``space`` holds on disk (``storage.index.describe``)
        plus ``catalog_generation`` and ``fresh`` (it reflects the catalog now); None
        when there is no cache (it is built on the next search)."""
        info = describe(self.index_dir, space)
        if info is None:
            return None
        uid, generation = self.catalog.state()
        fresh = info.get("uid") == uid and info.get("generation") == generation
        return {**info, "catalog_generation": generation, "fresh": fresh}

    def _rebuild(
        self, space: str, params: IndexParams | None = None
    ) -> tuple[VectorIndex, int, int]:
        _, gen, (vids, rows, vecs) = self.catalog.snapshot(space)
        dim = self.catalog.space_dims().get(space, vecs.shape[1] if len(vecs) else 1)
        params = params or rebuild_params(self.index_dir, space, self.params)
        idx = VectorIndex.build(dim, pack_ids(vids, rows), vecs, params)
        self._indexes[space] = (idx, gen, 0)
        self._save(space, force=True)
        return self._indexes[space]

    def _save(self, space: str, force: bool = False) -> None:
        idx, gen, dirty = self._indexes[space]
        if dirty or force:
            uid, _ = self.catalog.state()
            idx.save(self.index_dir, space, {"uid": uid, "generation": gen})
            self._indexes[space] = (idx, gen, 0)

    def flush(self) -> None:
        """Write every index that changed since it was last saved."""
        with self._lock:
            for space in list(self._indexes):
                self._save(space)

    def retrieve(
        self,
        vectors: Any,
        k: int = 5,
        space: str = "examples",
        where: Mapping[str, Any] | None = None,
    ) -> list[Hit] | list[list[Hit]]:
        """Nearest live versions by cosine, best first; a (n, d) batch gives n lists.

        ``where`` filters like ``list``: name, learner, base_id, text, tags, and any
        other key is read as a tag.
        """
        dim = self._dim(space)
        if dim is None:
            spaces = sorted(self._space_dims)
            raise InvalidEmbedding(f"no embeddings in space {space!r}; spaces: {spaces}")
        q = normalize(vectors, dim)
        single = np.ndim(vectors) == 1  # safe now: normalize took it as an array
        allowed = self.catalog.version_ids(where) if where else None
        if allowed is not None and len(allowed) * 4 <= EXACT_BELOW:
            found = self._exact(space, q, k, allowed)
        else:
            with self._lock:  # a concurrent catch-up must not add while FAISS searches
                found = self._fresh(space).search(q, k, allowed)
        refs = self.catalog.refs({vid for hits in found for vid, _ in hits})
        out = [
            [Hit(refs[v].name, refs[v].version, s) for v, s in hits if v in refs][:k]
            for hits in found
        ]
        return out[0] if single else out

    def _exact(self, space, q, k, allowed) -> list[list[tuple[int, float]]]:
        """Brute force over the few vectors a narrow filter leaves (straight from SQL)."""
        vids, _, vecs = self.catalog.vectors(space, allowed)
        if not len(vids):
            return [[] for _ in q]
        scores = q @ vecs.T
        out = []
        for row in scores:
            best: dict[int, float] = {}
            for j in np.argsort(-row, kind="stable"):
                v = int(vids[j])
                if v not in best:
                    best[v] = float(row[j])
                    if len(best) == k:
                        break
            out.append(list(best.items()))
        return out
