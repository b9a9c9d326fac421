"""Shared test helpers (plain functions, no fixtures): imported as ``from helpers import ...``.

Test modules never import each other or conftest; whatever two of them share lives here.
``tests`` is on ``sys.path`` through ``pythonpath`` in pyproject's pytest section, so this
module is importable in pytest and in the worker processes the tests start.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import skillbank as sb


def stable_seed(*parts: object) -> int:
    """A seed from names that is the same in every process (``hash()`` is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def randomise(model: nn.Module, name: str, std: float = 0.2) -> None:
    """Give adapter ``name`` non-zero B (fresh adapters are exact no-ops)."""
    g = torch.Generator().manual_seed(stable_seed(name))
    with torch.no_grad():
        for layer in sb.adapter_layers(model):
            if name in layer.lora_B:
                b = layer.lora_B[name]
                b.copy_(torch.randn(b.shape, generator=g) * std)


VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def tiny_vit(**kw) -> nn.Module:
    """The tests' reference backbone: a tiny timm ViT on 1x28x28 (patch 4), random weights;
    ``kw`` overrides the build (e.g. ``mlp_ratio=2.0`` for a different base)."""
    import timm

    torch.manual_seed(0)
    build = dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=2, num_heads=3
    )
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**build, **kw}).eval()


def make_skill(vit: nn.Module, name: str, seed: int, rank: int = 4) -> tuple[nn.Module, sb.Skill]:
    """A copy of ``vit`` with a randomised adapter ``name`` on every block site, and its skill."""
    model = copy.deepcopy(vit)
    sb.add_adapter(model, name, sb.LoRAConfig(rank=rank, targets=VIT_TARGETS, head="head"))
    torch.manual_seed(seed)
    randomise(model, name)
    return model, sb.Skill.from_model(model, name)


# --- worker processes and small skills for the reliability tests -------------------


def context() -> mp.context.BaseContext:
    """A forkserver with torch and skillbank preloaded (spawn where there is none)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "skillbank", "storage.library", "storage.catalog"])
    return ctx


def tiny_skill(seed: int) -> sb.Skill:
    """A real two-site LoRA skill on a tiny MLP; non-zero B so every seed differs."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sb.add_adapter(model, "s", sb.LoRAConfig(rank=2, targets=["0", "2"]))
    with torch.no_grad():
        for layer in sb.adapter_layers(model):
            layer.lora_B["s"].normal_()
    return sb.Skill.from_model(model, "s")


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=16)


# --- a throwaway PostgreSQL server (the ``postgres_server`` fixture) ---------------


# --- routing on synthetic Gaussians (test_routers, test_route_stats) ---------

TINY_DIM = 8  # features of Tiny


class Tiny(nn.Module):
    """x (N, TINY_DIM) -> patch_embed (Linear, identity at start) -> head: pooled feature = x."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(TINY_DIM, TINY_DIM)
        self.head = nn.Linear(TINY_DIM, classes)
        with torch.no_grad():
            self.patch_embed.weight.copy_(torch.eye(TINY_DIM))
            self.patch_embed.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.patch_embed(x))


class TinyImage(nn.Module):
    """Images (N, 1, 7, 7) -> body (Linear on the pixels) -> head; no patch embedding,
    so routing statistics read the input pixels."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.body = nn.Linear(49, TINY_DIM)
        self.head = nn.Linear(TINY_DIM, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x.flatten(1))))


def corner_images(sign: float, n: int, seed: int) -> torch.Tensor:
    """(n, 1, 7, 7) noise whose opposite corners move together (``sign`` 1) or against
    each other (-1): every pixel's mean and variance are the same either way."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.randn(n, 1, 7, 7, generator=g)
    z = torch.randn(2, n, generator=g)
    x[:, 0, 0, 0] += z[0]
    x[:, 0, 6, 6] += sign * z[0]
    x[:, 0, 0, 6] += z[1]
    x[:, 0, 6, 0] += sign * z[1]
    return x


def gaussian(mean, scale, n: int, seed: int) -> torch.Tensor:
    """``n`` samples around ``mean`` with per-dimension ``scale``, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.as_tensor(mean, dtype=torch.float32) + torch.randn(
        n, TINY_DIM, generator=g
    ) * torch.as_tensor(scale, dtype=torch.float32)


def skill_of(
    model: nn.Module,
    name: str,
    head_scale: float = 1.0,
    classes=(0, 1, 2, 3),
    target: str = "patch_embed",
) -> sb.Skill:
    """A rank-2 skill on ``target`` (Tiny's patch_embed; TinyImage's body) whose head is
    scaled by ``head_scale``."""
    m = copy.deepcopy(model)
    sb.add_adapter(m, name, sb.LoRAConfig(rank=2, targets=[target], head="head"))
    with torch.no_grad():
        m.head.weight.mul_(head_scale)
    return sb.Skill.from_model(m, name, metadata={"classes": list(classes)})


def add_task(bank: sb.SkillBank, model: nn.Module, name: str, xs, ys, **kw) -> str:
    """A skill whose data is ``xs`` with labels ``ys``, with example embedding and stats."""
    x, y = torch.cat(xs), torch.cat(ys)
    emb = sb.example_embedding(model, x, centres=2, head="head")
    stats = sb.compute_stats(model, x, y, head="head")
    return str(
        bank.add(name, skill_of(model, name, **kw), embedding=emb, stats=stats, embed_text=False)
    )


def unit(i: int, scale: float = 1.0) -> torch.Tensor:
    """``scale`` times the i-th unit vector of Tiny's feature space."""
    v = torch.zeros(TINY_DIM)
    v[i] = scale
    return v


def tiny_digit_split(images: int, tasks: int | None = None, name: str | None = "tiny"):
    """The first ``tasks`` of split 8x8 digits (5 tasks), ``images`` train and test images
    each, with the real source split; ``name=None`` keeps the split's own name."""
    from eval import data, streams

    d = data.digits(seed=0)
    s = streams.split(d, n_tasks=5)
    small = [
        data.Task(
            t.name,
            t.x_train[:images],
            t.y_train[:images],
            t.x_test[:images],
            t.y_test[:images],
            t.classes,
            metadata=t.metadata,
        )
        for t in s.tasks[:tasks]
    ]
    return streams.from_tasks(small, "class", n_classes=10, source=d.source, name=name or s.name)


def nano_vit() -> nn.Module:
    """A seeded nano ViT on 8x8 inputs: the smallest backbone the runner accepts."""
    from eval.backbones import create_backbone

    torch.manual_seed(0)
    return create_backbone("vit_nano", img_size=8).eval()


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
