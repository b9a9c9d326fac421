"""Serving a large library through ``sb.Router(max_resident=...)`` (a script, not a test).

    python benchmarks/serving.py [--skills 1000] [--cap 64] [--batches 20] [--flat 10000]

A bank of ``--skills`` rank-8 LoRA skills (random factors: speed does not depend
on them) on the timm ViT of ``benchmarks/adapters.py`` (1x28x28, 4x4 patches, LoRA
on attn.qkv / attn.proj / mlp.fc1 / mlp.fc2), its width (192) but 4 blocks by
default instead of 12 so that a thousand skills take 0.4 GB, not 1.2. Batches of ``--batch`` rows each
pick their skills from a Zipf law (``--zipf`` exponent: a skewed working set)
or uniformly; each batch is served by ``Router.forward(x, refs)``, the rows'
skills given (the retrieval pass, one bare forward, is the router's choice and
is not what this measures). Three laws: Zipf over the whole bank, Zipf over the
cap's hottest skills only (the working set fits: the steady state a skewed
load reaches when it fits), and uniform. After ``--warmup`` batches,
``--batches`` are timed.

Reported per distribution: throughput against single-adapter eval inference
of the same batch (one adapter active, merged weights: the base's cost), hit
rate, misses, evictions, extra forwards of batches that needed more skills
than fit, load time, and resident memory (adapters on the model plus their
mixed-batch stacks) against the cap's worth of skills.

``--flat N`` then routes N batches of 8 through a tiny ViT over a bank of 32
skills with a cap of 8 (Zipf: about one skill loaded and one evicted per batch)
and prints process RSS, the resident set and the stacks as it goes: memory
must stay flat.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters import TARGETS, build  # noqa: E402

import skillbank as sb  # noqa: E402


def make_bank(model: torch.nn.Module, n: int, rank: int, where: Path) -> sb.SkillBank:
    """``n`` skills with random factors (B too: nothing is skipped as zero), no head."""
    template_model = copy.deepcopy(model)
    sb.add_adapter(template_model, "t", sb.LoRAConfig(rank=rank, alpha=2 * rank, targets=TARGETS))
    template = sb.Skill.from_model(template_model, "t")
    bank = sb.SkillBank.open(where)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        factors = {
            site: (
                torch.randn(a.shape, generator=g) * 0.05,
                torch.randn(b.shape, generator=g) * 0.05,
            )
            for site, (a, b) in template.factors.items()
        }
        skill = dataclasses.replace(template, name=f"k{i}", factors=factors)
        bank.add(f"k{i}", skill, embed_text=False)
    return bank


LAWS = ("zipf", "zipf-fits", "uniform")


def picks(law: str, n_skills: int, rows: int, zipf: float, rng: np.random.Generator) -> list[str]:
    """Each row's skill under ``law`` over skills k0..k{n_skills - 1}."""
    if law == "uniform":
        idx = rng.integers(0, n_skills, rows)
    else:
        p = 1.0 / np.arange(1, n_skills + 1) ** zipf
        idx = rng.choice(n_skills, rows, p=p / p.sum())
    return [f"k{i}@1" for i in idx]


def stack_bytes(model: torch.nn.Module) -> int:
    return sum(layer._pool.nbytes() for layer in sb.adapter_layers(model))


