"""`SkillBank`: the versioned skill library, in skills instead of bytes.

``storage.Library`` keeps the catalog, blobs and index; this class turns
`Skill`s into blobs plus catalog metadata and back, embeds text and example
queries, and composes stored skills.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from storage import Hit, Ref, VerifyReport, VersionRecord
from storage import Library as _Library

from .compose import compose as _compose
from .embed import EXAMPLES, TEXT, TextEmbedder, features
from .errors import ConfigError
from .route_stats import MissingStats, RouteStats, stats_vectors
from .skill import Skill


def _base(skill: Skill) -> dict:
    # The catalog compares bases by structure; a weight hash stays in the blob.
    return {
        p: {k: v for k, v in sig.items() if k != "sha256"}
        for p, sig in skill.fingerprint.to_dict().items()
    }


class SkillBank:
    """Add, find, version and compose skills. Open one with ``SkillBank.open``."""

    def __init__(self, library: _Library, text_embedder: TextEmbedder | None = None) -> None:
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
        any SQLAlchemy URL works the same with ``blobs=`` a shared directory."""
        return cls(
            _Library.open(str(location), blobs=blobs, index_dir=index_dir, params=index_params),
            text_embedder,
        )

    def close(self) -> None:
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

        ``embedding`` is an example embedding ((d,) or (n, d)) or a dict of
        space -> vectors; the skill's own embeddings are added too. A description
        is embedded into the ``text`` space when a text embedder is available
        (``embed_text=True`` makes that required). Refuses a base that differs
        from earlier versions of ``name`` unless ``allow_base_change``. ``stats``
        (``sb.compute_stats``) are the routing statistics kept with the version; its
        class prototypes go into the ``prototypes`` space.
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
        if stats is not None:
            if not isinstance(stats, RouteStats):
                raise ConfigError(f"stats must be RouteStats, got {type(stats).__name__}")
            spaces.update(stats_vectors(stats.check(f"statistics of {name}")))
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
        parents = list(
            dict.fromkeys(str(self.library.get(p).ref) for p in parents)
        )  # resolve aliases once
        return self.library.add_version(
            name,
            skill.to_bytes(),
            ranks=skill.ranks,
            targets=skill.targets,
            base=_base(skill),
            learner=learner or skill.metadata.get("learner", ""),
            config=skill.config,
            metrics=dict(metrics or {}),
            description=description,
            tags=dict(tags or {}),
            parents=parents,
            embeddings=spaces,
            allow_base_change=allow_base_change,
            stats=None if stats is None else stats.to_arrays(),
        )

    def put_stats(self, ref: str, stats: RouteStats) -> Ref:
        """Routing statistics for a stored version that has none (one written by 0.1.0),
        computed from its task's data with ``sb.compute_stats`` on the bare base."""
        if not isinstance(stats, RouteStats):
            raise ConfigError(f"put_stats needs RouteStats, got {type(stats).__name__}")
        stats.check(f"statistics of {ref}")
        return self.library.put_stats(ref, stats.to_arrays(), stats_vectors(stats))

    def route_stats(
        self, refs: Sequence[str] | None = None, *, where: Mapping[str, Any] | None = None
    ) -> dict[str, RouteStats]:
        """Routing statistics of ``refs`` (or of every version ``where`` allows), by ref.

        Raises ``MissingStats`` naming the versions that have none, with the fix."""
        found = self.library.stats(list(refs) if refs is not None else None, where)
        lacking = sorted(str(r) for r, arrays in found.items() if arrays is None)
        if lacking:
            shown = ", ".join(lacking[:5]) + (
                f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
            )
            raise MissingStats(
                f"{shown} {'has' if len(lacking) == 1 else 'have'} no routing statistics "
                "(added before skillbank 0.2 or without stats=); compute them from the task's "
                "data on the bare base and store them: bank.put_stats(REF, "
                "sb.compute_stats(model, x, y)), or re-add the skill with stats=; "
                "the 'examples' router needs none"
            )
        return {str(r): RouteStats.from_arrays(a, f"statistics of {r}") for r, a in found.items()}

    def alias(self, ref: str, alias: str) -> Ref:
        return self.library.alias(ref, alias)

    def unalias(self, name: str, alias: str) -> Ref:
        return self.library.unalias(name, alias)

    def tag(self, ref: str, key: str, value: str) -> None:
        self.library.tag(ref, key, value)

    def untag(self, ref: str, key: str) -> None:
        self.library.untag(ref, key)

    def remove(self, ref: str) -> list[Ref]:
        """``name`` removes every version, ``name@3`` or ``name@alias`` one."""
        return self.library.remove(ref)

    def gc(self, dry_run: bool = False, min_age: float = 60.0) -> list[str]:
        return self.library.gc(dry_run=dry_run, min_age=min_age)

    # ------------------------------------------------------------- reading
    def get(self, ref: str) -> Skill:
        """The skill at ``name`` (latest), ``name@3`` or ``name@alias``; its blob is digest-checked."""
        record = self.library.get(ref)
        skill = Skill.from_bytes(self.library.read(record.ref), what=str(record.ref))
        skill.metadata["ref"] = str(record.ref)
        return skill

    def record(self, ref: str) -> VersionRecord:
        """Catalog metadata of one version, without reading its blob."""
        return self.library.get(ref)

    def list(self, name: str | None = None, **filters: Any) -> list[VersionRecord]:
        return self.library.list(name, **filters)

    def versions(self, name: str) -> list[VersionRecord]:
        return self.library.versions(name)

    def lineage(self, ref: str) -> list[Ref]:
        return self.library.lineage(ref)

    def verify(self) -> VerifyReport:
        return self.library.verify()

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

        ``query`` is a vector ((d,) gives one list of hits, (n, d) one per row), a
        text or list of texts (embedded by the bank's text embedder, ``text``
        space), or a batch of examples with ``model`` (their mean pooled feature,
        ``examples`` space).
        """
        if isinstance(query, str) or (
            isinstance(query, (list, tuple)) and query and isinstance(query[0], str)
        ):
            vectors = self.text_embedder(query)
            vectors = vectors[0] if isinstance(query, str) else vectors
            space = space or self.text_embedder.space
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
        """A new skill merged from stored ones (see ``skillbank.compose``), with lineage
        to the exact versions used; ``bank.add`` records it."""
        return _compose([self.get(r) for r in refs], weights, method, **options)

    def __repr__(self) -> str:
        return f"SkillBank({self.library!r})"
