"""Replacing a file atomically, for the layers above skillbank (which may not import storage).

Readers see the old file or the new one, never half of it: ``atomic_write`` for
bytes or text, ``atomic_path`` for writers that need a file name (safetensors,
matplotlib). Both are the storage layer's one atomic writer.
"""

from __future__ import annotations

from storage.atomic import atomic_path, atomic_write

__all__ = ["atomic_path", "atomic_write"]
