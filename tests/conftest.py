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
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=4,
        in_chans=1,
        num_classes=10,
        embed_dim=48,
        depth=2,
        num_heads=3,
    ).eval()


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


def randomise(model, name, std=0.2):
    """Give adapter ``name`` non-zero B (fresh adapters are exact no-ops)."""
    import skillbank as sb

    g = torch.Generator().manual_seed(hash(name) % 2**31)
    with torch.no_grad():
        for layer in sb.adapter_layers(model):
            if name in layer.lora_B:
                b = layer.lora_B[name]
                b.copy_(torch.randn(b.shape, generator=g) * std)


# --- catalogs on SQLite and on a throwaway PostgreSQL server -----------------------
# Tests that take ``catalog_url`` run once per backend. The PostgreSQL cluster is
# started once per session (initdb into a temp dir, loopback only, no fsync: it is
# thrown away) and each test gets a fresh database, dropped afterwards.

import itertools  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def _pg_bin(tool: str) -> str | None:
    """A PostgreSQL server tool on PATH or in Debian's versioned bin directory."""
    found = shutil.which(tool)
    if found:
        return found
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return str(versions[-1]) if versions else None


class PostgresServer:
    """A PostgreSQL cluster in a temp dir, run as the ``postgres`` OS user when we are root."""

    def __init__(self) -> None:
        initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (initdb and self.pg_ctl):
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.root = Path(tempfile.mkdtemp(prefix="skillbank-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.data = self.root / "data"
        self._run(
            initdb,
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        )
        opts = (
            f"-k {self.root} -h 127.0.0.1 -p {self.port} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(
            self.pg_ctl,
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "start",
        )
        self._names = itertools.count()

    def _run(self, *cmd: str) -> None:
        done = subprocess.run(
            [*self.as_user, *cmd], capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        if done.returncode:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}{tail}")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        try:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


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
