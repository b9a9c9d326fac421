"""Skills as files: save/load, attach, PEFT interop, and refusal of bad files."""

import copy
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import randomise, tiny_vit
from safetensors.torch import save_file

import skillbank as sb

VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


@pytest.fixture
def trained(vit):
    base = copy.deepcopy(vit)
    sb.add_adapter(
        vit,
        "task",
        sb.LoRAConfig(rank=4, targets=VIT_TARGETS, rank_pattern={"fc1": 2}, head="head"),
    )
    randomise(vit, "task")
    with torch.no_grad():
        vit.head.weight.normal_(std=0.1)
    return base, vit


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_skill_holds_factors_fingerprint_and_head(trained):
    _, model = trained
    skill = sb.Skill.from_model(model, "task", hash_weights=True, metadata={"task": "t0"})
    assert skill.ranks["blocks.0.mlp.fc1"] == 2 and skill.ranks["blocks.0.attn.qkv"] == 4
    assert skill.factors["blocks.0.attn.qkv"][1].shape == (144, 4)
    sig = skill.fingerprint.modules["blocks.0.attn.qkv"]
    assert (sig.kind, sig.shape, sig.dtype) == ("Linear", (144, 48), "float32") and len(
        sig.sha256
    ) == 64
    assert set(skill.head) == {"head.weight", "head.bias"}
    assert skill.targets == sorted(f"blocks.{i}.{t}" for i in range(2) for t in VIT_TARGETS)


def test_save_load_attach_reproduces_outputs(trained, x28, tmp_path):
    base, model = trained
    skill = sb.Skill.from_model(model, "task")
    skill.embeddings["examples"] = np.ones((2, 5), dtype=np.float32)
    path = skill.save(tmp_path / "task.safetensors")
    loaded = sb.Skill.load(path)
    assert loaded.embeddings["examples"].shape == (2, 5) and loaded.scales == skill.scales
    fresh = copy.deepcopy(base)
    sb.attach(fresh, loaded)
    torch.testing.assert_close(outputs(fresh, x28), outputs(model, x28), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs(fresh, x28), outputs(base, x28))


def test_attach_conv_and_attention_skills(resnet, clip_vit, x28, x_rgb):
    for model, x, targets in ((resnet, x28, [nn.Conv2d]), (clip_vit, x_rgb, ["attn", "c_fc"])):
        base = copy.deepcopy(model)
        sb.add_adapter(model, "s", sb.LoRAConfig(rank=3, targets=targets))
        randomise(model, "s", std=0.05)
        skill = sb.Skill.from_bytes(sb.Skill.from_model(model, "s").to_bytes())
        sb.attach(base, skill)
        torch.testing.assert_close(outputs(base, x), outputs(model, x), atol=1e-5, rtol=1e-5)


def test_attach_refuses_another_base_naming_the_module(trained, tmp_path):

    _, model = trained
    skill = sb.Skill.from_model(model, "task")
    other = tiny_vit(mlp_ratio=2.0)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(sb.BaseMismatch, match=r"blocks\.0\.mlp\.fc1"):
        sb.attach(other, skill)
    assert sb.adapter_names(other) == [] and all(
        torch.equal(v, before[k]) for k, v in other.state_dict().items()
    )


def test_attach_with_weight_hash_refuses_retrained_base(trained):
    base, model = trained
    skill = sb.Skill.from_model(model, "task", hash_weights=True)
    with torch.no_grad():
        base.blocks[0].attn.qkv.weight.add_(1e-3)
    with pytest.raises(sb.BaseMismatch, match="base weights differ"):
        sb.attach(base, skill)
    sb.attach(base, skill, strict=False)  # shapes agree: allowed when asked


