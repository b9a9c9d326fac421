"""Content-addressed, deduplicated blob store (sha256, fan-out directories).

A blob is durable before ``put`` returns: written through ``storage.atomic`` (a
temp file in its final directory, fsynced, renamed into place, the directory
fsynced), so a crash leaves either no blob or the whole blob. Every ``get``
re-hashes, so silent disk corruption surfaces as ``CorruptFile`` instead of as a
wrong adapter.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .atomic import atomic_path, is_temp, remove_stale
from .errors import CorruptFile, MissingBlob
from .faults import crash_point

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise CorruptFile(f"not a sha256 hex digest: {digest!r}")
    return digest


class BlobStore:
    """Immutable bytes addressed by their sha256, under ``root/ab/cdef...``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / digest[:2] / digest[2:]

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its digest; storing it twice is free.

        An existing blob is trusted only if it still hashes to its name: a new
        version must never be committed on top of a rotten copy.
        """
        data = bytes(data)
        digest = sha256(data)
        final = self.path(digest)
        if final.is_file() and final.stat().st_size == len(data) and self.check(digest) is None:
            os.utime(final)  # refresh the age so a concurrent gc grace period protects it
            return digest
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(final, renamed="blob.renamed") as tmp, open(tmp, "wb") as fh:
            view, half = memoryview(data), len(data) // 2
            fh.write(view[:half])
            crash_point("blob.write")
            fh.write(view[half:])
        return digest

    def get(self, digest: str) -> bytes:
        """The bytes of ``digest``, re-hashed; ``MissingBlob``/``CorruptFile`` otherwise."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MissingBlob(f"blob {digest} is missing from {self.root}") from None
        actual = sha256(data)
        if actual != digest:
            raise CorruptFile(f"blob {digest} is corrupt: its content hashes to {actual}")
        return data

    def check(self, digest: str) -> str | None:
        """'missing', 'corrupt' or None (fine), streaming so big blobs stay out of memory."""
        h = hashlib.sha256()
        try:
            with open(self.path(digest), "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        except FileNotFoundError:
            return "missing"
        return None if h.hexdigest() == digest else "corrupt"

    def size(self, digest: str) -> int:
        """Bytes the blob takes on disk (0 if it is missing)."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def delete(self, digest: str) -> bool:
        """Remove a blob; True if it was there."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def digests(self) -> Iterator[str]:
        """Every stored digest (temp files and strangers are skipped)."""
        for sub in sorted(self.root.iterdir()):
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            for f in sorted(sub.iterdir()):
                digest = sub.name + f.name
                if _DIGEST.match(digest) and f.is_file():
                    yield digest

    def _temps(self) -> Iterator[Path]:
        for sub in self.root.iterdir():
            if sub.is_dir():
                yield from (f for f in sub.iterdir() if is_temp(f))

    def gc(
        self, referenced: Iterable[str], dry_run: bool = False, min_age: float = 0.0
    ) -> list[str]:
        """Delete blobs not in ``referenced`` and stale temp files; return removed digests.

        ``min_age`` (seconds) spares files younger than that: a writer puts its blob
        before committing the row that references it, so a concurrent gc must not
        take a fresh blob for garbage.
        """
        keep = set(referenced)
        cutoff = time.time() - min_age
        removed = []
        for digest in list(self.digests()):
            if digest in keep:
                continue
            path = self.path(digest)
            try:
                if min_age and path.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            removed.append(digest)
            if not dry_run:
                self.delete(digest)
        if not dry_run:
            remove_stale(self._temps(), cutoff)
        return removed
