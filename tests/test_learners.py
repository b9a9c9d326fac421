"""Learners on a tiny ViT and scikit-learn's 8x8 digits: every test a few seconds on 2 cores."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.parametrize as P

import skillbank as sb
from eval import data, streams
from eval.backbones import create_backbone
from learners import (
    REGISTRY,
    IncreLoRA,
    LoRALearner,
    Orthogonal,
    RankSelective,
    TrainConfig,
    TrainingError,
    create_learner,
    select_ranks,
    subspace_overlap,
    truncate,
)

FAST = TrainConfig(steps=50, batch_size=32, progress=False, device="cpu")


@pytest.fixture(scope="module")
def digits_stream():
    return streams.split(data.digits(seed=0), n_tasks=5)


@pytest.fixture(scope="module")
def base():
    """vit_nano on 8x8 digits, briefly trained on the source split so adapters start from features."""
    torch.manual_seed(0)
    model = create_backbone("vit_nano", img_size=8)
    src = data.digits(seed=0).source
    from learners import train

    train(
        model,
        src.x_train,
        src.y_train,
        TrainConfig(steps=150, batch_size=64, b_ratio=1.0, progress=False, device="cpu"),
    )
    return model.eval()


def task_acc(model, task) -> float:
    """Accuracy among the task's own classes (what its skill was trained for)."""
    mask = torch.full((10,), float("-inf"))
    mask[list(task.classes)] = 0
    with torch.no_grad():
        return (model(task.x_test) + mask).argmax(1).eq(task.y_test).float().mean().item()


def with_skill(base, skill):
    model = copy.deepcopy(base)
    sb.attach(model, sb.Skill.from_bytes(skill.to_bytes()))
    return model


def n_modules(model_or_skill) -> int:
    return len(model_or_skill.ranks)


# ------------------------------------------------------------------ rank selection
@pytest.mark.parametrize("method", ["codyra", "adalora"])
def test_rank_selection_ends_below_rmax_and_keeps_accuracy(base, digits_stream, method):
    task = digits_stream[0]
    lora = LoRALearner(rank=8, train=FAST).fit(copy.deepcopy(base), task)
    sel = RankSelective(rank=8, method=method, target_rank=2.0, train=FAST)
    skill = sel.fit(copy.deepcopy(base), task)
    ranks = skill.metadata["chosen_ranks"]
    assert sum(ranks.values()) < 8 * len(ranks)  # something was pruned
    assert len(set(ranks.values())) > 1  # and not uniformly
    kept = {p: r for p, r in ranks.items() if r}
    assert skill.ranks == kept  # the skill holds only the survivors
    assert task_acc(with_skill(base, skill), task) >= task_acc(with_skill(base, lora), task) - 0.05


def test_adalora_meets_its_budget(base, digits_stream):
    skill = RankSelective(rank=8, method="adalora", target_rank=2.0, train=FAST).fit(
        copy.deepcopy(base), digits_stream[1]
    )
    assert sum(skill.metadata["chosen_ranks"].values()) <= 2 * len(skill.metadata["chosen_ranks"])


def test_select_ranks_keeps_the_named_columns(base, digits_stream):
    skill = LoRALearner(rank=4, train=FAST).fit(copy.deepcopy(base), digits_stream[0])
    site = next(iter(skill.factors))
    other = [s for s in skill.factors if s != site]
    out = select_ranks(skill, {site: [3, 1], **{s: [] for s in other[:1]}})
    a, b = skill.factors[site]
    assert torch.equal(out.factors[site][0], a[[3, 1]]) and torch.equal(
        out.factors[site][1], b[:, [3, 1]]
    )
    assert other[0] not in out.factors and out.ranks[other[1]] == 4
    assert sb.LoRAConfig.from_dict(out.config).rank_for(site) == 2


