"""The IVF-PQ index kind: recall against exact search, memory-mapped reopen, the
delta and tombstones between builds, pinning, stale stamps, and the CLI."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from storage import Library, ivf
from storage.index import FLAT, HNSW, IVFPQ, IndexParams, VectorIndex, normalize, pack_ids

D, PER = 32, 50  # dimension; vectors per catalog version (so a few thousand vectors take few adds)


def clustered(n, seed=0, d=D):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(40, d))
    return normalize(centres[rng.integers(0, 40, n)] + 0.45 * rng.normal(size=(n, d)))


def recall(idx, vecs, q, k=5):
    truth = faiss.IndexFlatIP(vecs.shape[1])
    truth.add(vecs)
    want = truth.search(q, k)[1] + 1  # version ids are row + 1
    got = idx.search(q, k)
    return float(
        np.mean(
            [len({v for v, _ in g} & set(w.tolist())) / k for g, w in zip(got, want, strict=True)]
        )
    )


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """Two OpenMP threads on a busy 2-core machine make these small builds ~10x slower."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def built(one_faiss_thread):
    vecs = clustered(4000)
    params = IndexParams(kind=IVFPQ, nlist=32, nprobe=8)
    return vecs, VectorIndex.build(D, pack_ids(np.arange(4000) + 1, np.zeros(4000)), vecs, params)


def test_kind_by_size_and_parameter_checks():
    p = IndexParams(threshold=10, ivf_threshold=100)
    assert [p.kind_for(n) for n in (10, 11, 100, 101)] == [FLAT, HNSW, HNSW, IVFPQ]
    assert IndexParams(kind=IVFPQ).kind_for(5) == IVFPQ
    for bad in (
        dict(kind="ivf"),
        dict(nprobe=0),
        dict(rerank=-1),
        dict(train_per_list=10),
        dict(nlist=0),
    ):
        with pytest.raises(ValueError):
            IndexParams(**bad)
    assert (
        ivf.auto_nlist(10**6) == 2048
        and ivf.auto_nlist(10**7) == 8192
        and ivf.auto_nlist(4000) == 64
    )
    assert ivf.auto_m(64) == 16 and ivf.auto_m(384) == 64 and ivf.auto_m(30) == 6


def test_recall_against_exact_search(built):
    vecs, idx = built
    assert idx.kind == IVFPQ and idx.nlist == 32 and idx.base.pq.M == ivf.auto_m(D)
    q = clustered(200, seed=1)
    assert recall(idx, vecs, q) >= 0.95  # PQ shortlist, exact re-ranking
    pq_only = VectorIndex.build(
        D,
        pack_ids(np.arange(4000) + 1, np.zeros(4000)),
        vecs,
        IndexParams(kind=IVFPQ, nlist=32, nprobe=8, rerank=0),
    )
    assert 0.3 <= recall(pq_only, vecs, q) < recall(idx, vecs, q)  # what re-ranking buys
    hits = idx.search(q[:3], 5)
    assert all([s for _, s in h] == sorted((s for _, s in h), reverse=True) for h in hits)
    assert idx.search(vecs[7:8], 1)[0][0] == (
        8,
        pytest.approx(1.0, abs=1e-5),
    )  # scores are exact cosines


def test_saved_base_is_memory_mapped_and_reopens_identically(built, tmp_path):
    vecs, idx = built
    q = clustered(50, seed=2)
    before = idx.search(q, 5)
    idx.save(tmp_path, "s", {"uid": "u", "generation": 1})
    assert idx.token and (tmp_path / f"s.ivfpq-{idx.token}" / "vectors.npy").is_file()
    loaded, stamp = VectorIndex.load(tmp_path, "s")
    assert isinstance(loaded, ivf.IVFPQIndex) and stamp["generation"] == 1 and loaded.pinned
    assert (
        type(faiss.downcast_InvertedLists(loaded.base.invlists)).__name__ == "OnDiskInvertedLists"
    )
    assert isinstance(loaded.base_vectors, np.memmap) and isinstance(loaded.base_ids, np.memmap)
    assert loaded.search(q, 5) == before
    assert loaded.params.nprobe == 8  # a pinned index keeps its settings


def test_delta_and_tombstones_between_builds(built, tmp_path):
    vecs, idx = built
    idx.save(tmp_path, "s", {"generation": 1})
    idx, _ = VectorIndex.load(tmp_path, "s")
    new = clustered(20, seed=3)
    idx.add(pack_ids(np.arange(20) + 10_001, np.zeros(20)), new)  # read-only base: into the delta
    idx.remove_versions([10_001, 1, 2])
    assert idx.ntotal == 4019 and idx.delta.ntotal == 19  # the delta deletes, the base tombstones
    assert idx.search(new[5:6], 1)[0][0][0] == 10_006
    assert not {1, 2, 10_001} & {
        v for v, _ in idx.search(np.concatenate([vecs[:2], new[:1]]), 30)[0]
    }
    idx.save(tmp_path, "s", {"generation": 2})
    again, stamp = VectorIndex.load(tmp_path, "s")
    assert (
        stamp["base"] == idx.token
        and again.delta.ntotal == 19
        and again.tombstones == {1, 2, 10_001}
    )
    assert again.search(new[5:6], 1)[0][0][0] == 10_006
    assert not again.needs_rebuild(IndexParams())  # pinned: stays IVF-PQ below the threshold
    assert again.needs_rebuild(IndexParams(kind=FLAT))  # unless asked for another kind
    again.remove_versions(list(range(1, 2100)))
    assert again.wasted() > ivf.MAX_WASTE and again.needs_rebuild(IndexParams())
    # a torn pair (delta rewritten by another process) or a missing base is refused
    (tmp_path / "s.delta.faiss").write_bytes(b"junk")
    assert VectorIndex.load(tmp_path, "s") is None


