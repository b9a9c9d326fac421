"""The public adapter-layer API that learners use: per-site factors with their rank
axes, reading and replacing factors and scales, rank gates, base ids."""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import skillbank as sb

# model fixture -> (input fixture, targets, module kinds they adapt)
KINDS = {
    "vit": ("x28", ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"], {"Linear"}),
    "resnet": ("x28", [nn.Conv2d], {"Conv2d"}),
    "clip_vit": ("x_rgb", ["attn", "c_fc", "c_proj"], {"MultiheadAttention", "Linear"}),
}

KIND_TYPES = (nn.MultiheadAttention, nn.Conv2d, nn.Linear)


@pytest.fixture(params=sorted(KINDS))
def case(request):
    """(model, input, targets, kinds) for each adapter kind."""
    x_name, targets, kinds = KINDS[request.param]
    model = request.getfixturevalue(request.param)
    return model, request.getfixturevalue(x_name), targets, kinds


class Fixed(nn.Module):
    """A rank gate with fixed values."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("values", values)

    def forward(self) -> torch.Tensor:
        return self.values


def fill(model, name, seed=0, std=0.2):
    """Non-zero factors for adapter ``name``, written through the API."""
    g = torch.Generator().manual_seed(seed)
    for layer in sb.adapter_layers(model, name):
        layer.set_factors(
            name,
            {
                site: (torch.randn(a.shape, generator=g) * std, torch.randn(b.shape, generator=g))
                for site, (a, b) in layer.get_factors(name).items()
            },
        )


def test_factors_cover_every_kind_with_the_rank_on_the_declared_axes(case):
    model, _, targets, kinds = case
    sb.add_adapter(model, "a", sb.LoRAConfig(rank=3, targets=targets))
    seen = set()
    for layer in sb.adapter_layers(model, "a"):
        seen.add(next(k.__name__ for k in KIND_TYPES if isinstance(layer.base, k)))
        a_param, b_param = layer.factor_parameters("a")
        axis_a, axis_b = layer.rank_axes
        assert a_param.shape[axis_a] == 3 and b_param.shape[axis_b] == 3
        factors = layer.adapter_factors("a")
        assert [f.site for f in factors] == list(layer.sites)
        assert layer.adapter_rank("a") == 3
        for f in factors:
            assert f.rank == 3 and f.scale == layer.adapter_scale("a")
            a, b = f.matrices()
            assert a.shape[0] == 3 and b.shape[1] == 3
            # the 2D form is exactly what the skill stores
            assert torch.equal(a, layer.get_factors("a")[f.site][0])
            assert torch.equal(b, layer.get_factors("a")[f.site][1])
            assert f.A.shape[f.rank_axis_A] == 3 and f.B.shape[f.rank_axis_B] == 3
    assert seen == kinds


def test_slicing_ranks_through_the_api_matches_the_layer_at_rank_k(case):
    """The first k ranks, cut along each kind's declared rank axes, give a rank-k adapter
    that computes what the rank-r adapter computes with ranks >= k gated off."""
    model, x, targets, _ = case
    full, small = copy.deepcopy(model), copy.deepcopy(model)
    sb.add_adapter(full, "a", sb.LoRAConfig(rank=4, targets=targets))
    sb.add_adapter(small, "k", sb.LoRAConfig(rank=2, targets=targets))
    fill(full, "a")
    big_layers, small_layers = sb.adapter_layers(full, "a"), sb.adapter_layers(small, "k")
    assert [la.path for la in big_layers] == [lk.path for lk in small_layers]
    for big, little in zip(big_layers, small_layers, strict=True):
        cut = {}
        for f in big.adapter_factors("a"):
            sliced = sb.Factors(
                f.site,
                f.A.narrow(f.rank_axis_A, 0, 2),
                f.B.narrow(f.rank_axis_B, 0, 2),
                f.rank_axis_A,
                f.rank_axis_B,
                f.scale,
            )
            cut[f.site] = tuple(t.detach() for t in sliced.matrices())
        little.set_factors("k", cut)
        little.set_adapter_scale("k", big.adapter_scale("a"))
        big.add_rank_gate("a", Fixed(torch.tensor([1.0, 1.0, 0.0, 0.0])))
    with torch.no_grad():
        y_small, y_full = small(x), full(x)
    assert torch.allclose(y_full, y_small, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(y_small, model(x), atol=1e-3)  # the slice is not a no-op


def test_get_and_set_factors_round_trip_exactly(case):
    model, x, targets, _ = case
    sb.add_adapter(model, "a", sb.LoRAConfig(rank=2, targets=targets))
    fill(model, "a", seed=3)
    saved = {
        layer.path: {s: (a.clone(), b.clone()) for s, (a, b) in layer.get_factors("a").items()}
        for layer in sb.adapter_layers(model, "a")
    }
    with torch.no_grad():
        y = model(x)
    other = copy.deepcopy(model)
    for layer in sb.adapter_layers(other, "a"):
        with torch.no_grad():
            for f in layer.adapter_factors("a"):
                f.A.zero_()
                f.B.zero_()
        layer.set_factors("a", saved[layer.path])
        for site, (a, b) in layer.get_factors("a").items():
            assert torch.equal(a, saved[layer.path][site][0])
            assert torch.equal(b, saved[layer.path][site][1])
    with torch.no_grad():
        assert torch.equal(other(x), y)


def test_set_factors_checks_every_shape_before_writing(vit, clip_vit):
    for model, targets in ((vit, ["attn.qkv"]), (clip_vit, ["attn"])):
        sb.add_adapter(model, "a", sb.LoRAConfig(rank=2, targets=targets))
        layer = sb.adapter_layers(model, "a")[0]
        before = {s: (a.clone(), b.clone()) for s, (a, b) in layer.get_factors("a").items()}
        bad = {s: (a + 1, b + 1) for s, (a, b) in before.items()}
        last = layer.sites[-1]
        bad[last] = (bad[last][0], bad[last][1][:, :1])  # one wrong shape, on the last site
        with pytest.raises(sb.ConfigError, match="shape"):
            layer.set_factors("a", bad)
        with pytest.raises(sb.ConfigError, match="no factors"):
            layer.set_factors("a", {})
        for s, (a, b) in layer.get_factors("a").items():
            assert torch.equal(a, before[s][0]) and torch.equal(b, before[s][1])


def test_rank_gates_scale_b_along_its_rank_axis_and_fold(case):
    model, x, targets, _ = case
    sb.add_adapter(model, "a", sb.LoRAConfig(rank=2, targets=targets))
    fill(model, "a", seed=1)
    with torch.no_grad():
        y = model(x)
        with sb.disabled(model):
            y0 = model(x)
    twice = copy.deepcopy(model)  # doubling the scale, without gates, is what a gate of 2 does
    for layer in sb.adapter_layers(twice, "a"):
        layer.set_adapter_scale("a", 2 * layer.adapter_scale("a"))
    layers = sb.adapter_layers(model, "a")
    trained = {layer.path: layer.factor_parameters("a")[1] for layer in layers}
    trained_b = {p: b.detach().clone() for p, b in trained.items()}

    gates = {layer.path: Fixed(torch.zeros(2)) for layer in layers}
    for layer in layers:
        layer.add_rank_gate("a", gates[layer.path])
        assert layer.rank_gates("a") == [gates[layer.path]]
        assert layer.factor_parameters("a")[1] is trained[layer.path]  # B still the Parameter
    with torch.no_grad():
        assert torch.allclose(model(x), y0, atol=1e-5)  # all ranks off: the bare base
        for g in gates.values():
            g.values.fill_(2.0)
        y2 = model(x)

    with torch.no_grad():
        assert torch.allclose(twice(x), y2, atol=1e-5)
        assert not torch.allclose(y2, y, atol=1e-3)

    for layer in layers:
        layer.remove_rank_gates("a", fold=True)  # B keeps B diag(2)
        assert layer.rank_gates("a") == []
        b = layer.factor_parameters("a")[1]
        assert torch.allclose(b, 2 * trained_b[layer.path])
    with torch.no_grad():
        assert torch.allclose(model(x), y2, atol=1e-5)


def test_a_rank_gate_of_the_wrong_size_is_refused(vit):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=4, targets=["mlp.fc1"]))
    layer = sb.adapter_layers(vit, "a")[0]
    with pytest.raises(sb.ConfigError, match=r"\(4,\)"):
        layer.add_rank_gate("a", Fixed(torch.ones(3)))
    assert layer.rank_gates("a") == []


def test_scale_reads_and_replaces_and_refreshes_the_eval_cache(vit, x28):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=4, alpha=8, targets=["mlp.fc1", "mlp.fc2"]))
    fill(vit, "a")
    layers = sb.adapter_layers(vit, "a")
    assert all(layer.adapter_scale("a") == 2.0 for layer in layers)
    with torch.no_grad():
        y = vit(x28)  # eval mode: runs (and caches) the merged weight
        with sb.disabled(vit):
            y0 = vit(x28)
        for layer in layers:
            layer.set_adapter_scale("a", 0.0)
        assert torch.allclose(vit(x28), y0, atol=1e-6) and not torch.allclose(y, y0, atol=1e-3)
    for bad in (float("nan"), "2", True):
        with pytest.raises(sb.ConfigError):
            layers[0].set_adapter_scale("a", bad)
    with pytest.raises(sb.AdapterNotFound):
        layers[0].adapter_scale("missing")


def test_adapter_layers_by_name(vit):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=2, targets=["mlp.fc1"]))
    sb.add_adapter(vit, "b", sb.LoRAConfig(rank=2, targets=["mlp.fc2"]))
    assert {layer.path for layer in sb.adapter_layers(vit, "a")} == {
        "blocks.0.mlp.fc1",
        "blocks.1.mlp.fc1",
    }
    assert len(sb.adapter_layers(vit)) == 4
    assert all(layer.has_adapter("b") for layer in sb.adapter_layers(vit, "b"))
    with pytest.raises(sb.AdapterNotFound):
        sb.adapter_layers(vit, "c")


def test_fingerprint_base_id_is_the_catalogs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sb.add_adapter(model, "a", sb.LoRAConfig(rank=2, targets=["0", "2"]))
    paths = [layer.path for layer in sb.adapter_layers(model, "a")]
    bank = sb.SkillBank.open(tmp_path / "bank")
    try:
        bank.add("a", sb.Skill.from_model(model, "a"), embed_text=False)
        base = sb.fingerprint(model, paths).base_id()
        assert [r.name for r in bank.list(base_id=base)] == ["a"]
        other = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
        sb.add_adapter(other, "a", sb.LoRAConfig(rank=2, targets=["0", "2"]))
        assert bank.list(base_id=sb.fingerprint(other, paths).base_id()) == []
    finally:
        bank.close()


def test_learners_use_only_the_public_adapter_api():
    """No learner (nor eval) reaches into adapter internals; no learner imports storage."""
    internals = re.compile(r"lora_[AB]|\.scaling\b|\.ranks\b|skillbank\.adapters\.|sb\.adapters\.")
    storage = re.compile(r"^\s*(?:from|import) storage\b", re.M)
    root = Path(__file__).resolve().parent.parent
    for package in ("learners", "eval"):
        for path in sorted((root / package).glob("*.py")):
            text = path.read_text()
            assert not internals.search(text), (path, internals.findall(text))
            if package == "learners":
                assert not storage.search(text), path
