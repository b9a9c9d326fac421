import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def vit():
    """A tiny timm ViT on 1x28x28 (patch 4): the library's reference backbone."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1,
                             num_classes=10, embed_dim=48, depth=2, num_heads=3).eval()


@pytest.fixture
def resnet():
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10).eval()


@pytest.fixture
def clip_vit():
    """A small open_clip vision tower (random weights, as pretrained=None builds)."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=28, patch_size=4, width=48, layers=2, heads=3, mlp_ratio=2.0,
                             output_dim=16).eval()


@pytest.fixture
def x28():
    torch.manual_seed(1)
    return torch.randn(6, 1, 28, 28)


@pytest.fixture
def x_rgb():
    torch.manual_seed(1)
    return torch.randn(6, 3, 28, 28)


def randomise(model, name, std=0.2):
    """Give adapter ``name`` non-zero B (fresh adapters are exact no-ops)."""
    import skillbank as sb

    g = torch.Generator().manual_seed(hash(name) % 2**31)
    with torch.no_grad():
        for layer in sb.adapter_layers(model):
            if name in layer.lora_B:
                b = layer.lora_B[name]
                b.copy_(torch.randn(b.shape, generator=g) * std)
