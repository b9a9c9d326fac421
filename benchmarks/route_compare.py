"""Every router on the skills of a finished benchmark run (a script, not a test).

    python benchmarks/route_compare.py runs/rotated --bank skills-rotated
    python benchmarks/route_compare.py runs/rotated --bank skills-rotated --rerank 2

Reads the run's ``results.json`` (stream, seeds, the routed learner's skill refs),
rebuilds its stream and its cached pretrained backbone, and scores the final
row (all skills banked) with each router: routing accuracy, routed ACC and the
oracle ACC (each sample run by its own task's skill). Training is not repeated:
the skills are the run's own, so the routers are compared on identical skills.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import skillbank as sb  # noqa: E402
from eval import backbones  # noqa: E402
from eval.config import BenchConfig, build_stream  # noqa: E402
from eval.protocol import score_routed  # noqa: E402
from skillbank.routers import ROUTERS  # noqa: E402


def compare(run: Path, bank_dir: str, learner: str, routers: list[str], rerank: int) -> list[dict]:
    doc = json.loads((run / "results.json").read_text())
    cfg = BenchConfig(stream=doc["stream"], learners=[learner])
    stream = build_stream(cfg)
    base = backbones.pretrain(
        "vit_micro", stream.source, seed=0, device="cpu", num_classes=stream.n_classes
    )
    rows = []
    with sb.SkillBank.open(bank_dir) as bank:
        for seed, refs in zip(doc["seeds"], doc["learners"][learner]["skills"], strict=True):
            skill_of_task = dict(enumerate(refs))
            tags = bank.record(refs[0]).tags
            where = {"learner": learner, "run": tags["run"], "seed": str(seed)}
            for name in routers:
                model = copy.deepcopy(base).eval()
                router = sb.Router(model, bank, where=where, router=name, rerank=rerank)
                scores = [score_routed(router, t, skill_of_task) for t in stream]
                rows.append(
                    {
                        "stream": doc["stream"],
                        "seed": seed,
                        "router": name + (f"+rerank{rerank}" if rerank > 1 else ""),
                        "routing": float(np.mean([s.routing for s in scores])),
                        "routed_acc": float(np.mean([s.class_il for s in scores])),
                        "oracle_acc": float(np.mean([s.task_il for s in scores])),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder holding results.json")
    ap.add_argument("--bank", required=True, help="the bank the run wrote to")
    ap.add_argument("--learner", default="lora")
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--rerank", type=int, default=0)
    args = ap.parse_args()
    compare(args.run, args.bank, args.learner, args.routers.split(","), args.rerank)


if __name__ == "__main__":
    main()
