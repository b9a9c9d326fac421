"""Backbones: building by name, safe weight loading, features, cached pretraining."""

import pickle

import pytest
import torch

import skillbank as sb
from eval import backbones
from eval.backbones import create_backbone, features, load_weights, pretrain, resolve_device
from eval.data import Task


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_preset_shapes():
    m = create_backbone("vit_nano", num_classes=7)
    assert _outputs(m, torch.rand(3, 1, 28, 28)).shape == (3, 7)
    assert m.patch_embed.grid_size == (4, 4)  # default patch = img_size // 4 for presets
    m8 = create_backbone("vit_nano", img_size=8, in_chans=3)
    assert _outputs(m8, torch.rand(2, 3, 8, 8)).shape == (2, 10)


def test_resnet_preset_has_batch_norms_and_a_widenable_fc_head(tmp_path, source):
    m = create_backbone("resnet_micro", num_classes=6)
    assert _outputs(m, torch.rand(3, 1, 28, 28)).shape == (3, 6)
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    assert backbones._classifier(m) == "fc"
    wide = pretrain(
        "resnet_micro", source, epochs=1, cache_dir=tmp_path, device="cpu", num_classes=30
    )
    assert wide.fc.out_features == 30 and _outputs(wide, source.x_test[:4]).shape == (4, 30)


def test_timm_vit_rebuilt_for_28px_and_cnn_without_patch_args():
    vit = create_backbone("vit_tiny_patch16_224", depth=1)
    assert vit.patch_embed.grid_size == (7, 7)  # patch 4 on 28 x 28
    assert _outputs(vit, torch.rand(2, 1, 28, 28)).shape == (2, 10)
    cnn = create_backbone("resnet10t", num_classes=4)
    assert _outputs(cnn, torch.rand(2, 1, 28, 28)).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("no_such_model_xyz")


def test_open_clip_vision_tower_with_head():
    m = create_backbone("open_clip:ViT-B-32", layers=1, width=32, head_width=16, num_classes=5)
    x = torch.rand(2, 1, 28, 28)
    assert _outputs(m, x).shape == (2, 5)
    assert features(m, x).shape == (2, m.num_features)


def test_weights_round_trip_safetensors_and_pt(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("vit_nano")
    x = torch.rand(4, 1, 28, 28)
    save_file(
        {k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        dst = create_backbone("vit_nano", weights=tmp_path / name)
        assert torch.equal(_outputs(dst, x), _outputs(src, x))
    with pytest.raises(FileNotFoundError):
        create_backbone("vit_nano", weights=tmp_path / "missing.pt")


class _Payload:  # a pickled object that is not a tensor: weights_only must refuse it
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pt_loading_refuses_arbitrary_pickles(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_weights(create_backbone("vit_nano"), tmp_path / "evil.pt")


def test_features_match_forward_head():
    m = create_backbone("vit_nano").eval()
    x = torch.rand(5, 1, 28, 28)
    f = features(m, x, batch_size=2)
    assert f.shape == (5, 32) and not f.requires_grad
    with torch.no_grad():
        assert torch.allclose(f, m.forward_head(m.forward_features(x), pre_logits=True), atol=1e-6)
    # any other module: the input of a named head, else the output
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x3 = torch.rand(2, 3)
    with torch.no_grad():
        assert torch.allclose(features(mlp, x3, head="2"), mlp[1](mlp[0](x3)))
        assert torch.allclose(features(mlp, x3), mlp(x3))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def source():
    from eval.streams import mnist

    s = mnist(seed=0).source
    return Task("src", s.x_train[:300], s.y_train[:300], s.x_test[:100], s.y_test[:100], s.classes)


def test_pretrain_caches_and_reloads(tmp_path, source, monkeypatch):
    rng_before = torch.get_rng_state()
    kw = dict(epochs=1, seed=0, cache_dir=tmp_path, device="cpu", batch_size=64)
    first = pretrain("vit_nano", source, **kw)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not first.pretrain_info["cached"]
    assert 0.0 <= first.pretrain_info["test_acc"] <= 1.0
    untrained = create_backbone("vit_nano")
    x = source.x_test[:16]
    assert not torch.allclose(_outputs(first, x), _outputs(untrained, x))

    def no_training(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(backbones, "train", no_training)
    second = pretrain("vit_nano", source, **kw)
    assert second.pretrain_info["cached"]
    assert second.pretrain_info["test_acc"] == pytest.approx(first.pretrain_info["test_acc"])
    assert torch.equal(_outputs(second, x), _outputs(first, x))
    with pytest.raises(AssertionError, match="cache"):
        pretrain("vit_nano", source, **{**kw, "seed": 1})  # a different key must train


def test_a_wider_stream_reuses_the_source_backbone(tmp_path, source, monkeypatch):
    kw = dict(epochs=1, seed=0, cache_dir=tmp_path, device="cpu", batch_size=64)
    narrow = pretrain("vit_nano", source, **kw)
    monkeypatch.setattr(backbones, "train", lambda *a, **k: pytest.fail("retrained"))
    width = 1 + max(source.classes)
    wide = pretrain("vit_nano", source, **kw, num_classes=width + 20)
    assert wide.pretrain_info["cached"] and len(list(tmp_path.glob("*.safetensors"))) == 1
    x = source.x_test[:8]
    logits = _outputs(wide, x)
    assert logits.shape == (8, width + 20)
    torch.testing.assert_close(logits[:, :width], _outputs(narrow, x))
    assert torch.count_nonzero(logits[:, width:]) == 0  # new classes start at logit 0
    with pytest.raises(sb.ConfigError, match="fewer than the source"):
        pretrain("vit_nano", source, **kw, num_classes=width - 1)


def test_pretrain_is_deterministic_and_honours_env_cache(tmp_path, source, monkeypatch):
    monkeypatch.setenv("SKILLBANK_CACHE", str(tmp_path / "env"))
    a = pretrain("vit_nano", source, epochs=1, seed=3, device="cpu")
    assert a.pretrain_info["path"].startswith(str(tmp_path / "env" / "backbones"))
    b = pretrain("vit_nano", source, epochs=1, seed=3, device="cpu", cache_dir=tmp_path / "other")
    assert not b.pretrain_info["cached"]
    x = source.x_test[:8]
    assert torch.equal(_outputs(a, x), _outputs(b, x))
