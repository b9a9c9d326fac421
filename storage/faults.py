"""Named crash points, so tests can kill a writer at an exact step of a write.

Set ``SKILLBANK_CRASH_AT=<point>[:<n>]`` (or call ``arm``) and the process
SIGKILLs itself the ``n``-th time (default 1st) it passes ``point``. Unset, a
point is one global lookup and a falsy test. Points, in write order:

- ``blob.write``     half of a blob's bytes are in its temp file
- ``blob.renamed``   the blob is in place, its directory not yet fsynced
- ``commit.before``  the blob is durable, the catalog transaction not committed
- ``commit.after``   the row is committed, the caller has not heard back
- ``index.write``    a FAISS index temp file is written, not yet renamed
- ``index.meta``     the new index file is in place, its stamp not yet
"""

from __future__ import annotations

import os
import signal

ENV = "SKILLBANK_CRASH_AT"
_armed: list | None = None  # [point, passes left] while armed


def arm(spec: str | None) -> None:
    """Arm ``point[:n]`` (None disarms); the env var does the same at import."""
    global _armed
    if not spec:
        _armed = None
        return
    point, _, n = spec.partition(":")
    _armed = [point, int(n or 1)]


def crash_point(name: str) -> None:
    """SIGKILL this process if ``name`` is the armed point and its count is reached."""
    if _armed is None or _armed[0] != name:
        return
    _armed[1] -= 1
    if _armed[1] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


arm(os.environ.get(ENV))

__all__ = ["ENV", "arm", "crash_point"]
