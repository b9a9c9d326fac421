"""Bad adapter requests: a clear error naming the problem, and the model unchanged."""

import pytest
import torch
import torch.nn as nn

import skillbank as sb


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    state, types, grads = snapshot(model)
    assert types == snap[1] and grads == snap[2]
    assert state.keys() == snap[0].keys() and all(
        torch.equal(v, snap[0][k]) for k, v in state.items()
    )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"targets": ["nothing_like_this"]}, sb.NoTargetMatched, "nothing_like_this"),
        ({"targets": ["norm1"]}, sb.UnsupportedModule, "LayerNorm"),
        ({"targets": ["qkv"], "rank": 49}, sb.ConfigError, r"rank 49 .*blocks\.0\.attn\.qkv"),
        (
            {"targets": ["qkv"], "rank_pattern": {"blocks.1.attn.qkv": 500}},
            sb.ConfigError,
            "rank 500",
        ),
        ({"targets": ["qkv"], "head": "no_such_head"}, sb.ConfigError, "no_such_head"),
    ],
)
def test_add_adapter_refuses_and_leaves_model_unchanged(vit, kwargs, error, match):
    snap = snapshot(vit)
    with pytest.raises(error, match=match):
        sb.add_adapter(vit, "a", sb.LoRAConfig(**kwargs))
    assert_unchanged(vit, snap)
    assert sb.adapter_names(vit) == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank"),
        ({"rank": -2}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"alpha": float("nan")}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": []}, "targets"),
        ({"targets": ["re:("]}, "regular expression"),
        ({"init": "magic"}, "init"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(sb.ConfigError, match=match):
        sb.LoRAConfig(**kwargs)


def test_duplicate_unknown_and_invalid_names(vit):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=2, targets=["qkv"]))
    snap = snapshot(vit)
    with pytest.raises(sb.AdapterExists, match="'a'"):
        sb.add_adapter(vit, "a", sb.LoRAConfig(rank=2, targets=["fc1"]))
    for call in (
        lambda: sb.set_active(vit, ["a", "ghost"]),
        lambda: sb.remove_adapter(vit, "ghost"),
        lambda: sb.Skill.from_model(vit, "ghost"),
    ):
        with pytest.raises(sb.AdapterNotFound, match="ghost"):
            call()
    for bad in ("", "a.b", "../x", "x" * 201, "tab\there"):
        with pytest.raises(sb.InvalidName):
            sb.add_adapter(vit, bad, sb.LoRAConfig(rank=2, targets=["fc1"]))
    with pytest.raises(sb.ConfigError, match="weights"):
        sb.set_active(vit, ["a"], weights=[1.0, 2.0])
    assert_unchanged(vit, snap)


def test_out_proj_alone_and_unsupported_attention_are_refused():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.raises(sb.UnsupportedModule, match="kdim"):
        sb.add_adapter(model, "a", sb.LoRAConfig(rank=2, targets=["re:attn"]))
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2))
    with pytest.raises(sb.UnsupportedModule, match="target the attention module"):
        sb.add_adapter(model, "a", sb.LoRAConfig(rank=2, targets=["out_proj"]))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(sb.UnsupportedModule, match="groups=2"):
        sb.add_adapter(grouped, "a", sb.LoRAConfig(rank=2, targets=[nn.Conv2d]))


def test_merged_model_refuses_changes(vit):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=2, targets=["qkv"]))
    sb.merge(vit)
    for call in (
        lambda: sb.set_active(vit, None),
        lambda: sb.remove_adapter(vit, "a"),
        lambda: sb.add_adapter(vit, "b", sb.LoRAConfig(rank=2, targets=["qkv"])),
    ):
        with pytest.raises(sb.MergedError, match="unmerge"):
            call()
    with pytest.raises(sb.MergedError):
        with sb.mixed_batch(vit, ["a"] * 6):
            vit(torch.randn(6, 1, 28, 28))
    sb.unmerge(vit)
    sb.remove_adapter(vit, "a")


def test_mixed_batch_rejects_wrong_row_count(vit):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=2, targets=["qkv"]))
    with pytest.raises(sb.ConfigError, match="rows"):
        with torch.no_grad(), sb.mixed_batch(vit, ["a", None]):
            vit(torch.randn(3, 1, 28, 28))
    # the context is left cleanly: the model runs normally afterwards
    assert all(layer.rows is None for layer in sb.adapter_layers(vit))
