"""Read-only commands: ls, show, versions, lineage, search, diff."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from . import render
from .core import Format, command, emit_json, fail, note, open_bank, out, parse_filters

FORMAT = typer.Option(Format.table, "--format", "-f", help="Output format.")
JSON = typer.Option(False, "--json", help="One JSON document on stdout.")
FILTER = typer.Option(
    None,
    "--filter",
    "-F",
    metavar="KIND:VALUE",
    help="Repeatable: tag:k=v, base:ID, learner:NAME, text:WORDS, name:GLOB.",
)
CATALOG_SORTS = {"name", "created", "version"}  # sorted (and limited) in SQL
SORT_KEYS = {
    "size": lambda r: r.size,
    "params": lambda r: render.lora_params(r) or 0,
    "learner": lambda r: (r.learner, r.name),
    "base": lambda r: (r.base_id, r.name),
}


def emit_records(
    records: list[Any],
    fmt: Format,
    quiet: bool = False,
    title: str | None = None,
    parents: bool = False,
) -> None:
    if quiet:
        for r in records:
            sys.stdout.write(f"{r.ref}\n")
    elif fmt == Format.json:
        emit_json([render.record_dict(r) for r in records])
    elif fmt == Format.csv:
        sys.stdout.write(render.records_csv(records))
    else:
        out().print(render.records_table(records, title=title, parents=parents))


@command()
def ls(
    filters: list[str] | None = FILTER,
    sort: str = typer.Option(
        "name",
        "--sort",
        "-s",
        metavar="FIELD[:desc]",
        help=f"One of {', '.join(sorted(CATALOG_SORTS | set(SORT_KEYS)))}.",
    ),
    limit: int | None = typer.Option(
        None, "--limit", "-n", min=1, help="Show at most this many rows."
    ),
    fmt: Format = FORMAT,
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Refs only (name@version), one per line."
    ),
    all_versions: bool = typer.Option(
        False, "--all-versions", "-a", help="Every version, not only the latest."
    ),
) -> None:
    """List skills (latest version of each, or every version)."""
    field, _, order = sort.partition(":")
    if field not in CATALOG_SORTS | set(SORT_KEYS) or order not in ("", "asc", "desc"):
        raise typer.BadParameter(
            f"{sort!r}: use FIELD[:asc|desc] with FIELD one of "
            f"{', '.join(sorted(CATALOG_SORTS | set(SORT_KEYS)))}",
            param_hint="--sort",
        )
    desc = order == "desc"
    query = parse_filters(filters)
    with open_bank() as bank:
        if field in CATALOG_SORTS:
            records = bank.list(
                **query, latest_only=not all_versions, sort=field, desc=desc, limit=limit
            )
        else:
            records = bank.list(**query, latest_only=not all_versions)
            records = sorted(records, key=SORT_KEYS[field], reverse=desc)[:limit]
    emit_records(records, fmt, quiet)
    if fmt == Format.table and not quiet and not records:
        note("no skills match" if query else "the bank is empty")


@command()
def show(
    ref: str = typer.Argument(..., help="NAME, NAME@VERSION or NAME@ALIAS."), as_json: bool = JSON
) -> None:
    """Everything about one version: metadata, per-module ranks, metrics, embeddings, lineage."""
    from skillbank import SkillbankError

    with open_bank() as bank:
        rec = bank.record(ref)
        try:
            skill = bank.get(str(rec.ref))
        except SkillbankError as e:  # still show the catalog's view of a damaged blob
            note(f"warning: cannot read the blob of {rec.ref}: {e}")
            skill = None
        dims = bank.spaces()
        tree = render.lineage_dict(str(rec.ref), bank.record)
    sites = [
        {
            "site": s,
            "rank": r,
            "scale": skill.scales.get(s) if skill else None,
            "A": list(skill.factors[s][0].shape) if skill else None,
            "B": list(skill.factors[s][1].shape) if skill else None,
        }
        for s, r in sorted(rec.ranks.items())
    ]
    spaces = {
        sp: {
            "dim": dims.get(sp),
            "in_file": list(skill.embeddings[sp].shape)
            if skill and sp in skill.embeddings
            else None,
        }
        for sp in rec.spaces
    }
    if skill:
        spaces.update(
            {
                sp: {"dim": None, "in_file": list(v.shape)}
                for sp, v in skill.embeddings.items()
                if sp not in spaces
            }
        )
    if as_json:
        doc = render.record_dict(rec, full=True)
        doc.update(
            sites=sites,
            embeddings=spaces,
            lineage=tree,
            num_params=skill.num_params if skill else None,
            head=sorted(skill.head) if skill else None,
        )
        emit_json(doc)
        return
    con = out()
    con.print(Text(f"{rec.ref}", style="bold cyan"), Text(rec.description or "", style="italic"))
    con.print(
        render.kv_table(
            [
                ("aliases", list(rec.aliases)),
                ("tags", dict(rec.tags)),
                ("learner", rec.learner or None),
                ("base", rec.base_id),
                ("created", rec.created.isoformat(timespec="seconds") if rec.created else None),
                ("size", render.human_size(rec.size)),
                ("digest", rec.digest),
                ("params", skill.num_params if skill else render.lora_params(rec)),
                ("head", sorted(skill.head) if skill and skill.head else None),
                ("parents", [str(p) for p in rec.parents]),
                ("config", rec.config),
            ]
        )
    )
    table = Table(title="modules", title_justify="left")
    for c in ("site", "rank", "A (r x in)", "B (out x r)", "scale"):
        table.add_column(c, justify="left" if c == "site" else "right")
    for s in sites:
        table.add_row(
            Text(s["site"]),
            str(s["rank"]),
            render.fmt(s["A"]).replace(", ", " x "),
            render.fmt(s["B"]).replace(", ", " x "),
            render.fmt(s["scale"]),
        )
    con.print(table)
    if rec.metrics:
        con.print(render.kv_table(rec.metrics.items(), title="metrics"))
    if spaces:
        emb = Table(title="embeddings", title_justify="left")
        for c in ("space", "dim", "in skill file"):
            emb.add_column(c)
        for sp, d in sorted(spaces.items()):
            emb.add_row(
                Text(sp), render.fmt(d["dim"]), render.fmt(d["in_file"]).replace(", ", " x ")
            )
        con.print(emb)
    con.print(Text("lineage", style="italic"))
    con.print(render.lineage_tree(tree))


@command()
def versions(
    name: str = typer.Argument(..., help="Skill name."),
    fmt: Format = FORMAT,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Refs only."),
) -> None:
    """Every version of one skill, oldest first."""
    with open_bank() as bank:
        records = bank.versions(name)
    emit_records(records, fmt, quiet, title=name, parents=True)


@command()
def lineage(
    ref: str = typer.Argument(..., help="NAME[@VERSION|@ALIAS]."), as_json: bool = JSON
) -> None:
    """The versions a skill was composed or derived from, as a tree."""
    with open_bank() as bank:
        rec = bank.record(ref)
        ancestors = [str(r) for r in bank.lineage(str(rec.ref))]
        tree = render.lineage_dict(str(rec.ref), bank.record)
    if as_json:
        emit_json({"ref": str(rec.ref), "ancestors": ancestors, "tree": tree})
    else:
        out().print(render.lineage_tree(tree))


def _like_vector(path: Path, space: str) -> Any:
    """A query vector from a .npy file or from a skill file's stored embeddings."""
    import numpy as np

    if not path.is_file():
        raise fail(f"no such file: {path}")
    if path.suffix == ".npy":
        try:
            vec = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise fail(f"{path}: not a plain numeric .npy array ({e})") from None
    else:
        from skillbank import Skill

        skill = Skill.load(path)
        if space not in skill.embeddings:
            raise fail(
                f"{path} has no {space!r} embedding; it has {sorted(skill.embeddings) or 'none'} "
                "(choose with --space)"
            )
        vec = skill.embeddings[space]
    vec = np.asarray(vec, dtype=np.float32)
    if vec.ndim == 2 and len(vec) > 1:
        note(
            f"{path.name}: {len(vec)} vectors; searching with the first (the mean of the examples)"
        )
    if vec.ndim == 2:
        vec = vec[0]
    if vec.ndim != 1:
        raise fail(f"{path}: expected a (d,) or (n, d) vector, got shape {vec.shape}")
    return vec


