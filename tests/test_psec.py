"""Per-sample composition (`sb.composed`, `sb.route(k>1)`) and the PSEC learner."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from helpers import randomise

import skillbank as sb
from eval import data, transfer
from eval.backbones import create_backbone
from eval.config import BenchConfig
from learners import PSEC, LoRALearner, TrainConfig, train
from learners.psec import restore

FAST = TrainConfig(steps=30, batch_size=32, progress=False, device="cpu")


# ------------------------------------------------------------ sb.composed
def _rowwise(model, names, weights, x):
    """The reference: each row alone with its weighted active set."""
    out = []
    for i in range(len(x)):
        sb.set_active(model, names, weights=weights[i].tolist())
        out.append(model(x[i : i + 1]))
    sb.set_active(model, [])
    return torch.cat(out)


def _with_adapters(model, names, targets):
    for n in names:
        sb.add_adapter(model, n, sb.LoRAConfig(rank=2 + names.index(n), alpha=4, targets=targets))
        randomise(model, n)
    sb.set_active(model, [])
    return model


@pytest.mark.parametrize("which", ["vit", "resnet", "mha"])
def test_composed_equals_each_row_run_with_its_weights(which, vit, resnet, x28):
    names = ["a", "b", "c"]
    if which == "vit":
        model, targets, x = vit, ["qkv", "proj", "fc1"], x28
    elif which == "resnet":
        model, targets, x = resnet, ["layer1.0.conv1", "layer2.0.conv2"], x28
    else:
        torch.manual_seed(0)
        model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
        targets, x = ["self_attn"], torch.randn(6, 5, 16)
    _with_adapters(model, names, targets)
    w = torch.rand(len(x), 3) * 2 - 0.5
    with torch.no_grad():
        with sb.composed(model, names, w):
            y = model(x)
        ref = _rowwise(model, names, w, x)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=1e-4)


def test_composed_is_differentiable_in_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    _with_adapters(model, ["a", "b"], ["0", "2"])
    x = torch.randn(3, 5, dtype=torch.double)

    def f(w):
        with sb.composed(model, ["a", "b"], w):
            return model(x)

    assert torch.autograd.gradcheck(f, torch.rand(3, 2, dtype=torch.double, requires_grad=True))


def test_composed_refuses_bad_weights_and_leaves_the_model(vit, x28):
    _with_adapters(vit, ["a", "b"], ["qkv"])
    before = vit(x28)
    with pytest.raises(sb.ConfigError, match=r"shape \(rows, 2\)"):
        with sb.composed(vit, ["a", "b"], torch.ones(6, 3)):
            pass
    with pytest.raises(sb.ConfigError, match="rows"):
        with sb.composed(vit, ["a", "b"], torch.ones(5, 2)):
            vit(x28)
    with pytest.raises(sb.AdapterNotFound):
        with sb.composed(vit, ["a", "zzz"], torch.ones(6, 2)):
            pass
    torch.testing.assert_close(vit(x28), before)
    assert all(layer.mix is None for layer in sb.adapter_layers(vit))


# ----------------------------------------------------------- a tiny library
@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """vit_nano pretrained briefly on 8x8 digits; two banked skills (rotation, inversion)."""
    torch.manual_seed(0)
    digits = data.digits(seed=0, source_fraction=0.3)
    base = create_backbone("vit_nano", img_size=8)
    train(base, digits.source.x_train, digits.source.y_train, replace(FAST, steps=120, b_ratio=1.0))
    base.eval()
    bank = sb.SkillBank.open(tmp_path_factory.mktemp("psec") / "bank")
    refs = {}
    for shift in ("rot90", "invert"):
        task = replace(transfer.shifted_task(digits, (shift,), 0), name=f"digits-{shift}")
        model = copy.deepcopy(base)
        skill = LoRALearner(rank=4, train=FAST).fit(model, task)
        with sb.disabled(model):
            emb = sb.example_embedding(model, task.x_train)
        refs[shift] = str(
            bank.add(f"lib-{shift}", skill, embedding=emb, embed_text=False, tags={"role": "lib"})
        )
    target = transfer.few_shot(transfer.mixed_task(digits, ("rot90", "invert"), 1), 5, 0)
    yield base, bank, refs, target
    bank.close()


def test_compose_trains_only_the_compositor_and_reloads(setting):
    base, bank, refs, task = setting
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    skill = PSEC(mode="compose", where={"role": "lib"}, train=FAST).fit(model, task, bank)
    # the model is left as it was: no adapters, same weights
    assert sb.adapter_names(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(skill.metadata["psec"]["skills"]) == set(refs.values())
    assert any(k.startswith("compositor.") for k in skill.extras)
    # through the bank and back: the per-sample composition is rebuilt exactly
    ref = bank.add("composed", skill, embed_text=False)
    assert {str(r) for r in bank.lineage(str(ref))} >= set(refs.values())
    loaded = bank.get(str(ref))
    one, two = restore(copy.deepcopy(base), loaded, bank), restore(copy.deepcopy(base), skill, bank)
    with torch.no_grad():
        torch.testing.assert_close(one(task.x_test[:16]), two(task.x_test[:16]))
        alpha = one.alpha(task.x_test[:16])
    assert alpha.shape == (16, 2) and torch.allclose(
        alpha.sum(1), torch.ones(16)
    )  # softmax: on the simplex
    assert not torch.allclose(
        alpha, alpha[:1].expand_as(alpha)
    )  # context-aware: weights differ per sample


def test_task_context_skill_equals_its_standalone_merge(setting):
    """With the task as context alpha is constant, so the exact (cat) merge stored in the
    skill must reproduce the composition when attached alone, head included."""
    base, bank, refs, task = setting
    skill = PSEC(mode="compose", context="task", skills=tuple(refs.values()), train=FAST).fit(
        copy.deepcopy(base), task, bank
    )
    comp = restore(copy.deepcopy(base), skill, bank)
    alone = copy.deepcopy(base)
    sb.attach(alone, skill, "merged", load_head=False)
    alone.head.load_state_dict({k.split(".", 1)[1]: v for k, v in skill.head.items()})
    with torch.no_grad():
        torch.testing.assert_close(
            alone(task.x_test[:16]), comp(task.x_test[:16]), atol=1e-5, rtol=1e-4
        )


def test_expand_adds_a_new_skill_with_lineage(setting):
    base, bank, refs, task = setting
    model = copy.deepcopy(base)
    skill = PSEC(mode="expand", skills=(refs["rot90"], refs["invert"]), rank=2, train=FAST).fit(
        model, task, bank
    )
    assert sb.adapter_names(model) == []
    assert set(skill.ranks.values()) == {2}  # the new LoRA itself, not the composed skills
    assert any(b.abs().sum() > 0 for _, b in skill.factors.values())
    ref = bank.add("expanded", skill, embed_text=False)
    assert {str(r) for r in bank.lineage(str(ref))} >= set(refs.values())
    comp = restore(copy.deepcopy(base), bank.get(str(ref)), bank)
    assert comp.residual is not None and task.name in sb.adapter_names(comp.model)


def test_output_space_baseline_mixes_the_skills_outputs(setting):
    base, bank, refs, task = setting
    skill = PSEC(
        mode="compose", space="output", skills=(refs["rot90"], refs["invert"]), train=FAST
    ).fit(copy.deepcopy(base), task, bank)
    comp = restore(copy.deepcopy(base), skill, bank)
    x = task.x_test[:8]
    with torch.no_grad():
        alpha = comp.alpha(x)
        per_skill = []
        for i, name in enumerate(comp.names):
            sb.set_active(comp.model, [name])
            f = sb.features(comp.model, x, head="head")
            per_skill.append(f @ comp.head_w[i].t() + comp.head_b[i])
        sb.set_active(comp.model, [])
        expected = sum(alpha[:, i : i + 1] * per_skill[i] for i in range(len(per_skill)))
        torch.testing.assert_close(comp(x), expected, atol=1e-5, rtol=1e-4)


def test_route_k2_mixes_the_two_nearest_skills(setting):
    base, bank, refs, task = setting
    model = copy.deepcopy(base)
    x = task.x_test[:10]
    routed = sb.route(model, bank, x, k=2, where={"role": "lib"}, mask_classes=False)
    assert all(len(r) == 2 for r in routed.refs) and all(s[0] >= s[1] for s in routed.scores)
    one = sb.route(model, bank, x, k=1, where={"role": "lib"}, mask_classes=False)
    assert isinstance(one.refs[0], str)
    # row 0 by hand: adapters and heads mixed with softmax(score / 0.05) weights
    router = sb.Router(model, bank, where={"role": "lib"}, mask_classes=False)
    w = torch.softmax(torch.tensor(routed.scores[0]) / 0.05, 0)
    by_hand = router.mix(x[:1], [routed.refs[0]], w[None])
    torch.testing.assert_close(routed.logits[:1], by_hand)
    with pytest.raises(sb.ConfigError, match="k must be positive"):
        sb.route(model, bank, x, k=0)


def test_bad_psec_input_is_refused(setting):
    base, bank, refs, task = setting
    with pytest.raises(sb.ConfigError, match="mode"):
        PSEC(mode="blend")
    with pytest.raises(sb.ConfigError, match="space='parameter'"):
        PSEC(mode="expand", space="output")
    with pytest.raises(sb.ConfigError, match="bank"):
        PSEC().fit(copy.deepcopy(base), task)
    model = copy.deepcopy(base)
    with pytest.raises(sb.SkillNotFound):
        PSEC(skills=("no-such-skill",), train=FAST).fit(model, task, bank)
    assert sb.adapter_names(model) == []
    with pytest.raises(sb.ConfigError, match="not made by PSEC"):
        restore(copy.deepcopy(base), bank.get(refs["rot90"]), bank)


# --------------------------------------------------------- the protocol
def test_transfer_tasks_and_config():
    digits = data.digits(seed=0, source_fraction=0.3)
    mixed = transfer.mixed_task(digits, ("rot90", "invert"), 3)
    rot = transfer.shift("rot90", digits.x_test, 0)
    inv = transfer.shift("invert", digits.x_test, 0)
    is_rot = (mixed.x_test == rot).flatten(1).all(1)
    is_inv = (mixed.x_test == inv).flatten(1).all(1)
    assert torch.all(is_rot | is_inv) and is_rot.any() and is_inv.any()
    shots = transfer.few_shot(mixed, 3, 0)
    assert torch.equal(torch.bincount(shots.y_train), torch.full((10,), 3))
    with pytest.raises(sb.ConfigError, match="fewer than"):
        transfer.few_shot(mixed, 10_000, 0)
    cfg = BenchConfig(protocol="transfer")
    assert cfg.stream == "composite-mnist" and "compose" in cfg.learners and cfg.shots == [5, 20]
    with pytest.raises(sb.ConfigError, match="unknown transfer methods"):
        transfer.bench_protocol(
            BenchConfig(protocol="transfer", learners=["magic"]), "unused", None
        )
    with pytest.raises(sb.ConfigError, match="shots"):
        BenchConfig(protocol="transfer", shots=[0])
