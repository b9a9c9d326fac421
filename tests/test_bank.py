"""SkillBank: skills in, skills out, found by vector, text or examples."""

import copy

import numpy as np
import pytest
import torch
from helpers import make_skill, tiny_vit

import skillbank as sb


@pytest.fixture
def embedded(tmp_path):
    """The default embedded bank: ``skills/catalog.db`` + ``blobs/`` + ``index/``."""
    with sb.SkillBank.open(tmp_path / "skills") as b:
        yield b


@pytest.fixture
def bank(catalog_url, tmp_path):
    """A bank on each catalog backend (SQLite and PostgreSQL, see conftest)."""
    with sb.SkillBank.open(catalog_url, blobs=tmp_path / "blobs") as b:
        yield b


def test_embedded_layout_and_roundtrip(vit, embedded, tmp_path, x28):
    bank = embedded
    model, skill = make_skill(vit, "digits", 0)
    ref = bank.add(
        "digits", skill, embedding=np.ones(8), metrics={"acc": 0.9}, tags={"stage": "dev"}
    )
    assert (ref.name, ref.version) == ("digits", 1)
    assert (tmp_path / "skills" / "catalog.db").is_file() and (
        tmp_path / "skills" / "blobs"
    ).is_dir()
    back = bank.get("digits@1")
    fresh = copy.deepcopy(vit)
    sb.attach(fresh, back)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x28), model(x28), atol=1e-5, rtol=1e-5)
    rec = bank.record("digits")
    assert rec.metrics == {"acc": 0.9} and rec.tags == {"stage": "dev"} and rec.ranks == skill.ranks


def test_versions_aliases_and_lineage(vit, bank):
    _, s1 = make_skill(vit, "a", 1)
    _, s2 = make_skill(vit, "a", 2)
    assert str(bank.add("a", s1)) == "a@1" and str(bank.add("a", s2)) == "a@2"
    bank.alias("a@1", "prod")
    assert bank.get("a@prod").metadata["ref"] == "a@1" and bank.get("a").metadata["ref"] == "a@2"
    merged = bank.compose(["a@1", "a@prod", "a@2"], weights=[0.2, 0.3, 0.5], method="cat")
    ref = bank.add("mix", merged)
    assert {str(r) for r in bank.lineage(str(ref))} == {"a@1", "a@2"}
    with pytest.raises(sb.SkillNotFound, match="a"):
        bank.get("aa")


def test_add_refuses_other_base_unless_told(vit, bank):

    _, s1 = make_skill(vit, "x", 1)
    other = tiny_vit(mlp_ratio=2.0)
    _, s2 = make_skill(other, "x", 2)
    bank.add("x", s1)
    with pytest.raises(sb.BaseMismatch):
        bank.add("x", s2)
    assert [v.version for v in bank.versions("x")] == [1]
    assert bank.add("x", s2, allow_base_change=True).version == 2


def test_retrieve_by_vector_examples_and_text(vit, bank):
    rng = np.random.default_rng(0)
    centres = {f"s{i}": rng.normal(size=16) for i in range(4)}
    for i, (name, c) in enumerate(centres.items()):
        _, skill = make_skill(vit, name, i, rank=2)
        bank.add(name, skill, embedding=c, description=f"skill number {i}", embed_text=False)
    hits = bank.retrieve(centres["s2"] + 0.01 * rng.normal(size=16), k=2)
    assert hits[0].name == "s2" and hits[0].score > hits[1].score
    batch = bank.retrieve(np.stack([centres["s0"], centres["s3"]]), k=1)
    assert [h[0].name for h in batch] == ["s0", "s3"]
    # examples + model: the query is the mean pooled feature of the batch
    x = torch.randn(5, 1, 28, 28)
    emb = sb.example_embedding(vit, x, centres=2)
    assert emb.shape == (3, 48) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    _, skill = make_skill(vit, "ex", 9, rank=2)
    bank.add("ex", skill, embedding={"feat": emb})
    assert bank.retrieve(x, k=1, model=vit, space="feat")[0].name == "ex"
    # text through a user-supplied embedder (the MiniLM default is tested separately)
    vocab = ["rotated", "permuted", "noisy"]
    bank.text_embedder = sb.TextEmbedder(
        lambda texts: np.array([[w in t for w in vocab] for t in texts], float) + 0.1
    )
    for word in vocab:
        _, skill = make_skill(vit, word, 3, rank=2)
        bank.add(word, skill, description=f"digits, {word}")
    assert bank.retrieve("something noisy", k=1)[0].name == "noisy"


def test_text_retrieval_with_offline_minilm(vit, embedded):
    bank = embedded
    descriptions = {
        "rot": "handwritten digits rotated by ninety degrees",
        "noise": "images corrupted with heavy gaussian noise",
        "perm": "pixels shuffled by a fixed random permutation",
    }
    for name, text in descriptions.items():
        _, skill = make_skill(vit, name, 1, rank=2)
        bank.add(name, skill, description=text, embed_text=True)
    assert bank.retrieve("digits turned sideways (rotation)", k=1)[0].name == "rot"
    assert bank.retrieve("noisy pictures", k=1)[0].name == "noise"


def test_removed_versions_never_return_and_blob_tampering_is_caught(vit, bank, tmp_path):
    _, s1 = make_skill(vit, "gone", 1)
    _, s2 = make_skill(vit, "kept", 2)
    bank.add("gone", s1, embedding=np.array([1.0, 0, 0]))
    bank.add("kept", s2, embedding=np.array([0.9, 0.1, 0]))
    bank.remove("gone")
    assert [h.name for h in bank.retrieve(np.array([1.0, 0, 0]), k=5)] == ["kept"]
    blob = bank.library.blobs.path(bank.record("kept").digest)
    blob.write_bytes(blob.read_bytes()[:-3] + b"xyz")
    with pytest.raises(sb.CorruptFile):
        bank.get("kept")
    assert not bank.verify().ok


def test_bad_names_and_embeddings_write_nothing(vit, bank):
    _, skill = make_skill(vit, "ok", 1)
    for bad in ("a/b", "..", "x" * 201, "tab\tname", ""):
        with pytest.raises(sb.InvalidName):
            bank.add(bad, skill)
    with pytest.raises(sb.InvalidEmbedding):
        bank.add("ok", skill, embedding=np.array([np.nan, 1.0]))
    bank.add("ok", skill, embedding=np.ones(4))
    with pytest.raises(sb.InvalidEmbedding):
        bank.add("ok2", skill, embedding=np.ones(5))  # the space has dimension 4
    sneaky = "x'); DROP TABLE versions; --"
    bank.add(sneaky, skill, embedding=np.ones(4))
    assert {r.name for r in bank.list()} == {"ok", sneaky}
