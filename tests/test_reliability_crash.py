"""A writer SIGKILLed mid-write never costs a skill or leaves a bad row.

Each trial forks a writer that adds real skills (and retrieves and saves the
index after each add) and dies at a named crash point (``storage.faults``) on
its n-th pass, or at a random moment. After every kill the bank must open;
``verify`` may find orphan blobs and nothing else; every add the writer heard
back about is there, intact; versions are 1..n; the index on disk is rebuilt
or caught up; ``gc`` removes the orphans. Trials accumulate on one bank.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import context, tiny_skill, vector

import skillbank as sb
from storage import faults
from storage.blobs import sha256
from storage.index import VectorIndex

pytestmark = pytest.mark.reliability

POINTS = [
    "blob.write",
    "blob.renamed",
    "commit.before",
    "commit.after",
    "index.write",
    "index.meta",
]
ORPHANING = {"blob.renamed", "commit.before"}  # the blob is in place but no row was committed
ROUNDS = {"sqlite": 5, "postgresql": 2}  # rounds over every point
RANDOM_KILLS = {"sqlite": 10, "postgresql": 4}
NAMES = 3


def _writer(url: str, home: str, spec: str | None, first: int, count: int) -> None:
    """Add ``count`` skills, logging each one only after ``add`` returned."""
    torch.set_num_threads(1)
    faults.arm(spec)
    home_ = Path(home)
    with sb.SkillBank.open(url, blobs=home_ / "blobs", index_dir=home_ / "index") as bank:
        (home_ / "ready").touch()
        for seed in range(first, first + count):
            skill = tiny_skill(seed)
            ref = bank.add(f"skill{seed % NAMES}", skill, embedding=vector(seed))
            with open(home_ / "done.log", "a") as fh:
                fh.write(f"{ref.name} {ref.version} {sha256(skill.to_bytes())}\n")
                fh.flush()
                os.fsync(fh.fileno())
            bank.retrieve(vector(seed), k=1)  # catch the index up ...
            bank.library.flush()  # ... and save it, so the index points are passed too


def _acknowledged(home: Path) -> list[tuple[str, int, str]]:
    log = home / "done.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(n, int(v), d) for n, v, d in (line.split() for line in lines)]


def _check(url: str, home: Path, point: str | None, before: int) -> tuple[int, int]:
    """Everything the issue promises after a kill; returns (versions, orphans removed)."""
    acked = _acknowledged(home)
    if point == "index.meta":  # the new index file is in place, its stamp is the old one
        assert VectorIndex.load(home / "index", "examples") is None
    with sb.SkillBank.open(url, blobs=home / "blobs", index_dir=home / "index") as bank:
        report = bank.verify()
        assert not (report.missing_blobs or report.corrupt_blobs), report
        assert not (report.index_without_rows or report.rows_without_index), report
        if point is not None and point not in ORPHANING:
            assert not report.orphan_blobs, (point, report)
        assert len(report.orphan_blobs) <= 1, report
        for name, version, digest in acked:  # every acknowledged add survived, intact
            assert bank.record(f"{name}@{version}").digest == digest
        rows = [r for n in bank.library.catalog.names() for r in bank.versions(n)]
        for name in {r.name for r in rows}:
            assert [r.version for r in bank.versions(name)] == list(
                range(1, 1 + sum(r.name == name for r in rows))
            )
        known = {(n, v) for n, v, _ in acked}
        unheard = [r for r in rows if (r.name, r.version) not in known]
        assert len(rows) == len(known) + len(unheard)
        # at most the one add in flight, and only if it got as far as its commit
        assert len(unheard) == (point == "commit.after") if point else len(unheard) <= 1
        for r in rows:  # no row points at a missing or corrupt blob
            assert bank.get(str(r.ref)).ranks == {"0": 2, "2": 2}
        assert len(rows) >= before
        removed = bank.gc(min_age=0)
        assert removed == list(report.orphan_blobs)
        after = bank.verify()
        assert after == type(after)(), after
        assert not list((home / "blobs").glob("*/.tmp-*")) and not list(
            (home / "index").glob(".*.tmp")
        )
        uid, generation = bank.library.catalog.state()
        vids = set(bank.library.catalog.vectors("examples")[0].tolist())
    loaded = VectorIndex.load(home / "index", "examples")  # the cache on disk is current again
    assert loaded is not None and (loaded[1]["uid"], loaded[1]["generation"]) == (uid, generation)
    assert (
        loaded[0].live_versions() == vids and len(set(loaded[0].ids().tolist())) == loaded[0].ntotal
    )
    with open(home / "done.log", "a") as fh:  # the next trial starts from the catalog
        fh.writelines(f"{r.name} {r.version} {r.digest}\n" for r in unheard)
    return len(rows), len(removed)


def _run(
    ctx: mp.context.BaseContext,
    url: str,
    home: Path,
    spec: str | None,
    first: int,
    count: int,
    rng: np.random.Generator,
) -> int | None:
    (home / "ready").unlink(missing_ok=True)
    p = ctx.Process(target=_writer, args=(url, str(home), spec, first, count))
    p.start()
    if spec is None:  # kill at a random moment once the writer is under way
        while not (home / "ready").exists() and p.is_alive():
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0.0, 0.15)))
        p.kill()
    p.join(60)
    return p.exitcode


@pytest.mark.slow
def test_sigkill_at_every_step_loses_nothing(catalog_url, tmp_path, request):
    backend = request.node.callspec.params["catalog_url"]
    ctx, rng = context(), np.random.default_rng(0)
    trials = [(p, int(rng.integers(1, 4))) for _ in range(ROUNDS[backend]) for p in POINTS]
    trials += [(None, 0)] * RANDOM_KILLS[backend]
    seed, versions, orphans = 0, 0, 0
    for point, nth in trials:
        spec = f"{point}:{nth}" if point else None
        count = 4 if point else 40
        code = _run(ctx, catalog_url, tmp_path, spec, seed, count, rng)
        assert code == -signal.SIGKILL or (point is None and code == 0), (spec, code)
        seed += count
        versions, removed = _check(catalog_url, tmp_path, point, versions)
        orphans += removed
    # the trials did write and crash mid-write (how many adds land before a random kill
    # depends on the machine's load, so no count is promised beyond that)
    assert versions > 0 and orphans > 0
    print(
        f"\n{backend}: {len(trials)} kills, {versions} versions kept, {orphans} orphan blobs collected"
    )


def test_crash_points_cost_nothing_unarmed(monkeypatch):
    """Unarmed, a crash point returns at once; armed, it counts passes before the kill."""
    faults.arm(None)
    faults.crash_point("blob.write")
    monkeypatch.setattr(os, "kill", lambda pid, sig: (_ for _ in ()).throw(SystemExit(sig)))
    faults.arm("blob.write:2")
    faults.crash_point("commit.after")
    faults.crash_point("blob.write")
    with pytest.raises(SystemExit) as killed:
        faults.crash_point("blob.write")
    assert killed.value.code == signal.SIGKILL
    faults.arm(None)
