"""The one way the project replaces a file: readers see the old file or the new, never half.

A unique temp file is written beside the target (same directory, so the rename
stays on one file system), fsynced, renamed over the target, and the directory
is fsynced so the rename itself survives a power cut. Temp names end in
``TEMP_SUFFIX`` and carry the process, thread and a clock tick, so concurrent
writers never share one and a cleaner can recognise leftovers of a crash.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """A fresh temp name beside ``path``: hidden, unique per process, thread and call."""
    tag = f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
    return path.with_name(f".{path.name}.{tag}{TEMP_SUFFIX}")


def is_temp(path: Path) -> bool:
    """Whether ``path`` looks like a temp file left by ``atomic_path``."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path to write by any means; on a clean exit it replaces ``path``.

    For writers that need a file name (``faiss.write_index``, ``safetensors``,
    ``np.save``). On an exception the temp file is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` (text is written as UTF-8), durably and atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else bytes(data))
    return path
