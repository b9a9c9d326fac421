"""VectorIndex and the Library's index cache: exactness, dedupe, removal,
staleness, rebuilds, thread control."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from storage import Library, library
from storage.errors import InvalidEmbedding
from storage.index import FLAT, HNSW, IndexParams, VectorIndex, normalize, pack_ids, threads_for


def data(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, d))
    return normalize(centres[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, d)))


def brute(vecs, vids, q, k):
    out = []
    for row in q @ vecs.T:
        best = {}
        for j in np.argsort(-row):
            best.setdefault(int(vids[j]), float(row[j]))
            if len(best) == k:
                break
        out.append(list(best))
    return out


@pytest.mark.parametrize("kind", [FLAT, HNSW])
def test_search_matches_brute_force_with_multi_vector_versions(kind):
    vecs = data()
    vids = np.arange(len(vecs)) // 4 + 1  # four vectors per version
    idx = VectorIndex.build(
        16, pack_ids(vids, np.arange(len(vecs)) % 4), vecs, IndexParams(kind=kind)
    )
    q = data(20, seed=1)
    got = idx.search(q, 5)
    assert all(len(h) == 5 and len({v for v, _ in h}) == 5 for h in got)
    want = brute(vecs, vids, q, 5)
    recall = np.mean([len({v for v, _ in g} & set(w)) / 5 for g, w in zip(got, want, strict=True)])
    assert recall >= (1.0 if kind == FLAT else 0.95)
    for hits in got:
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("kind", [FLAT, HNSW])
def test_removed_versions_never_returned(kind, tmp_path):
    vecs = data(100)
    vids = np.arange(100) + 1
    idx = VectorIndex.build(16, pack_ids(vids, np.zeros(100)), vecs, IndexParams(kind=kind))
    idx.remove_versions([1, 2, 3])
    hits = idx.search(vecs[:3], 100)
    assert all({1, 2, 3}.isdisjoint(v for v, _ in h) for h in hits)
    assert all(len(h) == 97 for h in hits)
    idx.save(tmp_path, "s", {"generation": 1})
    loaded, stamp = VectorIndex.load(tmp_path, "s")
    assert stamp["generation"] == 1 and loaded.kind == kind
    assert loaded.live_versions() == set(range(4, 101))
    assert {v for v, _ in loaded.search(vecs[:1], 200)[0]} == set(range(4, 101))


def test_load_rejects_inconsistent_files(tmp_path):
    idx = VectorIndex.build(16, pack_ids(np.arange(10) + 1, np.zeros(10)), data(10))
    idx.save(tmp_path, "s", {"generation": 0})
    meta = tmp_path / "s.json"
    stamp = json.loads(meta.read_text())
    meta.write_text(json.dumps({**stamp, "ntotal": 3}))
    assert VectorIndex.load(tmp_path, "s") is None
    meta.write_text("{not json")
    assert VectorIndex.load(tmp_path, "s") is None
    assert VectorIndex.load(tmp_path, "missing") is None


def test_normalize_refuses_bad_vectors():
    assert np.allclose(np.linalg.norm(normalize([3.0, 4.0]), axis=1), 1)
    for bad in ([np.inf, 1.0], [], [0.0, 0.0], np.ones((2, 2, 2))):
        with pytest.raises(InvalidEmbedding):
            normalize(bad)
    with pytest.raises(InvalidEmbedding):
        normalize(np.ones(3), dim=4)


def test_single_query_runs_on_one_thread(monkeypatch):
    calls = []
    real = faiss.omp_set_num_threads
    monkeypatch.setattr(faiss, "omp_set_num_threads", lambda n: (calls.append(n), real(n)))
    before = faiss.omp_get_max_threads()
    with threads_for(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before and calls == [1, before]
    calls.clear()
    with threads_for(8):
        pass
    assert calls == []


def opener(catalog_url, tmp_path):
    """``Library.open`` for this test's catalog (either backend), index under tmp_path/index."""

    def open_(**kw):
        return Library.open(
            catalog_url, blobs=tmp_path / "blobs", index_dir=tmp_path / "index", **kw
        )

    return open_


def fill(lib, n, seed=0, name="s"):
    vecs = data(n, seed=seed)
    for i, v in enumerate(vecs):
        lib.add_version(f"{name}{i}", b"blob-%d-%d" % (seed, i), embeddings={"examples": v})
    return vecs


