"""Each corruption changes images, keeps shape and range, is seeded, and grows with severity."""

import pytest
import torch

from eval.corruptions import CORRUPTIONS, COTTA_ORDER, corrupt, frost


@pytest.fixture(scope="module")
def x():
    from eval.data import digits, mnist

    try:
        return mnist(seed=0).x_test[:32]
    except ImportError:  # pragma: no cover
        return torch.nn.functional.interpolate(
            digits().x_test[:32], size=28, mode="bilinear"
        ).clamp(0, 1)


def test_registry_matches_cotta_order():
    assert len(COTTA_ORDER) == 15
    assert COTTA_ORDER[0] == "gaussian_noise" and COTTA_ORDER[-1] == "jpeg_compression"
    assert set(COTTA_ORDER) == set(CORRUPTIONS)


@pytest.mark.parametrize("name", COTTA_ORDER)
def test_changes_image_and_keeps_shape_and_range(x, name):
    for s in (1, 5):
        y = corrupt(x, name, s, seed=0)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert (y - x).abs().mean() > 1e-3


@pytest.mark.parametrize("name", COTTA_ORDER)
def test_deterministic_by_seed(x, name):
    assert torch.equal(corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=7))


@pytest.mark.parametrize(
    "name",
    [
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "glass_blur",
        "motion_blur",
        "snow",
        "frost",
        "fog",
        "elastic_transform",
    ],
)
def test_random_corruptions_depend_on_seed(x, name):
    assert not torch.equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=1))


@pytest.mark.parametrize("name", COTTA_ORDER)
def test_severity_5_moves_images_further_than_1(x, name):
    d1 = (corrupt(x, name, 1, seed=0) - x).abs().mean()
    d5 = (corrupt(x, name, 5, seed=0) - x).abs().mean()
    assert d5 > d1


def test_single_image_and_rgb(x):
    one = corrupt(x[0], "fog", 2, seed=0)
    assert one.shape == x[0].shape
    rgb = x[:4].expand(-1, 3, -1, -1).contiguous()
    for name in COTTA_ORDER:
        y = corrupt(rgb, name, 2, seed=0)
        assert y.shape == rgb.shape and float(y.min()) >= 0 and float(y.max()) <= 1


def test_other_sizes_work():
    small = torch.rand(4, 1, 8, 8)
    for name in COTTA_ORDER:
        assert corrupt(small, name, 5, seed=0).shape == small.shape


def test_bad_arguments_raise(x):
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "rain", 3)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "fog", bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(x * 255, "fog", 3)


def test_frost_says_it_is_procedural():
    assert "procedural" in frost.__doc__
