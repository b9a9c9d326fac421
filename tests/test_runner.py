"""The benchmark runner end to end on a tiny stream (8x8 digits, a nano ViT)."""

import json

import numpy as np
import pytest
import torch

import skillbank as sb
from eval import runner, streams
from eval.config import load
from eval.data import digits
from learners import TrainConfig, TrainingError

FAST = TrainConfig(epochs=6, lr=5e-3, progress=False)


@pytest.fixture(scope="module")
def stream():
    return streams.split(digits(seed=0), n_tasks=2, scenario="class", seed=0)


@pytest.fixture(scope="module")
def backbone(stream, tmp_path_factory):
    from eval.backbones import pretrain

    return pretrain(
        "vit_nano",
        stream.source,
        epochs=80,
        seed=0,
        cache_dir=tmp_path_factory.mktemp("cache"),
        img_size=8,
        num_classes=stream.n_classes,
    )


def kwargs(*names):
    return {n: {"train": FAST, "rank": 4} for n in names}


@pytest.mark.slow
def test_bench_fills_matrices_bank_results_and_plots(stream, backbone, tmp_path):
    out = tmp_path / "run"
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        res = runner.bench(
            stream,
            ["lora", "finetune", "frozen"],
            backbone=backbone,
            bank=bank,
            seeds=[0, 1],
            out=out,
            learner_kwargs=kwargs("lora", "finetune", "frozen"),
        )
        lora, finetune, frozen = res["lora"], res["finetune"], res["frozen"]
        assert lora.R.shape == (3, 2) and len(lora.runs) == 2
        # row 0 is the untrained model, the same for every learner
        np.testing.assert_allclose(lora.runs[0].R[0], frozen.runs[0].R[0])
        np.testing.assert_allclose(
            frozen.R, np.repeat(frozen.R[:1], 3, axis=0)
        )  # frozen never changes
        # skills are in the bank, tagged with the run, one per task and seed
        refs = [r for run in lora.runs for r in run.skills]
        assert len(refs) == 4 and all(bank.record(r).learner == "lora" for r in refs)
        # each banked skill carries its routing statistics (the default router needs them)
        assert set(bank.route_stats(refs)) == set(refs)
        # routing is reported and routed LoRA keeps old tasks better than sequential finetuning
        assert 0.0 <= lora.runs[0].routing[-1] <= 1.0 and lora.runs[0].routing[0] is None
        assert lora.metrics["forgetting"]["mean"] < finetune.metrics["forgetting"]["mean"]
        assert lora.metrics["acc"]["mean"] > 0.5
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["learners"]) == {"lora", "finetune", "frozen"} and doc["device"] == "cpu"
    assert (doc["router"], doc["rerank"]) == ("fused", 0)  # class-IL default
    assert len(doc["learners"]["lora"]["R"]) == 2 and doc["versions"]["torch"]
    assert doc["learners"]["lora"]["metrics"]["acc"]["std"] is not None
    for png in ("accuracy_matrix.png", "accuracy_over_time.png", "forgetting.png", "summary.png"):
        assert (out / png).stat().st_size > 1000


def test_resume_continues_an_interrupted_run(stream, backbone, tmp_path, monkeypatch):
    out, bank_dir = tmp_path / "run", tmp_path / "bank"
    calls = []
    original = runner.run_seed

    def crash_after_first_task(*a, on_task=None, **k):
        def hook(state):
            on_task(state)
            calls.append(state.done)
            if state.done == 1:
                raise KeyboardInterrupt  # the machine went away after task 1

        return original(*a, on_task=hook, **k)

    monkeypatch.setattr(runner, "run_seed", crash_after_first_task)
    with pytest.raises(KeyboardInterrupt):
        runner.run(
            stream,
            "lora",
            backbone=backbone,
            bank=bank_dir,
            seeds=[0],
            out=out,
            learner_kwargs=kwargs("lora"),
        )
    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert len(ckpt["runs"]["lora/0"]["skills"]) == 1
    monkeypatch.setattr(runner, "run_seed", original)
    trained = []
    monkeypatch.setattr(
        runner.Learner,
        "fit",
        lambda self, m, task, bank=None: (
            trained.append(task.name) or original_fit(self, m, task, bank)
        ),
    )
    res = runner.run(
        stream,
        "lora",
        backbone=backbone,
        bank=bank_dir,
        seeds=[0],
        out=out,
        resume=True,
        learner_kwargs=kwargs("lora"),
    )
    assert trained == [stream[1].name]  # task 0 was not trained again
    assert res.runs[0].R[1] == ckpt["runs"]["lora/0"]["R"][1] and len(res.runs[0].R) == 3
    with sb.SkillBank.open(bank_dir) as bank:
        assert len(bank.list()) == 2


original_fit = runner.Learner.fit


def test_bad_configuration_fails_before_training(stream, tmp_path):
    with pytest.raises(sb.ConfigError, match="unknown learner 'nope'"):
        runner.bench(stream, ["lora", "nope"], bank=tmp_path / "b")
    with pytest.raises(sb.ConfigError, match="unknown backbone"):
        runner.bench(stream, ["lora"], backbone="no_such_net", bank=tmp_path / "b")
    with pytest.raises(sb.ConfigError, match="unknown config keys"):
        load(None, stream="split-mnist", colour="red")
    with pytest.raises(sb.ConfigError, match="unknown stream"):
        load(None, stream="imagenet")
    assert not (tmp_path / "b" / "blobs").exists() or not any(
        (tmp_path / "b" / "blobs").rglob("*.*")
    )


def test_nan_loss_stops_the_task_and_writes_no_skill(stream, backbone, tmp_path):
    import copy

    model = copy.deepcopy(backbone)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = float("inf")  # the loss turns NaN at the first step
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        with pytest.raises(TrainingError, match="no skill was written"):
            runner.run(stream, "lora", backbone=model, bank=bank, learner_kwargs=kwargs("lora"))
        assert bank.list() == []
    assert (
        sb.adapter_names(model) == []
    )  # the runner trained a copy; the failed adapter is gone anyway


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text("stream: rotated-mnist\ntasks: 3\nlearners: [lora, joint]\nseeds: [1]\n")
    cfg = load(path, seeds=[4, 5])
    assert (cfg.stream, cfg.tasks, cfg.learners, cfg.seeds) == (
        "rotated-mnist",
        3,
        ["lora", "joint"],
        [4, 5],
    )
    assert cfg.source_fraction == 0.5 and cfg.learners == ["lora", "joint"]
    cfg = load(
        None, learners=["rank_selective"], learner_options={"rank_selective": {"max_kappa": 0.1}}
    )
    assert (
        runner.make_learner("rank_selective", **cfg.learner_options["rank_selective"]).max_kappa
        == 0.1
    )
    with pytest.raises(sb.ConfigError, match="not in the run"):
        load(None, learners=["lora"], learner_options={"increlora": {}})
    with pytest.raises(sb.ConfigError, match="source_fraction"):
        load(None, source_fraction=1.5)


def test_route_sends_each_row_to_the_skill_of_its_data(stream, backbone, tmp_path):
    import copy

    from learners import LoRALearner

    model = copy.deepcopy(backbone)
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        for task in list(stream)[:2]:
            skill = LoRALearner(rank=4, train=FAST).fit(model, task)
            with sb.disabled(model):
                emb = sb.example_embedding(model, task.x_train, centres=4)
            bank.add(task.name, skill, embedding=emb)
        x = torch.cat([stream[0].x_test[:20], stream[1].x_test[:20]])
        routed = sb.route(model, bank, x)
        chosen = [r.split("@")[0] for r in routed.refs]
        truth = [stream[0].name] * 20 + [stream[1].name] * 20
        assert np.mean([c == t for c, t in zip(chosen, truth, strict=True)]) > 0.8
        assert routed.logits.shape == (40, stream.n_classes)
        # each row's prediction stays within its skill's classes
        for r, row in zip(chosen, routed.logits, strict=True):
            classes = stream[0].classes if r == stream[0].name else stream[1].classes
            assert int(row.argmax()) in classes


def test_resume_of_a_learner_without_skills(stream, backbone, tmp_path):
    # frozen stores no skill per task; its checkpoint must still resume
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        learner = runner.make_learner("frozen", **kwargs("frozen")["frozen"])
        first = runner.run_seed(
            stream, learner, backbone, bank, 0, device=torch.device("cpu"), run_id="r"
        )
        partial = runner.SeedRun(
            **{
                k: list(v[:2]) if k in ("R", "R_task", "routing", "retention") else list(v[:1])
                for k, v in vars(first).items()
            }
        )
        resumed = runner.run_seed(
            stream,
            learner,
            backbone,
            bank,
            0,
            device=torch.device("cpu"),
            run_id="r",
            state=partial,
        )
        assert resumed.R == first.R and resumed.skills == ["", ""]
