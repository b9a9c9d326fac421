"""Routing statistics: combination, round trip through the bank, migration, bad input."""

import dataclasses

import numpy as np
import pytest
import torch
from alembic import command
from helpers import Tiny, TinyImage, add_task, corner_images, gaussian, skill_of, unit

import skillbank as sb
from skillbank.route_stats import HEAD, PROTOTYPES, RouteStats, pooled_within, stats_from_features
from storage.session import alembic_config, make_engine, schema_revision


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Tiny().eval()


def data(n=60, seed=0):
    x = torch.cat([gaussian(unit(0, 3), 0.3, n, seed), gaussian(unit(1, 3), 0.3, n, seed + 1)])
    return x, torch.cat([torch.zeros(n), torch.ones(n)]).long()


def test_statistics_combine_without_the_data(model):
    x, y = data()
    whole = sb.compute_stats(model, x, y, head="head")
    half = [sb.compute_stats(model, x[i::2], y[i::2], head="head") for i in range(2)]
    np.testing.assert_allclose(half[0].scatter + half[1].scatter, whole.scatter, atol=1e-9)
    np.testing.assert_allclose(half[0].class_sums + half[1].class_sums, whole.class_sums, atol=1e-9)
    # the pooled within-class scatter of skills equals the one computed from their samples
    f, _ = sb.route_stats.route_features(model, x, head="head")
    f = f.double().numpy()
    by_hand = sum(
        (f[y == c] - f[y == c].mean(0)).T @ (f[y == c] - f[y == c].mean(0)) for c in (0, 1)
    )
    scatter, dof = pooled_within([whole])
    np.testing.assert_allclose(scatter, by_hand, atol=1e-9)
    assert dof == len(x) - 2


def test_stats_round_trip_through_the_bank(model, catalog_url, tmp_path):
    x, y = data()
    stats = sb.compute_stats(model, x, y, head="head")
    with sb.SkillBank.open(catalog_url, blobs=tmp_path / "blobs") as bank:
        ref = str(bank.add("a", skill_of(model, "a"), stats=stats, embed_text=False))
        assert PROTOTYPES in bank.record(ref).spaces
    with sb.SkillBank.open(catalog_url, blobs=tmp_path / "blobs") as bank:
        back = bank.route_stats([ref])[ref]
        assert back.classes == stats.classes and back.layers == stats.layers == ("patch_embed",)
        for a, b in zip(back.to_arrays().values(), stats.to_arrays().values(), strict=True):
            np.testing.assert_array_equal(a, b)
        hits = bank.retrieve(stats.means()[1], k=1, space=PROTOTYPES)
        assert str(hits[0].ref) == ref


def test_pixel_statistics_combine_and_round_trip(catalog_url, tmp_path):
    torch.manual_seed(0)
    model = TinyImage().eval()
    x, y = corner_images(1, 40, 0), torch.arange(40) // 20
    whole = sb.compute_stats(model, x, y, head="head")
    half = [sb.compute_stats(model, x[i::2], y[i::2], head="head") for i in range(2)]
    for key in ("pixel_sums", "pixel_scatter"):
        parts = [getattr(h, key) for h in half]
        np.testing.assert_allclose(parts[0] + parts[1], getattr(whole, key), atol=1e-9)
    mean, cov = whole.pixel_gaussians(shrink=0.0)  # unshrunk: the sample moments
    flat = x.flatten(1).double().numpy()
    np.testing.assert_allclose(mean[1], flat[y == 1].mean(0), atol=1e-9)
    np.testing.assert_allclose(cov[1], np.cov(flat[y == 1].T, bias=True), atol=1e-9)
    with sb.SkillBank.open(catalog_url, blobs=tmp_path / "blobs") as bank:
        skill = skill_of(model, "a", target="body")
        ref = str(bank.add("a", skill, stats=whole, embed_text=False))
    with sb.SkillBank.open(catalog_url, blobs=tmp_path / "blobs") as bank:
        back = bank.route_stats([ref])[ref]
    np.testing.assert_array_equal(back.pixel_scatter, whole.pixel_scatter)
    np.testing.assert_array_equal(back.pixel_sums, whole.pixel_sums)
    bad = dataclasses.replace(whole, pixel_scatter=whole.pixel_scatter[:, :3])
    with pytest.raises(sb.InvalidEmbedding, match="pixel sums"):
        bad.check()


def test_a_skills_own_statistics_sets_live_in_the_same_store(model, catalog_url, tmp_path):
    """A learner's "head" statistics ride on the skill into the catalog's statistics
    table, beside the routing set, and come back with bank.get; the file has none."""
    x, y = data()
    head = stats_from_features(
        torch.randn(len(y), 5, generator=torch.Generator().manual_seed(1)), y
    )
    skill = skill_of(model, "a")
    skill.stats[HEAD] = head
    with sb.SkillBank.open(catalog_url, blobs=tmp_path / "blobs") as bank:
        ref = str(bank.add("a", skill, embed_text=False))  # no routing set
        assert PROTOTYPES not in bank.record(ref).spaces
        assert not sb.Skill.from_bytes(skill.to_bytes()).stats
    with sb.SkillBank.open(catalog_url, blobs=tmp_path / "blobs") as bank:
        back = bank.get(ref).stats
        assert set(back) == {HEAD}
        for a, b in zip(back[HEAD].to_arrays().values(), head.to_arrays().values(), strict=True):
            np.testing.assert_array_equal(a, b)
        assert bank.route_stats([ref], kind=HEAD)[ref].classes == head.classes
        with pytest.raises(sb.MissingStats, match="a@1 has no routing statistics"):
            bank.route_stats([ref])
        bank.put_stats(ref, sb.compute_stats(model, x, y, head="head"))  # the set it lacked
        assert bank.route_stats([ref])[ref].dim != head.dim
        with pytest.raises(sb.SkillExists, match="immutable"):
            bank.put_stats(ref, head, kind=HEAD)
        assert set(bank.get(ref).stats) == {HEAD}  # the routing set stays the routers'


