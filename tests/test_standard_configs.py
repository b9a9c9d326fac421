"""The standard-benchmark configs (split CIFAR-100, ImageNet-R) and their loading paths,
on tiny files in the real on-disk layouts; nothing downloads."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import skillbank as sb
from eval import backbones
from eval.config import build_stream, load
from eval.driver import Context
from eval.runner import BASELINES, list_learners
from eval.streams import legacy_order

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CIFAR = CONFIGS / "split-cifar100.yaml"
IMAGENET_R = CONFIGS / "imagenet-r.yaml"
# A tiny ViT: the weights paths do not depend on the size.
TINY = dict(depth=1, embed_dim=32, num_heads=2, img_size=32, patch_size=8)
VIT = "vit_tiny_patch16_224"


@pytest.mark.parametrize("path", [CIFAR, IMAGENET_R])
def test_configs_load_and_validate(path):
    cfg = load(path)
    assert cfg.backbone == "vit_base_patch16_224.augreg_in21k"
    assert cfg.pretrained is True and cfg.weights is None
    assert cfg.download is False  # nothing downloads unless asked
    assert cfg.tasks == 10 and cfg.scenario == "class" and cfg.class_order_seed == 1993
    assert set(cfg.learners) <= set(list_learners()) | set(BASELINES)


def test_class_order_is_pycil_seed_1993():
    state = np.random.get_state()
    try:
        np.random.seed(1993)  # exactly what PyCIL / LAMDA-PILOT do
        pycil = np.random.permutation(100).tolist()
    finally:
        np.random.set_state(state)
    assert legacy_order(range(100), 1993) == pycil
    assert pycil[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]


def _fake_cifar100(root: Path, per_class: tuple[int, int] = (2, 1)) -> np.ndarray:
    """train/test/meta pickles in CIFAR-100's python format; returns the train images."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = None
    for split, n in zip(("train", "test"), per_class, strict=True):
        labels = [c for c in range(100) for _ in range(n)]
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        doc = {
            "filenames": [f"{i}.png" for i in range(len(labels))],
            "batch_label": split,
            "fine_labels": labels,
            "coarse_labels": [c // 5 for c in labels],
            "data": data,
        }
        (folder / split).write_bytes(pickle.dumps(doc))
        out = data if split == "train" else out
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": list("ab")}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return out


def test_cifar100_from_a_folder_in_torchvision_layout(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    train = _fake_cifar100(tmp_path)
    # Fake files cannot match the real checksums; torchvision checks them for real data.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    monkeypatch.setattr(
        tv_cifar.CIFAR100, "download", lambda self: pytest.fail("must not download")
    )
    stream = build_stream(load(CIFAR, data_root=str(tmp_path)))
    order = legacy_order(range(100), 1993)
    assert len(stream) == 10 and stream.scenario == "class" and stream.n_classes == 100
    assert stream.image_shape == (3, 32, 32) and stream.source is None
    assert [t.classes for t in stream] == [tuple(order[i : i + 10]) for i in range(0, 100, 10)]
    first = stream[0]
    assert len(first.x_train) == 20 and len(first.x_test) == 10
    # Pixels survive the N x 3072 -> N x 3 x 32 x 32 layout: the first train image of class 68.
    row = train[68 * 2].reshape(3, 32, 32)
    assert torch.equal(first.x_train[first.y_train == 68][0], torch.from_numpy(row).float() / 255)


def test_absent_cifar100_without_download_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(
        tv_cifar.CIFAR100, "download", lambda self: pytest.fail("must not download")
    )
    cfg = load(CIFAR, data_root=str(tmp_path / "data"))
    with pytest.raises(sb.ConfigError, match="cifar-100-python") as e:
        build_stream(cfg)
    assert "download: true" in str(e.value) and "cifar-100-python.tar.gz" in str(e.value)
    assert not (tmp_path / "data").exists()


def _tree(root: Path, classes: int = 20, per_class: int = 5) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):  # mixed sizes and modes, as in ImageNet-R
            shape = (10 + i, 12, 3) if i % 2 else (9, 11)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(d / f"{i}.jpg")


