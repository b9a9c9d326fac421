"""Storage layer of skillbank: SQL catalog, content-addressed blobs, FAISS index.

Deals in bytes, numpy arrays, dicts and frozen dataclasses; imports no torch and
nothing from the layers above. Heavy modules (SQLAlchemy, FAISS) load lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

from .entities import Hit, NewVersion, Ref, VerifyReport, VersionRecord
from .errors import (
    BaseMismatch,
    ConfigError,
    CorruptFile,
    InvalidEmbedding,
    InvalidName,
    MissingBlob,
    SchemaError,
    SkillbankError,
    SkillExists,
    SkillNotFound,
    UnsafeFile,
)

_LAZY = {
    "BlobStore": "blobs",
    "Catalog": "catalog",
    "IndexParams": "index",
    "VectorIndex": "index",
    "Library": "library",
}

__all__ = [
    "BaseMismatch",
    "BlobStore",
    "Catalog",
    "ConfigError",
    "CorruptFile",
    "Hit",
    "IndexParams",
    "InvalidEmbedding",
    "InvalidName",
    "Library",
    "MissingBlob",
    "Ref",
    "SchemaError",
    "SkillExists",
    "SkillNotFound",
    "SkillbankError",
    "UnsafeFile",
    "VectorIndex",
    "VerifyReport",
    "VersionRecord",
    "NewVersion",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
