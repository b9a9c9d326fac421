"""BlobStore: content addressing, durability protocol, corruption checks, gc."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from storage.blobs import BlobStore
from storage.errors import CorruptFile, MissingBlob


@pytest.fixture
def store(tmp_path):
    return BlobStore(tmp_path / "blobs")


def test_put_get_roundtrip_and_fanout(store):
    data = os.urandom(1000)
    digest = store.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.path(digest) == store.root / digest[:2] / digest[2:]
    assert store.get(digest) == data
    assert store.exists(digest)
    assert list(store.digests()) == [digest]
    assert not [p for p in store.root.rglob("*") if p.name.startswith(".tmp-")]


def test_put_is_deduplicated(store):
    a = store.put(b"same bytes")
    b = store.put(b"same bytes")
    c = store.put(b"other bytes")
    assert a == b != c
    assert sorted(store.digests()) == sorted({a, c})


def test_corruption_is_detected_and_named(store):
    digest = store.put(b"payload " * 100)
    path = store.path(digest)
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFile, match=digest):
        store.get(digest)
    assert store.check(digest) == "corrupt"


def test_missing_blob(store):
    digest = store.put(b"soon gone")
    assert store.delete(digest)
    assert not store.delete(digest)
    with pytest.raises(MissingBlob, match=digest):
        store.get(digest)
    assert store.check(digest) == "missing"


def test_bad_digest_rejected(store):
    with pytest.raises(CorruptFile):
        store.path("../../etc/passwd")
    with pytest.raises(CorruptFile):
        store.get("ABC")


def test_gc_removes_only_unreferenced_and_stale_temps(store):
    keep = store.put(b"keep")
    drop = store.put(b"drop")
    stale = store.path(keep).parent / ".tmp-leftover"
    stale.write_bytes(b"partial")
    assert store.gc({keep}, dry_run=True) == [drop]
    assert store.exists(drop) and stale.exists()
    assert store.gc({keep}) == [drop]
    assert store.exists(keep) and not store.exists(drop) and not stale.exists()
    assert store.get(keep) == b"keep"


def test_gc_min_age_spares_fresh_blobs(store):
    fresh = store.put(b"fresh, maybe about to be referenced")
    old = store.put(b"old garbage")
    past = time.time() - 3600
    os.utime(store.path(old), (past, past))
    assert store.gc(set(), min_age=60) == [old]
    assert store.exists(fresh)
