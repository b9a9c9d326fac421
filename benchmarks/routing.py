"""Routing throughput over a bank of many skills (a script, not a test).

    python benchmarks/routing.py --skills 100,10000

Builds banks of N small LoRA skills on the ``vit_micro`` preset (random weights:
speed does not depend on them), each with an example embedding and routing
statistics of its own random data, then times on one thread, for a batch of 128:

- ``base``: one plain forward of the base model;
- ``1 adapter``: one forward with one adapter active (the reference of the goal);
- per router, ``decide``: the routing decision alone (one bare pass with the
  layer hooks plus retrieval and re-scoring) and ``routed``: the decision plus
  the one ``mixed_batch`` forward that runs every row with its skill.

Times are medians of ``--reps`` runs after a warm-up (skills attached, caches and
the shared covariance loaded); the one-off warm-up is reported too.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import skillbank as sb  # noqa: E402
from eval.backbones import create_backbone  # noqa: E402
from skillbank.routers import ROUTERS  # noqa: E402

CONFIG = sb.LoRAConfig(rank=1, targets=["blocks.0.attn.qkv"])


def make_bank(model: torch.nn.Module, n: int, where: Path) -> sb.SkillBank:
    bank = sb.SkillBank.open(where)
    work = copy.deepcopy(model)
    sb.add_adapter(work, "s", CONFIG)
    skill = sb.Skill.from_model(work, "s")
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        x = torch.rand(16, 1, 28, 28, generator=g) * (0.5 + (i % 97) / 97)
        y = torch.arange(16) % 2 + 2 * (i % 5)
        with sb.disabled(model):
            emb = sb.example_embedding(model, x)
        stats = sb.compute_stats(model, x, y)
        bank.add(f"skill-{i}", skill, embedding=emb, stats=stats, embed_text=False)
    return bank


def timed(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skills", default="100,10000")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--routers", default=",".join(ROUTERS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = create_backbone("vit_micro", num_classes=10).eval()
    x = torch.rand(args.batch, 1, 28, 28)
    one = copy.deepcopy(base)
    sb.add_adapter(one, "a", CONFIG)
    with torch.no_grad():
        t_base = timed(lambda: base(x), args.reps)
        t_one = timed(lambda: one(x), args.reps)
    print(
        f"batch {args.batch}, 1 thread: base {t_base * 1e3:.1f} ms, 1 adapter {t_one * 1e3:.1f} ms"
    )
    print(
        "| skills | router | decide ms | routed ms | decide / 1 adapter | routed / 1 adapter | warm-up s |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in [int(s) for s in args.skills.split(",") if s]:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            bank = make_bank(base, n, Path(tmp) / "bank")
            print(f"<!-- bank of {n} built in {time.perf_counter() - start:.0f} s -->", flush=True)
            for name in args.routers.split(","):
                model = copy.deepcopy(base)
                router = sb.Router(model, bank, router=name)
                start = time.perf_counter()
                router(x)  # warm-up: attaches the chosen skills, loads statistics
                warm = time.perf_counter() - start
                decide = timed(lambda router=router: router.rank(x, 1), args.reps)
                routed = timed(lambda router=router: router(x), args.reps)
                print(
                    f"| {n:,} | {name} | {decide * 1e3:.1f} | {routed * 1e3:.1f} | "
                    f"{decide / t_one:.2f} | {routed / t_one:.2f} | {warm:.1f} |",
                    flush=True,
                )
            bank.close()


if __name__ == "__main__":
    main()