# --------------------------------------------------------------------- DyLoRA
def test_nested_lora_truncates_to_its_first_ranks(base, digits_stream):
    task = digits_stream[2]
    skill = LoRALearner(rank=8, nested=True, train=FAST).fit(copy.deepcopy(base), task)
    short = truncate(skill, 3)
    for site, (a, b) in skill.factors.items():
        assert torch.equal(short.factors[site][0], a[:3]) and torch.equal(
            short.factors[site][1], b[:, :3]
        )
        assert short.scales[site] == pytest.approx(skill.scales[site] * 8 / 3)  # alpha / 3
    # the truncated skill is the full one with ranks 3.. switched off at scale alpha / 3
    manual = with_skill(base, skill)
    with torch.no_grad():
        for layer in sb.adapter_layers(manual):
            layer.lora_B[skill.name][:, 3:] = 0
            layer.scaling[skill.name] *= 8 / 3
    x = task.x_test[:16]
    with torch.no_grad():
        assert torch.allclose(with_skill(base, short)(x), manual(x), atol=1e-5)
    # every prefix was trained to work alone: rank 2 is still far above chance (0.5)
    assert task_acc(with_skill(base, truncate(skill, 2)), task) > 0.7


# ------------------------------------------------------------------ orthogonal
@pytest.fixture(scope="module")
def after_first(base, digits_stream):
    """A model that has learned task 0 with `Orthogonal`, and that skill."""
    model = copy.deepcopy(base)
    return model, Orthogonal(train=FAST).fit(model, digits_stream[0])


def _second(after_first, stream, learner):
    model = copy.deepcopy(after_first[0])
    return model, learner.fit(model, stream[1])


def test_orthogonal_lowers_overlap_with_past_skills(after_first, digits_stream):
    first = after_first[1]
    _, plain = _second(after_first, digits_stream, LoRALearner(train=FAST))
    model, ortho = _second(after_first, digits_stream, Orthogonal(init="lora", train=FAST))
    plain_overlap = subspace_overlap(plain, [first])
    assert ortho.metadata["overlap"] == pytest.approx(subspace_overlap(ortho, [first]))
    assert ortho.metadata["overlap"] < 0.5 * plain_overlap
    assert {n for n, _ in sb.active_adapters(model)} == {
        first.name,
        ortho.name,
    }  # summed, no routing


def test_inflora_starts_in_the_complement_of_past_inputs(after_first, digits_stream):
    _, skill = _second(after_first, digits_stream, Orthogonal(init="inflora", train=FAST))
    assert skill.metadata["overlap"] < 0.05


def test_orthogonal_reads_past_skills_from_the_bank(base, after_first, digits_stream, tmp_path):
    bank = sb.SkillBank.open(str(tmp_path / "bank"))
    first = after_first[1]
    bank.add("first", first, tags={"run": "r1"})
    model = copy.deepcopy(base)
    skill = Orthogonal(pego=True, bank_where={"tags": {"run": "r1"}}, train=FAST).fit(
        model, digits_stream[1], bank
    )
    assert skill.metadata["past"] == [first.name]
    assert skill.metadata["overlap"] is not None
    assert {n for n, _ in sb.active_adapters(model)} == {first.name, skill.name}


def test_old_head_rows_are_bit_identical_after_later_tasks(base, digits_stream):
    model = copy.deepcopy(base)
    learner = Orthogonal(align=False, train=FAST)
    learner.fit(model, digits_stream[0])
    rows = list(digits_stream[0].classes)
    kept = {k: v[rows].clone() for k, v in model.head.state_dict().items()}
    for task in digits_stream[1:3]:
        learner.fit(model, task)
    for k, v in model.head.state_dict().items():
        assert torch.equal(v[rows], kept[k])


def test_inflora_a_is_orthogonal_to_the_memory(base, digits_stream):
    model = copy.deepcopy(base)
    learner = Orthogonal(train=FAST)
    learner.fit(model, digits_stream[0])
    memory = {p: m.clone() for p, m in learner.memory.items()}
    skill = learner.fit(model, digits_stream[1])
    assert memory and all(m.shape[1] > 0 for m in memory.values())
    for layer in sb.adapter_layers(model, skill.name):
        a, _ = layer.factors_2d(skill.name)
        assert torch.allclose(a @ memory[layer.path], torch.zeros(()), atol=1e-5)
        assert not layer.factor_parameters(skill.name)[0].requires_grad  # A frozen, B trained
    assert skill.metadata["overlap"] < 1e-4  # the past A rows are avoided too


