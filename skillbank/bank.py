"""`SkillBank`: the versioned skill library, in skills instead of bytes.

``storage.Library`` keeps the catalog, blobs and index; this class turns
`Skill`s into blobs plus catalog metadata and back, embeds text and example
queries, and composes stored skills.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from storage import Hit, Ref, VerifyReport, VersionRecord
from storage import Library as _Library
from storage.index import AUTO, KINDS
from storage.names import parse_ref

from .compose import compose as _compose
from .embed import EXAMPLES, TEXT, TextEmbedder, features
from .errors import ConfigError, InvalidEmbedding
from .route_stats import (
    ROUTE,
    MissingStats,
    RouteStats,
    sets_from_arrays,
    sets_to_arrays,
    stats_vectors,
)
from .skill import Skill


class SkillBank:
    """Add, find, version and compose skills. Open one with ``SkillBank.open``."""

    #: The ``kind`` values ``index_build`` takes ("auto" chooses by size).
    INDEX_KINDS: tuple[str, ...] = (AUTO, *KINDS)

    def __init__(self, library: _Library, text_embedder: TextEmbedder | None = None) -> None:
        """Wrap an open library; most callers want ``SkillBank.open`` instead.

        Args:
            library: The catalog, blobs and index (``storage.Library``).
            text_embedder: Embeds descriptions and text queries (default: ``TextEmbedder()``).
        """
        self.library = library
        self.text_embedder = text_embedder or TextEmbedder()

    @classmethod
    def open(
        cls,
        location: str | Path = "skills",
        *,
        blobs: str | Path | None = None,
        index_dir: str | Path | None = None,
        text_embedder: TextEmbedder | None = None,
        index_params: Any = None,
    ) -> SkillBank:
        """A directory gives the embedded bank (``catalog.db``, ``blobs/``, ``index/``);
        any SQLAlchemy URL works the same with ``blobs=`` a shared directory.

        Args:
            location: A directory (created if missing) or a catalog URL.
            blobs: The blob directory; required with a URL.
            index_dir: Where the index cache lives (default: beside the blobs).
            text_embedder: Embeds descriptions and text queries.
            index_params: ``storage.IndexParams`` for the retrieval index.
        """
        return cls(
            _Library.open(str(location), blobs=blobs, index_dir=index_dir, params=index_params),
            text_embedder,
        )

    def close(self) -> None:
        """Save index changes not yet on disk and release the database."""
        self.library.close()

    def __enter__(self) -> SkillBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- writing
    def add(
        self,
        name: str,
        skill: Skill,
        *,
        embedding: Any = None,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        metrics: Mapping[str, Any] | None = None,
        parent: str | Sequence[str] | None = None,
        learner: str | None = None,
        embed_text: bool | None = None,
        allow_base_change: bool = False,
        stats: RouteStats | None = None,
    ) -> Ref:
        """Store ``skill`` as the next version of ``name``.

        Refuses a base that differs from earlier versions of ``name`` unless
        ``allow_base_change``; on any error nothing is stored.

        Args:
            name: The skill name (no ``@``, ``/`` or control characters).
            skill: The skill to store (checked for shapes and finite weights).
            embedding: An example embedding ((d,) or (n, d)) or a dict of space ->
                vectors; the skill's own embeddings are added too.
            description: Free text, embedded into the ``text`` space when a text
                embedder is available.
            tags: Key -> string value labels.
            metrics: JSON-able numbers to keep with the version.
            parent: Ref(s) this version derives from (default: the skill's
                ``metadata["parents"]``); aliases are resolved once, here.
            learner: Who trained it (default: the skill's ``metadata["learner"]``).
            embed_text: True requires the description embedding, False skips it,
                None embeds it when possible.
            allow_base_change: Accept a base model that differs from earlier versions.
            stats: Routing statistics kept with the version (``sb.compute_stats`` on
                the bare base); its class prototypes go into the ``prototypes`` space.
                The skill's own ``stats`` sets (e.g. ``"head"``) are kept beside it.

        Returns:
            The new version's ref (``name@N``).
        """
        if not isinstance(skill, Skill):
            raise ConfigError(f"bank.add needs a Skill, got {type(skill).__name__}")
        skill.check_shapes()
        skill.check_weights()
        spaces = {k: np.asarray(v) for k, v in skill.embeddings.items()}
        if embedding is not None:
            spaces.update(
                {k: np.asarray(v) for k, v in embedding.items()}
                if isinstance(embedding, Mapping)
                else {EXAMPLES: np.asarray(embedding)}
            )
        sets = dict(skill.stats)
        if stats is not None:
            if not isinstance(stats, RouteStats):
                raise ConfigError(f"stats must be RouteStats, got {type(stats).__name__}")
            sets[ROUTE] = stats
        arrays = sets_to_arrays(sets)  # checks every set before anything is written
        if ROUTE in sets:
            spaces.update(stats_vectors(sets[ROUTE]))
        if description and embed_text is not False and TEXT not in spaces:
            try:
                spaces[TEXT] = self.text_embedder(description)
            except ConfigError:
                if embed_text:
                    raise
        parents = (
            [parent]
            if isinstance(parent, str)
            else list(parent or skill.metadata.get("parents", []))
        )
        # resolve aliases once
        parents = list(dict.fromkeys(str(self.library.get(p).ref) for p in parents))
        return self.library.add_version(
            name,
            skill.to_bytes(),
            ranks=skill.ranks,
            targets=skill.targets,
            base=skill.fingerprint.structure(),  # a weight hash stays in the blob
            learner=learner or skill.metadata.get("learner", ""),
            config=skill.config,
            metrics=dict(metrics or {}),
            description=description,
            tags=dict(tags or {}),
            parents=parents,
            embeddings=spaces,
            allow_base_change=allow_base_change,
            stats=arrays or None,
        )

    def put_stats(self, ref: str, stats: RouteStats, kind: str = ROUTE) -> Ref:
        """Statistics set ``kind`` for a stored version that has none of it: routing
        statistics for a version written by 0.1.0, computed from its task's data with
        ``sb.compute_stats`` on the bare base. A set once stored never changes."""
        if not isinstance(stats, RouteStats):
            raise ConfigError(f"put_stats needs RouteStats, got {type(stats).__name__}")
        arrays = sets_to_arrays({kind: stats})
        vectors = stats_vectors(stats) if kind == ROUTE else {}
        return self.library.put_stats(ref, arrays, vectors)

    def route_stats(
        self,
        refs: Sequence[str] | None = None,
        *,
        where: Mapping[str, Any] | None = None,
        kind: str = ROUTE,
    ) -> dict[str, RouteStats]:
        """Statistics set ``kind`` (default: the routing set) of ``refs`` (or of every
        version ``where`` allows), by ref.

        Raises ``MissingStats`` naming the versions that have none, with the fix."""
        found = self.library.stats(list(refs) if refs is not None else None, where)
        sets = {
            str(r): sets_from_arrays(a or {}, f"statistics of {r}", keep=kind.__eq__)
            for r, a in found.items()
        }
        lacking = sorted(r for r, named in sets.items() if kind not in named)
        if lacking:
            shown = ", ".join(lacking[:5]) + (
                f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
            )
            has = "has" if len(lacking) == 1 else "have"
            if kind != ROUTE:
                raise MissingStats(
                    f"{shown} {has} no {kind!r} statistics: the learner that trained "
                    f"{'it' if len(lacking) == 1 else 'them'} kept none"
                )
            raise MissingStats(
                f"{shown} {has} no routing statistics "
                "(added before skillbank 0.2 or without stats=); compute them from the task's "
                "data on the bare base and store them: `skillbank stats rebuild REF --data "
                "DATA.npz --backbone NAME [--weights FILE]` or bank.put_stats(REF, "
                "sb.compute_stats(model, x, y)), or re-add the skill with stats=; "
                "the 'examples' router needs none"
            )
        return {r: named[kind] for r, named in sets.items()}

    def alias(self, ref: str, alias: str) -> Ref:
        """Point ``name@alias`` at a version; an existing alias moves.

        Args:
            ref: The version (``name``, ``name@3``, ``name@other-alias``).
            alias: The alias (not all digits, not ``latest``).

        Returns:
            The version the alias now names.
        """
        return self.library.alias(ref, alias)

    def unalias(self, name: str, alias: str) -> Ref:
        """Drop an alias and return the version it named.

        Args:
            name: The skill name.
            alias: The alias to drop.
        """
        return self.library.unalias(name, alias)

    def tag(self, ref: str, key: str, value: str) -> None:
        """Set one tag on one version.

        Args:
            ref: The version.
            key: The tag key.
            value: Its string value (replaces an earlier one).
        """
        self.library.tag(ref, key, value)

    def untag(self, ref: str, key: str) -> None:
        """Remove one tag from one version.

        Args:
            ref: The version.
            key: The tag key.
        """
        self.library.untag(ref, key)

    def resolve(self, ref: str) -> list[Ref]:
        """The versions ``ref`` names, i.e. what ``remove(ref)`` would remove.

        Args:
            ref: ``name`` (every version) or ``name@3`` / ``name@alias`` (one).
        """
        name, selector = parse_ref(ref)
        if selector is None:
            return [r.ref for r in self.versions(name)]
        return [self.record(ref).ref]

    def remove(self, ref: str) -> list[Ref]:
        """Remove versions from the catalog; their blobs stay until ``gc``.

        Args:
            ref: ``name`` removes every version, ``name@3`` or ``name@alias`` one.

        Returns:
            The removed versions.
        """
        return self.library.remove(ref)

    def gc(self, dry_run: bool = False, min_age: float = 60.0) -> list[str]:
        """Delete blobs no version references, and temp files killed writers left.

        Args:
            dry_run: Only report what would be deleted.
            min_age: Spare files younger than this many seconds (a writer may be
                between storing a blob and committing the version that names it).

        Returns:
            The digests of the deleted (or, dry, deletable) blobs.
        """
        return self.library.gc(dry_run=dry_run, min_age=min_age)

    def blob_bytes(self, digests: Iterable[str]) -> int:
        """Bytes the given blobs take on disk (missing ones count 0), e.g. what ``gc`` frees.

        Args:
            digests: Blob digests, as ``gc`` returns them.
        """
        return self.library.blob_bytes(digests)

    # ------------------------------------------------------------- reading
    def get(self, ref: str) -> Skill:
        """The stored skill, its blob checked against its digest.

        Args:
            ref: ``name`` (the latest version), ``name@3`` or ``name@alias``.

        Returns:
            The skill, with ``metadata["ref"]`` set to the exact version read.
        """
        record = self.library.get(ref)
        skill = Skill.from_bytes(self.library.read(record.ref), what=str(record.ref))
        skill.metadata["ref"] = str(record.ref)
        arrays = self.library.stats([record.ref])[record.ref] or {}
        # the sets a learner kept; the routers' own set is bank.route_stats' to read
        skill.stats = sets_from_arrays(arrays, f"statistics of {record.ref}", keep=ROUTE.__ne__)
        return skill

    def record(self, ref: str) -> VersionRecord:
        """Catalog metadata of one version, without reading its blob.

        Args:
            ref: ``name``, ``name@3`` or ``name@alias``.
        """
        return self.library.get(ref)

    def list(self, name: str | None = None, **filters: Any) -> list[VersionRecord]:
        """Versions matching every filter given (see ``storage.Catalog.list``).

        Args:
            name: A substring of skill names, or a glob (``*``, ``?``).
            **filters: ``tags``, ``learner``, ``base_id``, ``text``, ``latest_only``,
                ``sort``, ``desc`` and ``limit``.
        """
        return self.library.list(name, **filters)

    def versions(self, name: str) -> list[VersionRecord]:
        """Every version of ``name``, oldest first.

        Args:
            name: The skill name.
        """
        return self.library.versions(name)

    def lineage(self, ref: str) -> list[Ref]:
        """The ancestors of ``ref``, breadth-first, each once.

        Args:
            ref: The version to trace.
        """
        return self.library.lineage(ref)

    def verify(self) -> VerifyReport:
        """Re-hash every referenced blob and compare each index with the catalog."""
        return self.library.verify()

    def generation(self) -> int:
        """A counter that moves whenever versions or their embeddings and statistics are
        added or removed: a cache of what the routers read stays fresh while it holds."""
        return self.library.generation()

    def spaces(self) -> dict[str, int]:
        """Embedding space -> dimension, for every space that ever held a vector."""
        return self.library.space_dims()

    # ----------------------------------------------------------- retrieval
    def retrieve(
        self,
        query: Any,
        k: int = 5,
        *,
        space: str | None = None,
        where: Mapping[str, Any] | None = None,
        model: nn.Module | None = None,
        head: str | None = None,
    ) -> list[Hit] | list[list[Hit]]:
        """Nearest skills, best first, by cosine similarity.

        Args:
            query: A vector ((d,) gives one list of hits, (n, d) one per row), a
                text or list of texts (embedded by the bank's text embedder into
                the ``text`` space), or a batch of examples with ``model`` (their
                mean pooled feature, ``examples`` space).
            k: Hits per query.
            space: The embedding space (default: by the kind of query).
            where: Filters as in ``list`` (name, learner, base_id, text, tags;
                any other key is read as a tag).
            model: The backbone that turns a batch of examples into a query.
            head: The model's head module, skipped when pooling features.
        """
        if isinstance(query, str) or (
            isinstance(query, (list, tuple)) and query and isinstance(query[0], str)
        ):
            space = space or self.text_embedder.space
            known = self.spaces()
            if space not in known:
                raise InvalidEmbedding(
                    f"no skill in this bank has a {space!r} embedding (spaces here: "
                    f"{sorted(known)}): descriptions are embedded when a skill is added with a "
                    "text encoder installed (pip install 'skillbank[text]'); re-add the skills "
                    "with a description to make them searchable by text"
                )
            vectors = self.text_embedder(query)
            vectors = vectors[0] if isinstance(query, str) else vectors
        elif model is not None:
            x = torch.as_tensor(query)
            f = torch.nn.functional.normalize(features(model, x, head=head), dim=1)
            vectors, space = f.mean(0).numpy(), space or EXAMPLES
        else:
            vectors = (
                query.detach().cpu().numpy()
                if isinstance(query, torch.Tensor)
                else np.asarray(query)
            )
            space = space or EXAMPLES
        if k <= 0:
            raise ConfigError(f"k must be positive, got {k}")
        return self.library.retrieve(vectors, k=k, space=space, where=where)

    # --------------------------------------------------------- composition
    def compose(
        self,
        refs: Sequence[str],
        weights: Sequence[float] | None = None,
        method: str = "linear",
        **options: Any,
    ) -> Skill:
        """A new skill merged from stored ones, with lineage to the exact versions used;
        ``bank.add`` records it.

        Args:
            refs: The stored skills to merge.
            weights: One weight per skill (see ``skillbank.compose``).
            method: A name in ``skillbank.COMPOSE``.
            **options: ``rank`` and ``name`` of the result, and options of the
                method (e.g. ``density`` for TIES).
        """
        return _compose([self.get(r) for r in refs], weights, method, **options)

    # --------------------------------------------------------------- index
    @property
    def index_dir(self) -> Path:
        """Where the retrieval index cache lives."""
        return self.library.index_dir

    def index_build(self, space: str, kind: str | None = None, **settings: Any) -> dict[str, Any]:
        """Rebuild the index of ``space`` from the catalog now and save it (offline
        maintenance: a big IVF-PQ build belongs here, not on a query's path).

        Args:
            space: An embedding space (one of ``spaces()``).
            kind: "auto" (choose by size), "flat", "hnsw" or "ivfpq" (pinned until the
                next build), or None to keep a pinned kind and its settings.
            **settings: ``IndexParams`` fields to override (``nlist``, ``pq_m``,
                ``nprobe``, ``rerank``, ``train_per_list``, ``hnsw_m``, ...).

        Returns:
            ``kind``, ``vectors``, ``pinned`` and ``bytes`` (on disk) of the new index.
        """
        if space not in self.spaces():
            known = ", ".join(sorted(self.spaces())) or "none"
            raise InvalidEmbedding(f"no embedding space {space!r}; spaces: {known}")
        idx = self.library.rebuild_index(space, self.library.build_params(space, kind, **settings))
        info = self.library.index_info(space) or {}
        return {
            "kind": idx.kind,
            "vectors": idx.ntotal,
            "pinned": idx.pinned,
            "bytes": info.get("bytes"),
        }

    def index_info(self) -> dict[str, dict[str, Any] | None]:
        """Per embedding space, what its index cache holds on disk (kind, vectors,
        bytes, settings, catalog stamp, ``fresh``), or None when there is none yet
        (it is built on the next search)."""
        return {sp: self.library.index_info(sp) for sp in sorted(self.spaces())}

    # ------------------------------------------------------------- catalog
    @staticmethod
    def db_revision(location: str | Path) -> tuple[str | None, str]:
        """The catalog's schema revision (None if empty) and the newest this code knows.

        Args:
            location: A bank directory or catalog URL, as for ``open``.
        """
        from storage.session import revisions

        return revisions(str(location))

    @staticmethod
    def db_upgrade(location: str | Path) -> tuple[str | None, str]:
        """Apply pending catalog migrations; refuses a schema newer than this code.

        Args:
            location: A bank directory or catalog URL, as for ``open``.

        Returns:
            The schema revision before (None if empty) and after (the head).
        """
        from storage.session import upgrade

        return upgrade(str(location))

    def __repr__(self) -> str:
        return f"SkillBank({self.library!r})"