def test_peft_roundtrip_both_ways(trained, vit, x28, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base, model = trained
    # ours -> PEFT
    sb.Skill.from_model(model, "task").to_peft(tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(outputs(peft_model, x28), outputs(model, x28), atol=1e-5, rtol=1e-5)
    # PEFT -> ours, with rsLoRA, rank and alpha patterns and a saved head
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["qkv", "fc2"],
        rank_pattern={"fc2": 2},
        alpha_pattern={"qkv": 3},
        use_rslora=True,
        modules_to_save=["head"],
    )
    peft_model = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(std=0.2)
    peft_model.save_pretrained(tmp_path / "theirs")
    skill = sb.Skill.from_peft(tmp_path / "theirs", name="from-peft")
    assert skill.ranks["blocks.0.mlp.fc2"] == 2 and skill.scales[
        "blocks.0.attn.qkv"
    ] == pytest.approx(3 / 2)
    fresh = copy.deepcopy(base)
    sb.attach(fresh, skill)
    torch.testing.assert_close(outputs(fresh, x28), outputs(peft_model, x28), atol=1e-5, rtol=1e-5)


def test_peft_conv_roundtrip(resnet, x28, tmp_path):
    from peft import PeftModel

    base = copy.deepcopy(resnet)
    sb.add_adapter(resnet, "c", sb.LoRAConfig(rank=2, targets=["layer1.0.conv1", "layer2.0.conv2"]))
    randomise(resnet, "c", std=0.05)
    sb.Skill.from_model(resnet, "c").to_peft(tmp_path / "c")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "c")
    torch.testing.assert_close(outputs(peft_model, x28), outputs(resnet, x28), atol=1e-5, rtol=1e-5)
    back = sb.Skill.from_peft(tmp_path / "c")
    sb.attach(base, back)
    torch.testing.assert_close(outputs(base, x28), outputs(resnet, x28), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ bad files
def test_pickle_offered_as_skill_is_refused_unopened(tmp_path):
    for name, data in (("a.bin", pickle.dumps({"x": 1})), ("a.pt", None)):
        path = tmp_path / name
        if data is None:
            torch.save({"x": torch.ones(2)}, path)
        else:
            path.write_bytes(data)
        with pytest.raises(sb.UnsafeFile, match="never unpickles"):
            sb.Skill.load(path)


def test_truncated_and_corrupt_files_are_refused(trained, tmp_path):
    data = sb.Skill.from_model(trained[1], "task").to_bytes()
    for bad in (
        data[:5],
        data[: len(data) // 2],
        b"\xff" * 8 + data[8:],
        data[:8] + b"{not json" + data[17:],
    ):
        with pytest.raises(sb.CorruptFile):
            sb.Skill.from_bytes(bad)
    absurd = (10**15).to_bytes(8, "little") + b"{}"
    with pytest.raises(sb.UnsafeFile, match="header"):
        sb.Skill.from_bytes(absurd)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(sb.CorruptFile, match="not a skillbank skill"):
        sb.Skill.load(plain)


def test_nan_weights_and_shape_mismatch_are_refused(trained):
    _, model = trained
    skill = sb.Skill.from_model(model, "task")
    a, b = skill.factors["blocks.0.attn.qkv"]
    skill.factors["blocks.0.attn.qkv"] = (a, b.clone().fill_(float("nan")))
    with pytest.raises(sb.CorruptFile, match="NaN"):
        sb.Skill.from_bytes(skill.to_bytes())
    skill.factors["blocks.0.attn.qkv"] = (a[:, :10], b[:, :])
    with pytest.raises(sb.CorruptFile):
        sb.Skill.from_bytes(skill.to_bytes())


def test_peft_folder_of_another_method_or_pickle_is_refused(tmp_path):
    folder = tmp_path / "ia3"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(sb.ConfigError, match="IA3"):
        sb.Skill.from_peft(folder)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    )
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(sb.UnsafeFile, match="pickle"):
        sb.Skill.from_peft(folder)


def test_header_lengths_that_look_like_pickle_opcodes_still_load(trained):
    # 896 = 0x380: the length field starts with 0x80 0x03, a pickle protocol-3 opcode
    skill = sb.Skill.from_model(trained[1], "task")
    for target in (640, 896, 1152, 1408):
        data = skill.to_bytes()
        n = int.from_bytes(data[:8], "little")
        if n > target:
            continue
        skill.metadata["pad"] = ""
        skill.metadata["pad"] = "x" * (target - int.from_bytes(skill.to_bytes()[:8], "little"))
        data = skill.to_bytes()
        assert (
            data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
            or int.from_bytes(data[:8], "little") != target
        )
        assert sb.Skill.from_bytes(data).scales == skill.scales