def test_inflora_memory_and_class_statistics_round_trip_through_the_bank(
    base, digits_stream, tmp_path
):
    first = Orthogonal(train=FAST)
    skill = first.fit(copy.deepcopy(base), digits_stream[0])
    bank = sb.SkillBank.open(str(tmp_path / "bank"))
    bank.add("first", skill, tags={"run": "r1"})
    assert not any(k.startswith("ca.") for k in skill.extras)  # one store: the bank's table
    kept = bank.route_stats(["first@1"], kind="head")["first@1"]
    assert (kept.class_sums == first.class_stats[0].class_sums).all()
    later = Orthogonal(bank_where={"tags": {"run": "r1"}}, train=FAST)
    model = copy.deepcopy(base)
    later.fit(model, digits_stream[1], bank)
    for path, m in first.memory.items():  # the later memory contains the first one's span
        grown = later.memory[path]
        assert torch.allclose(grown @ (grown.T @ m), m, atol=1e-4)
    assert len(later.class_stats) == 2
    assert later.class_stats[0].classes == tuple(digits_stream[0].classes)


def test_memory_from_another_base_is_refused(base, digits_stream):
    skill = Orthogonal(train=FAST).fit(copy.deepcopy(base), digits_stream[0])
    other = create_backbone("vit_micro", img_size=8)
    sb.add_adapter(other, "probe", sb.LoRAConfig(rank=2, targets=("attn.qkv",)))
    learner = Orthogonal(train=FAST)
    with pytest.raises(sb.BaseMismatch, match="another base"):
        learner.continue_from(other, [skill])
    assert learner.memory == {} and learner.class_stats == []


def test_alignment_undoes_a_head_biased_to_the_newest_classes():
    from learners import heads
    from skillbank.route_stats import stats_from_features

    gen = torch.Generator().manual_seed(0)
    means = torch.randn(4, 16, generator=gen)
    y = torch.arange(4).repeat_interleave(200)
    x = means[y] + 0.5 * torch.randn(len(y), 16, generator=gen)
    head = torch.nn.Linear(16, 4)
    with torch.no_grad():  # a fair classifier, then the newest task's rows pushed up
        head.weight.copy_(means)
        head.bias.copy_(-0.5 * (means**2).sum(1) + torch.tensor([0.0, 0.0, 30.0, 30.0]))

    def accuracy():
        with torch.no_grad():
            return (head(x).argmax(1) == y).float().mean().item()

    before = accuracy()
    stats = [stats_from_features(x[y < 2], y[y < 2]), stats_from_features(x[y >= 2], y[y >= 2])]
    heads.align(head, stats, seed=0)
    assert before < 0.6 and accuracy() > 0.95


def test_sdlora_learns_magnitudes_over_frozen_past_skills(after_first, digits_stream, tmp_path):
    """SD-LoRA: the past skill's factors stay as trained, only its magnitude moves; the sum
    runs with the learned magnitudes and a later run takes them over from the bank."""
    model, first = copy.deepcopy(after_first[0]), after_first[1]
    before = {
        layer.path: [t.clone() for t in layer.factors_2d(first.name)]
        for layer in sb.adapter_layers(model, first.name)
    }
    learner = Orthogonal(init="sdlora", align=False, train=FAST)
    skill = learner.fit(model, digits_stream[1])
    mags = skill.metadata["magnitudes"]
    assert set(mags) == {first.name, skill.name}
    assert mags[first.name] != pytest.approx(0.8)  # the past magnitude trained
    for layer in sb.adapter_layers(model, first.name):
        now = layer.factors_2d(first.name)
        assert all(torch.equal(a, b) for a, b in zip(now, before[layer.path], strict=True))
        assert layer.rank_gates(first.name) == [] and layer.rank_gates(skill.name) == []
    assert dict(sb.active_adapters(model)) == pytest.approx(mags)
    bank = sb.SkillBank.open(str(tmp_path / "bank"))
    bank.add("second", skill, tags={"run": "r1"})
    later = Orthogonal(init="sdlora", train=FAST)
    later.continue_from(model, [bank.get("second")])
    assert later.magnitudes == pytest.approx(mags)


