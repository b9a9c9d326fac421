"""Records, hits and reports as tables, JSON-ready dicts, CSV rows and trees.

Pure formatting: no bank access here except the lineage walk, which only reads
records. Every user-supplied string goes into rich as ``Text`` so a description
like "[q]" is shown, not parsed as markup.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text
from rich.tree import Tree

COLUMNS = ("name", "version", "aliases", "ranks", "params", "base", "learner", "created", "size")
CSV_COLUMNS = (
    "ref",
    "name",
    "version",
    "aliases",
    "ranks",
    "params",
    "base_id",
    "learner",
    "created",
    "size",
    "tags",
    "description",
)


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def rank_summary(ranks: dict[str, int]) -> str:
    """``r=8 x 12`` for uniform ranks, ``r=2..8 x 12`` otherwise."""
    if not ranks:
        return "-"
    lo, hi = min(ranks.values()), max(ranks.values())
    r = f"{lo}" if lo == hi else f"{lo}..{hi}"
    return f"r={r} x {len(ranks)}"


def lora_params(record: Any) -> int | None:
    """A*B parameter count from the catalog's ranks and base shapes (no blob read).

    Packed attention sites (``attn[q]``) get a third of the in-projection rows.
    """
    from skillbank.skill import site_module

    total = 0
    for site, r in record.ranks.items():
        sig = record.base.get(site_module(site))
        if not sig or not sig.get("shape"):
            return None
        shape = list(sig["shape"])
        fan_out = shape[0] // 3 if site.endswith("]") else shape[0]
        fan_in = 1
        for d in shape[1:]:
            fan_in *= int(d)
        total += int(r) * (fan_out + fan_in)
    return total


def when(dt: Any) -> str:
    """Local time for people (JSON and CSV keep the catalog's ISO timestamp)."""
    if dt is None:
        return "-"
    return (dt.astimezone() if dt.tzinfo else dt).strftime("%Y-%m-%d %H:%M")


def record_dict(r: Any, full: bool = False) -> dict[str, Any]:
    """One version as a JSON-ready dict; ``full`` adds the base fingerprint."""
    d = {
        "ref": str(r.ref),
        "name": r.name,
        "version": r.version,
        "aliases": list(r.aliases),
        "tags": dict(r.tags),
        "description": r.description,
        "learner": r.learner,
        "base_id": r.base_id,
        "ranks": dict(r.ranks),
        "targets": list(r.targets),
        "params": lora_params(r),
        "size": r.size,
        "digest": r.digest,
        "created": r.created.isoformat() if r.created else None,
        "metrics": dict(r.metrics),
        "config": dict(r.config),
        "parents": [str(p) for p in r.parents],
        "spaces": list(r.spaces),
    }
    if full:
        d["base"] = dict(r.base)
    return d


def _cells(r: Any) -> list[str]:
    params = lora_params(r)
    return [
        r.name,
        str(r.version),
        ", ".join(r.aliases) or "-",
        rank_summary(r.ranks),
        f"{params:,}" if params is not None else "-",
        r.base_id[:12] or "-",
        r.learner or "-",
        when(r.created),
        human_size(r.size),
    ]


def records_table(records: Sequence[Any], title: str | None = None, parents: bool = False) -> Table:
    table = Table(title=title, title_justify="left")
    for c in COLUMNS:
        table.add_column(
            c,
            justify="right" if c in ("version", "params", "size") else "left",
            no_wrap=c in ("name", "created", "size"),
        )
    if parents:
        table.add_column("parents")
    for r in records:
        row = _cells(r) + ([", ".join(str(p) for p in r.parents) or "-"] if parents else [])
        table.add_row(*(Text(c) for c in row))
    return table


def records_csv(records: Iterable[Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in records:
        w.writerow(
            [
                str(r.ref),
                r.name,
                r.version,
                ";".join(r.aliases),
                rank_summary(r.ranks),
                lora_params(r) if lora_params(r) is not None else "",
                r.base_id,
                r.learner,
                r.created.isoformat() if r.created else "",
                r.size,
                ";".join(f"{k}={v}" for k, v in sorted(r.tags.items())),
                r.description,
            ]
        )
    return buf.getvalue()


def kv_table(rows: Iterable[tuple[str, Any]], title: str | None = None) -> Table:
    table = Table(
        title=title, title_justify="left", show_header=False, box=None, padding=(0, 2, 0, 0)
    )
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(Text(str(k)), Text(fmt(v)))
    return table


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items()) or "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v) or "-"
    return str(v)


# --------------------------------------------------------------- lineage
def lineage_dict(
    ref: str, record_of: Callable[[str], Any], seen: set[str] | None = None
) -> dict[str, Any]:
    """``{"ref", "parents": [...]}`` down to the roots; a removed parent is marked, a
    version reached twice (diamond) is expanded only once."""
    seen = set() if seen is None else seen
    from skillbank import SkillNotFound

    try:
        rec = record_of(ref)
    except SkillNotFound:
        return {"ref": ref, "removed": True, "parents": []}
    key = str(rec.ref)
    if key in seen:
        return {"ref": key, "repeated": True, "parents": []}
    seen.add(key)
    return {
        "ref": key,
        "description": rec.description,
        "learner": rec.learner,
        "parents": [lineage_dict(str(p), record_of, seen) for p in rec.parents],
    }


def lineage_tree(node: dict[str, Any], tree: Tree | None = None) -> Tree:
    label = Text(node["ref"], style="bold")
    if node.get("removed"):
        label.append(" (removed)", style="red")
    elif node.get("repeated"):
        label.append(" (see above)", style="dim")
    elif node.get("learner") or node.get("description"):
        label.append(
            f"  {node.get('learner') or ''} {node.get('description') or ''}".rstrip(), style="dim"
        )
    branch = Tree(label) if tree is None else tree.add(label)
    for p in node["parents"]:
        lineage_tree(p, branch)
    return branch
