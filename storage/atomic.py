"""The one way the project replaces a file or publishes a directory: never half of one.

A unique temp is written beside the target (same directory, so the rename stays
on one file system), fsynced, renamed over the target, and the directory is
fsynced so the rename itself survives a power cut. Temp names start with
``TEMP_PREFIX`` and end with ``TEMP_SUFFIX`` (a cleaner looking for either
recognises them) and carry the process, a per-process counter and random bits,
so concurrent writers (threads, processes, hosts sharing a directory) never
share one.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from .faults import crash_point

TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".tmp"
_calls = itertools.count()  # next() is atomic under the GIL: no two calls share a number


def temp_path(path: Path) -> Path:
    """A fresh temp name beside ``path``: hidden, unique per process, call and host.

    The target's name is cut to 100 bytes so the temp name stays within the 255
    bytes file systems allow; the tag alone makes it unique.
    """
    tag = f"{os.getpid()}-{next(_calls)}-{os.urandom(4).hex()}"
    return path.with_name(f"{TEMP_PREFIX}{_cut(path.name)}.{tag}{TEMP_SUFFIX}")


def temp_glob(prefix: str) -> str:
    """A glob matching the temps of every target whose name starts with ``prefix``."""
    return f"{glob.escape(TEMP_PREFIX + _cut(prefix))}*"


def _cut(name: str, limit: int = 100) -> str:
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return name


def is_temp(path: Path) -> bool:
    """Whether ``path`` is a temp an interrupted writer may have left behind.

    Besides the names ``temp_path`` gives, this recognises those of earlier
    releases (``.tmp-<digest>...`` blobs, ``.<name>.<pid>.tmp`` files).
    """
    name = Path(path).name
    return name.startswith(TEMP_PREFIX) or (name.startswith(".") and name.endswith(TEMP_SUFFIX))


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
    """Flush ``path``'s bytes to disk, whoever wrote them (a writer that only takes a name)."""
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, written: str | None = None, renamed: str | None = None
) -> Iterator[Path]:
    """Yield a temp path to write by any means; on a clean exit it replaces ``path``.

    For writers that need a file name (``faiss.write_index``, ``safetensors``,
    ``np.save``). On an exception the temp file is removed and ``path`` is left
    as it was.

    Args:
        path: The file to replace; its directory must exist.
        written: Crash point passed once the temp is durable, before the rename.
        renamed: Crash point passed once the rename is done, before the directory fsync.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        if written:
            crash_point(written)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if renamed:
        crash_point(renamed)
    fsync_dir(path.parent)


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str, *, written: str | None = None
) -> Path:
    """Replace ``path`` with ``data`` (text is written as UTF-8), durably and atomically.

    Args:
        path: The file to replace; its directory must exist.
        data: Its new content.
        written: Crash point passed once the temp is durable, before the rename.
    """
    path = Path(path)
    with atomic_path(path, written=written) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else bytes(data))
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, written: str | None = None) -> Iterator[Path]:
    """Yield a fresh temp directory; on a clean exit it appears, complete, as ``path``.

    Every file in it is fsynced before the rename. A directory cannot replace a
    non-empty one atomically, so ``path`` must not exist yet (give it a unique
    name, as the IVF-PQ bases do). On an exception the temp directory is removed.

    Args:
        path: The directory to publish; its parent must exist.
        written: Crash point passed once the contents are durable, before the rename.
    """
    path = Path(path)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        if written:
            crash_point(written)
        if path.exists():
            raise FileExistsError(f"{path} exists; a directory is published only once")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def remove_stale(paths: Iterable[Path], cutoff: float) -> int:
    """Delete the temp files among ``paths`` older than ``cutoff`` (epoch seconds).

    Directories are left alone: a temp directory may hold a long build still in
    progress, and its owner prunes it with its own grace period.

    Args:
        paths: Candidates (anything ``is_temp`` does not recognise is skipped).
        cutoff: Only files last modified at or before this time go.

    Returns:
        How many files were deleted.
    """
    removed = 0
    for tmp in list(paths):
        if not is_temp(tmp):
            continue
        try:
            if tmp.is_file() and tmp.stat().st_mtime <= cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed
