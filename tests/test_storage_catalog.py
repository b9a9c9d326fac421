"""Catalog + Library: versions, refs, aliases, tags, filters, lineage, removal,
integrity, migrations, validation, concurrency."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from storage import Library, Ref
from storage.errors import (
    BaseMismatch,
    CorruptFile,
    InvalidEmbedding,
    InvalidName,
    MissingBlob,
    SchemaError,
    SkillNotFound,
)
from storage.models import Base
from storage.names import parse_ref
from storage.session import alembic_config, head_revision, make_engine, schema_revision

BASE = {"arch": "vit_tiny", "shapes": {"qkv": [192, 576]}}


@pytest.fixture
def lib(catalog_url, tmp_path):
    """A library on each backend (SQLite and PostgreSQL, see conftest)."""
    library = Library.open(catalog_url, blobs=tmp_path / "blobs")
    yield library
    library.close()


def add(lib, name, seed=0, **kw):
    rng = np.random.default_rng(seed)
    kw.setdefault("base", BASE)
    kw.setdefault("embeddings", {"examples": rng.normal(size=8)})
    return lib.add_version(name, f"{name}-{seed}".encode() + rng.bytes(16), **kw)


def counts(lib):
    with lib.catalog.engine.connect() as c:
        tables = ["skills", "versions", "tags", "embeddings", "spaces", "version_parents"]
        return {t: c.exec_driver_sql(f"select count(*) from {t}").scalar() for t in tables}


def test_version_numbers_and_refs(lib):
    refs = [add(lib, "mnist", seed=i) for i in range(3)]
    assert [str(r) for r in refs] == ["mnist@1", "mnist@2", "mnist@3"]
    assert lib.get("mnist").version == 3
    assert lib.get("mnist@latest").version == 3
    assert lib.get("mnist@2").version == 2
    assert lib.get(Ref("mnist", 1)).ref == Ref("mnist", 1)
    rec = lib.get("mnist@2")
    assert lib.read("mnist@2") == lib.blobs.get(rec.digest)
    assert rec.spaces == ("examples",) and rec.base == BASE and rec.base_id


def test_parse_ref():
    assert parse_ref("a") == ("a", None)
    assert parse_ref("a@12") == ("a", 12)
    assert parse_ref("a@prod") == ("a", "prod")
    for bad in ["@1", "a@", "a@0", "a@b@c", ""]:
        with pytest.raises(InvalidName):
            parse_ref(bad)


def test_not_found_suggests_close_names(lib):
    add(lib, "mnist-rot90")
    with pytest.raises(SkillNotFound, match="mnist-rot90"):
        lib.get("mnist-rot9")
    with pytest.raises(SkillNotFound, match=r"versions \[1\]"):
        lib.get("mnist-rot90@7")
    with pytest.raises(SkillNotFound):
        lib.get("mnist-rot90@prod")


def test_aliases_move_and_drop(lib):
    for i in range(3):
        add(lib, "a", seed=i)
    assert lib.alias("a@1", "prod") == Ref("a", 1)
    assert lib.get("a@prod").version == 1
    lib.alias("a@3", "prod")
    assert lib.get("a@prod").version == 3
    assert lib.get("a@3").aliases == ("prod",) and lib.get("a@1").aliases == ()
    assert lib.unalias("a", "prod") == Ref("a", 3)
    with pytest.raises(SkillNotFound):
        lib.get("a@prod")
    for bad in ["12", "latest", "x@y", ""]:
        with pytest.raises(InvalidName):
            lib.alias("a@1", bad)


def test_tags_and_list_filters(lib):
    add(lib, "digits-a", 0, tags={"team": "vision"}, learner="lora", description="Rotated digits")
    add(lib, "digits-a", 1, tags={"team": "vision"}, learner="psec")
    add(lib, "digits-b", 2, tags={"team": "audio"}, learner="lora")
    add(lib, "other", 3, learner="lora", base={"arch": "resnet"})
    lib.tag("other@1", "team", "vision")
    lib.tag("other@1", "stage", "prod")
    assert lib.get("other").tags == {"stage": "prod", "team": "vision"}
    lib.untag("other", "stage")
    assert lib.get("other").tags == {"team": "vision"}

    def names(**kw):
        return sorted(str(r.ref) for r in lib.list(**kw))

    assert names() == ["digits-a@2", "digits-b@1", "other@1"]
    assert names(latest_only=False) == ["digits-a@1", "digits-a@2", "digits-b@1", "other@1"]
    assert names(name="digits") == ["digits-a@2", "digits-b@1"]
    assert names(name="digits-?") == ["digits-a@2", "digits-b@1"]
    assert names(name="*-b") == ["digits-b@1"]
    assert names(tags={"team": "vision"}) == ["digits-a@2", "other@1"]
    assert names(learner="lora") == ["digits-a@1", "digits-b@1", "other@1"]
    assert names(learner="lora", tags={"team": "vision"}) == ["digits-a@1", "other@1"]
    assert names(base_id=lib.get("other").base_id) == ["other@1"]
    assert names(text="rotated") == ["digits-a@1"]
    ordered = [str(r.ref) for r in lib.list(sort="name", desc=False)]
    assert ordered == ["digits-a@2", "digits-b@1", "other@1"]
    assert [str(r.ref) for r in lib.list(limit=1)] == ["other@1"]  # newest first
    assert [r.version for r in lib.versions("digits-a")] == [1, 2]


def test_lineage_breadth_first(lib):
    add(lib, "root")
    add(lib, "left", parents=["root"])
    add(lib, "right", parents=["root@1"])
    add(lib, "merged", parents=["left", "right"])
    assert lib.get("merged").parents == (Ref("left", 1), Ref("right", 1))
    assert lib.lineage("merged") == [Ref("left", 1), Ref("right", 1), Ref("root", 1)]
    with pytest.raises(SkillNotFound):
        add(lib, "orphan", parents=["nope"])


def test_remove_drops_aliases_embeddings_and_retrieval(lib):
    vec = np.ones(8)
    add(lib, "x", 0, embeddings={"examples": vec})
    add(lib, "x", 1, embeddings={"examples": -vec})
    add(lib, "y", 2)
    lib.alias("x@1", "prod")
    assert lib.retrieve(vec, k=1)[0].name == "x"  # builds the index before removal
    assert lib.remove("x@prod") == [Ref("x", 1)]
    with pytest.raises(SkillNotFound):
        lib.get("x@prod")
    hits = lib.retrieve(vec, k=10)
    assert Ref("x", 1) not in [h.ref for h in hits] and len(hits) == 2
    assert str(add(lib, "x", 3)) == "x@3"  # numbers are never reused
    assert lib.remove("x") == [Ref("x", 2), Ref("x", 3)]
    assert [h.name for h in lib.retrieve(vec, k=10)] == ["y"]
    with pytest.raises(SkillNotFound):
        lib.versions("x")
    assert counts(lib)["embeddings"] == 1 and lib.verify().ok


def test_blob_corruption_detected_on_read_and_verify(lib):
    add(lib, "a", 0)
    add(lib, "b", 1)
    digest = lib.get("a").digest
    path = lib.blobs.path(digest)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    with pytest.raises(CorruptFile, match=digest):
        lib.read("a")
    assert lib.read("b")
    report = lib.verify()
    assert report.corrupt_blobs == (digest,) and not report.ok
    lib.blobs.path(lib.get("b").digest).unlink()  # behind the bank's back
    with pytest.raises(MissingBlob):
        lib.read("b")
    assert lib.verify().missing_blobs == (lib.get("b").digest,)


def test_gc_removes_only_orphans(lib):
    add(lib, "a", 0)
    add(lib, "a", 1)
    gone = lib.get("a@1").digest
    lib.remove("a@1")
    assert lib.verify().orphan_blobs == (gone,) and lib.verify().ok
    assert lib.gc(dry_run=True, min_age=0) == [gone] and lib.blobs.exists(gone)
    assert lib.gc(min_age=0) == [gone]
    assert not lib.blobs.exists(gone) and lib.read("a@2")
    assert lib.gc(min_age=0) == []


def test_migrations_match_models_and_downgrade(catalog_url, tmp_path):
    blobs = tmp_path / "blobs"
    Library.open(catalog_url, blobs=blobs).close()
    engine = make_engine(catalog_url)
    assert schema_revision(engine) == head_revision() == "0002"
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
    engine.dispose()
    lib = Library.open(catalog_url, blobs=blobs)  # upgrades again
    assert str(add(lib, "again")) == "again@1"
    lib.close()


def test_newer_schema_is_refused(catalog_url, tmp_path):
    Library.open(catalog_url, blobs=tmp_path / "blobs").close()
    engine = make_engine(catalog_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("update alembic_version set version_num = '9999_future'")
    engine.dispose()
    with pytest.raises(SchemaError, match="9999_future is newer than this skillbank"):
        Library.open(catalog_url, blobs=tmp_path / "blobs")


@pytest.mark.parametrize(
    "name", ["", "a/b", "a\\b", "a@b", "tab\tname", "nl\nname", " pad", "x" * 201, ".."]
)
def test_invalid_names_write_nothing(lib, name):
    with pytest.raises(InvalidName):
        add(lib, name)
    assert set(counts(lib).values()) == {0} and list(lib.blobs.digests()) == []


@pytest.mark.parametrize(
    "emb",
    [np.array([1.0, np.nan] * 4), np.zeros((0, 8)), np.ones(5), np.zeros(8), np.ones((2, 2, 2))],
)
def test_invalid_embeddings_write_nothing(lib, emb):
    add(lib, "ok")
    before = counts(lib)
    with pytest.raises(InvalidEmbedding):
        add(lib, "bad", embeddings={"examples": emb})
    assert counts(lib) == before and len(list(lib.blobs.digests())) == 1


def test_base_mismatch(lib):
    add(lib, "a")
    with pytest.raises(BaseMismatch):
        add(lib, "a", 1, base={"arch": "resnet"})
    assert [r.version for r in lib.versions("a")] == [1]
    add(lib, "a", 1, base={"arch": "resnet"}, allow_base_change=True)
    assert lib.get("a").base == {"arch": "resnet"}


def test_sql_looking_strings_stored_literally(lib):
    evil = "x'); DROP TABLE versions; --"
    add(lib, evil, tags={"k": "' OR 1=1 --"}, description="%_\\")
    add(lib, "plain")
    assert lib.get(evil).name == evil
    assert [r.name for r in lib.list(name=evil)] == [evil]
    assert [r.name for r in lib.list(tags={"k": "' OR 1=1 --"})] == [evil]
    assert [r.name for r in lib.list(text="%_")] == [evil]  # wildcards are escaped
    assert lib.list(name="%") == []
    assert counts(lib)["versions"] == 2


def _writer(url: str, blobs: str, worker: int, n: int) -> None:
    lib = Library.open(url, blobs=blobs)
    for i in range(n):
        add(lib, "shared", seed=worker * 1000 + i)
    lib.close()


def test_concurrent_writers_number_without_gaps(catalog_url, tmp_path):
    blobs = str(tmp_path / "blobs")
    Library.open(catalog_url, blobs=blobs).close()
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    procs = [ctx.Process(target=_writer, args=(catalog_url, blobs, w, 10)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    lib = Library.open(catalog_url, blobs=blobs)
    assert [r.version for r in lib.versions("shared")] == list(range(1, 41))
    assert len({r.digest for r in lib.versions("shared")}) == 40
    assert lib.verify().ok
    assert len(lib.retrieve(np.ones(8), k=50)) == 40
    lib.close()


def test_storage_imports_nothing_from_above():
    import subprocess
    import sys

    code = (
        "import sys, storage.library, storage.catalog, storage.index, storage.blobs\n"
        "bad = [m for m in ('torch', 'skillbank', 'learners', 'eval') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
