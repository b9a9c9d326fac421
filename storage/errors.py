"""The one error family of skillbank.

It lives at the bottom layer (``storage``) so every layer above can raise and
catch the same classes without importing upward; ``skillbank.errors`` re-exports
it and adds the adapter-specific errors.
"""

from __future__ import annotations


class SkillbankError(Exception):
    """Base of every error skillbank raises on purpose."""


class InvalidName(SkillbankError, ValueError):
    """A skill name, alias or tag that cannot be stored safely."""


class SkillNotFound(SkillbankError, KeyError):
    """An unknown skill name, version or alias."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class SkillExists(SkillbankError, ValueError):
    """A name (or alias) that is already taken."""


class BaseMismatch(SkillbankError, ValueError):
    """A skill trained on a different base model than the one offered."""


class ConfigError(SkillbankError, ValueError):
    """A setting or argument that cannot be applied as given (index parameters, sort keys,
    adapter configurations)."""


class CorruptFile(SkillbankError, ValueError):
    """A file or blob whose bytes are not what they claim to be."""


class UnsafeFile(CorruptFile):
    """A file refused for safety (pickle payloads, absurd declared sizes)."""


class SchemaError(SkillbankError, RuntimeError):
    """A catalog whose schema this code cannot use (e.g. newer than the code)."""


class InvalidEmbedding(SkillbankError, ValueError):
    """A NaN, empty or wrong-dimension embedding."""


class MissingBlob(CorruptFile):
    """A blob the catalog references but the blob store no longer holds."""