def test_sdlora_leaves_the_sum_unchanged_when_a_task_starts(after_first, digits_stream):
    model = copy.deepcopy(after_first[0])
    learner = Orthogonal(init="sdlora", align=False, train=FAST)
    learner.fit(model, digits_stream[1])
    x = digits_stream[0].x_test[:8]
    with torch.no_grad():
        expected = model(x)
    learner.prepare(model, digits_stream[2], None, "third")  # gates on, the new B is zero
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
    learner.abort(model, "third")
    sb.remove_adapter(model, "third")
    assert all(
        layer.rank_gates(n) == [] for layer in sb.adapter_layers(model) for n in layer.names()
    )


def test_orthogonal_refuses_bad_settings():
    for bad in (
        {"init": "svd"},
        {"magnitude": 0.0},
        {"energy": 0.0},
        {"energy": 0.99, "energy_end": 0.9},
        {"n_tasks": 0},
    ):
        with pytest.raises(sb.ConfigError):
            Orthogonal(**bad)


# ------------------------------------------------------------------- IncreLoRA
def test_increlora_grows_to_its_budget(base, digits_stream):
    learner = IncreLoRA(rank=6, budget=3.0, top_h=2, train=FAST)
    skill = learner.fit(copy.deepcopy(base), digits_stream[3])
    hist = skill.metadata["rank_history"]
    budget = skill.metadata["rank_budget"]
    assert budget == 3 * n_modules(skill)
    assert hist[0] < budget and hist[-1] == budget
    assert all(b >= a for a, b in zip(hist, hist[1:], strict=False))  # grows, never shrinks
    assert max(hist) == budget  # and stops at the budget
    assert sum(skill.ranks.values()) == budget and len(set(skill.ranks.values())) > 1


# --------------------------------------------------------- every learner, common contract
LEARNERS = {
    "lora": lambda: LoRALearner(train=FAST),
    "lora-nested": lambda: LoRALearner(nested=True, train=FAST),
    "rank_selective": lambda: RankSelective(rank=8, train=FAST),
    "rank_selective-adalora": lambda: RankSelective(rank=8, method="adalora", train=FAST),
    "increlora": lambda: IncreLoRA(rank=6, budget=3.0, train=FAST),
    "orthogonal": lambda: Orthogonal(train=FAST),
    "orthogonal-inflora": lambda: Orthogonal(init="inflora", pego=True, train=FAST),
}


COVERED_ELSEWHERE = {"psec"}  # composes banked skills: tests/test_psec.py
# the field's references: whole-model skills, not adapters (tests/test_references.py)
COVERED_ELSEWHERE |= {"naive", "ewc", "lwf", "replay", "simplecil"}


def test_every_registered_learner_is_covered():
    assert set(REGISTRY) - COVERED_ELSEWHERE <= {k.split("-")[0] for k in LEARNERS}
    assert isinstance(create_learner("rank_selective", train={"steps": 3}), RankSelective)


@pytest.mark.parametrize("key", list(LEARNERS))
def test_saved_skill_reproduces_the_live_model(base, digits_stream, key):
    learner = LEARNERS[key]()
    model = copy.deepcopy(base)
    skills = [learner.fit(model, digits_stream[0])]
    if learner.inference == "direct":  # a second task, so the sum of skills is tested too
        skills.append(learner.fit(model, digits_stream[1]))
    fresh = copy.deepcopy(base)
    for s in skills:
        sb.attach(fresh, sb.Skill.from_bytes(s.to_bytes()), activate=False)
    sb.set_active(fresh, [s.name for s in skills])
    if learner.restores_head:  # a routed skill brings its head; the live model kept the base head
        model.load_state_dict(skills[-1].head, strict=False)
    assert not any(P.is_parametrized(layer.lora_B) for layer in sb.adapter_layers(model))
    x = digits_stream[1].x_test[:32]
    with torch.no_grad():
        assert torch.allclose(model(x), fresh(x), atol=1e-5)


@pytest.mark.parametrize("key", list(LEARNERS))
def test_nan_loss_raises_and_leaves_no_skill(base, digits_stream, key):
    model = copy.deepcopy(base)
    before = sb.adapter_names(model)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError):
        LEARNERS[key]().fit(model, digits_stream[0])
    assert sb.adapter_names(model) == before
    assert not any(P.is_parametrized(layer.lora_B) for layer in sb.adapter_layers(model))
