"""Adapter mechanics on real timm and open_clip models."""

import copy

import pytest
import torch
import torch.nn as nn
from helpers import randomise

import skillbank as sb
from skillbank.adapters.kinds import Conv2dAdapter, LinearAdapter, MultiheadAttentionAdapter

VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def layer_paths(model):
    return sorted(layer.path for layer in sb.adapter_layers(model))


def test_targets_by_suffix_exact_regex_and_type(vit, resnet):
    m = copy.deepcopy(vit)
    sb.add_adapter(m, "suffix", sb.LoRAConfig(rank=2, targets=VIT_TARGETS))
    assert layer_paths(m) == sorted(f"blocks.{i}.{t}" for i in range(2) for t in VIT_TARGETS)

    m = copy.deepcopy(vit)
    sb.add_adapter(m, "exact", sb.LoRAConfig(rank=2, targets=["blocks.1.mlp.fc2"]))
    assert layer_paths(m) == ["blocks.1.mlp.fc2"]

    m = copy.deepcopy(vit)
    sb.add_adapter(m, "regex", sb.LoRAConfig(rank=2, targets=[r"re:blocks\.0\..*fc\d"]))
    assert layer_paths(m) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]

    r = copy.deepcopy(resnet)
    sb.add_adapter(r, "convs", sb.LoRAConfig(rank=2, targets=[nn.Conv2d], exclude=["re:conv1"]))
    layers = sb.adapter_layers(r)
    assert layers and all(isinstance(layer, Conv2dAdapter) for layer in layers)
    assert "conv1" not in layer_paths(r) and "layer1.0.conv1" in layer_paths(r)


def test_base_frozen_only_adapter_and_head_train(vit):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=4, targets=VIT_TARGETS, head="head"))
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    sb.add_adapter(vit, "b", sb.LoRAConfig(rank=4, targets=VIT_TARGETS))
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)  # old adapter and head now frozen


def test_rank_pattern_and_rslora_scale(vit):
    cfg = sb.LoRAConfig(
        rank=8,
        alpha=16,
        targets=VIT_TARGETS,
        rank_pattern={"fc1": 2, "blocks.1.mlp.fc1": 3},
        use_rslora=True,
    )
    sb.add_adapter(vit, "a", cfg)
    by_path = {layer.path: layer for layer in sb.adapter_layers(vit)}
    assert by_path["blocks.0.mlp.fc1"].ranks["a"] == 2
    assert by_path["blocks.1.mlp.fc1"].ranks["a"] == 3  # the longer key wins
    assert by_path["blocks.0.attn.qkv"].lora_A["a"].shape == (8, 48)
    assert by_path["blocks.0.attn.qkv"].scaling["a"] == pytest.approx(16 / 8**0.5)


def test_fresh_adapter_is_a_no_op_and_training_moves_it(vit, x28):
    y0 = vit(x28)
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=4, targets=VIT_TARGETS))
    assert torch.equal(vit(x28), y0)
    vit.train()
    opt = torch.optim.SGD(sb.param_groups(vit, lr=0.1, b_ratio=16), lr=0.1)
    loss = vit(x28).square().mean()
    loss.backward()
    opt.step()
    vit.eval()
    assert not torch.allclose(vit(x28), y0)


def test_param_groups_put_b_at_ratio(vit):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=4, targets=VIT_TARGETS, head="head"))
    groups = sb.param_groups(vit, lr=1e-3, b_ratio=16)
    b_ids = {id(layer.lora_B["a"]) for layer in sb.adapter_layers(vit)}
    slow, fast = groups
    assert fast["lr"] == pytest.approx(16e-3) and {id(p) for p in fast["params"]} == b_ids
    assert slow["lr"] == pytest.approx(1e-3) and not b_ids & {id(p) for p in slow["params"]}
    assert any(p is vit.head.weight for p in slow["params"])


def test_active_set_with_weights_adds_outputs(vit, x28):
    y0 = vit(x28)
    for n in ("a", "b"):
        sb.add_adapter(vit, n, sb.LoRAConfig(rank=4, targets=["blocks.1.mlp.fc2"]))
        randomise(vit, n)
    # fc2 of the last block feeds the head through a norm, so compare at fc2's output
    layer = sb.adapter_layers(vit)[0]
    h = torch.randn(5, 7, 192)
    outs = {}
    for n in ("a", "b"):
        sb.set_active(vit, n)
        outs[n] = layer(h) - layer.base(h)
    sb.set_active(vit, ["a", "b"], weights=[0.25, 2.0])
    vit.train()
    combined = layer(h) - layer.base(h)
    torch.testing.assert_close(combined, 0.25 * outs["a"] + 2.0 * outs["b"], atol=1e-5, rtol=1e-5)
    sb.set_active(vit, None)
    vit.eval()
    torch.testing.assert_close(vit(x28), y0, atol=0, rtol=0)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "fixture,inputs", [("vit", "x28"), ("resnet", "x28"), ("clip_vit", "x_rgb")]
)
def test_merge_is_exact_and_reversible(request, fixture, inputs):
    model, x = request.getfixturevalue(fixture), request.getfixturevalue(inputs)
    targets = {"vit": VIT_TARGETS, "resnet": [nn.Conv2d], "clip_vit": ["attn", "c_fc", "c_proj"]}[
        fixture
    ]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    sb.add_adapter(model, "a", sb.LoRAConfig(rank=4, targets=targets))
    randomise(model, "a", std=0.05)
    model.train()  # unmerged path, with batch-norm statistics frozen below
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eval()
    with torch.no_grad():
        y = model(x)
        for _ in range(50):
            sb.merge(model)
            sb.unmerge(model)
        sb.merge(model)
        ym = model(x)
        sb.unmerge(model)
        assert _rel(ym, y) < 1e-5
        yu = model(x)
    assert torch.equal(yu, y)  # no drift after 50 merge/unmerge cycles
    sb.remove_adapter(model, "a")
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())


