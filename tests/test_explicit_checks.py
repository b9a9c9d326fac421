"""Input checks are explicit code, not ``assert``: they hold under ``python -O`` too,
and every refusal is a member of the SkillbankError family."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import skillbank as sb
from storage import IndexParams, Library
from storage.index import normalize

ROOT = Path(__file__).resolve().parents[1]


def _hostile_files(folder: Path) -> tuple[Path, Path]:
    """A safetensors file whose header is a JSON list, and a PEFT folder whose config is one."""
    header = b"[1, 2]"
    bad_safetensors = folder / "list-header.safetensors"
    bad_safetensors.write_bytes(len(header).to_bytes(8, "little") + header)
    peft = folder / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("[1, 2]")
    return bad_safetensors, peft


def test_hostile_files_are_refused_under_python_O(tmp_path):
    """Both checks were ``assert isinstance(..., dict)``; ``-O`` strips asserts."""
    bad_safetensors, peft = _hostile_files(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        assert False, "not reached under -O"  # proves the asserts are really gone
        import skillbank as sb
        from skillbank.safefile import read_safetensors
        for load in (lambda: read_safetensors({str(bad_safetensors)!r}),
                     lambda: sb.Skill.from_peft({str(peft)!r})):
            try:
                load()
            except sb.CorruptFile as e:
                print("CorruptFile:", e)
            else:
                sys.exit("accepted a hostile file")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-O", "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("CorruptFile:") for line in lines)
    assert "not a JSON object" in lines[0] and "adapter_config.json" in lines[1]


def test_hostile_files_are_refused_in_process(tmp_path):
    bad_safetensors, peft = _hostile_files(tmp_path)
    with pytest.raises(sb.CorruptFile, match="not a JSON object"):
        sb.Skill.load(bad_safetensors)
    with pytest.raises(sb.CorruptFile, match="not a JSON object"):
        sb.Skill.from_peft(peft)
    (peft / "adapter_config.json").write_bytes(b"[" * 100_000)  # deep enough to overflow
    with pytest.raises(sb.CorruptFile, match="not a JSON object"):
        sb.Skill.from_peft(peft)


def test_storage_value_errors_are_in_the_family(tmp_path):
    """The plain ValueErrors storage used to raise are SkillbankErrors now, still ValueErrors."""
    with pytest.raises(sb.ConfigError, match="index kind"):
        IndexParams(kind="bogus")
    with pytest.raises(sb.ConfigError, match="IVF-PQ"):
        IndexParams(nprobe=0)
    with pytest.raises(sb.ConfigError, match="needs blobs"):
        Library.open("sqlite:///" + str(tmp_path / "x.db"))
    with pytest.raises(sb.InvalidEmbedding, match="array of numbers"):
        normalize(["not", "numbers"])
    with pytest.raises(sb.InvalidEmbedding):
        normalize([[1.0, 2.0], [3.0]])  # ragged
    with Library.open(tmp_path / "bank") as lib:
        with pytest.raises(sb.ConfigError, match="sort"):
            lib.list(sort="colour")
        lib.add_version("s", b"blob", embeddings={"examples": np.ones(4)})
        with pytest.raises(sb.InvalidEmbedding):
            lib.retrieve([[1.0, 2.0], [3.0]])
    assert issubclass(sb.ConfigError, ValueError) and sb.ConfigError is sb.errors.ConfigError


def test_compose_refuses_options_its_method_does_not_take(vit):
    from helpers import make_skill

    _, a = make_skill(vit, "a", 0)
    with pytest.raises(sb.ConfigError, match="takes no option"):
        sb.compose([a, a], method="linear", density=0.5)
    assert sb.compose([a, a], method="ties", density=0.5).ranks == a.ranks


def test_no_assert_statements_outside_tests():
    offenders = []
    for package in ("cli", "skillbank", "storage"):
        for path in (ROOT / package).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.lstrip().startswith("assert "):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert offenders == []
