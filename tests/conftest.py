"""Fixtures and session settings only; shared plain helpers live in ``helpers.py``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import PostgresServer, tiny_vit  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def vit():
    """A tiny timm ViT on 1x28x28 (patch 4): the library's reference backbone."""
    return tiny_vit()


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
    return VisionTransformer(
        image_size=28, patch_size=4, width=48, layers=2, heads=3, mlp_ratio=2.0, output_dim=16
    ).eval()


@pytest.fixture
def x28():
    torch.manual_seed(1)
    return torch.randn(6, 1, 28, 28)


@pytest.fixture
def x_rgb():
    torch.manual_seed(1)
    return torch.randn(6, 3, 28, 28)


# --- catalogs on SQLite and on a throwaway PostgreSQL server -----------------------
# Tests that take ``catalog_url`` run once per backend. The PostgreSQL cluster is
# started once per session (initdb into a temp dir, loopback only, no fsync: it is
# thrown away) and each test gets a fresh database, dropped afterwards.


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server; skipped when it cannot run here, except in CI."""
    try:
        import psycopg  # noqa: F401

        server = PostgresServer()
    except (ImportError, FileNotFoundError, RuntimeError, KeyError) as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must test PostgreSQL, but it is unavailable: {err}")
        pytest.skip(f"PostgreSQL unavailable ({err}); run .ci/setup to install it")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request, tmp_path) -> str:
    """A fresh, empty catalog: a directory (SQLite) or a PostgreSQL URL.

    Open it with ``Library.open(catalog_url, blobs=tmp_path / "blobs")`` (or
    ``SkillBank.open``) so both backends keep their blobs in the test's tmp dir.
    """
    if request.param == "sqlite":
        yield str(tmp_path / "bank")
        return
    server = request.getfixturevalue("postgres_server")
    name = server.create_database()
    yield server.url(name)
    server.drop_database(name)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster, and much faster on a busy machine.

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
