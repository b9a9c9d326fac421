"""Test-time adaptation: the online loop, Source/BN-adapt/Tent, ViDA, banking, the protocol."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

import skillbank as sb
from eval import streams
from eval.backbones import create_backbone
from eval.data import digits
from eval.tta import run_stream
from learners import BNAdapt, SourceOnly, Tent, ViDA, create_method, online
from learners.tta import domain_layers, norm_affine_parameters
from learners.vida import HIGH, LOW, allot, augment, ema_update, uncertainty

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stream():
    data = digits(seed=0, source_fraction=0.3)
    return streams.corrupted(data, corruptions=["gaussian_noise", "fog"], severity=5, seed=0)


@pytest.fixture
def nano():
    torch.manual_seed(0)
    return create_backbone("vit_nano", img_size=8, num_classes=10).eval()


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def small_vida(**kw):
    return ViDA(**{"high_rank": 4, "views": 3, "source_steps": 0, "device": "cpu", **kw})


def x8(n=16, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- pure pieces


def test_allot_both_branches_and_uncertainty():
    assert allot(0.1, 0.05) == pytest.approx((0.9, 1.1))  # uncertain: lean on the high-rank adapter
    assert allot(0.01, 0.05) == pytest.approx((1.01, 0.99))  # confident: lean on the low-rank one
    assert allot(0.05, 0.05) == pytest.approx(
        (0.95, 1.05)
    )  # the threshold itself counts as uncertain
    assert allot(3.0, 0.05) == (0.0, 2.0)  # clipped: no negative scale
    same = torch.randn(1, 4, 10).expand(5, 4, 10)
    assert uncertainty(same) == 0.0
    views = torch.randn(6, 4, 10)
    assert uncertainty(views, 0.1) == pytest.approx(0.1 * float(views.var(0).mean()), rel=1e-6)


def test_ema_math():
    t, s = [torch.ones(3), torch.zeros(2)], [torch.zeros(3), torch.ones(2)]
    ema_update(t, s, 0.9)
    assert torch.allclose(t[0], torch.full((3,), 0.9)) and torch.allclose(
        t[1], torch.full((2,), 0.1)
    )


def test_augment_is_batched_and_bounded():
    x = x8(4)
    v = augment(x, 5, torch.Generator().manual_seed(0))
    assert v.shape == (20, 1, 8, 8) and 0.0 <= float(v.min()) and float(v.max()) <= 1.0
    assert not torch.equal(v[:4], v[4:8])


# --------------------------------------------------------------------------- ViDA


def test_vida_starts_as_source_and_teacher_is_ema(nano):
    src = copy.deepcopy(nano)
    x = x8()
    vida = small_vida(ema=0.9, lr=1e-2)
    vida.setup(copy.deepcopy(nano))
    assert {LOW, HIGH} <= set(sb.adapter_names(vida.model))
    layers = sb.adapter_layers(vida.model)
    assert all(
        float(layer.lora_B[n].detach().abs().sum()) == 0 for layer in layers for n in (LOW, HIGH)
    )
    assert {layer.ranks[LOW] for layer in layers} == {1} and {
        layer.ranks[HIGH] for layer in layers
    } == {4}
    before = {k: v.clone() for k, v in vida.teacher.state_dict().items()}
    with torch.no_grad():
        expected = src(x)
    logits = vida.step(x)  # B = 0: the first prediction is the source model's
    assert torch.allclose(logits, expected, atol=1e-5)
    lo, hi = vida.scales
    assert sorted([lo, hi]) == pytest.approx(
        [1 - min(vida.last_uncertainty, 1), 1 + min(vida.last_uncertainty, 1)]
    )
    student = dict(vida.model.named_parameters())
    moved = 0
    for k, p in vida.teacher.named_parameters():
        if "lora_" in k:  # teacher = 0.9 * old teacher + 0.1 * updated student
            assert torch.allclose(p, 0.9 * before[k] + 0.1 * student[k], atol=1e-6)
            moved += int(not torch.equal(p, before[k]))
        else:
            assert torch.equal(p, before[k])  # frozen backbone
    assert moved > 0


def test_vida_source_stage_and_backbone_option(nano, stream):
    src = copy.deepcopy(nano)
    vida = small_vida(source_steps=3, source_augment=0.5, train_backbone=True)
    source = replace(
        stream.source, x_train=stream.source.x_train[:128], y_train=stream.source.y_train[:128]
    )
    vida.setup(copy.deepcopy(nano), source)
    assert any(
        float(layer.lora_B[HIGH].detach().abs().sum()) > 0
        for layer in sb.adapter_layers(vida.model)
    )
    vida.step(x8())
    groups = vida.opt.param_groups
    assert [g["lr"] for g in groups] == [1e-4, 1e-5]
    assert not torch.equal(vida.model.state_dict()["head.weight"], src.state_dict()["head.weight"])


def test_domain_skill_roundtrip_and_retrieval(nano, stream, tmp_path):
    vida = small_vida(lr=1e-2, bank_skills=True)
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        run = run_stream(
            vida, nano, stream, batch_size=64, bank=bank, tags={"seed": "0", "source": "m0"}
        )
        assert len(run.skills) == 2 and all(run.skills)
        rec = bank.get(run.skills[0])
        assert rec.metadata["vida"]["ranks"] == [1, 4]
        assert rec.ranks and set(rec.ranks.values()) == {5}
        # the banked skill is a plain LoRA too: attached, it reproduces the teacher at s_l = s_h = 1
        last = bank.get(run.skills[1])
        vida._set_scales(vida._teacher_layers, (1.0, 1.0))
        plain = copy.deepcopy(nano)
        sb.attach(plain, last)
        x = stream[1].x_test[:8]
        with torch.no_grad():
            assert torch.allclose(plain(x), vida.teacher(x), atol=1e-4)
        # a later visit of domain 0 finds its skill by the batch's statistics and starts from it
        again = small_vida(retrieve=True)
        again.setup(copy.deepcopy(nano))
        hit = again.start_from_bank(bank, stream[0].x_test[:64], where={"source": "m0"})
        assert hit == run.skills[0]
        got = again.domain_skill("x")
        for site, (a, b) in got.factors.items():
            assert torch.allclose(a, rec.factors[site][0]) and torch.allclose(
                b, rec.factors[site][1], atol=1e-6
            )
        assert again.start_from_bank(bank, stream[0].x_test[:64], where={"source": "other"}) is None
        with pytest.raises(sb.ConfigError, match="not a ViDA skill"):
            again.load_skill(replace(rec, metadata={}))


def test_fit_contract_leaves_model_alone(nano, stream):
    before = copy.deepcopy(nano.state_dict())
    task = replace(stream[0], x_test=stream[0].x_test[:32], y_test=stream[0].y_test[:32])
    skill = small_vida().fit(nano, task)
    assert isinstance(skill, sb.Skill) and skill.name == task.name
    assert not sb.adapter_names(nano)
    assert all(torch.equal(v, before[k]) for k, v in nano.state_dict().items())


# --------------------------------------------------------------------------- baselines and the loop


def test_tent_updates_only_norm_affine(nano):
    tent = Tent(device="cpu", lr=1e-2)
    tent.setup(copy.deepcopy(nano))
    before = {k: v.clone() for k, v in tent.model.named_parameters()}
    tent.step(x8())
    norm_ids = {id(p) for p in norm_affine_parameters(tent.model)}
    changed = [k for k, p in tent.model.named_parameters() if not torch.equal(p, before[k])]
    assert changed and all(id(dict(tent.model.named_parameters())[k]) in norm_ids for k in changed)


def test_bn_adapt_reestimates_statistics():
    model = bn_model()
    bn = BNAdapt(device="cpu")
    bn.setup(copy.deepcopy(model))
    params = {k: v.clone() for k, v in bn.model.named_parameters()}
    mean0 = bn.model[1].running_mean.clone()
    online(bn, x8(32) * 3 + 1, batch_size=16)
    assert not torch.equal(bn.model[1].running_mean, mean0) and not bn.notes
    assert all(torch.equal(p, params[k]) for k, p in bn.model.named_parameters())


def test_bn_adapt_on_layernorm_vit_is_source_only(nano):
    x = x8()
    bn, src = BNAdapt(device="cpu"), SourceOnly(device="cpu")
    bn.setup(copy.deepcopy(nano))
    src.setup(copy.deepcopy(nano))
    assert bn.notes and "equals source-only" in bn.notes[0]
    assert torch.equal(online(bn, x), online(src, x))


def test_tent_on_batchnorm_uses_batch_statistics():
    tent = Tent(device="cpu")
    tent.setup(bn_model())
    assert tent.model[1].training and tent.model[1].running_mean is None
    tent.step(x8())


def test_online_loop_never_sees_labels(nano, stream):
    seen = []

    class Spy(SourceOnly):
        def step(self, x):
            seen.append(x)
            return super().step(x)

    spy = Spy(device="cpu")
    spy.setup(copy.deepcopy(nano))
    x = stream[0].x_test[:40]
    online(spy, x, batch_size=16)
    assert [len(b) for b in seen] == [16, 16, 8] and torch.equal(torch.cat(seen), x)
    with pytest.raises(sb.ConfigError):
        online(spy, stream[0].y_test)  # labels are not inputs
    # shuffled labels change the score, never the adaptation: ViDA ends in the same state
    small = streams.Stream(
        tuple(replace(t, x_test=t.x_test[:48], y_test=t.y_test[:48]) for t in stream),
        "tta",
        stream.n_classes,
        stream.source,
        "s",
    )
    g = torch.Generator().manual_seed(1)
    wrong = streams.Stream(
        tuple(replace(t, y_test=t.y_test[torch.randperm(48, generator=g)]) for t in small),
        "tta",
        stream.n_classes,
        stream.source,
        "s",
    )
    states = []
    for s in (small, wrong):
        v = small_vida(lr=1e-2)
        run_stream(v, nano, s, batch_size=16)
        states.append(v.teacher.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bad_inputs(nano):
    for bad in (
        {"views": 1},
        {"low_rank": 4, "high_rank": 4},
        {"ema": 1.0},
        {"lr": 0.0},
        {"high_rank": 0},
        {"targets": ()},
        {"source_steps": -1},
        {"source_augment": 2.0},
        {"reset": "yes"},
        {"reset": {"every": 0}},
        {"reset": {"max_drop": -1.0}},
        {"reset": {"sometimes": 1}},
    ):
        with pytest.raises(sb.ConfigError):
            create_method("vida", **{"high_rank": 4, "views": 3, "device": "cpu", **bad})
    with pytest.raises(sb.ConfigError, match="unknown test-time"):
        create_method("nope")
    with pytest.raises(sb.ConfigError, match="unknown options"):
        create_method("tent", rank=3)
    with pytest.raises(sb.ConfigError, match="setup"):
        online(SourceOnly(), x8())
    with pytest.raises(sb.ConfigError, match="batch_size"):
        s = SourceOnly(device="cpu")
        s.setup(copy.deepcopy(nano))
        online(s, x8(), batch_size=0)
    with pytest.raises(sb.ConfigError):
        small_vida(targets=("nothing.here",)).setup(copy.deepcopy(nano))
    with pytest.raises(sb.ConfigError):
        small_vida(high_rank=64).setup(copy.deepcopy(nano))  # rank above the 32-wide embedding
    with pytest.raises(sb.ConfigError):
        Tent(device="cpu").setup("not a model")


# --------------------------------------------------------------------------- the protocol


def test_bench_protocol_small(tmp_path, monkeypatch, stream):
    import eval.config as config
    from eval.config import BenchConfig
    from eval.tta import bench_protocol

    small = streams.Stream(
        tuple(replace(t, x_test=t.x_test[:64], y_test=t.y_test[:64]) for t in stream),
        "tta",
        stream.n_classes,
        stream.source,
        "tiny",
    )
    monkeypatch.setattr(config, "build_stream", lambda cfg: small)
    monkeypatch.setenv("SKILLBANK_CACHE", str(tmp_path / "cache"))
    cfg = BenchConfig(
        protocol="tta",
        backbone="vit_nano",
        pretrain_epochs=1,
        seeds=[0],
        device="cpu",
        out=str(tmp_path / "out"),
        batch_size=32,
        learners=["source", "source_stage", "bn_adapt", "tent", "vida", "tent:noreset"],
        learner_options={
            "vida": {"high_rank": 4, "views": 2, "source_steps": 2},
            "source_stage": {"high_rank": 4, "views": 2, "source_steps": 2},
            "tent:noreset": {"reset": False},
        },
    )
    doc = bench_protocol(cfg, str(tmp_path / "bank"))
    assert set(doc["methods"]) == {
        "source",
        "source_stage",
        "bn_adapt",
        "tent",
        "vida",
        "vida pass 2",
        "tent pass 2",
        "tent:noreset",
        "tent:noreset pass 2",
    }
    assert len(doc["methods"]["vida"]["errors"][0]) == 2 and "met_vida_le_tent" in doc["goals"]
    # the second pass found each domain's own skill by its statistics
    for name in ("vida", "tent"):
        assert doc["methods"][name + " pass 2"]["found"] == [[True, True]]
    assert doc["goals"]["domains_found"] == 2 and set(doc["goals"]["second_pass"]) == {
        "vida",
        "tent",
    }
    assert (tmp_path / "out" / "results.json").is_file() and (
        tmp_path / "out" / "tta_error.png"
    ).is_file()
    assert "| vida |" in (tmp_path / "out" / "table.md").read_text()
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        # one skill per domain and banking method (vida, tent, tent:noreset), with statistics
        assert len(bank.list()) == 6
        assert len(bank.route_stats()) == 6
    with pytest.raises(sb.ConfigError, match="unknown options"):
        bench_protocol(replace(cfg, learner_options={"vida": {"bogus": 1}}), None)


def test_shuffled_keeps_pairs_and_domain_order(stream):
    from eval.tta import shuffled

    s = shuffled(stream, 0)
    assert [t.name for t in s] == [t.name for t in stream]
    for a, b in zip(stream, s, strict=True):
        assert not torch.equal(a.y_test, b.y_test) and sorted(a.y_test.tolist()) == sorted(
            b.y_test.tolist()
        )
        i = int(
            (a.x_test.flatten(1) == b.x_test[0].flatten()).all(1).nonzero()[0]
        )  # pairs stay together
        assert a.y_test[i] == b.y_test[0]
    assert all(torch.equal(a.x_test, b.x_test) for a, b in zip(s, shuffled(stream, 0), strict=True))


# --------------------------------------------------------------------------- source stage, guard, bad input


def trained_resnet():
    """resnet_micro with the look of a trained one: timm zero-initialises each block's
    last BN scale (no gradient reaches the block's convolutions then) and its running
    statistics start at 0 / 1."""
    model = create_backbone("resnet_micro", img_size=8, num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
            m.running_mean = 0.1 * torch.randn(m.running_mean.shape, generator=g)
            m.running_var = 0.5 + torch.rand(m.running_var.shape, generator=g)
    return model


@pytest.mark.parametrize("allot", [False, True])
def test_source_stage_leaves_the_backbone_bit_identical(stream, allot):
    """The adapters train on the source data; every backbone weight and batch-norm
    statistic stays exactly as it was (also when the stage sets the scales per batch
    by the allotment, which then go back to 1)."""
    model = trained_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    source = replace(
        stream.source, x_train=stream.source.x_train[:128], y_train=stream.source.y_train[:128]
    )
    stage = create_method(
        "source_stage",
        high_rank=4,
        views=2,
        source_steps=4,
        source_augment=0.5,
        source_allot=allot,
        threshold=0.0,  # every batch uncertain: the scales swing to (1 - U, 1 + U)
        device="cpu",
    )
    stage.setup(copy.deepcopy(model), source)
    for layer in sb.adapter_layers(stage.teacher):
        assert dict(layer.active) == {LOW: 1.0, HIGH: 1.0}
    layers = sb.adapter_layers(stage.teacher)
    assert [layer.path for layer in layers][:2] == ["layer1.0.conv1", "layer1.0.conv2"]
    assert any(float(layer.lora_B[HIGH].detach().abs().sum()) > 0 for layer in layers)
    after = stage.teacher.state_dict()
    adapted = {layer.path for layer in layers}
    for k, v in before.items():
        site, _, leaf = k.rpartition(".")
        got = after[f"{site}.base.{leaf}" if site in adapted else k]
        assert torch.equal(got, v), k


def test_source_stage_row_keeps_source_statistics(stream):
    model = trained_resnet()
    stage = create_method("source_stage", high_rank=4, views=2, source_steps=0, device="cpu")
    stage.setup(copy.deepcopy(model))
    x = x8(32)
    with torch.no_grad():
        assert torch.allclose(stage.step(x), model(x), atol=1e-5)  # B = 0, eval-mode BN


class _Collapsing(SourceOnly):
    """A stand-in for a method that drifts: each step adds to one class's bias."""

    name = "collapsing"

    def step(self, x):
        self.check_batch(x)
        with torch.no_grad():
            self.model[-1].bias[3] += 5.0
            return self.model(x)


def test_reset_guard_restores_the_exact_state_after_collapse():
    from learners.tta import ResetGuard

    model = bn_model()
    method = _Collapsing(device="cpu")
    method.setup(copy.deepcopy(model))
    guard = ResetGuard(max_drop=0.1, window=2).attach(method)
    start = {k: v.clone() for k, v in method.model.state_dict().items()}
    preds = online(method, x8(16 * 8), batch_size=16, guard=guard)
    assert len(preds) == 128 and guard.resets and "diversity" in guard.resets[0][1]
    # right after a reset the state is the one right after setup, bit for bit
    fresh = _Collapsing(device="cpu")
    fresh.setup(copy.deepcopy(model))
    guard2 = ResetGuard(max_drop=0.1, window=2).attach(fresh)
    for xb in x8(16 * 3).split(16):
        logits = fresh.step(xb)
        if guard2.after_batch(xb, logits):
            assert all(torch.equal(v, start[k]) for k, v in fresh.model.state_dict().items())
            break
    else:
        pytest.fail("the collapse was never caught")
    # a method that does not adapt is never reset (the reference is its own start)
    steady = SourceOnly(device="cpu")
    steady.setup(copy.deepcopy(model))
    quiet = ResetGuard().attach(steady)
    online(steady, x8(16 * 6), batch_size=16, guard=quiet)
    assert quiet.resets == []


def test_periodic_reset_restores_tent_and_its_optimizer():
    from learners.tta import ResetGuard

    model = bn_model()
    tent = Tent(device="cpu", lr=0.05)
    tent.setup(copy.deepcopy(model))
    start = tent.state()
    guard = ResetGuard(every=3, max_drop=None).attach(tent)
    for xb in x8(16 * 3, seed=1).split(16):
        logits = tent.step(xb)
        reason = guard.after_batch(xb, logits)
    assert reason and reason.startswith("periodic") and guard.resets == [(2, reason)]
    assert tent.opt is None  # the optimizer starts afresh
    now = tent.state()["model"]
    assert all(torch.equal(now[k], v) for k, v in start["model"].items())


def test_retrieval_finds_a_domain_from_its_statistics(tmp_path):
    """Two domains a small brightness shift apart: each batch finds its own domain."""
    from skillbank.routers import StatsRouter

    model = create_backbone("vit_nano", img_size=8, num_classes=10).eval()
    vida = small_vida()
    vida.setup(copy.deepcopy(model))
    a = x8(256, seed=3) * 0.8
    b = (a + 0.15).clamp(0, 1)
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        refs = {}
        for name, x in (("a", a), ("b", b)):
            refs[name] = str(
                bank.add(
                    f"dom-{name}",
                    vida.domain_skill(f"dom-{name}"),
                    embedding=vida.domain_embedding(x),
                    stats=vida.domain_stats(x),
                    learner="vida",
                    embed_text=False,
                )
            )
        fresh_a, fresh_b = x8(64, seed=9) * 0.8, (x8(64, seed=9) * 0.8 + 0.15).clamp(0, 1)
        assert vida.start_from_bank(bank, fresh_a) == refs["a"]
        assert vida.start_from_bank(bank, fresh_b) == refs["b"]
        layers = domain_layers(model)
        assert layers == ("blocks.0",)
        got, scores = StatsRouter(bank, layers=layers).rank_batch(
            sb.route_stats.route_features(model, fresh_b, layers=layers)[1], k=2
        )
        assert got == [refs["b"], refs["a"]] and scores[0] > scores[1]
        assert vida.start_from_bank(bank, fresh_a, where={"learner": "none"}) is None


@pytest.mark.parametrize("name", ["bn_adapt", "tent", "vida"])
def test_a_batch_of_one_or_of_nan_is_refused_and_changes_nothing(name):
    model = bn_model()
    opts = (
        {"high_rank": 3, "views": 2, "source_steps": 0, "targets": ("0",)} if name == "vida" else {}
    )
    method = create_method(name, device="cpu", **opts)
    method.setup(copy.deepcopy(model))
    method.step(x8(8))  # one good batch first (optimizer state exists)
    state = method.state()
    bad_nan = x8(8)
    bad_nan[2, 0, 1, 1] = float("nan")
    for bad, match in ((x8(1), "at least 2"), (bad_nan, "NaN")):
        with pytest.raises(sb.ConfigError, match=match):
            method.step(bad)
        now = method.state()
        for part, tensors in state.items():
            assert all(torch.equal(now[part][k], v) for k, v in tensors.items())
    # a single leftover image joins the batch before it: every image is predicted
    assert len(online(method, x8(17), batch_size=8)) == 17


def test_a_bank_filled_by_another_backbone_is_refused_up_front(tmp_path, stream):
    from eval.tta import check_bank_fits

    vit = create_backbone("vit_nano", img_size=8, num_classes=10).eval()
    resnet = create_backbone("resnet_micro", img_size=8, num_classes=10).eval()
    x = stream.source.x_test[:8]
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        check_bank_fits(bank, vit, x)  # an empty bank takes any backbone
        vida = small_vida()
        vida.setup(copy.deepcopy(vit))
        bank.add(
            "d",
            vida.domain_skill("d"),
            embedding=vida.domain_embedding(x),
            stats=vida.domain_stats(x),
            embed_text=False,
        )
        check_bank_fits(bank, vit, x)
        with pytest.raises(sb.ConfigError, match="its own bank"):
            check_bank_fits(bank, resnet, x)


def test_retrieval_passes_over_skills_that_do_not_fit(tmp_path):
    model = create_backbone("vit_nano", img_size=8, num_classes=10).eval()
    x = x8(64, seed=5)
    other = small_vida(high_rank=3)
    other.setup(copy.deepcopy(model))
    mine = small_vida()
    mine.setup(copy.deepcopy(model))
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        kw = dict(embedding=mine.domain_embedding(x), stats=mine.domain_stats(x), learner="vida")
        bank.add("rank-3", other.domain_skill("rank-3"), embed_text=False, **kw)
        assert mine.start_from_bank(bank, x) is None  # the only skill has other ranks
        ref = str(bank.add("rank-4", mine.domain_skill("rank-4"), embed_text=False, **kw))
        assert mine.start_from_bank(bank, x) == ref


def test_tent_domain_skill_round_trips_through_the_bank_and_is_found_again(tmp_path):
    """Tent's skill is its norm layers' affine parameters: banked after a domain, a
    fresh Tent that finds it starts exactly where the first one ended."""
    model = bn_model()
    dark, light = x8(64, seed=1) * 0.3, (x8(64, seed=2) * 0.3 + 0.6)
    first = Tent(device="cpu", lr=0.05)
    first.setup(copy.deepcopy(model))
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        refs = {}
        for name, x in (("dark", dark), ("light", light)):
            for xb in x.split(16):
                first.step(xb)
            skill = first.domain_skill(f"tent-{name}")
            assert not skill.factors and set(skill.extras) == {"1.weight", "1.bias"}
            refs[name] = str(
                bank.add(
                    f"tent-{name}",
                    skill,
                    embedding=first.domain_embedding(x),
                    stats=first.domain_stats(x),
                    learner="tent",
                    embed_text=False,
                )
            )
        end = {k: v.clone() for k, v in first.model.state_dict().items()}
        again = Tent(device="cpu", lr=0.05)
        again.setup(copy.deepcopy(model))
        assert not torch.equal(again.model.state_dict()["1.weight"], end["1.weight"])
        assert again.start_from_bank(bank, x8(32, seed=7) * 0.3 + 0.6) == refs["light"]
        now = again.model.state_dict()
        assert all(torch.equal(now[k], v) for k, v in end.items())
        assert again.opt is None  # a fresh optimizer
        assert again.start_from_bank(bank, x8(32, seed=8) * 0.3) == refs["dark"]
        # a ViDA skill (low-rank factors, no norm parameters) is not Tent's to load
        with pytest.raises(sb.ConfigError, match="not a Tent skill"):
            vida = small_vida(high_rank=3, targets=("0",))
            vida.setup(copy.deepcopy(model))
            again.load_skill(vida.domain_skill("v"))
        skill = bank.get(refs["dark"])  # as if banked from a model with 5 channels there
        skill.fingerprint.modules["1"] = replace(skill.fingerprint.modules["1"], shape=(5,))
        with pytest.raises(sb.BaseMismatch, match="does not fit"):
            again.load_skill(skill)


def test_methods_without_domain_state_have_no_domain_skill():
    for name in ("source", "bn_adapt"):
        method = create_method(name, device="cpu")
        method.setup(bn_model())
        assert not method.bank_skills
        with pytest.raises(sb.ConfigError, match="learns nothing per domain"):
            method.domain_skill("x")


def test_second_pass_counts_as_lower_only_on_every_seed():
    from eval.tta import PASS2, goals

    def row(errors, found=None):
        err = np.asarray(errors)
        doc = {
            "mean_error": {"mean": float(err.mean())},
            "error_per_domain": {"mean": err.mean(0).tolist()},
            "errors": err.tolist(),
        }
        if found is not None:
            doc |= {"found": found, "domains_found": {"mean": float(np.mean(np.sum(found, 1)))}}
        return doc

    all_found = [[True] * 2] * 2
    methods = {
        "source": row([[0.5, 0.5], [0.5, 0.5]]),
        "tent": row([[0.3, 0.3], [0.3, 0.3]]),
        "tent" + PASS2: row([[0.2, 0.3], [0.29, 0.3]], all_found),  # lower on both seeds
        "vida": row([[0.4, 0.4], [0.4, 0.4]]),
        "vida" + PASS2: row([[0.1, 0.1], [0.41, 0.4]], all_found),  # lower mean, one seed worse
    }
    g = goals(methods)
    assert g["second_pass"]["vida"]["second_pass"] < g["second_pass"]["vida"]["first_pass"]
    assert g["second_pass_lower"] == ["tent"] and g["met_second_pass_lower"]
    del methods["tent" + PASS2]
    assert not goals(methods)["met_second_pass_lower"]