def test_bad_statistics_sets_are_refused_before_anything_is_written(model, tmp_path):
    skill = skill_of(model, "a")
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        skill.stats["not a name"] = sb.compute_stats(model, *data(), head="head")
        with pytest.raises(sb.ConfigError, match="identifier"):
            bank.add("a", skill, embed_text=False)
        skill.stats = {HEAD: "means"}
        with pytest.raises(sb.ConfigError, match="must be RouteStats"):
            bank.add("a", skill, embed_text=False)
        assert bank.list() == []


def test_a_0_1_0_catalog_upgrades_and_still_routes(model, tmp_path):
    where = tmp_path / "old"
    x, y = data()
    with sb.SkillBank.open(where) as bank:  # a 0.1.0 bank: example embedding only
        emb = sb.example_embedding(model, x, head="head")
        ref = str(bank.add("old", skill_of(model, "old"), embedding=emb, embed_text=False))
    engine = make_engine(where)
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert schema_revision(engine) == "0001"
    engine.dispose()
    with sb.SkillBank.open(where) as bank:
        assert schema_revision(bank.library.catalog.engine) == "0002"
        assert set(sb.route(model, bank, x, head="head").refs) == {ref}
        for router in ("prototype", "mahalanobis", "stats"):
            with pytest.raises(sb.MissingStats, match=r"old@1.*put_stats"):
                sb.route(model, bank, x, head="head", router=router)
        bank.put_stats(ref, sb.compute_stats(model, x, y, head="head"))
        assert set(sb.route(model, bank, x, head="head", router="mahalanobis").refs) == {ref}
        with pytest.raises(sb.SkillExists, match="immutable"):
            bank.put_stats(ref, sb.compute_stats(model, x, y, head="head"))


def test_a_skill_without_stats_among_others_is_named(model, tmp_path):
    x, y = data()
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        add_task(bank, model, "with", [x], [y])
        emb = sb.example_embedding(model, x, head="head")
        bank.add("without", skill_of(model, "without"), embedding=emb, embed_text=False)
        with pytest.raises(sb.MissingStats, match="without@1 has no routing statistics"):
            sb.route(model, bank, x, head="head", router="prototype")


def _unchanged(bank, before):
    assert [str(r.ref) for r in bank.list(latest_only=False)] == before
    assert len(list(bank.library.blobs.digests())) == len(before)  # no stray blob


def test_bad_statistics_leave_nothing_written(model, tmp_path):
    x, y = data()
    with sb.SkillBank.open(tmp_path / "bank") as bank:
        add_task(bank, model, "good", [x], [y])
        before = [str(r.ref) for r in bank.list(latest_only=False)]
        # a different feature dimension than the bank's prototypes
        wide = sb.RouteStats((0,), np.ones(1), np.ones((1, 16)), np.eye(16))
        with pytest.raises(sb.InvalidEmbedding, match="dimension 16"):
            bank.add("wide", skill_of(model, "wide"), stats=wide, embed_text=False)
        _unchanged(bank, before)
        # NaN in the statistics
        good = sb.compute_stats(model, x, y, head="head")
        nan = RouteStats(good.classes, good.counts, good.class_sums * np.nan, good.scatter)
        with pytest.raises(sb.InvalidEmbedding, match="NaN"):
            bank.add("nan", skill_of(model, "nan"), stats=nan, embed_text=False)
        _unchanged(bank, before)
        # inconsistent shapes
        bad = RouteStats((0, 1), np.ones(1), good.class_sums, good.scatter)
        with pytest.raises(sb.InvalidEmbedding, match="classes"):
            bank.add("bad", skill_of(model, "bad"), stats=bad, embed_text=False)
        _unchanged(bank, before)
        # a model whose features have another dimension cannot route over this bank
        wide_model = torch.nn.Sequential()
        wide_model.head = torch.nn.Linear(16, 4)
        with pytest.raises(sb.InvalidEmbedding, match="dimension"):
            sb.route(wide_model, bank, torch.randn(3, 16), head="head", router="prototype")


def test_nan_inputs_and_mismatched_labels_are_refused(model):
    x, y = data()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(sb.InvalidEmbedding, match="NaN"):
        sb.compute_stats(model, bad, y, head="head")
    with pytest.raises(sb.InvalidEmbedding, match="one label each"):
        sb.compute_stats(model, x, y[:-1], head="head")


def test_default_layers_follow_the_architecture():
    from eval.backbones import create_backbone
    from skillbank.route_stats import INPUT, default_layers

    assert default_layers(create_backbone("vit_nano")) == ("patch_embed",)
    assert default_layers(create_backbone("resnet_micro")) == ("act1",)  # the stem
    assert default_layers(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))) == (
        INPUT,
    )


def test_layer_features_alone_stop_the_pass_at_the_last_layer(model):
    """A router that reads layers only (``stats``) pays for the layers, not the whole pass."""
    x, _ = data()
    calls = []
    model.head.register_forward_hook(lambda *_: calls.append(1))
    pooled, full = sb.route_stats.route_features(model, x, layers=("patch_embed",), head="head")
    ran = len(calls)
    none, early = sb.route_stats.route_features(
        model, x, layers=("patch_embed",), head="head", pooled=False
    )
    assert pooled is not None and none is None
    torch.testing.assert_close(early, full, rtol=0, atol=0)
    assert ran > 0 and len(calls) == ran  # the head never ran the second time
    with pytest.raises(sb.ConfigError, match="needs layers"):
        sb.route_stats.route_features(model, x, pooled=False)