def test_eval_mode_merges_automatically_and_train_mode_trains_again(vit, x28):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=4, targets=VIT_TARGETS))
    randomise(vit, "a")
    vit.train()
    with torch.no_grad():
        y_train = vit(x28)
    calls = []  # per layer call: did it run with a low-rank term?
    original = LinearAdapter.run
    LinearAdapter.run = lambda self, weight, add, x: (
        calls.append(add is not None) or original(self, weight, add, x)
    )
    try:
        vit.eval()
        with torch.no_grad():
            y_eval = vit(x28)
        assert calls and not any(calls)  # only the cached merged weights ran
        assert _rel(y_eval, y_train) < 1e-5
        calls.clear()
        vit.train()
        vit(x28).sum().backward()
        assert calls and all(calls), "train mode must run the adapters again"
        grads = [layer.lora_B["a"].grad for layer in sb.adapter_layers(vit)]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        LinearAdapter.run = original


def test_eval_mode_with_grad_keeps_gradients(vit, x28):
    # Test-time adaptation trains in eval mode: the merged cache must not cut the graph.
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=4, targets=VIT_TARGETS))
    randomise(vit, "a")
    vit.eval()
    vit(x28).sum().backward()
    assert all(layer.lora_A["a"].grad is not None for layer in sb.adapter_layers(vit))


def test_eval_cache_follows_weight_changes(vit, x28):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=4, targets=VIT_TARGETS))
    with torch.no_grad():
        y0 = vit(x28)
        randomise(vit, "a")  # in-place change after the cache was built
        y1 = vit(x28)
    assert not torch.allclose(y0, y1)


def test_open_clip_attention_adapts_q_k_v_and_out_proj(clip_vit, x_rgb):
    sb.add_adapter(clip_vit, "a", sb.LoRAConfig(rank=4, targets=["attn"]))
    kinds = {layer.path: type(layer) for layer in sb.adapter_layers(clip_vit)}
    assert kinds["transformer.resblocks.0.attn"] is MultiheadAttentionAdapter
    assert kinds["transformer.resblocks.0.attn.out_proj"] is LinearAdapter
    attn = clip_vit.transformer.resblocks[0].attn
    assert attn.lora_A["a"].shape == (3, 4, 48) and attn.lora_B["a"].shape == (3, 48, 4)
    # each of q, k, v has its own factors: changing only v's B moves only the v rows of the delta
    with torch.no_grad():
        attn.lora_B["a"][2].normal_()
    delta = attn.delta_weight((("a", 1.0),))
    assert delta[:96].abs().sum() == 0 and delta[96:].abs().sum() > 0
    # and the adapted forward equals native attention with the merged weight
    sb.set_active(clip_vit, "a")
    clip_vit.train()
    with torch.no_grad():
        y = clip_vit(x_rgb)
        sb.merge(clip_vit)
        ym = clip_vit(x_rgb)  # the native nn.MultiheadAttention path
        sb.unmerge(clip_vit)
    assert _rel(y, ym) < 1e-5