@command()
def search(
    text: str | None = typer.Argument(None, help="A description to search for (text space)."),
    like: Path | None = typer.Option(
        None, "--like", help="A skill .safetensors file or a .npy vector."
    ),
    space: str | None = typer.Option(
        None, "--space", help="Embedding space (default: text for TEXT, examples for --like)."
    ),
    k: int = typer.Option(5, "-k", min=1, help="Number of hits."),
    filters: list[str] | None = FILTER,
    fmt: Format = FORMAT,
) -> None:
    """Find the skills nearest a text or an embedding (cosine similarity, best first)."""
    if (text is None) == (like is None):
        raise typer.BadParameter("give either TEXT or --like FILE", param_hint="TEXT / --like")
    where = parse_filters(filters) or None
    query: Any = text if like is None else _like_vector(like, space or "examples")
    with open_bank() as bank:
        hits = bank.retrieve(query, k=k, space=space, where=where)
        records = {str(h.ref): bank.record(str(h.ref)) for h in hits}
    rows = [
        {
            "rank": i + 1,
            "ref": str(h.ref),
            "name": h.name,
            "version": h.version,
            "score": h.score,
            "aliases": list(records[str(h.ref)].aliases),
            "description": records[str(h.ref)].description,
        }
        for i, h in enumerate(hits)
    ]
    if fmt == Format.json:
        emit_json(rows)
    elif fmt == Format.csv:
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["rank", "ref", "score", "aliases", "description"])
        for r in rows:
            w.writerow(
                [r["rank"], r["ref"], f"{r['score']:.6f}", ";".join(r["aliases"]), r["description"]]
            )
    else:
        table = Table()
        for c in ("#", "ref", "score", "aliases", "description"):
            table.add_column(c, justify="right" if c in ("#", "score") else "left")
        for r in rows:
            table.add_row(
                str(r["rank"]),
                Text(r["ref"]),
                f"{r['score']:.4f}",
                Text(", ".join(r["aliases"]) or "-"),
                Text(r["description"] or ""),
            )
        out().print(table)
        if not rows:
            note("no hits")


