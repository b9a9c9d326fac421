"""The field's references (EWC, LwF, replay, SimpleCIL): each mechanism on a tiny model, then
each through the runner on a tiny stream."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import nano_vit, tiny_digit_split

from eval import runner
from learners import EWC, LwF, ReservoirBuffer, SimpleCIL, TrainConfig, create_learner
from learners.lwf import distillation
from skillbank.embed import features

FAST = TrainConfig(steps=3, batch_size=16, progress=False, device="cpu")


@pytest.fixture(scope="module")
def stream():
    return tiny_digit_split(40, tasks=2)  # enough to see every mechanism


@pytest.fixture
def model():
    return nano_vit()


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it(model, stream):
    ewc = EWC(train=FAST)
    assert ewc.penalty(model) is None  # nothing anchored before the first task
    ewc.fit(model, stream[0])
    assert set(ewc.fisher) == set(ewc.anchor) and all((f >= 0).all() for f in ewc.fisher.values())
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        model.head.weight.add_(0.1)
    moved = ewc.penalty(model).item()
    expected = 0.5 * ewc.ewc_lambda * 0.01 * ewc.fisher["head.weight"].sum().item()
    assert moved > 0 and moved == pytest.approx(expected, rel=1e-4)


def test_ewc_fisher_decays_online(model, stream):
    ewc = EWC(train=FAST, decay=0.5)
    ewc.fit(model, stream[0])
    first = {k: f.clone() for k, f in ewc.fisher.items()}
    from learners.ewc import fisher_diagonal

    t = stream[1]
    twin = copy.deepcopy(model)
    fresh = fisher_diagonal(twin, ewc.trainable(twin), t.x_train, t.y_train, FAST.batch_size)
    ewc.finish(model, t, "ewc")  # fold task 1's Fisher at the same weights
    torch.testing.assert_close(
        ewc.fisher["head.bias"], 0.5 * first["head.bias"] + fresh["head.bias"]
    )


def test_lwf_distils_towards_the_previous_model_on_old_classes(model, stream):
    lwf = LwF(train=FAST)
    x, y = stream[1].x_train[:8], stream[1].y_train[:8]
    assert lwf.loss_terms(model, x, y, model(x)) is None  # no teacher before the first task
    lwf.fit(model, stream[0])
    assert lwf.old_classes == stream[0].classes
    with torch.no_grad():
        teacher = model(x)[:, list(stream[0].classes)]
    torch.testing.assert_close(lwf.teacher(x), teacher)  # the target is the old model's output
    # the term vanishes when the model still agrees with the teacher, and not once it moves
    assert lwf.loss_terms(model, x, y, model(x)).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.head.weight[list(stream[0].classes)] *= 3.0
    logits = model(x)
    term = lwf.loss_terms(model, x, y, logits)
    old = list(stream[0].classes)
    assert term.item() > 0
    assert term.item() == pytest.approx(distillation(logits[:, old], teacher, 2.0).item())


def test_replay_buffer_stays_a_uniform_sample_of_the_stream():
    """Offer 10 sources of 100 examples each, in order; every source keeps ~ size/10 places."""
    counts = np.zeros(10)
    runs = 40
    for seed in range(runs):
        buf = ReservoirBuffer(size=50, seed=seed)
        for source in range(10):
            buf.add(torch.zeros(100, 1), torch.full((100,), source))
        assert len(buf) == 50
        counts += np.bincount(buf.y.numpy(), minlength=10)
    share = counts / counts.sum()
    assert np.abs(share - 0.1).max() < 0.02  # late sources do not crowd out early ones


def test_replay_appends_stored_samples_to_each_batch(model, stream):
    rep = create_learner("replay", train=FAST, memory=30)
    x, y = stream[1].x_train[:8], stream[1].y_train[:8]
    assert rep.batch_hook(x, y)[0] is x  # nothing stored before the first task ends
    rep.fit(model, stream[0])
    assert len(rep.buffer) == 30 and set(rep.buffer.y.tolist()) <= set(stream[0].classes)
    bx, by = rep.batch_hook(x, y)
    assert len(by) == 16 and torch.equal(by[:8], y)
    assert set(by[8:].tolist()) <= set(stream[0].classes)


def test_simplecil_is_the_nearest_class_mean(model, stream):
    frozen = copy.deepcopy(model)
    cil = SimpleCIL(train=FAST)
    for t in stream:
        cil.fit(model, t)
    for name, p in frozen.named_parameters():  # the backbone never trains
        if not name.startswith("head"):
            torch.testing.assert_close(dict(model.named_parameters())[name], p)
    seen = sorted({c for t in stream for c in t.classes})
    x_all = torch.cat([t.x_train for t in stream])
    y_all = torch.cat([t.y_train for t in stream])
    f = features(frozen, x_all, head="head")
    means = F.normalize(torch.stack([f[y_all == c].mean(0) for c in seen]), dim=1)
    x_test = torch.cat([t.x_test for t in stream])
    q = F.normalize(features(frozen, x_test, head="head"), dim=1)
    nearest = torch.tensor(seen)[torch.cdist(q, means).argmin(1)]
    with torch.no_grad():
        assert torch.equal(model(x_test).argmax(1), nearest)


def test_references_refuse_bad_settings():
    from skillbank import ConfigError

    for bad in (
        dict(name="ewc", tune="half"),
        dict(name="ewc", decay=2.0),
        dict(name="lwf", temperature=0.0),
        dict(name="replay", memory=0),
    ):
        with pytest.raises(ConfigError):
            create_learner(**bad)


@pytest.mark.parametrize("name", ["naive", "ewc", "lwf", "replay", "simplecil"])
def test_reference_runs_through_the_runner(model, stream, tmp_path, name):
    result = runner.bench(
        stream,
        [name],
        backbone=model,
        bank=tmp_path / "bank",
        seeds=(0,),
        device="cpu",
        learner_kwargs={name: {"train": FAST}},
    )[name]
    R = np.asarray(result.runs[0].R)
    assert R.shape == (3, 2) and ((R >= 0) & (R <= 1)).all()
    assert runner.make_learner(name).inference == "direct"


def test_lora_option_trains_one_adapter_and_leaves_the_base(model, stream):
    import skillbank as sb

    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head")}
    ewc = EWC(train=FAST, tune="lora")
    skill = ewc.fit(model, stream[0])
    assert sb.adapter_names(model) == ["ewc"] and skill.factors
    assert all(k.startswith(("head", "ewc")) or ".lora_" in k for k in ewc.anchor)
    with sb.disabled(model):
        for k, v in model.state_dict().items():
            if k in base:
                torch.testing.assert_close(v, base[k])


def test_full_tuning_skill_carries_the_whole_model(model, stream):
    skill = create_learner("naive", train=FAST).fit(model, stream[0])
    assert not skill.factors and set(skill.head) == set(model.state_dict())
    import skillbank as sb

    back = sb.Skill.from_bytes(skill.to_bytes())
    torch.testing.assert_close(back.head["head.weight"], model.head.weight.detach())


def test_report_prints_the_tables_of_results_json(model, stream, tmp_path):
    import json

    from typer.testing import CliRunner

    from cli import app

    runner.bench(
        stream,
        ["simplecil"],
        backbone=model,
        bank=tmp_path / "bank",
        seeds=(0,),
        device="cpu",
        out=tmp_path / "run",
    )
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    cli = CliRunner()
    out = cli.invoke(app, ["report", str(tmp_path / "run"), "--format", "json"])
    assert out.exit_code == 0, out.output
    assert (
        json.loads(out.output)["learners"]["simplecil"] == doc["learners"]["simplecil"]["metrics"]
    )
    md = cli.invoke(app, ["report", str(tmp_path / "run")])
    acc = doc["learners"]["simplecil"]["metrics"]["acc"]["mean"] * 100
    assert md.exit_code == 0 and f"| simplecil | {acc:.1f} ± 0.0 |" in md.output
    missing = cli.invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "no results.json" in missing.output


def test_an_interrupted_reference_run_resumes_by_starting_its_seed_over(
    model, stream, tmp_path, monkeypatch
):
    # EWC's Fisher lives in the learner, not the bank: resuming mid-stream would silently
    # drop it, so the runner re-runs the seed instead of crashing or continuing wrongly
    out, bank = tmp_path / "run", tmp_path / "bank"
    original = runner.run_seed

    def crash_after_first_task(*a, on_task=None, **k):
        def hook(state):
            on_task(state)
            if state.done == 1:
                raise KeyboardInterrupt

        return original(*a, on_task=hook, **k)

    def run(resume=False):
        return runner.bench(
            stream,
            ["ewc"],
            backbone=model,
            bank=bank,
            seeds=(0,),
            out=out,
            device="cpu",
            resume=resume,
            learner_kwargs={"ewc": {"train": FAST}},
        )["ewc"]

    monkeypatch.setattr(runner, "run_seed", crash_after_first_task)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(runner, "run_seed", original)
    trained = []
    fit = runner.Learner.fit
    monkeypatch.setattr(
        runner.Learner,
        "fit",
        lambda self, m, t, b=None: trained.append(t.name) or fit(self, m, t, b),
    )
    result = run(resume=True)
    assert trained == [t.name for t in stream]  # both tasks again, from the start
    assert np.asarray(result.runs[0].R).shape == (3, 2)
