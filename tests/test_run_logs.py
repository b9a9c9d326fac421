"""Per-task logs of the runner: tasks.csv row by row, TensorBoard and wandb sinks, clear errors."""

from __future__ import annotations

import csv
import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
from helpers import nano_vit, tiny_digit_split
from typer.testing import CliRunner

import skillbank as sb
from cli import app
from eval import logs, runner
from eval.config import BenchConfig
from eval.metrics import forgetting
from learners import TrainConfig

STEPS = TrainConfig(steps=2, batch_size=16, progress=False, device="cpu")


@pytest.fixture(scope="module")
def stream():
    return tiny_digit_split(30, tasks=2)


@pytest.fixture
def model():
    return nano_vit()


def _bench(stream, model, tmp_path, learners=("lora",), seeds=(0,), **kwargs):
    return runner.bench(
        stream,
        list(learners),
        backbone=model,
        bank=tmp_path / "bank",
        seeds=seeds,
        device="cpu",
        out=tmp_path / "out",
        learner_kwargs={n: {"train": STEPS, "rank": 2} for n in learners},
        **kwargs,
    )


def _rows(tmp_path) -> list[dict[str, str]]:
    with (tmp_path / "out" / logs.CSV_NAME).open(newline="") as f:
        return list(csv.DictReader(f))


def _fake_module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec sees it installed
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def test_tasks_csv_has_a_row_per_task_learner_and_seed_matching_the_matrix(stream, model, tmp_path):
    results = _bench(stream, model, tmp_path, learners=("lora", "frozen"), seeds=(0, 1))
    rows = _rows(tmp_path)
    assert len(rows) == 2 * 2 * len(stream)  # learners x seeds x tasks, one header
    for row in rows:
        run = results[row["learner"]].runs[int(row["seed"])]
        i = int(row["task"])
        assert row["task_name"] == stream[i - 1].name
        assert float(row["acc"]) == pytest.approx(np.mean(run.R[i][:i]))  # ACC_i
        assert [float(row[f"class_il_{j + 1}"]) for j in range(len(stream))] == pytest.approx(
            run.R[i]
        )
        assert float(row["task_il"]) == pytest.approx(np.mean(run.R_task[i][:i]))
        assert int(row["params"]) == run.params[i - 1] and row["skill"] == run.skills[i - 1]
        # the row records the run's own measured time (a copy check, not a speed claim)
        assert float(row["seconds"]) == pytest.approx(run.seconds[i - 1])
        if i == 1:
            assert row["forgetting"] == ""  # undefined with one task seen
        else:
            assert float(row["forgetting"]) == pytest.approx(forgetting(np.array(run.R)[:, :i]))
        # routed learners log their routing accuracy; direct ones leave it empty
        assert (row["routing"] != "") == (row["learner"] == "lora")
    assert {r["run_id"] for r in rows} == {_run_id(tmp_path)}


def _run_id(tmp_path) -> str:
    return json.loads((tmp_path / "out" / "results.json").read_text())["run_id"]


def test_an_interrupted_run_keeps_its_rows_and_resume_appends_the_rest(
    stream, model, tmp_path, monkeypatch
):
    real = runner._bank_skill

    def power_cut(bank, stream, learner, task, skill, model, seed, tags, index):
        if index == 1:
            raise RuntimeError("power cut")
        return real(bank, stream, learner, task, skill, model, seed, tags, index)

    monkeypatch.setattr(runner, "_bank_skill", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        _bench(stream, model, tmp_path)
    rows = _rows(tmp_path)
    assert [(r["learner"], r["task"]) for r in rows] == [("lora", "1")]

    monkeypatch.setattr(runner, "_bank_skill", real)
    _bench(stream, model, tmp_path, resume=True)
    resumed = _rows(tmp_path)  # one header, the first row kept, the second appended
    assert [r["task"] for r in resumed] == ["1", "2"]
    assert resumed[0] == rows[0] and resumed[1]["run_id"] == rows[0]["run_id"]


class FakeWriter:
    """Records what torch.utils.tensorboard.SummaryWriter would write."""

    made: list[FakeWriter] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_sink_writes_acc_forgetting_and_routing_per_learner_and_seed(
    stream, model, tmp_path, monkeypatch
):
    FakeWriter.made.clear()
    monkeypatch.setitem(sys.modules, "tensorboard", _fake_module("tensorboard"))
    monkeypatch.setitem(
        sys.modules,
        "torch.utils.tensorboard",
        _fake_module("torch.utils.tensorboard", SummaryWriter=FakeWriter),
    )
    results = _bench(stream, model, tmp_path, log=["tensorboard"])
    (writer,) = FakeWriter.made
    assert writer.log_dir == str(tmp_path / "out" / logs.TENSORBOARD_DIR) and writer.closed
    got = {(tag, step): value for tag, value, step in writer.scalars}
    R = results["lora"].runs[0].R
    assert got[("lora/seed0/acc", 1)] == pytest.approx(R[1][0])
    assert got[("lora/seed0/acc", 2)] == pytest.approx(np.mean(R[2][:2]))
    assert ("lora/seed0/forgetting", 2) in got and ("lora/seed0/forgetting", 1) not in got
    assert ("lora/seed0/routing", 1) in got
    assert not (tmp_path / "out" / logs.CSV_NAME).exists()  # only the sinks asked for


def test_wandb_sink_starts_one_run_and_logs_each_task(stream, model, tmp_path, monkeypatch):
    calls: list[tuple[str, dict]] = []
    fake = _fake_module(
        "wandb",
        init=lambda **kw: calls.append(("init", kw)),
        log=lambda values: calls.append(("log", values)),
        finish=lambda: calls.append(("finish", {})),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _bench(stream, model, tmp_path, log=["csv", "wandb"])
    assert [c[0] for c in calls] == ["init", "log", "log", "finish"]
    init = calls[0][1]
    assert init["config"]["learners"] == ["lora"] and init["name"] == _run_id(tmp_path)
    assert calls[2][1]["lora/seed0/task"] == 2
    assert calls[2][1]["lora/seed0/acc"] == pytest.approx(float(_rows(tmp_path)[1]["acc"]))


def test_wandb_receives_the_whole_config_of_a_configured_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(
        sys.modules, "wandb", _fake_module("wandb", init=lambda **kw: calls.append(kw))
    )
    cfg = BenchConfig(log=["wandb"], out=str(tmp_path))
    logs.open_loggers(cfg.log, logs.LogSetup(tmp_path, "r1", 5, config=cfg.to_dict()))
    assert calls[0]["config"] == cfg.to_dict() and calls[0]["config"]["log"] == ["wandb"]


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_asking_for_a_sink_that_is_not_installed_names_the_extra(
    name, stream, model, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(sb.ConfigError, match=rf"pip install 'skillbank\[{name}\]'"):
        _bench(stream, model, tmp_path, log=["csv", name])
    assert not (tmp_path / "bank").exists() and not (tmp_path / "out").exists()  # before any run


def test_unknown_log_names_are_refused_by_the_config_and_the_cli(tmp_path):
    with pytest.raises(sb.ConfigError, match="unknown log"):
        BenchConfig(log=["csv", "mlflow"])
    assert BenchConfig().log == ["csv"]  # on by default
    assert BenchConfig(log="csv, tensorboard").log == ["csv", "tensorboard"]
    res = CliRunner().invoke(
        app, ["--bank", str(tmp_path / "bank"), "bench", "--log", "csv,mlflow"]
    )
    assert res.exit_code != 0 and "unknown log" in res.output