def rss_mb() -> float:
    """Resident set size now (Linux), else the peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def single_adapter(base: torch.nn.Module, bank: sb.SkillBank) -> torch.nn.Module:
    """The reference: one skill attached and active, eval mode (merged weights)."""
    model = copy.deepcopy(base)
    sb.attach(model, bank.get("k0"), "k0")
    return model.eval()


def serve(args, law: str, bank: sb.SkillBank, base: torch.nn.Module, x: torch.Tensor) -> dict:
    """Route the law's batches; each timed batch is followed by the single-adapter forward
    of the same inputs, so both see the same machine load (it drifts on a shared CPU)."""
    model = copy.deepcopy(base)
    one = single_adapter(base, bank)
    router = sb.Router(model, bank, max_resident=args.cap, mask_classes=False)
    rng = np.random.default_rng(1)
    n = min(args.cap, args.skills) if law == "zipf-fits" else args.skills
    batches = [picks(law, n, len(x), args.zipf, rng) for _ in range(args.warmup + args.batches)]
    with torch.inference_mode():
        for refs in batches[: args.warmup]:
            router.forward(x, refs)
            one(x)
        warm = router.stats
        routed, single = [], []
        for refs in batches[args.warmup :]:
            t = time.perf_counter()
            router.forward(x, refs)
            routed.append(time.perf_counter() - t)
            t = time.perf_counter()
            one(x)
            single.append(time.perf_counter() - t)
    st = router.stats
    skill = bank.get("k0")
    return {
        "law": law,
        "seconds": float(np.mean(routed)),
        "single": float(np.mean(single)),
        "distinct": float(np.mean([len(set(r)) for r in batches[args.warmup :]])),
        "hits": st.hits - warm.hits,
        "misses": st.misses - warm.misses,
        "evictions": st.evictions - warm.evictions,
        "chunks": st.chunks - warm.chunks,
        "load": st.load_seconds - warm.load_seconds,
        "resident": st.resident,
        "bytes": st.adapter_bytes + stack_bytes(model),
        "cap_bytes": 2 * args.cap * sum(a.nbytes + b.nbytes for a, b in skill.factors.values()),
    }


FLAT_SKILLS, FLAT_CAP, FLAT_ROWS = 32, 8, 8


def flat(n_batches: int, console: Console) -> None:
    """Memory over many routed batches on a tiny model: RSS and the resident set."""
    torch.manual_seed(0)
    base = build(24, 1).eval()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        bank = make_bank(base, FLAT_SKILLS, 8, Path(tmp) / "bank")
        model = copy.deepcopy(base)
        router = sb.Router(model, bank, max_resident=FLAT_CAP, mask_classes=False)
        rng = np.random.default_rng(2)
        x = torch.randn(FLAT_ROWS, 1, 28, 28)
        table = Table(
            title=f"memory over {n_batches} routed batches of {FLAT_ROWS} (ViT d=24 depth=1, "
            f"cap {FLAT_CAP}, Zipf 1.1 over {FLAT_SKILLS} skills)"
        )
        for col in (
            "batches",
            "RSS MB",
            "resident",
            "stack slots",
            "stack KB",
            "misses",
            "evictions",
        ):
            table.add_column(col, justify="right")
        step = max(1, n_batches // 10)
        with torch.inference_mode():
            for i in range(1, n_batches + 1):
                router.forward(x, picks("zipf", FLAT_SKILLS, len(x), 1.1, rng))
                if i == 1 or i % step == 0:
                    st = router.stats
                    layers = sb.adapter_layers(model)
                    table.add_row(
                        str(i),
                        f"{rss_mb():.1f}",
                        str(st.resident),
                        str(max((layer._pool.capacity for layer in layers), default=0)),
                        f"{stack_bytes(model) / 1024:.0f}",
                        str(st.misses),
                        str(st.evictions),
                    )
        bank.close()
    console.print(table)
    console.print(f"{time.perf_counter() - start:.0f} s")


def routing(args, console: Console) -> None:
    """The serving table: every law over one bank."""
    base = build(args.embed_dim, args.depth).eval()
    x = torch.randn(args.batch, 1, 28, 28)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        bank = make_bank(base, args.skills, args.rank, Path(tmp) / "bank")
        console.print(f"bank of {args.skills} skills built in {time.perf_counter() - t:.1f} s")
        results = [serve(args, law, bank, base, x) for law in LAWS]
        bank.close()
    table = Table(
        title=f"serving: ViT d={args.embed_dim} depth={args.depth}, {args.skills} rank-{args.rank} "
        f"skills, cap {args.cap}, batch {args.batch}, {args.batches} batches after {args.warmup} "
        f"warm-up, {args.threads} thread(s)"
    )
    cols = (
        "law",
        "distinct/batch",
        "ms/batch",
        "1 adapter ms",
        "vs 1 adapter",
        "goal",
        "hit rate",
        "misses",
        "evictions",
        "extra fwd",
        "load s",
        "resident",
        "resident MB",
        "cap MB",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "law" else "right")
    for r in results:
        ratio = r["single"] / r["seconds"]
        goal = r["law"] == "zipf-fits"
        lookups = r["hits"] + r["misses"]
        table.add_row(
            {
                "zipf": f"zipf {args.zipf}, all {args.skills}",
                "zipf-fits": f"zipf {args.zipf}, hottest {min(args.cap, args.skills)}",
            }.get(r["law"], r["law"]),
            f"{r['distinct']:.1f}",
            f"{r['seconds'] * 1e3:.1f}",
            f"{r['single'] * 1e3:.1f}",
            f"{ratio:.2f}x",
            (">= 0.6x " + ("yes" if ratio >= 0.6 else "NO")) if goal else "-",
            f"{r['hits'] / lookups:.3f}" if lookups else "-",
            str(r["misses"]),
            str(r["evictions"]),
            str(r["chunks"]),
            f"{r['load']:.2f}",
            f"{r['resident']} / {args.cap}",
            f"{r['bytes'] / 2**20:.1f}",
            f"{r['cap_bytes'] / 2**20:.1f}",
        )
    console.print(table)
    console.print(
        "resident MB: adapters on the model plus their mixed-batch stacks; cap MB: the cap's "
        "worth of skills, twice (adapter + stack slot). uptime: "
        + os.popen("uptime").read().strip()
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--skills", type=int, default=1000)
    ap.add_argument("--cap", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20, help="timed batches per law (0: skip)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--embed-dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flat", type=int, default=10000, help="batches of the memory check (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=220)
    if args.batches:
        routing(args, console)
    if args.flat:
        flat(args.flat, console)


if __name__ == "__main__":
    main()