def test_library_index_rebuilds_when_stale(catalog_url, tmp_path):
    open_ = opener(catalog_url, tmp_path)
    lib = open_()
    vecs = fill(lib, 30)
    first = lib.retrieve(vecs[5], k=3)
    assert first[0].name == "s5" and first[0].score == pytest.approx(1.0, abs=1e-5)
    lib.close()
    stamp = tmp_path / "index" / "examples.json"
    index_file = tmp_path / "index" / "examples.faiss"
    assert stamp.exists() and index_file.exists()
    for damage in ("delete-stamp", "future-generation", "foreign-uid", "garbage-index"):
        if damage == "delete-stamp":
            stamp.unlink()
        elif damage == "future-generation":
            meta = json.loads(stamp.read_text())
            stamp.write_text(json.dumps({**meta, "generation": 10**6}))
        elif damage == "foreign-uid":
            meta = json.loads(stamp.read_text())
            stamp.write_text(json.dumps({**meta, "uid": "someone-else"}))
        else:
            index_file.write_bytes(b"not a faiss index")
        lib = open_()
        assert lib.retrieve(vecs[5], k=3) == first, damage
        lib.close()
        uid, generation = lib.catalog.state()
        rewritten = json.loads(stamp.read_text())
        assert (rewritten["generation"], rewritten["uid"]) == (generation, uid), damage
        assert VectorIndex.load(tmp_path / "index", "examples") is not None, damage


def test_index_catches_up_with_other_writers(catalog_url, tmp_path):
    open_ = opener(catalog_url, tmp_path)
    a, b = open_(), open_()
    vecs = fill(a, 20)
    assert a.retrieve(vecs[3], k=1)[0].name == "s3"
    new = fill(b, 5, seed=9, name="late")
    assert a.retrieve(new[2], k=1)[0].name == "late2"  # written by b, seen by a
    b.remove("s3")
    assert "s3" not in {h.name for h in a.retrieve(vecs[3], k=25)}
    a.close()
    b.close()
    c = open_()
    assert "s3" not in {h.name for h in c.retrieve(vecs[3], k=25)}
    assert c.verify().ok
    c.close()


def test_old_persisted_index_does_not_resurrect_removed(catalog_url, tmp_path):
    open_ = opener(catalog_url, tmp_path)
    lib = open_()
    vecs = fill(lib, 10)
    lib.retrieve(vecs[0], k=1)
    lib.close()  # index saved with all ten
    other = open_()
    other.remove("s0")
    other.catalog.close()  # no index work in this process
    lib = open_()
    assert "s0" not in {h.name for h in lib.retrieve(vecs[0], k=10)}
    lib.close()


def test_switches_to_hnsw_above_threshold_and_filters(catalog_url, tmp_path, monkeypatch):
    open_ = opener(catalog_url, tmp_path)
    lib = open_(params=IndexParams(threshold=40))
    vecs = fill(lib, 30)
    lib.retrieve(vecs[0], k=1)
    assert lib._fresh("examples").kind == FLAT
    more = fill(lib, 30, seed=1, name="t")
    batch = lib.retrieve(np.stack([vecs[1], more[1]]), k=2)
    assert [hits[0].name for hits in batch] == ["s1", "t1"]
    assert lib._fresh("examples").kind == HNSW
    lib.remove("t1")
    assert "t1" not in {h.name for h in lib.retrieve(more[1], k=60)}
    lib.tag("s7", "group", "g")
    assert [h.name for h in lib.retrieve(more[1], k=5, where={"group": "g"})] == ["s7"]
    hits = lib.retrieve(vecs[2], k=3, where={"name": "s*"})
    assert hits[0].name == "s2" and all(h.name.startswith("s") for h in hits)
    exact = lib.retrieve(more[3], k=4, where={"name": "t*"})
    monkeypatch.setattr(library, "EXACT_BELOW", 0)  # same filter through the ANN path
    assert [h.name for h in lib.retrieve(more[3], k=4, where={"name": "t*"})] == [
        h.name for h in exact
    ]
    with pytest.raises(InvalidEmbedding):
        lib.retrieve(np.ones(5))
    with pytest.raises(InvalidEmbedding):
        lib.retrieve(np.ones(16), space="text")
    lib.close()