def _norm(t: Any) -> float:
    return float(t.float().norm())


@command()
def diff(
    a: str = typer.Argument(..., help="First ref."),
    b: str = typer.Argument(..., help="Second ref."),
    as_json: bool = JSON,
) -> None:
    """Config, metric and rank differences, and per-module delta norms ||scale * B @ A||_F."""
    with open_bank() as bank:
        ra, rb = bank.record(a), bank.record(b)
        sa, sb = bank.get(str(ra.ref)), bank.get(str(rb.ref))
    config = {
        k: [ra.config.get(k), rb.config.get(k)]
        for k in sorted(set(ra.config) | set(rb.config))
        if ra.config.get(k) != rb.config.get(k)
    }
    metrics = {}
    for k in sorted(set(ra.metrics) | set(rb.metrics)):
        va, vb = ra.metrics.get(k), rb.metrics.get(k)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        metrics[k] = {"a": va, "b": vb, "delta": vb - va if numeric else None}
    sites = []
    for s in sorted(set(sa.factors) | set(sb.factors)):
        da = sa.delta(s) if s in sa.factors else None
        db = sb.delta(s) if s in sb.factors else None
        both = da is not None and db is not None and da.shape == db.shape
        sites.append(
            {
                "site": s,
                "rank_a": sa.ranks.get(s),
                "rank_b": sb.ranks.get(s),
                "norm_a": _norm(da) if da is not None else None,
                "norm_b": _norm(db) if db is not None else None,
                "norm_diff": _norm(da - db) if both else None,
            }
        )
    doc = {
        "a": str(ra.ref),
        "b": str(rb.ref),
        "same_base": ra.base_id == rb.base_id,
        "params": [sa.num_params, sb.num_params],
        "config": config,
        "metrics": metrics,
        "sites": sites,
    }
    if as_json:
        emit_json(doc)
        return
    con = out()
    con.print(Text(f"{ra.ref}  vs  {rb.ref}", style="bold"))
    con.print(
        render.kv_table(
            [
                ("base", "same" if doc["same_base"] else f"{ra.base_id} != {rb.base_id}"),
                ("params", f"{sa.num_params:,} vs {sb.num_params:,}"),
                (
                    "learner",
                    ra.learner
                    if ra.learner == rb.learner
                    else f"{ra.learner or '-'} vs {rb.learner or '-'}",
                ),
            ]
        )
    )
    if config:
        t = Table(title="config differences", title_justify="left")
        for c in ("key", str(ra.ref), str(rb.ref)):
            t.add_column(Text(c))
        for key, (va, vb) in config.items():
            t.add_row(Text(key), Text(render.fmt(va)), Text(render.fmt(vb)))
        con.print(t)
    else:
        con.print("configs are identical")
    if metrics:
        t = Table(title="metrics", title_justify="left")
        for c in ("metric", str(ra.ref), str(rb.ref), "delta"):
            t.add_column(Text(c), justify="left" if c == "metric" else "right")
        for key, m in metrics.items():
            t.add_row(
                Text(key),
                Text(render.fmt(m["a"])),
                Text(render.fmt(m["b"])),
                render.fmt(m["delta"]),
            )
        con.print(t)
    t = Table(title="modules", title_justify="left")
    for c in ("site", "rank a", "rank b", "||delta a||", "||delta b||", "||a - b||"):
        t.add_column(c, justify="left" if c == "site" else "right")
    for s in sites:
        t.add_row(
            Text(s["site"]),
            render.fmt(s["rank_a"]),
            render.fmt(s["rank_b"]),
            *(
                f"{s[k]:.4g}" if s[k] is not None else "-"
                for k in ("norm_a", "norm_b", "norm_diff")
            ),
        )
    con.print(t)
