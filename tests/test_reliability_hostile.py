"""Hostile files and names: refused with a clear error, and nothing written.

Pickles are never unpickled (a payload whose ``__reduce__`` would create a
marker file never does); safetensors with absurd declared sizes are refused
before anything is allocated; names, aliases, spaces and paths cannot escape;
malformed PEFT folders, NaN weights and a mismatched base leave the catalog,
the blob store and the model as they were.
"""

from __future__ import annotations

import copy
import json
import pickle
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from helpers import tiny_skill, vector

import skillbank as sb
from skillbank import safefile

pytestmark = pytest.mark.reliability


class Plant:
    """Unpickling this creates ``path``: the test fails if that file ever appears."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def bank(catalog_url, tmp_path):
    with sb.SkillBank.open(
        catalog_url, blobs=tmp_path / "blobs", index_dir=tmp_path / "index"
    ) as b:
        b.add("kept", tiny_skill(0), embedding=vector(0))
        yield b


def state(bank: sb.SkillBank) -> tuple:
    """Everything a refused write must leave alone: rows of every table and the blob set."""
    tables = [
        "skills",
        "versions",
        "aliases",
        "tags",
        "embeddings",
        "spaces",
        "version_parents",
        "changes",
        "catalog_state",
    ]
    with bank.library.catalog.engine.connect() as conn:
        rows = {
            t: sorted(map(tuple, conn.exec_driver_sql(f"select * from {t}").all())) for t in tables
        }
    return rows, sorted(bank.library.blobs.digests())


def pickles(marker: Path, tmp_path: Path) -> dict[str, bytes]:
    """The same planted payload in every pickle flavour a file could arrive in."""
    out = {
        f"protocol{p}": pickle.dumps(Plant(marker), protocol=p)
        for p in range(pickle.HIGHEST_PROTOCOL + 1)
    }
    torch.save({"w": Plant(marker)}, tmp_path / "zip.pt")
    out["torch.save-zip"] = (tmp_path / "zip.pt").read_bytes()
    torch.save({"w": Plant(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    out["torch.save-legacy"] = (tmp_path / "legacy.pt").read_bytes()
    return out


@pytest.fixture
def no_unpickling(monkeypatch):
    """Belt and braces: any call into the unpicklers fails the test outright."""

    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    for mod, attr in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, attr, refuse)


def test_pickles_are_never_unpickled(bank, tmp_path, no_unpickling):
    marker = tmp_path / "PWNED"
    payloads = pickles(marker, tmp_path)
    before = state(bank)
    for kind, data in payloads.items():
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(data)
        with pytest.raises(sb.CorruptFile):
            sb.Skill.load(path)
        with pytest.raises(sb.CorruptFile):
            sb.Skill.from_bytes(data)
        for weights in (
            "adapter_model.bin",
            "adapter_model.safetensors",
        ):  # PEFT import, both names
            folder = tmp_path / f"peft-{kind}-{weights}"
            folder.mkdir()
            (folder / "adapter_config.json").write_text(
                json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4})
            )
            (folder / weights).write_bytes(data)
            with pytest.raises(sb.SkillbankError, match="pickle|safetensors|header"):
                sb.Skill.from_peft(folder)
    assert state(bank) == before
    # a catalog row whose blob is a pickle (digest and all) is refused on the way out
    for kind, data in payloads.items():
        ref = bank.library.add_version(f"planted-{kind.replace('.', '-')}", data)
        with pytest.raises(sb.CorruptFile):
            bank.get(str(ref))
    assert not marker.exists()


def _safetensors(header: dict | bytes, body: bytes = b"", declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + body


ABSURD = {
    "header length 2^63": _safetensors({}, declared=2**63 - 1),
    "header length past the end": _safetensors({}, declared=60 * 2**20),
    "header length 2^64-1": b"\xff" * 8 + b"{}",
    "terabyte tensor in 16 bytes": _safetensors(
        {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "shape product overflows int64": _safetensors(
        {"w": {"dtype": "F32", "shape": [2**40, 2**40, 2**40], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "negative dimension": _safetensors(
        {"w": {"dtype": "F32", "shape": [-4, -1], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "offsets past the end": _safetensors(
        {"w": {"dtype": "U8", "shape": [2**40], "data_offsets": [0, 2**40]}}, b"\0" * 16
    ),
    "offsets reversed": _safetensors(
        {"w": {"dtype": "U8", "shape": [4], "data_offsets": [12, 8]}}, b"\0" * 16
    ),
    "float shape": _safetensors(
        {"w": {"dtype": "U8", "shape": [1e300], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "unknown dtype": _safetensors(
        {"w": {"dtype": "F1024", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16
    ),
    "header is a list": _safetensors(b"[1, 2, 3]"),
    "nested 100k deep": _safetensors(b"[" * 100_000 + b"]" * 100_000),
    "header not utf-8": _safetensors(b"\xff\xfe{}"),
    "metadata not strings": _safetensors({"__metadata__": {"skillbank": {"a": 1}}}),
    "overlapping tensors": _safetensors(
        {
            "a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
            "b": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
        },
        b"\0" * 16,
    ),
    "empty file": b"",
    "seven bytes": b"\x01" * 7,
}


@pytest.mark.parametrize("kind", sorted(ABSURD))
def test_absurd_safetensors_refused_before_allocating(kind, tmp_path, monkeypatch):
    data = ABSURD[kind]
    loaded = []
    real_load = safefile._load
    monkeypatch.setattr(safefile, "_load", lambda d: loaded.append(1) or real_load(d))
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(data)
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4})
    )
    (folder / "adapter_model.safetensors").write_bytes(data)
    tracemalloc.start()
    try:
        for read in (
            lambda: sb.Skill.load(path),
            lambda: sb.Skill.from_bytes(data),
            lambda: sb.Skill.from_peft(folder),
            lambda: safefile.read_safetensors(path),
        ):
            tracemalloc.reset_peak()
            with pytest.raises(sb.CorruptFile):
                read()
            assert tracemalloc.get_traced_memory()[1] < 8 * 2**20 + 4 * len(data), (
                kind
            )  # no big allocation
    finally:
        tracemalloc.stop()
    if kind != "overlapping tensors":  # that one is refused by the safetensors parser itself
        assert not loaded, f"{kind}: reached the tensor loader"


BAD_NAMES = [
    "../x",
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "/abs",
    "a/../b",
    "..\\x",
    "C:\\x",
    "a\x00b",
    "\x00",
    "x\n",
    "tab\tname",
    " lead",
    "trail ",
    "rtl\u202eflip",
    "zero\u200bwidth",
    "x" * 201,
    "",
    "a@b",
    "name@1",
]


def test_names_aliases_and_spaces_cannot_escape(bank, tmp_path):
    skill = tiny_skill(1)
    before = state(bank)
    outside = sorted(p.name for p in tmp_path.parent.iterdir())
    for bad in BAD_NAMES:
        with pytest.raises(sb.InvalidName):
            bank.add(bad, skill, embedding=vector(1))
        with pytest.raises(sb.InvalidName):
            bank.add(
                "fine", skill, embedding={bad: vector(1)}
            )  # a space name becomes an index file name
        with pytest.raises((sb.InvalidName, sb.SkillNotFound)):
            bank.alias("kept@1", bad)
        if any(c in bad for c in "\x00\n\t\u202e\u200b") or bad != bad.strip() or not bad:
            with pytest.raises(sb.InvalidName):
                bank.tag("kept@1", bad, "v")  # tag keys are not paths, but controls are refused
        hostile = copy.copy(skill)
        hostile.name = bad  # a skill file may name itself anything; imports use that name
        with pytest.raises(sb.InvalidName):
            bank.add(hostile.name, hostile)
    assert state(bank) == before
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == outside
    assert not list(tmp_path.rglob("passwd"))
    assert {p.name for p in tmp_path.rglob("*.faiss")} <= {"examples.faiss"}


def test_nul_and_missing_paths_give_clear_errors_and_write_nothing(tmp_path):
    skill = tiny_skill(2)
    before = sorted(tmp_path.rglob("*"))
    for bad in [tmp_path / "a\x00b.safetensors", str(tmp_path) + "/\x00", "\x00"]:
        with pytest.raises(sb.SkillbankError, match="NUL|null"):
            skill.save(bad)
        with pytest.raises(sb.SkillbankError, match="NUL|null"):
            skill.to_peft(bad)
        with pytest.raises(sb.SkillbankError):
            sb.Skill.load(bad)
        with pytest.raises(sb.SkillbankError):
            sb.Skill.from_peft(bad)
    assert sorted(tmp_path.rglob("*")) == before


def _peft_folder(tmp_path: Path, name: str) -> Path:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sb.add_adapter(model, "s", sb.LoRAConfig(rank=2, targets=["0", "2"]))
    return sb.Skill.from_model(model, "s").to_peft(tmp_path / name)


BAD_CONFIGS = {
    "not json": "{'r': 2",
    "a list": [2, 4],
    "missing r": {"r": None},
    "r as string": {"r": "2"},
    "r negative": {"r": -2},
    "r zero": {"r": 0},
    "r float": {"r": 2.5},
    "r bool": {"r": True},
    "alpha as string": {"lora_alpha": "4"},
    "alpha NaN": {"lora_alpha": float("nan")},
    "alpha infinite": {"lora_alpha": float("inf")},
    "rank pattern string": {"rank_pattern": {"0": "2"}},
    "rank pattern list": {"rank_pattern": [["0", 2]]},
    "wrong peft_type": {"peft_type": "IA3"},
    "no peft_type": {"peft_type": None},
    "DoRA": {"use_dora": True},
    "trained bias": {"bias": "all"},
    "fan_in_fan_out": {"fan_in_fan_out": True},
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_malformed_peft_configs_are_refused_and_write_nothing(kind, bank, tmp_path):
    folder = _peft_folder(tmp_path, "peft")
    cfg_path = folder / "adapter_config.json"
    change = BAD_CONFIGS[kind]
    if isinstance(change, dict):
        cfg = json.loads(cfg_path.read_text())
        for key, value in change.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        cfg_path.write_text(json.dumps(cfg))
    else:
        cfg_path.write_text(change if isinstance(change, str) else json.dumps(change))
    before = state(bank)
    with pytest.raises((sb.ConfigError, sb.CorruptFile)) as err:
        bank.add("imported", sb.Skill.from_peft(folder))
    assert str(folder) in str(err.value) or "PEFT" in str(err.value), err.value  # says which file
    assert state(bank) == before


def test_nan_weights_write_nothing(bank, tmp_path):
    before = state(bank)
    skill = tiny_skill(4)
    a, b = skill.factors["2"]
    skill.factors["2"] = (a, b.clone().fill_(float("nan")))
    for bad in (skill, _with_inf_scale(tiny_skill(5))):
        with pytest.raises(sb.CorruptFile, match="NaN|Inf|finite"):
            bank.add("nan", bad, embedding=vector(4))
        with pytest.raises(sb.CorruptFile, match="NaN|Inf|finite"):
            bad.save(tmp_path / "nan.safetensors")
        with pytest.raises(sb.CorruptFile, match="NaN|Inf|finite"):
            bad.to_peft(tmp_path / "nan-peft")
        with pytest.raises(sb.CorruptFile, match="NaN|Inf|finite"):
            sb.Skill.from_bytes(bad.to_bytes())
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        snapshot = copy.deepcopy(model.state_dict())
        with pytest.raises(sb.CorruptFile, match="NaN|Inf|finite"):
            sb.attach(model, bad)
        _assert_same_model(model, snapshot)
    folder = _peft_folder(tmp_path, "peft-nan")  # NaN arriving through a PEFT import
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(sb.CorruptFile, match="NaN"):
        sb.Skill.from_peft(folder)
    assert state(bank) == before
    assert not (tmp_path / "nan.safetensors").exists() and not (tmp_path / "nan-peft").exists()
    assert not list(tmp_path.glob(".nan*"))


def _with_inf_scale(skill: sb.Skill) -> sb.Skill:
    skill.scales = {k: float("inf") for k in skill.scales}
    return skill


def _assert_same_model(model: nn.Module, snapshot: dict) -> None:
    assert sb.adapter_names(model) == [] and not sb.adapter_layers(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    state_now = model.state_dict()
    assert state_now.keys() == snapshot.keys()
    assert all(torch.equal(state_now[k], snapshot[k]) for k in snapshot)


def test_mismatched_base_is_refused_and_writes_nothing(bank):
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sb.add_adapter(other, "s", sb.LoRAConfig(rank=2, targets=["0", "2"]))
    foreign = sb.Skill.from_model(other, "s")
    before = state(bank)
    with pytest.raises(sb.BaseMismatch):
        bank.add("kept", foreign, embedding=vector(9))  # "kept" was trained on another base
    assert state(bank) == before  # no row and no blob
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(sb.BaseMismatch, match="'0'"):
        sb.attach(model, foreign)
    _assert_same_model(model, snapshot)
    renamed = copy.copy(bank.get("kept"))
    renamed.name = "../escape"
    with pytest.raises(sb.InvalidName):
        sb.attach(model, renamed)  # a skill naming itself a path is not an adapter name
    _assert_same_model(model, snapshot)


HEADER_MUTATIONS = {
    "header is a list": lambda h: [h],
    "name not a string": lambda h: {**h, "name": ["../x"]},
    "scales a list": lambda h: {**h, "scales": [1.0]},
    "scale is a string": lambda h: {**h, "scales": {k: "1" for k in h["scales"]}},
    "scale is NaN": lambda h: {**h, "scales": {k: float("nan") for k in h["scales"]}},
    "scale is a bool": lambda h: {**h, "scales": {k: True for k in h["scales"]}},
    "fingerprint garbage": lambda h: {**h, "fingerprint": {"0": 3}},
    "fingerprint a list": lambda h: {**h, "fingerprint": [1]},
    "config a string": lambda h: {**h, "config": "rank=2"},
    "metadata a list": lambda h: {**h, "metadata": [1]},
    "future format": lambda h: {**h, "format": 99},
    "missing site": lambda h: {**h, "scales": {**h["scales"], "ghost": 1.0}},
}


@pytest.mark.parametrize("kind", sorted(HEADER_MUTATIONS))
def test_malformed_skill_headers_are_refused(kind, bank):
    from safetensors.torch import load, save

    data = tiny_skill(6).to_bytes()
    tensors = load(data)
    with safefile_meta(data) as header:
        mutated = HEADER_MUTATIONS[kind](header)
    hostile = save(tensors, {"skillbank": json.dumps(mutated)})
    before = state(bank)
    with pytest.raises(sb.CorruptFile):
        sb.Skill.from_bytes(hostile)
    ref = bank.library.add_version("planted", hostile)  # even if it is in the catalog already
    with pytest.raises(sb.CorruptFile):
        bank.get(str(ref))
    bank.remove(str(ref))
    assert state(bank)[0]["versions"] == before[0]["versions"]


class safefile_meta:
    """The skillbank JSON header of a skill's bytes, as a context manager for brevity."""

    def __init__(self, data: bytes) -> None:
        _, meta = safefile.read_safetensors(data)
        self.header = json.loads(meta["skillbank"])

    def __enter__(self) -> dict:
        return self.header

    def __exit__(self, *exc: object) -> None:
        return None


def test_rotten_blob_is_rewritten_not_reused(bank):
    """Re-adding identical bytes over a corrupt copy must not commit a row on the rot."""
    skill = tiny_skill(0)  # the same bytes as "kept@1"
    digest = bank.record("kept").digest
    path = bank.library.blobs.path(digest)
    path.write_bytes(b"\0" * path.stat().st_size)  # same size, wrong bytes
    assert bank.verify().corrupt_blobs == (digest,)
    bank.add("again", skill, embedding=vector(0))
    assert bank.verify() == type(bank.verify())()
    assert bank.get("kept").factors.keys() == bank.get("again").factors.keys()
