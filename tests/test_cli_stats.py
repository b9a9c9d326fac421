"""`skillbank stats rebuild`: routing statistics for a version that has none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import skillbank as sb
from cli import app
from eval.backbones import create_backbone


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    base = create_backbone("vit_nano", img_size=8, num_classes=10).eval()
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    sb.add_adapter(base, "a", sb.LoRAConfig(rank=2, targets=["attn.qkv"]))
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(40, 1, 8, 8, generator=g), torch.arange(40) % 3
    data = tmp_path / "data.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    bank_dir = tmp_path / "bank"
    with sb.SkillBank.open(bank_dir) as bank:  # as 0.1.0 stored it: no statistics
        ref = str(bank.add("a", sb.Skill.from_model(base, "a"), embed_text=False))
    args = ["--bank", str(bank_dir), "stats", "rebuild", ref, "--data", str(data)]
    return bank_dir, ref, args + ["--backbone", "vit_nano", "--weights", str(weights)], x, y


def test_rebuild_stores_what_compute_stats_gives(setup):
    bank_dir, ref, args, x, y = setup
    with sb.SkillBank.open(bank_dir) as bank, pytest.raises(sb.MissingStats, match="stats rebuild"):
        bank.route_stats([ref])
    got = CliRunner().invoke(app, args)
    assert got.exit_code == 0, got.output
    assert "3 classes, 40 samples" in got.output
    weights = args[args.index("--weights") + 1]
    base = create_backbone("vit_nano", img_size=8, num_classes=10, weights=weights).eval()
    want = sb.compute_stats(base, x, y)
    with sb.SkillBank.open(bank_dir) as bank:
        stored = bank.route_stats([ref])[ref]
    assert stored.classes == (0, 1, 2) and stored.layers == want.layers
    expected = want.to_arrays()
    assert set(stored.to_arrays()) == set(expected)
    for key, got in stored.to_arrays().items():
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, expected[key], rtol=1e-6, atol=1e-9)
        else:
            np.testing.assert_array_equal(got, expected[key])
    # a second rebuild is refused: statistics are immutable like the version
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already" in again.output


def test_rebuild_refuses_bad_data_and_another_base(setup, tmp_path):
    bank_dir, ref, args, x, y = setup
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=x.numpy(), labels=y.numpy())
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=x.numpy(), y=np.array([object()] * 40, dtype=object))
    short = tmp_path / "short.npz"
    np.savez(short, x=x.numpy(), y=y.numpy()[:-1])
    data_at = args.index("--data") + 1
    for path, match in ((bad, "lacks y"), (pickled, "pickle"), (short, "N samples")):
        got = CliRunner().invoke(app, [*args[:data_at], str(path), *args[data_at + 1 :]])
        assert got.exit_code == 1 and match in got.output, got.output
    other = [*args[: args.index("--backbone")], "--backbone", "resnet_micro"]
    got = CliRunner().invoke(app, other)
    assert got.exit_code == 1 and "was not trained on this resnet_micro" in got.output
    with sb.SkillBank.open(bank_dir) as bank, pytest.raises(sb.MissingStats):
        bank.route_stats([ref])  # nothing was written
