"""The TTA protocol on both backbone presets at severities 5 and 3, in one table.

    python benchmarks/tta.py [--out runs/tta-grid] [--seeds 0 1 2]

Runs ``skillbank bench --protocol tta`` (its defaults: source, source_stage,
bn_adapt, tent, vida, and the second pass of tent and vida) for ``vit_micro`` and
``resnet_micro`` on ``corrupted-mnist`` (severity 5) and ``corrupted-mnist-s3``,
each into ``OUT/<backbone>-<stream>`` with a bank per backbone
(``OUT/skills-<backbone>``: a bank space holds one dimension). A run whose
``results.json`` already has every seed is read, not rerun. Prints the mean
error of every method per cell with the guard's resets, then the protocol's
goals per cell.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval import config, tta  # noqa: E402

BACKBONES = ("vit_micro", "resnet_micro")
STREAMS = {"corrupted-mnist": 5, "corrupted-mnist-s3": 3}


def cell(out: Path, backbone: str, stream: str, seeds: list[int]) -> dict:
    run = out / f"{backbone}-{stream}"
    done = run / "results.json"
    if done.is_file():
        doc = json.loads(done.read_text())
        if doc.get("seeds") == seeds:
            return doc
    cfg = config.load(protocol="tta", backbone=backbone, stream=stream, seeds=seeds, out=str(run))
    return config.execute(cfg, bank=str(out / f"skills-{backbone}"))


def summary(docs: dict[tuple[str, str], dict]) -> str:
    cols = list(docs)
    head = "| method | " + " | ".join(f"{b} s{STREAMS[s]}" for b, s in cols) + " |"
    rows = [head, "|---" * (len(cols) + 1) + "|"]
    methods = list(dict.fromkeys(m for d in docs.values() for m in d["methods"]))
    for m in methods:
        vals = []
        for key in cols:
            r = docs[key]["methods"].get(m)
            vals.append(
                "-"
                if r is None
                else f"{100 * r['mean_error']['mean']:.1f} ± {100 * r['mean_error']['std']:.1f}"
                + (f" ({r['total_resets']} resets)" if r["total_resets"] else "")
            )
        rows.append(f"| {m} | " + " | ".join(vals) + " |")
    return "\n".join(rows)


def goals(docs: dict[tuple[str, str], dict]) -> str:
    """The protocol's goals per cell, measured again from the methods' rows (a run
    read back from disk is judged by the current rules)."""
    lines = []
    for (b, s), d in docs.items():
        g = tta.goals(d["methods"])
        worst = g.get("worst_domain_gap_vs_source", {})
        name, gap = max(worst.items(), key=lambda kv: kv[1]) if worst else ("-", 0.0)
        passes = "; ".join(
            f"{m} {100 * p['first_pass']:.1f} -> {100 * p['second_pass']:.1f}"
            + (" (lower on every seed)" if p["lower_on_every_seed"] else "")
            for m, p in g.get("second_pass", {}).items()
        )
        lines.append(
            f"- {b} s{STREAMS[s]}: BN-adapt {100 * g.get('bn_adapt_relative_vs_source', 0):.1f}% "
            f"below source; ViDA {100 * g.get('vida_relative_vs_source_stage', 0):.1f}% below "
            f"the source stage, <= Tent: {g.get('met_vida_le_tent')}; worst domain vs source "
            f"{100 * gap:+.1f} ({name}); second pass found "
            f"{g.get('domains_found', 0):.1f}/15 domains; first -> second pass: {passes}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/tta-grid")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    out = Path(args.out)
    docs = {(b, s): cell(out, b, s, args.seeds) for b in BACKBONES for s in STREAMS}
    print(summary(docs))
    print()
    print(goals(docs))


if __name__ == "__main__":
    main()
