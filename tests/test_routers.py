"""Routers on synthetic Gaussians whose right answer is known, plus re-ranking and bad input."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import TINY_DIM, Tiny, TinyImage, add_task, corner_images, gaussian, skill_of, unit

import skillbank as sb
from skillbank.routers import make_router


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture
def bank(tmp_path):
    with sb.SkillBank.open(tmp_path / "bank") as b:
        yield b


def accuracy(model, bank, xs, want, **kw):
    refs = sb.route(model, bank, torch.cat(xs), head="head", mask_classes=False, **kw).refs
    truth = [w for x, w in zip(xs, want, strict=True) for _ in range(len(x))]
    return float(np.mean([r == w for r, w in zip(refs, truth, strict=True)]))


def test_examples_and_prototype_route_separated_classes(model, bank):
    # skill a holds classes around e0 and e1, skill b around e2 and e3
    means = [unit(0, 3), unit(1, 3), unit(2, 3), unit(3, 3)]
    train = [gaussian(m, 0.3, 50, i) for i, m in enumerate(means)]
    a = add_task(bank, model, "a", train[:2], [torch.full((50,), c) for c in (0, 1)])
    b = add_task(bank, model, "b", train[2:], [torch.full((50,), c) for c in (2, 3)])
    test = [gaussian(m, 0.3, 30, 10 + i) for i, m in enumerate(means)]
    want = [a, a, b, b]
    assert accuracy(model, bank, test, want, router="examples") >= 0.95
    assert accuracy(model, bank, test, want, router="prototype") == 1.0


def test_mahalanobis_uses_the_shared_covariance(model, bank):
    # The classes differ by 0.4 along e2 (noise 0.05) and by 1.2 along e1, where the
    # shared noise is 1.5: the nearest mean by cosine is misled, the shared covariance is not.
    m1, m2 = unit(0, 3) + unit(1, 0.6) + unit(2, 0.2), unit(0, 3) - unit(1, 0.6) - unit(2, 0.2)
    scale = torch.full((TINY_DIM,), 0.05)
    scale[1] = 1.5
    a = add_task(bank, model, "a", [gaussian(m1, scale, 400, 1)], [torch.zeros(400)])
    b = add_task(bank, model, "b", [gaussian(m2, scale, 400, 2)], [torch.ones(400)])
    test = [gaussian(m1, scale, 200, 3), gaussian(m2, scale, 200, 4)]
    proto = accuracy(model, bank, test, [a, b], router="prototype")
    maha = accuracy(model, bank, test, [a, b], router="mahalanobis")
    assert maha >= 0.97 and maha > proto + 0.1, (maha, proto)


def test_stats_router_finds_a_domain_the_pooled_feature_cannot_see(model, bank):
    # Two domains with the same directions (pooled features are L2-normalised) but
    # inputs 1x and 4x as large: only the layer statistics tell them apart.
    mean = unit(0, 1.0) + unit(1, 1.0)
    ys = [torch.zeros(300)]
    a = add_task(bank, model, "small", [gaussian(mean, 0.5, 300, 1)], ys)
    b = add_task(bank, model, "large", [4 * gaussian(mean, 0.5, 300, 2)], ys)
    test = [gaussian(mean, 0.5, 100, 3), 4 * gaussian(mean, 0.5, 100, 4)]
    assert accuracy(model, bank, test, [a, b], router="stats") >= 0.95
    assert accuracy(model, bank, test, [a, b], router="prototype") <= 0.75


def test_fused_router_sees_both_the_class_and_the_domain(model, bank):
    # "small" and "large" differ only in scale (one direction after L2 norm): the
    # pooled feature cannot tell them apart; "other" differs in direction.
    ys = [torch.zeros(300)]
    near, far = unit(0, 1.0) + unit(1, 1.0), unit(2, 1.0) + unit(3, 1.0)
    a = add_task(bank, model, "small", [gaussian(near, 0.5, 300, 1)], ys)
    b = add_task(bank, model, "large", [4 * gaussian(near, 0.5, 300, 2)], ys)
    c = add_task(bank, model, "other", [gaussian(far, 0.5, 300, 3)], ys)
    test = [
        gaussian(near, 0.5, 100, 4),
        4 * gaussian(near, 0.5, 100, 5),
        gaussian(far, 0.5, 100, 6),
    ]
    assert accuracy(model, bank, test, [a, b, c], router="fused") >= 0.95
    assert accuracy(model, bank, test, [a, b, c], router="mahalanobis") <= 0.85


def _crossed_domains():
    """Two domains whose classes sit on crossed diagonals: each domain's data has mean
    0 and variance 4 in every dimension, so one diagonal Gaussian per skill is the
    same for both; per class they differ."""
    d1, d2 = unit(0, 2.0) + unit(1, 2.0), unit(0, 2.0) - unit(1, 2.0)
    ys = [torch.zeros(200), torch.ones(200)]
    train = {"a": [d1, -d1], "b": [d2, -d2]}
    return train, ys


def _add_with(bank, model, name, xs, ys, per_class: bool) -> str:
    x, y = torch.cat(xs), torch.cat(ys)
    stats = sb.compute_stats(model, x, y, head="head")
    if not per_class:  # as skillbank 0.2 stored them: the skill's layer sums alone
        stats = dataclasses.replace(
            stats, layer_sums=stats.layer_sums.sum(0), layer_squares=stats.layer_squares.sum(0)
        )
    return str(bank.add(name, skill_of(model, name), stats=stats, embed_text=False))


def test_stats_router_keeps_a_gaussian_per_class_of_each_skill(model, tmp_path):
    train, ys = _crossed_domains()
    test = [gaussian(m, 0.5, 50, 20 + i) for i, m in enumerate(train["a"] + train["b"])]
    scores = {}
    for per_class in (True, False):
        with sb.SkillBank.open(tmp_path / f"bank-{per_class}") as bank:
            refs = {
                n: _add_with(
                    bank,
                    model,
                    n,
                    [gaussian(m, 0.5, 200, i) for i, m in enumerate(ms)],
                    ys,
                    per_class,
                )
                for n, ms in train.items()
            }
            want = [refs["a"], refs["a"], refs["b"], refs["b"]]
            scores[per_class] = accuracy(model, bank, test, want, router="stats")
    assert scores[True] >= 0.95 and scores[False] <= 0.75, scores


def test_statistics_of_0_2_and_per_class_ones_route_side_by_side(model, bank):
    train, ys = _crossed_domains()
    a = _add_with(
        bank, model, "a", [gaussian(m, 0.5, 200, i) for i, m in enumerate(train["a"])], ys, True
    )
    b = _add_with(
        bank,
        model,
        "b",
        [gaussian(m, 0.5, 200, 9 + i) for i, m in enumerate(train["b"])],
        ys,
        False,
    )
    test = [gaussian(m, 0.5, 50, 20 + i) for i, m in enumerate(train["a"] + train["b"])]
    for router in ("stats", "fused"):
        got = sb.route(model, bank, torch.cat(test), head="head", router=router).refs
        assert set(got) <= {a, b}
    assert accuracy(model, bank, test, [a, a, b, b], router="fused") >= 0.95


def test_pixel_covariance_tells_domains_apart_that_differ_only_in_correlation(tmp_path):
    # "same": opposite corners move together; "opposite": against each other. Every
    # pixel (and every 4 x 4 cell of the layer descriptor) has the same mean and
    # variance in both: only the pixel grid's covariance tells them apart.
    torch.manual_seed(0)
    model = TinyImage().eval()
    test = [corner_images(1, 100, 10), corner_images(-1, 100, 11)]
    scores = {}
    for pixels in (True, False):
        with sb.SkillBank.open(tmp_path / f"bank-{pixels}") as bank:
            refs = []
            for i, (name, sign) in enumerate((("same", 1), ("opposite", -1))):
                stats = sb.compute_stats(
                    model, corner_images(sign, 300, i), torch.zeros(300), head="head"
                )
                assert stats.layers == ("input",) and stats.pixel_scatter.shape == (1, 49, 49)
                if not pixels:  # as statistics stored before pixel moments existed
                    stats = dataclasses.replace(stats, pixel_sums=None, pixel_scatter=None)
                skill = skill_of(model, name, classes=(0, 1), target="body")
                refs.append(str(bank.add(name, skill, stats=stats, embed_text=False)))
            for router in ("stats", "fused"):
                scores[pixels, router] = accuracy(model, bank, test, refs, router=router)
            # router_options={"pixels": False} skips the term: as if the moments were absent
            off = accuracy(
                model, bank, test, refs, router="stats", router_options={"pixels": False}
            )
            scores[pixels, "stats, pixels off"] = off
    # the pooled feature (a ReLU of mixed pixels) sees part of it: fused gains less
    assert scores[True, "stats"] >= 0.95 and scores[False, "stats"] <= 0.7, scores
    assert scores[True, "fused"] >= 0.95 and scores[False, "fused"] <= 0.85, scores
    assert scores[True, "stats, pixels off"] == scores[False, "stats"], scores


def test_pixel_features_of_another_size_are_refused(tmp_path):
    model = TinyImage().eval()
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        stats = sb.compute_stats(model, corner_images(1, 50, 0), torch.zeros(50), head="head")
        bank.add("a", skill_of(model, "a", target="body"), stats=stats, embed_text=False)
        router = make_router("stats", bank)
        router._fresh_stats()
        with pytest.raises(sb.InvalidEmbedding, match="pixel features are 36-d"):
            router.pixel_log_likelihoods(torch.zeros(3, 36), [["a@1"]] * 3)


def test_rerank_keeps_the_candidate_the_adapted_model_is_sure_of(model, bank):
    x = gaussian(unit(0, 3), 0.3, 40, 1)
    ys = [torch.zeros(40)]
    add_task(bank, model, "unsure", [x], ys, head_scale=0.01)
    sure = add_task(bank, model, "sure", [x + 0.01], ys, head_scale=50.0)
    router = sb.Router(model, bank, router="prototype", rerank=2, head="head", mask_classes=False)
    routed = router(x)
    assert set(routed.refs) == {sure}
    torch.testing.assert_close(routed.logits, router.forward(x, routed.refs))
    assert all(0.0 < s <= 1.0 for s in routed.scores)  # softmax confidences


def test_bad_router_settings_are_refused(model, bank):
    with pytest.raises(sb.ConfigError, match="unknown router"):
        sb.Router(model, bank, router="vote")
    with pytest.raises(sb.ConfigError, match="rerank"):
        sb.Router(model, bank, rerank=-1)
    with pytest.raises(sb.ConfigError, match="unknown router options"):
        sb.Router(model, bank, router="mahalanobis", router_options={"shrinkage": 0.2})
    assert (
        sb.Router(model, bank, router="mahalanobis", router_options={"shrink": 0.2}).router.shrink
        == 0.2
    )


def test_bench_config_checks_router_keys_before_any_run():
    from eval.config import load

    cfg = load(None, router="stats", rerank=2, router_options={"candidates": 4})
    assert (cfg.router, cfg.rerank, cfg.router_options) == ("stats", 2, {"candidates": 4})
    for bad, match in (
        ({"router": "vote"}, "unknown router 'vote'"),
        ({"rerank": -1}, "rerank"),
        ({"router_options": {"shrinkage": 0.2}}, "unknown router options"),
        ({"router_options": [1]}, "mapping"),
        ({"router_options": {"pixels": "no"}}, "pixels must be true or false"),
    ):
        with pytest.raises(sb.ConfigError, match=match):
            load(None, **bad)


def test_nan_features_are_refused(model, bank):
    x = gaussian(unit(0, 3), 0.3, 20, 1)
    add_task(bank, model, "a", [x], [torch.zeros(20)])
    bad = x.clone()
    bad[3, 0] = float("nan")
    for router in ("examples", "prototype", "mahalanobis", "stats"):
        with pytest.raises(sb.InvalidEmbedding, match="NaN"):
            sb.route(model, bank, bad, router=router, head="head")


@pytest.mark.parametrize("width", [2, 16])  # 40 skills: per candidate column, then BLAS
def test_stats_scores_are_each_skills_best_class_likelihood(width):
    rng = np.random.default_rng(0)
    router = make_router("stats", bank=None)
    skills = [f"s{i}@1" for i in range(40)]
    router._moments = {  # 1 to 3 classes per skill, 6-d descriptor
        r: (rng.normal(size=(n, 6)), rng.uniform(0.5, 2.0, size=(n, 6)))
        for r, n in zip(skills, rng.integers(1, 4, size=len(skills)), strict=True)
    }
    x = rng.normal(size=(20, 6))
    refs = [list(rng.choice(skills, size=width, replace=False)) for _ in x]
    refs[0] = refs[0][:1]  # a row with fewer candidates than the others
    extra = rng.normal(size=(len(x), width, 3))  # per row, candidate and class: fused's terms
    for bonus in (None, extra):
        got = router.log_likelihoods(x, refs, extra=bonus)
        for i, row in enumerate(refs):
            for j, r in enumerate(row):
                mean, var = router._moments[r]
                ll = -0.5 * (((x[i] - mean) ** 2 / var) + np.log(var)).mean(-1)
                if bonus is not None:
                    ll = ll + bonus[i, j, : len(mean)]
                assert got[i, j] == pytest.approx(ll.max(), rel=1e-9, abs=1e-9)
        assert np.isneginf(got[0, 1:]).all()