def test_image_folder_config_builds_a_stream(tmp_path):
    _tree(tmp_path / "imagenet-r")
    cfg = load(IMAGENET_R, data_root=str(tmp_path / "imagenet-r"))
    stream = build_stream(cfg)
    assert len(stream) == 10 and stream.n_classes == 20 and stream.source is None
    assert stream.image_shape == (3, cfg.image_size, cfg.image_size)
    order = legacy_order(range(20), 1993)
    assert [t.classes for t in stream] == [tuple(order[i : i + 2]) for i in range(0, 20, 2)]
    assert sum(len(t.x_train) + len(t.x_test) for t in stream) == 100


def test_absent_image_folder_is_a_clear_error(tmp_path):
    with pytest.raises(sb.ConfigError, match="nothing is downloaded"):
        build_stream(load(IMAGENET_R, data_root=str(tmp_path / "missing")))


def test_new_keys_are_validated_and_defaults_unchanged(tmp_path):
    default = load()
    assert (default.stream, default.source_fraction, default.backbone) == (
        "domains-mnist",
        0.5,
        "vit_micro",
    )
    assert not default.pretrained and default.weights is None and not default.download
    bad = [
        dict(stream="split-cifar100"),  # no data_root
        dict(data_root="x"),  # split-mnist reads no user data
        dict(class_order_seed=1993),
        dict(stream="image-folder", data_root="x", download=True),  # cannot download
        dict(stream="image-folder", data_root="x", image_size=0),
        dict(stream="split-cifar100", data_root="x", download="yes"),
        dict(pretrained=True),  # a preset has no published weights
        dict(backbone=VIT, pretrained=True, weights=str(tmp_path / "w.safetensors")),
        dict(backbone=VIT, weights=str(tmp_path / "missing.safetensors")),
        dict(source_fraction=0.0),  # a source split is needed without weights
    ]
    for overrides in bad:
        with pytest.raises(sb.ConfigError):
            load(**overrides)


def _save_tiny(tmp_path: Path, name: str, num_classes: int = 7) -> dict[str, torch.Tensor]:
    import timm
    from safetensors.torch import save_file

    state = timm.create_model(VIT, num_classes=num_classes, **TINY).state_dict()
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / name))
    else:
        torch.save(state, tmp_path / name)
    return state


@pytest.mark.parametrize("name", ["w.safetensors", "w.pt"])
def test_local_weights_load_into_a_timm_model_with_a_fresh_head(tmp_path, name):
    state = _save_tiny(tmp_path, name)
    model = backbones.from_weights(VIT, 5, weights=tmp_path / name, **TINY)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("head."))
    assert own["head.weight"].shape == (5, 32)
    # Small grey images are repeated to RGB and resized to the model's input size.
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 5)
    assert model.forward_features(torch.rand(2, 3, 16, 16)).shape[0] == 2


class _Payload:  # unpickling this would run code: weights_only must refuse it
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_weights_refuse_a_pickle_and_a_mismatch(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": _Payload(str(marker))}, protocol=2))
    with pytest.raises(sb.ConfigError, match="refusing"):
        backbones.from_weights(VIT, 5, weights=tmp_path / "evil.pt", **TINY)
    assert not marker.exists()
    _save_tiny(tmp_path, "w.safetensors")
    with pytest.raises(sb.ConfigError, match="does not fit"):
        backbones.from_weights(VIT, 5, weights=tmp_path / "w.safetensors", **{**TINY, "depth": 2})


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    import timm

    def offline(*a, pretrained=False, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(sb.ConfigError, match="weights: PATH"):
        backbones.from_weights(VIT, 5, pretrained=True)


def test_run_context_uses_the_weights_instead_of_pretraining(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    full = timm.create_model(VIT, num_classes=3).state_dict()
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "w.safetensors"))
    cfg = load(backbone=VIT, weights=str(tmp_path / "w.safetensors"), source_fraction=0.0)
    monkeypatch.setattr(backbones, "pretrain", lambda *a, **k: pytest.fail("must not pretrain"))
    ctx = Context(None, torch.device("cpu"), "r", (0,), backbone=VIT, cfg=cfg)
    model = ctx.pretrained(None, 10)
    assert model.head.out_features == 10 and torch.equal(
        model.state_dict()["blocks.0.attn.qkv.weight"], full["blocks.0.attn.qkv.weight"]
    )
