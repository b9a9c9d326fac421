"""The protocol driver: one registry, one run context, one run-id format for every protocol."""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

import skillbank as sb
from eval import driver, registry, streams, transfer
from eval.config import BenchConfig, execute
from eval.data import digits

RUN_ID = re.compile(r"[0-9a-f]{12}")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKILLBANK_CACHE", str(tmp_path / "cache"))


def test_registry_lists_the_three_protocols():
    assert sorted(registry.PROTOCOLS) == ["continual", "transfer", "tta"]
    for name, protocol in registry.PROTOCOLS.items():
        cfg = BenchConfig(protocol=name)  # the protocol's defaults fill the config
        assert protocol.name == name
        assert (cfg.stream, cfg.learners) == (protocol.stream, list(protocol.learners))
    assert [n for n, p in registry.PROTOCOLS.items() if p.multi_process] == ["continual"]


def test_unknown_protocol_is_a_config_error():
    message = r"unknown protocol 'nope'; choose from \['continual', 'transfer', 'tta'\]"
    with pytest.raises(sb.ConfigError, match=message):
        BenchConfig(protocol="nope")
    with pytest.raises(sb.ConfigError, match=message):
        registry.get_protocol("nope")
    with pytest.raises(sb.ConfigError, match="already registered"):
        registry.register_protocol(registry.PROTOCOLS["tta"])
    assert sorted(registry.PROTOCOLS) == ["continual", "transfer", "tta"]


def test_run_ids_have_one_format_across_protocols(tmp_path, monkeypatch, cache):
    """Each built-in protocol, tiny, through ``execute``: its run id in results.json and on
    every skill it banked is the driver's (12 hex digits)."""
    import eval.config as config

    tiny = dict(backbone="vit_nano", pretrain_epochs=1, seeds=[0], epochs=1, device="cpu")
    data = digits(seed=0, source_fraction=0.3)
    tta_stream = streams.corrupted(data, corruptions=["gaussian_noise", "fog"], severity=5, seed=0)
    tta_stream = streams.Stream(
        tuple(replace(t, x_test=t.x_test[:32], y_test=t.y_test[:32]) for t in tta_stream),
        "tta",
        tta_stream.n_classes,
        tta_stream.source,
        "tiny-tta",
    )
    monkeypatch.setattr(transfer, "mnist", lambda seed, source_fraction: data)
    configs = {
        "continual": BenchConfig(stream="split-digits", tasks=2, learners=["lora"], **tiny),
        "tta": BenchConfig(protocol="tta", learners=["source"], batch_size=16, **tiny),
        "transfer": BenchConfig(protocol="transfer", learners=["nearest"], shots=[2], **tiny),
    }
    monkeypatch.setattr(
        config,
        "build_stream",
        lambda cfg: (
            tta_stream
            if cfg.protocol == "tta"
            else streams.split(data, 2, scenario="class", seed=0)
        ),
    )
    ids = {}
    for name, cfg in configs.items():
        cfg = replace(cfg, out=str(tmp_path / name))
        execute(cfg, console=quiet(), bank=str(tmp_path / f"bank-{name}"))
        ids[name] = json.loads((tmp_path / name / "results.json").read_text())["run_id"]
        assert RUN_ID.fullmatch(ids[name]), (name, ids[name])
        with sb.SkillBank.open(tmp_path / f"bank-{name}") as bank:
            assert {r.tags["run"] for r in bank.list()} <= {ids[name]}
            assert bank.list() or name == "tta"  # tta's `source` banks nothing
    assert len(set(ids.values())) == 3  # a new id per run


def test_a_registered_protocol_runs_through_the_shared_context(tmp_path, monkeypatch):
    seen: list[dict] = []

    def run(cfg, bank, console):
        with driver.open_run(cfg, bank, console) as ctx:
            seen.append({"bank": ctx.bank, "open": ctx.bank.list() == [], "cfg": ctx.cfg})
            seeds = list(ctx.each_seed("tiny"))
            doc = {"protocol": "tiny", "run_id": ctx.run_id, "tags": [ctx.tags(s) for s in seeds]}
            ctx.write_results(doc, texts={"table.md": "| tiny |\n"})
        return doc

    monkeypatch.setattr(registry, "PROTOCOLS", dict(registry.PROTOCOLS))
    registry.register_protocol(driver.Protocol("tiny", stream="none", learners=("noop",), run=run))
    out, bank_dir = tmp_path / "out", tmp_path / "bank"
    cfg = BenchConfig(protocol="tiny", seeds=[3, 5], out=str(out), device="cpu")
    assert (cfg.stream, cfg.learners) == ("none", ["noop"])
    console = quiet()
    doc = execute(cfg, console=console, bank=str(bank_dir))
    # the bank was opened for the run (created at the location) and closed after it
    assert seen[0]["open"] and seen[0]["cfg"] is cfg and bank_dir.is_dir()
    # seeds looped in order, each announced, each tagged with the run id
    assert [t["seed"] for t in doc["tags"]] == ["3", "5"]
    assert {t["run"] for t in doc["tags"]} == {doc["run_id"]} and RUN_ID.fullmatch(doc["run_id"])
    assert "seed 3: tiny" in console.file.getvalue() and "seed 5: tiny" in console.file.getvalue()
    # results written through the one path, with no temp files left beside them
    assert json.loads((out / "results.json").read_text()) == doc
    assert (out / "table.md").read_text() == "| tiny |\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "table.md"]

    # a crash while replacing results.json leaves the previous run's file whole
    real_replace = os.replace

    def crash(src, dst, *args, **kwargs):
        if Path(dst).name == "results.json":
            raise OSError("disk full")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        execute(cfg, console=quiet(), bank=str(bank_dir))
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((out / "results.json").read_text()) == doc
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "table.md"]
    assert len(seen) == 2 and seen[1]["bank"] is not seen[0]["bank"]


def test_context_without_out_writes_nothing_and_keeps_a_given_run_id(tmp_path):
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        with driver.open_context(bank, seeds=[1], device="cpu", run_id="abc123abc123") as ctx:
            assert ctx.bank is bank and ctx.run_id == "abc123abc123"
            assert ctx.write_results({"x": 1}) is None
            with pytest.raises(sb.ConfigError, match="source split"):
                ctx.pretrained(None, 10)
        bank.list()  # a bank given open stays open
    assert not any(p.name == "results.json" for p in tmp_path.rglob("*"))