def test_missing_or_short_base_is_refused(built, tmp_path):
    _, idx = built
    idx.save(tmp_path, "s", {"generation": 1})
    base = tmp_path / f"s.ivfpq-{idx.token}"
    with open(base / "vectors.npy", "r+b") as fh:
        fh.truncate(100)
    assert VectorIndex.load(tmp_path, "s") is None
    for f in base.iterdir():
        f.unlink()
    base.rmdir()
    assert VectorIndex.load(tmp_path, "s") is None


def fill(lib, versions, seed=0, name="s"):
    """``versions`` versions of PER vectors each; returns the vectors by version."""
    vecs = clustered(versions * PER, seed=seed).reshape(versions, PER, D)
    for i, v in enumerate(vecs):
        lib.add_version(
            f"{name}{i}", b"%s-%d-%d" % (name.encode(), seed, i), embeddings={"examples": v}
        )
    return vecs


def test_library_keeps_a_pinned_ivfpq_index_in_step_with_the_catalog(tmp_path):
    home = tmp_path / "bank"
    lib = Library.open(home)
    vecs = fill(lib, 60)  # 3,000 vectors
    idx = lib.rebuild_index("examples", IndexParams(kind=IVFPQ, nlist=32))
    assert idx.kind == IVFPQ and idx.token and len(idx.base_ids) == 3000
    assert lib.retrieve(vecs[7, 3], k=1)[0].name == "s7"
    lib.close()

    a, b = Library.open(home), Library.open(home)  # default params: the pinned kind stays
    assert a.retrieve(vecs[9, 0], k=1)[0].name == "s9"
    assert a._fresh("examples").kind == IVFPQ
    late = fill(b, 3, seed=5, name="late")
    b.remove("s9")
    assert a.retrieve(late[1, 0], k=1)[0].name == "late1"  # b's add, found through a's delta
    assert "s9" not in {h.name for h in a.retrieve(vecs[9, 0], k=20)}
    assert a._fresh("examples").delta.ntotal == 3 * PER
    hits = a.retrieve(vecs[4, 0], k=3, where={"name": "s4*"})
    assert hits[0].name == "s4" and all(h.name.startswith("s4") for h in hits)
    assert a.verify().ok
    a.close()
    b.close()

    stamp_file = home / "index" / "examples.json"
    stamp = json.loads(stamp_file.read_text())
    stamp_file.write_text(
        json.dumps({**stamp, "uid": "someone-else"})
    )  # stale: rebuilt, still IVF-PQ
    c = Library.open(home)
    assert c.retrieve(late[2, 0], k=1)[0].name == "late2"
    rebuilt = c._fresh("examples")
    assert rebuilt.kind == IVFPQ and rebuilt.nlist == 32 and rebuilt.delta.ntotal == 0
    assert rebuilt.token != stamp["base"] and len(rebuilt.base_ids) == 62 * PER
    c.close()


def test_auto_kind_switches_to_ivfpq_above_its_threshold(tmp_path):
    lib = Library.open(tmp_path / "bank", params=IndexParams(threshold=100, ivf_threshold=2000))
    vecs = fill(lib, 30)  # 1,500 vectors: HNSW
    assert lib.retrieve(vecs[3, 0], k=1)[0].name == "s3" and lib._fresh("examples").kind == HNSW
    more = fill(lib, 20, seed=1, name="t")  # 2,500: IVF-PQ, built on the query path
    assert lib.retrieve(more[4, 0], k=1)[0].name == "t4"
    idx = lib._fresh("examples")
    assert idx.kind == IVFPQ and not idx.pinned and idx.nlist == ivf.auto_nlist(2500)
    lib.close()


def test_cli_index_build_and_info(tmp_path):
    home = tmp_path / "bank"
    with Library.open(home) as lib:
        fill(lib, 30)
    runner = CliRunner(env={"COLUMNS": "200"})

    def run(*args):
        res = runner.invoke(app, ["--bank", str(home), "index", *args])
        assert res.exit_code == 0, res.output
        return res

    built = json.loads(
        run("build", "--kind", "ivfpq", "--nlist", "16", "--nprobe", "4", "--json").stdout
    )
    assert (
        built[0]["space"] == "examples"
        and built[0]["kind"] == IVFPQ
        and built[0]["vectors"] == 1500
    )
    info = json.loads(run("info", "--json").stdout)[0]
    assert (info["kind"], info["nlist"], info["nprobe"], info["pinned"], info["state"]) == (
        IVFPQ,
        16,
        4,
        True,
        "fresh",
    )
    assert info["bytes"] > 1500 * D * 4  # the float32 vectors for re-ranking are part of it
    again = json.loads(run("build", "--json").stdout)[0]  # no --kind: keeps the pinned kind
    assert again["kind"] == IVFPQ and again["pinned"]
    auto = json.loads(run("build", "--kind", "auto", "--json").stdout)[0]
    assert auto["kind"] == FLAT and not auto["pinned"]
    assert "examples" in run("info").stdout
    bad = runner.invoke(app, ["--bank", str(home), "index", "build", "--space", "nope"])
    assert bad.exit_code == 1 and "no embedding space nope" in bad.output