def test_attention_masks_match_native(x_rgb):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=False)
    model = nn.Sequential()
    model.add_module("attn", mha)
    ref = copy.deepcopy(mha)
    sb.add_adapter(model, "a", sb.LoRAConfig(rank=2, targets=["attn"]))
    q, kv = torch.randn(5, 3, 16), torch.randn(7, 3, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    layer = sb.adapter_layers(model)[0]
    layer.train(False)
    for need in (True, False):
        out, w = layer(q, kv, kv, key_padding_mask=pad, attn_mask=causal, need_weights=need)
        out_ref, w_ref = ref(q, kv, kv, key_padding_mask=pad, attn_mask=causal, need_weights=need)
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-4)
        if need:
            torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-4)
    # with a live adapter the adapter path (not the native module) runs and agrees with a merge
    randomise(model, "a")
    layer.train(True)
    with torch.no_grad():
        out, _ = layer(q, kv, kv, key_padding_mask=pad, need_weights=False)
        sb.merge(model)
        out_m, _ = layer(q, kv, kv, key_padding_mask=pad, need_weights=False)
        sb.unmerge(model)
    torch.testing.assert_close(out, out_m, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "fixture,inputs", [("vit", "x28"), ("resnet", "x28"), ("clip_vit", "x_rgb")]
)
def test_mixed_batch_equals_rows_run_alone(request, fixture, inputs):
    model, x = request.getfixturevalue(fixture), request.getfixturevalue(inputs)
    targets = {"vit": VIT_TARGETS, "resnet": [nn.Conv2d], "clip_vit": ["attn", "c_fc", "c_proj"]}[
        fixture
    ]
    names = ["a", "b", "c"]
    for i, n in enumerate(names):
        sb.add_adapter(model, n, sb.LoRAConfig(rank=2 + 2 * i, targets=targets))  # ranks differ
        randomise(model, n, std=0.05)
    rows = ["b", None, "a", "c", "b", "a"]
    with torch.no_grad():
        with sb.mixed_batch(model, rows):
            y = model(x)
        for i, name in enumerate(rows):
            sb.set_active(model, name)
            alone = model(x[i : i + 1])
            assert (y[i] - alone[0]).abs().max() < 1e-5, (i, name)


def test_mixed_batch_uses_no_loop_over_adapters(vit, x28):
    # 16 adapters: every layer does one gather + two batched matmuls, never a per-adapter call.
    for i in range(16):
        sb.add_adapter(vit, f"s{i}", sb.LoRAConfig(rank=4, targets=VIT_TARGETS))
    calls = []
    original = torch.bmm
    rows = [f"s{i % 16}" for i in range(6)]
    try:
        torch.bmm = lambda *a, **k: calls.append(1) or original(*a, **k)
        with torch.no_grad(), sb.mixed_batch(vit, rows):
            vit(x28)
    finally:
        torch.bmm = original
    assert len(calls) == len(sb.adapter_layers(vit))  # one down-projection bmm per layer


def test_remove_adapter_restores_modules(vit):
    types = {n: type(m) for n, m in vit.named_modules()}
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=2, targets=VIT_TARGETS))
    sb.add_adapter(vit, "b", sb.LoRAConfig(rank=2, targets=["fc1"]))
    sb.remove_adapter(vit, "a")
    assert layer_paths(vit) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    sb.remove_adapter(vit, "b")
    assert {n: type(m) for n, m in vit.named_modules()} == types
    assert sb.adapter_names(vit) == []


def test_dropout_is_applied_in_training_only(vit, x28):
    sb.add_adapter(vit, "a", sb.LoRAConfig(rank=4, targets=VIT_TARGETS, dropout=0.5))
    randomise(vit, "a")
    vit.train()
    with torch.no_grad():
        torch.manual_seed(0)
        y1 = vit(x28)
        torch.manual_seed(1)
        y2 = vit(x28)
        vit.eval()
        y3, y4 = vit(x28), vit(x28)
    assert not torch.allclose(y1, y2) and torch.equal(y3, y4)


def test_fused_training_path_matches_plain_autograd(vit, x28):
    # The fused op and the generic path (dropout p=0 forces neither; autocast-free CPU uses fused)
    # must give the same gradients for adapters, head and inputs.
    from skillbank.adapters.functional import lora_linear

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    w, bias = torch.randn(6, 8, dtype=torch.double), torch.randn(6, dtype=torch.double)
    a = torch.randn(3, 8, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.double, requires_grad=True)
    s = torch.tensor([0.5, 0.5, 2.0], dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x, a, b: lora_linear(x, w, bias, a, b, s), (x, a, b))
    plain = torch.nn.functional.linear(x, w, bias) + (x @ a.t() * s) @ b.t()
    torch.testing.assert_close(lora_linear(x, w, bias, a, b, s), plain)
    # and on a model with two active adapters (concatenated factors) against a dropout-path layer
    for n in ("p", "q"):
        sb.add_adapter(vit, n, sb.LoRAConfig(rank=2, targets=["fc1"]))
        randomise(vit, n)
    sb.set_active(vit, ["p", "q"], weights=[0.5, 1.5])
    for lay in sb.adapter_layers(vit):
        for p in lay.adapter_parameters("p"):
            p.requires_grad_(True)  # add_adapter("q") froze "p"
    vit.train()
    vit(x28).square().mean().backward()
    layer = sb.adapter_layers(vit)[0]
    fused = [layer.lora_A[n].grad.clone() for n in ("p", "q")]
    for n in ("p", "q"):
        layer.lora_A[n].grad = None
    for lay in sb.adapter_layers(vit):  # Dropout (not Identity) takes the generic path
        lay.lora_dropout["p"] = torch.nn.Dropout(0.0)
    for p in vit.parameters():
        p.grad = None
    vit(x28).square().mean().backward()
    for g, n in zip(fused, ("p", "q"), strict=True):
        torch.testing.assert_close(layer.lora_A[n].grad, g, atol=1e-6, rtol=1e-4)
