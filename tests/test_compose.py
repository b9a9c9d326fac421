"""Composition methods: each a pure function with its own checks."""

import copy

import pytest
import torch
from helpers import randomise

import skillbank as sb

VIT_TARGETS = ["attn.qkv", "mlp.fc2"]


@pytest.fixture
def skills(vit):
    out = []
    for i, rank in enumerate((4, 4, 2)):
        model = copy.deepcopy(vit)
        sb.add_adapter(
            model, f"s{i}", sb.LoRAConfig(rank=rank, targets=VIT_TARGETS, use_rslora=i == 1)
        )
        torch.manual_seed(i)
        randomise(model, f"s{i}")
        out.append(sb.Skill.from_model(model, f"s{i}"))
    return out


def dense(skill, site):
    return skill.delta(site)


@pytest.mark.parametrize("method", sorted(sb.COMPOSE))
def test_one_skill_at_weight_one_is_unchanged(skills, method, vit, x28):
    s = skills[1]  # the rsLoRA one, which PEFT's merging gets wrong
    merged = sb.compose([s], [1.0], method=method)
    for site in s.factors:
        torch.testing.assert_close(dense(merged, site), dense(s, site), atol=1e-5, rtol=1e-4)
    a, b = copy.deepcopy(vit), copy.deepcopy(vit)
    sb.attach(a, s)
    sb.attach(b, merged)
    with torch.no_grad():
        torch.testing.assert_close(a(x28), b(x28), atol=1e-5, rtol=1e-5)


def test_cat_is_exact_weighted_sum(skills):
    merged = sb.compose(skills, [0.5, -1.0, 2.0], method="cat")
    for site in skills[0].factors:
        want = 0.5 * dense(skills[0], site) - dense(skills[1], site) + 2.0 * dense(skills[2], site)
        torch.testing.assert_close(dense(merged, site), want, atol=1e-5, rtol=1e-4)
        assert merged.ranks[site] == 10


def test_svd_is_exact_at_full_rank_and_best_below(skills):
    w = [0.3, 0.3, 0.4]
    full = sb.compose(skills, w, method="svd", rank=10)
    low = sb.compose(skills, w, method="svd", rank=3)
    for site in skills[0].factors:
        want = sum(wi * dense(s, site) for wi, s in zip(w, skills, strict=True))
        torch.testing.assert_close(dense(full, site), want, atol=1e-5, rtol=1e-4)
        # truncation error equals the tail of the singular values (Eckart-Young)
        sv = torch.linalg.svdvals(want)
        err = torch.linalg.matrix_norm(dense(low, site) - want)
        assert err == pytest.approx(sv[3:].square().sum().sqrt().item(), rel=1e-3)
        assert low.ranks[site] == 3


def test_linear_needs_equal_ranks_and_ties_resolves_signs(skills):
    with pytest.raises(sb.ConfigError, match="equal ranks"):
        sb.compose(skills, method="linear")
    merged = sb.compose(skills[:2], [1.0, 1.0], method="ties", rank=8, density=0.3)
    site = next(iter(skills[0].factors))
    d0, d1, m = dense(skills[0], site), dense(skills[1], site), dense(merged, site)
    # where both deltas are large and disagree in sign, the result keeps the elected sign
    both = (
        (d0.abs() > d0.abs().quantile(0.9))
        & (d1.abs() > d1.abs().quantile(0.9))
        & (d0.sign() != d1.sign())
    )
    elected = torch.sign(d0 + d1)
    assert both.any() and ((torch.sign(m[both]) == elected[both]).float().mean() > 0.8)


def test_bad_compose_requests(skills):
    with pytest.raises(sb.ConfigError, match="unknown composition"):
        sb.compose(skills, method="magic")
    with pytest.raises(sb.ConfigError, match="weight"):
        sb.compose(skills, [1.0])
    with pytest.raises(sb.ConfigError):
        sb.compose([])
