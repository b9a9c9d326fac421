"""Errors raised by skillbank: the storage family plus the adapter-specific ones."""

from __future__ import annotations

from storage.errors import (
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


class NoTargetMatched(ConfigError):
    """No module of the model matched the configured targets."""


class UnsupportedModule(ConfigError):
    """A matched module whose type has no adapter layer."""


class AdapterNotFound(SkillbankError, KeyError):
    """An adapter name the model does not carry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AdapterExists(SkillbankError, ValueError):
    """An adapter name the model already carries."""


class MergedError(SkillbankError, RuntimeError):
    """An operation that needs unmerged adapters was asked of a merged model."""


__all__ = [
    "AdapterExists",
    "AdapterNotFound",
    "BaseMismatch",
    "ConfigError",
    "CorruptFile",
    "InvalidEmbedding",
    "InvalidName",
    "MergedError",
    "MissingBlob",
    "NoTargetMatched",
    "SchemaError",
    "SkillExists",
    "SkillNotFound",
    "SkillbankError",
    "UnsafeFile",
    "UnsupportedModule",
]
