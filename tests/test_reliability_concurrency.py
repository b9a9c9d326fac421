"""Several processes on one bank at once: writers adding real skills while readers
retrieve, first opens of a fresh catalog racing to create the schema, and runners
on separate "machines" sharing one PostgreSQL catalog and one blob folder.

Run on SQLite and PostgreSQL (``catalog_url``). Workers are forked from a
forkserver that preloaded torch, so each costs milliseconds, not an import.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import context, tiny_skill, vector

import skillbank as sb
from storage import Library
from storage.blobs import sha256
from storage.index import VectorIndex

pytestmark = pytest.mark.reliability

WRITERS, ADDS, READERS = 4, 8, 2
OPENERS = 6


def _writer(url: str, home: str, worker: int, start: mp.synchronize.Event) -> None:
    torch.set_num_threads(1)
    out = Path(home) / f"writer{worker}.jsonl"
    with sb.SkillBank.open(url, blobs=Path(home) / "blobs", index_dir=Path(home) / "index") as bank:
        start.wait()
        for i in range(ADDS):
            seed = 1000 * worker + i
            skill = tiny_skill(seed)
            name = "shared" if i % 2 == 0 else f"own{worker}"
            ref = bank.add(name, skill, embedding=vector(seed), tags={"writer": str(worker)})
            with open(out, "a") as fh:
                fh.write(json.dumps([name, ref.version, seed, sha256(skill.to_bytes())]) + "\n")


def _reader(url: str, home: str, worker: int, start: mp.synchronize.Event) -> None:
    """Retrieve and read back until the writers are done; any hit must be readable."""
    torch.set_num_threads(1)
    done, ops = Path(home) / "writers-done", 0
    try:
        with sb.SkillBank.open(
            url, blobs=Path(home) / "blobs", index_dir=Path(home) / "index"
        ) as bank:
            start.wait()
            rng = np.random.default_rng(worker)
            while not done.exists() or ops < 10:
                try:
                    hits = bank.retrieve(rng.normal(size=16), k=3)
                except sb.InvalidEmbedding:  # no writer has created the space yet
                    hits = []
                for hit in hits:
                    skill = bank.get(f"{hit.name}@{hit.version}")
                    assert skill.ranks == {"0": 2, "2": 2}, skill
                bank.list()
                ops += 1
        (Path(home) / f"reader{worker}.ops").write_text(str(ops))
    except BaseException:
        (Path(home) / f"reader{worker}.err").write_text(traceback.format_exc())
        raise


def test_writers_and_readers_lose_nothing(catalog_url, tmp_path):
    home = str(tmp_path)
    sb.SkillBank.open(catalog_url, blobs=tmp_path / "blobs", index_dir=tmp_path / "index").close()
    ctx = context()
    start = ctx.Event()
    writers = [
        ctx.Process(target=_writer, args=(catalog_url, home, w, start)) for w in range(WRITERS)
    ]
    readers = [
        ctx.Process(target=_reader, args=(catalog_url, home, r, start)) for r in range(READERS)
    ]
    for p in writers + readers:
        p.start()
    start.set()
    for p in writers:
        p.join(300)
    (tmp_path / "writers-done").touch()
    for p in readers:
        p.join(300)
    errors = {f.name: f.read_text() for f in tmp_path.glob("reader*.err")}
    assert [p.exitcode for p in writers + readers] == [0] * (WRITERS + READERS), errors
    added = [
        json.loads(line)
        for w in range(WRITERS)
        for line in (tmp_path / f"writer{w}.jsonl").read_text().splitlines()
    ]
    assert len(added) == WRITERS * ADDS
    assert all(int((tmp_path / f"reader{r}.ops").read_text()) >= 10 for r in range(READERS))

    with sb.SkillBank.open(
        catalog_url, blobs=tmp_path / "blobs", index_dir=tmp_path / "index"
    ) as bank:
        by_name: dict[str, list[int]] = {}
        for name, version, _, digest in added:
            by_name.setdefault(name, []).append(version)
            assert bank.record(f"{name}@{version}").digest == digest  # every add is there, intact
        for name, versions in by_name.items():
            assert sorted(versions) == list(range(1, len(versions) + 1)), name  # no gaps, no dups
            assert [r.version for r in bank.versions(name)] == sorted(versions)
        assert len(by_name["shared"]) == WRITERS * ADDS // 2
        report = bank.verify()
        assert report == type(report)(), (
            report
        )  # nothing missing, corrupt, orphaned or out of index
        for name, version, seed, _ in added:  # the index agrees: each exact vector finds its skill
            hit = bank.retrieve(vector(seed), k=1)[0]
            assert (hit.name, hit.version) == (name, version)
            assert bank.get(f"{name}@{version}").factors.keys() == {"0", "2"}
        vids = bank.library.catalog.vectors("examples")[0]
        generation = bank.library.catalog.state()[1]
    loaded = VectorIndex.load(tmp_path / "index", "examples")  # the cache left on disk agrees too
    assert loaded is not None and loaded[1]["generation"] == generation
    assert loaded[0].live_versions() == set(vids.tolist())
    ids = loaded[0].ids().tolist()
    assert len(ids) == len(set(ids)) == len(vids)  # no vector entered twice (rebuild vs catch-up)


def _opener(url: str, home: str, worker: int, barrier: mp.synchronize.Barrier) -> None:
    barrier.wait()
    with Library.open(url, blobs=Path(home) / "blobs", index_dir=Path(home) / "index") as lib:
        lib.add_version("first", f"opener-{worker}".encode(), embeddings={"e": np.ones(4)})


def test_first_opens_race_to_create_the_schema(catalog_url, tmp_path):
    """Fresh catalog, several processes opening it at the same instant: one migrates."""
    ctx = context()
    barrier = ctx.Barrier(OPENERS)
    procs = [
        ctx.Process(target=_opener, args=(catalog_url, str(tmp_path), w, barrier))
        for w in range(OPENERS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * OPENERS
    with Library.open(catalog_url, blobs=tmp_path / "blobs") as lib:
        assert [r.version for r in lib.versions("first")] == list(range(1, OPENERS + 1))
        assert lib.verify().ok
        with lib.catalog.engine.connect() as conn:
            assert conn.exec_driver_sql("select count(*) from alembic_version").scalar() == 1


# --- one library, many machines ----------------------------------------------------
# Runners on separate processes (stand-ins for machines) share one PostgreSQL catalog
# and one blob folder; each keeps its own index cache, as a machine would on local disk.

# SKILLBANK_RUNNERS / SKILLBANK_RUNNER_ADDS scale it up for a soak run.
RUNNERS = int(os.environ.get("SKILLBANK_RUNNERS", "4"))
RUNNER_ADDS = int(
    os.environ.get("SKILLBANK_RUNNER_ADDS", "15")
)  # a multiple of 3 keeps the names even


def _runner(
    url: str, home: str, worker: int, start: mp.synchronize.Event, added: mp.synchronize.Barrier
) -> None:
    torch.set_num_threads(1)
    root = Path(home)
    try:
        with sb.SkillBank.open(
            url, blobs=root / "shared-blobs", index_dir=root / f"machine{worker}" / "index"
        ) as bank:
            start.wait()
            for i in range(RUNNER_ADDS):
                seed = 10_000 * (worker + 1) + i
                name = ("shared-a", "shared-b", f"runner{worker}")[i % 3]
                skill = tiny_skill(seed)
                ref = bank.add(name, skill, embedding=vector(seed), tags={"runner": str(worker)})
                with open(root / f"runner{worker}.jsonl", "a") as fh:
                    fh.write(json.dumps([name, ref.version, seed, sha256(skill.to_bytes())]) + "\n")
                if i % 5 == 0:  # the local index catches up while the others keep writing
                    bank.retrieve(vector(seed), k=1)
            added.wait(timeout=240)
            seen = 0
            for other in range(RUNNERS):
                if other == worker:
                    continue
                for line in (root / f"runner{other}.jsonl").read_text().splitlines():
                    name, version, seed, digest = json.loads(line)
                    hit = bank.retrieve(vector(seed), k=1)[
                        0
                    ]  # by embedding, through this machine's index
                    assert (hit.name, hit.version) == (name, version), (hit, name, version)
                    assert bank.record(f"{name}@{version}").digest == digest
                    assert bank.get(f"{name}@{version}").ranks == {
                        "0": 2,
                        "2": 2,
                    }  # blob read, re-hashed
                    seen += 1
        (root / f"runner{worker}.seen").write_text(str(seen))
    except BaseException:
        (root / f"runner{worker}.err").write_text(traceback.format_exc())
        raise


def test_many_runners_one_postgres_catalog_and_blob_folder(postgres_server, tmp_path):
    """N runners add versions of shared names and their own to one PostgreSQL catalog at
    once: numbers stay 1..n, nothing is lost, every blob verifies, and every runner
    retrieves what the others added."""
    db = postgres_server.create_database()
    url = postgres_server.url(db)
    try:
        ctx = context()
        start, added = ctx.Event(), ctx.Barrier(RUNNERS)
        procs = [
            ctx.Process(target=_runner, args=(url, str(tmp_path), w, start, added))
            for w in range(RUNNERS)
        ]
        for p in procs:
            p.start()
        start.set()
        for p in procs:
            p.join(300)
        errors = {f.name: f.read_text() for f in tmp_path.glob("runner*.err")}
        assert [p.exitcode for p in procs] == [0] * RUNNERS, errors
        rows = [
            json.loads(line)
            for w in range(RUNNERS)
            for line in (tmp_path / f"runner{w}.jsonl").read_text().splitlines()
        ]
        assert len(rows) == RUNNERS * RUNNER_ADDS
        seen = [int((tmp_path / f"runner{w}.seen").read_text()) for w in range(RUNNERS)]
        assert seen == [(RUNNERS - 1) * RUNNER_ADDS] * RUNNERS  # each saw all the others' adds
        with sb.SkillBank.open(
            url, blobs=tmp_path / "shared-blobs", index_dir=tmp_path / "auditor" / "index"
        ) as bank:
            by_name: dict[str, list[int]] = {}
            for name, version, _, digest in rows:
                by_name.setdefault(name, []).append(version)
                assert bank.record(f"{name}@{version}").digest == digest
            assert len(by_name) == 2 + RUNNERS
            for name, versions in by_name.items():
                assert sorted(versions) == list(range(1, len(versions) + 1)), (
                    name
                )  # gapless, no dups
                assert [r.version for r in bank.versions(name)] == sorted(versions)
            assert (
                len(by_name["shared-a"]) == len(by_name["shared-b"]) == RUNNERS * RUNNER_ADDS // 3
            )
            assert sum(len(bank.versions(n)) for n in by_name) == RUNNERS * RUNNER_ADDS
            report = bank.verify()
            assert report == type(report)(), report  # every blob present and intact, no orphans
            assert set(bank.library.blobs.digests()) == {d for *_, d in rows}
    finally:
        postgres_server.drop_database(db)
