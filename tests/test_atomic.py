"""storage.atomic: the one temp-and-rename writer (files and directories) and its cleaner."""

from __future__ import annotations

import os
import threading

import pytest

from storage import atomic
from storage.blobs import BlobStore


def test_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "skill.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("the writer died")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["skill.safetensors"]
    # a writer that never created its temp fails the same clean way
    with pytest.raises(FileNotFoundError), atomic.atomic_path(target):
        pass
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_write_replaces_and_returns_the_target(tmp_path):
    target = tmp_path / "a.json"
    assert atomic.atomic_write(target, "{}") == target and target.read_text() == "{}"
    atomic.atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and os.listdir(tmp_path) == ["a.json"]


def test_concurrent_writers_never_mix(tmp_path):
    """Each writer's file is one byte repeated; a reader must only ever see a whole one."""
    target = tmp_path / "shared.bin"
    size, rounds = 256 * 1024, 20
    atomic.atomic_write(target, b"\x00" * size)
    seen, errors, done = set(), [], threading.Event()

    def write(byte: int) -> None:
        try:
            for _ in range(rounds):
                atomic.atomic_write(target, bytes([byte]) * size)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def read() -> None:
        while not done.is_set():
            data = target.read_bytes()
            seen.add((len(data), len(set(data))))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(b,)) for b in (1, 2)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert not errors
    assert seen == {(size, 1)}  # never short, never two writers' bytes in one file
    assert target.read_bytes() in (b"\x01" * size, b"\x02" * size)
    assert os.listdir(tmp_path) == ["shared.bin"]


def test_temp_names_are_unique_hidden_and_recognised(tmp_path):
    target = tmp_path / "x.faiss"
    names: list[str] = []

    def grab() -> None:
        names.extend(atomic.temp_path(target).name for _ in range(500))

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == len(names) == 2000
    tmp = atomic.temp_path(target)
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and atomic.is_temp(tmp)
    assert not atomic.is_temp(target)
    long = atomic.temp_path(tmp_path / ("é" * 120))  # 240 bytes of name: the temp still fits
    assert len(os.fsencode(long.name)) < 255 and long.parent == tmp_path
    assert long.match(atomic.temp_glob("é" * 120))


def test_atomic_dir_publishes_whole_or_not_at_all(tmp_path):
    final = tmp_path / "base-1"
    with pytest.raises(RuntimeError), atomic.atomic_dir(final) as tmp:
        (tmp / "a.npy").write_bytes(b"a")
        raise RuntimeError("build failed")
    assert os.listdir(tmp_path) == []
    with atomic.atomic_dir(final) as tmp:
        (tmp / "a.npy").write_bytes(b"a")
        (tmp / "b.npy").write_bytes(b"b")
    assert sorted(os.listdir(final)) == ["a.npy", "b.npy"] and os.listdir(tmp_path) == ["base-1"]
    with pytest.raises(FileExistsError), atomic.atomic_dir(final) as tmp:
        (tmp / "c.npy").write_bytes(b"c")
    assert sorted(os.listdir(final)) == ["a.npy", "b.npy"] and os.listdir(tmp_path) == ["base-1"]


def test_blob_gc_removes_stale_temps_of_killed_writers(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    keep = store.put(b"keep")
    final = store.path(keep)
    stale = atomic.temp_path(final)  # what a writer killed mid-put leaves
    stale.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    fresh = atomic.temp_path(final)  # a writer still at work
    fresh.write_bytes(b"partial")
    assert list(store.digests()) == [keep]
    store.gc({keep}, min_age=60)
    assert not stale.exists() and fresh.exists() and store.get(keep) == b"keep"


def test_remove_stale_spares_strangers_and_directories(tmp_path):
    stranger, temp = tmp_path / "notes.tmp", atomic.temp_path(tmp_path / "x")
    build = atomic.temp_path(tmp_path / "space.ivfpq-abc")
    build.mkdir()
    for f in (stranger, temp):
        f.write_bytes(b"")
    assert atomic.remove_stale(tmp_path.iterdir(), cutoff=2e9) == 1
    assert stranger.exists() and not temp.exists() and build.is_dir()


def test_ivf_prune_removes_abandoned_builds_after_the_grace(tmp_path):
    from storage import ivf

    old, young = (atomic.temp_path(tmp_path / f"s.ivfpq-{t}") for t in ("old", "young"))
    for d in (old, young):
        d.mkdir()
        (d / "index.faiss").write_bytes(b"half")
    os.utime(old, (1, 1))
    ivf.prune(tmp_path, "s")
    assert not old.exists() and young.is_dir()
