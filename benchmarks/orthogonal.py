"""`Orthogonal` as one model: its inference cost and how far apart its skills are.

    python benchmarks/orthogonal.py inference [--skills 5] [--reps 30]
    python benchmarks/orthogonal.py overlap [--stream split-mnist] [--seed 0]

``inference``: one batch of 128 MNIST-sized images through ``vit_micro`` on one
thread, the bare base beside the same model carrying ``--skills`` rank-8 skills on
attn.qkv / attn.proj / mlp.fc1 / mlp.fc2, all active and summed as ``Orthogonal``
leaves them (eval mode merges them into the weights), and, for scale, the same
skills run unmerged. Medians of alternating runs; goal: merged <= 1.03x base.

``overlap``: the stream trained with the runner's defaults (10 epochs, lr 3e-3,
rank 8) by plain LoRA, O-LoRA (``Orthogonal(init="lora")``, lambda 0.5),
SD-LoRA (``Orthogonal(init="sdlora")``) and InfLoRA (``Orthogonal()``); per
task, the overlap of its skill's A with the previous task's,
``||A_prev A^T||_F / (||A_prev||_F ||A||_F)`` averaged over sites.
Goals: InfLoRA <= 0.05; O-LoRA at least 10x below plain LoRA.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import race  # noqa: E402

import skillbank as sb  # noqa: E402
from eval import config, metrics, runner  # noqa: E402
from eval.backbones import create_backbone  # noqa: E402
from learners import (  # noqa: E402
    DEFAULT_TARGETS,
    LoRALearner,
    Orthogonal,
    TrainConfig,
    subspace_overlap,  # noqa: E402
)


def inference(n_skills: int, reps: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = create_backbone("vit_micro").eval()
    model = copy.deepcopy(base)
    cfg = sb.LoRAConfig(rank=8, targets=DEFAULT_TARGETS)
    names = [f"task-{i}" for i in range(n_skills)]
    for name in names:
        sb.add_adapter(model, name, cfg)
        with torch.no_grad():
            for layer in sb.adapter_layers(model, name):
                for p in layer.adapter_parameters(name):
                    p.normal_(0, 0.02)  # speed does not depend on the values
    sb.set_active(model, names)
    model.eval()
    unmerged = copy.deepcopy(model).train()  # train mode: the low-rank branches run
    merged = copy.deepcopy(model)
    sb.merge(merged)  # explicit: the delta written into the base weights
    x = torch.randn(128, 1, 28, 28)

    def run(m):
        return lambda: m(x)

    with torch.no_grad():
        assert torch.allclose(model(x), unmerged(x), atol=1e-4)
        t = race(
            {
                "base": run(base),
                "merged": run(model),
                "explicit": run(merged),
                "unmerged": run(unmerged),
            },
            reps,
        )
    table = Table(title=f"vit_micro, batch 128, 1 thread, {n_skills} skills summed")
    for col in ("model", "ms / batch", "x base", "goal"):
        table.add_column(col)
    table.add_row("base", f"{t['base'] * 1e3:.2f}", "1.00", "")
    table.add_row(
        "all skills, eval mode (merged cache)",
        f"{t['merged'] * 1e3:.2f}",
        f"{t['merged'] / t['base']:.3f}",
        "",  # a cache check per adapted layer and forward, no goal
    )
    table.add_row(
        "all skills, sb.merge(model)",
        f"{t['explicit'] * 1e3:.2f}",
        f"{t['explicit'] / t['base']:.3f}",
        "<= 1.03",
    )
    table.add_row(
        "all skills unmerged", f"{t['unmerged'] * 1e3:.2f}", f"{t['unmerged'] / t['base']:.3f}", ""
    )
    Console().print(table)


def overlap(stream_name: str, seed: int) -> None:
    cfg = config.load(stream=stream_name)
    stream = config.build_stream(cfg)
    train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, progress=False)
    learners = {
        "plain LoRA": LoRALearner(rank=cfg.rank, train=train),
        "O-LoRA (lambda 0.5)": Orthogonal(init="lora", rank=cfg.rank, train=train),
        "SD-LoRA": Orthogonal(init="sdlora", rank=cfg.rank, train=train),
        "InfLoRA": Orthogonal(rank=cfg.rank, train=train),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, learner) in enumerate(learners.items()):
            bank = sb.SkillBank.open(f"{tmp}/bank{i}")
            result = runner.run(stream, learner, bank=bank, seeds=(seed,), device="cpu", log=())
            skills = [bank.get(ref) for ref in result.runs[0].skills]
            rows[label] = (
                [subspace_overlap(b, [a]) for a, b in zip(skills, skills[1:], strict=False)],
                metrics.acc(np.asarray(result.runs[0].R)),
            )
            print(label, rows[label], flush=True)  # noqa: T201 (a long run: show progress)
    table = Table(title=f"{stream.name}, seed {seed}: overlap of each skill with the previous one")
    table.add_column("learner")
    for t in stream[1:]:
        table.add_column(t.name)
    table.add_column("ACC")
    for label, (values, acc) in rows.items():
        table.add_row(
            label, *(f"{v:.4f}" if v >= 1e-3 else f"{v:.1e}" for v in values), f"{100 * acc:.1f}"
        )
    plain = rows["plain LoRA"][0]
    olora = rows["O-LoRA (lambda 0.5)"][0]
    table.add_row(
        "plain / O-LoRA",
        *(f"{p / max(o, 1e-12):.1f}x" for p, o in zip(plain, olora, strict=True)),
        "",
    )
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    inf = sub.add_parser("inference")
    inf.add_argument("--skills", type=int, default=5)
    inf.add_argument("--reps", type=int, default=30)
    ov = sub.add_parser("overlap")
    ov.add_argument("--stream", default="split-mnist")
    ov.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.what == "inference":
        inference(args.skills, args.reps)
    else:
        overlap(args.stream, args.seed)


if __name__ == "__main__":
    main()
