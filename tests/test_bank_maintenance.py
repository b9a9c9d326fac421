"""SkillBank's maintenance methods (the CLI's only door to the library) and the layering rule."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import make_skill

import skillbank as sb

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def filled(vit, tmp_path):
    with sb.SkillBank.open(tmp_path / "skills") as bank:
        rng = np.random.default_rng(0)
        for i in range(3):
            _, skill = make_skill(vit, "a", i)
            bank.add("a", skill, embedding=rng.normal(size=8))
        bank.alias("a@2", "prod")
        yield bank


def test_spaces_resolve_and_garbage_size(filled):
    bank = filled
    assert bank.spaces() == {"examples": 8}
    assert [str(r) for r in bank.resolve("a")] == ["a@1", "a@2", "a@3"]
    assert [str(r) for r in bank.resolve("a@prod")] == ["a@2"]
    with pytest.raises(sb.SkillNotFound):
        bank.resolve("a@9")
    with pytest.raises(sb.InvalidName):
        bank.resolve("a/b")
    first = bank.record("a@1")
    bank.remove("a@1")
    garbage = bank.gc(dry_run=True, min_age=0)
    assert garbage == [first.digest] and bank.blob_bytes(garbage) == first.size > 0
    assert bank.blob_bytes(["0" * 64]) == 0  # a missing blob frees nothing


def test_index_build_and_info(filled):
    bank = filled
    assert bank.index_info() == {"examples": None}  # nothing searched or built yet
    built = bank.index_build("examples", "flat")
    assert (built["kind"], built["vectors"], built["pinned"]) == ("flat", 3, True)
    assert built["bytes"] > 0
    info = bank.index_info()["examples"]
    assert info["fresh"] and (info["kind"], info["ntotal"], info["pinned"]) == ("flat", 3, True)
    assert bank.index_build("examples")["pinned"]  # None keeps the pinned kind
    assert not bank.index_build("examples", "auto")["pinned"]
    with pytest.raises(sb.ConfigError, match="index kind"):
        bank.index_build("examples", "annoy")
    with pytest.raises(sb.ConfigError, match="unknown index setting"):
        bank.index_build("examples", "flat", colour=3)
    with pytest.raises(sb.ConfigError):
        bank.index_build("examples", "ivfpq", nprobe=0)
    with pytest.raises(sb.InvalidEmbedding, match="no embedding space"):
        bank.index_build("text")
    assert bank.index_dir.is_dir()


def test_db_revision_and_upgrade(tmp_path):
    fresh = tmp_path / "new"
    before, after = sb.SkillBank.db_upgrade(fresh)
    assert before is None and after
    assert sb.SkillBank.db_revision(fresh) == (after, after)
    assert sb.SkillBank.db_upgrade(fresh) == (after, after)


def test_cli_uses_only_the_public_skillbank_surface():
    """What lint-imports checks, plus the attribute the linter cannot see: ``bank.library``."""
    offenders = []
    for path in sorted((ROOT / "cli").glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"^\s*(from|import) storage\b|\.library\b", line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == []
