"""Commands that change the bank or move skills in and out of it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from . import render
from .core import (
    app,
    command,
    confirm,
    db_app,
    emit_json,
    fail,
    is_url,
    note,
    open_bank,
    out,
    parse_pairs,
    state,
)

JSON = typer.Option(False, "--json", help="One JSON document on stdout.")


# ------------------------------------------------------------- labels
@command()
def alias(
    ref: str = typer.Argument(..., help="NAME@VERSION (or NAME for the latest)."),
    name: str = typer.Argument(..., help="The alias, e.g. prod."),
) -> None:
    """Point an alias (NAME@ALIAS) at a version; an existing alias moves."""
    with open_bank() as bank:
        target = bank.alias(ref, name)
    note(f"{target.name}@{name} -> {target}")


@command()
def unalias(
    name: str = typer.Argument(..., help="Skill name."),
    alias_: str = typer.Argument(..., metavar="ALIAS", help="The alias to drop."),
) -> None:
    """Drop an alias."""
    with open_bank() as bank:
        target = bank.unalias(name, alias_)
    note(f"removed {name}@{alias_} (was {target})")


@command()
def tag(
    ref: str = typer.Argument(..., help="NAME[@VERSION|@ALIAS]."),
    pairs: list[str] = typer.Argument(..., metavar="KEY=VALUE...", help="One or more tags."),
) -> None:
    """Set tags on one version."""
    tags = parse_pairs(pairs, "KEY=VALUE")
    with open_bank() as bank:
        rec = bank.record(ref)
        for k, v in tags.items():
            bank.tag(str(rec.ref), k, v)
    note(f"tagged {rec.ref}: {render.fmt(tags)}")


@command()
def untag(
    ref: str = typer.Argument(..., help="NAME[@VERSION|@ALIAS]."),
    keys: list[str] = typer.Argument(..., metavar="KEY...", help="Tag keys to remove."),
) -> None:
    """Remove tags from one version."""
    with open_bank() as bank:
        rec = bank.record(ref)
        for k in keys:
            bank.untag(str(rec.ref), k)
    note(f"untagged {rec.ref}: {', '.join(keys)}")


# ------------------------------------------------------------ in / out
@command(name="export")
def export_(
    ref: str = typer.Argument(..., help="NAME[@VERSION|@ALIAS]."),
    path: Path = typer.Argument(..., help="Output file (or directory), or the PEFT folder."),
    peft: bool = typer.Option(False, "--peft", help="Write a Hugging Face PEFT LoRA folder."),
    force: bool = typer.Option(
        False, "--force", help="Overwrite an existing file or non-empty folder."
    ),
) -> None:
    """Write a stored skill to a .safetensors file or a PEFT folder."""
    with open_bank() as bank:
        rec = bank.record(ref)
        skill = bank.get(str(rec.ref))
    if peft:
        if path.exists() and not path.is_dir():
            raise fail(f"{path} is a file; --peft writes a folder")
        if path.is_dir() and any(path.iterdir()) and not force:
            raise fail(f"{path} exists and is not empty (use --force to write into it)")
        written = skill.to_peft(path)
    else:
        if path.is_dir():  # names hold no path separators (the bank checks), so this stays inside
            path = path / f"{rec.name}-v{rec.version}.safetensors"
        if path.exists() and not force:
            raise fail(f"{path} exists (use --force to overwrite)")
        if not path.parent.is_dir():
            raise fail(f"no directory {path.parent}")
        written = skill.save(path)
    note(f"exported {rec.ref} -> {written}")
    out().print(Text(str(written)))


@command(name="import")
def import_(
    path: Path = typer.Argument(..., help="A skill .safetensors file or a PEFT LoRA folder."),
    name: str | None = typer.Option(None, "--name", help="Skill name (default: the file's)."),
    description: str = typer.Option("", "--description", "-d"),
    tags: list[str] | None = typer.Option(
        None, "--tag", "-t", metavar="KEY=VALUE", help="Repeatable."
    ),
    learner: str | None = typer.Option(None, "--learner"),
    embedding: Path | None = typer.Option(None, "--embedding", help="A .npy example embedding."),
    embed_text: bool | None = typer.Option(
        None,
        "--embed-text/--no-embed-text",
        help="Embed the description (default: when a text model is installed).",
    ),
    allow_base_change: bool = typer.Option(False, "--allow-base-change"),
) -> None:
    """Add a skill file or a PEFT folder to the bank as the next version of NAME."""
    import numpy as np

    from skillbank import Skill

    tag_map = parse_pairs(tags or [], "--tag")
    if path.is_dir():
        skill = Skill.from_peft(path, name)
    elif path.is_file():
        skill = Skill.load(path)
    else:
        raise fail(f"no such file or folder: {path}")
    vec = np.load(embedding, allow_pickle=False) if embedding is not None else None
    with open_bank(create=True) as bank:
        ref = bank.add(
            name or skill.name,
            skill,
            embedding=vec,
            description=description,
            tags=tag_map,
            learner=learner,
            embed_text=embed_text,
            allow_base_change=allow_base_change,
        )
    note(f"imported {path} as {ref}")
    out().print(Text(str(ref)))


# --------------------------------------------------------- maintenance
@command()
def rm(
    ref: str = typer.Argument(..., help="NAME (every version), NAME@VERSION or NAME@ALIAS."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be removed."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
) -> None:
    """Remove versions from the catalog; their blobs stay until `skillbank gc`."""
    with open_bank() as bank:
        doomed = bank.resolve(ref)
        listing = ", ".join(str(r) for r in doomed)
        if dry_run:
            note(f"would remove {len(doomed)} version(s): {listing}")
            return
        confirm(f"remove {len(doomed)} version(s): {listing}?", yes)
        removed = bank.remove(ref)
    note(f"removed {', '.join(str(r) for r in removed)} (run `skillbank gc` to free the blobs)")


@command()
def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list unreferenced blobs."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
    min_age: float = typer.Option(
        60.0,
        "--min-age",
        min=0,
        help="Spare blobs younger than this many seconds (a writer may be mid-add).",
    ),
) -> None:
    """Delete blobs no version references."""
    with open_bank() as bank:
        garbage = bank.gc(dry_run=True, min_age=min_age)
        size = bank.blob_bytes(garbage)
        for d in garbage:
            out().print(Text(d))
        if dry_run or not garbage:
            note(
                f"{'would delete' if garbage else 'nothing to delete:'} {len(garbage)} blob(s), "
                f"{render.human_size(size)}"
            )
            return
        confirm(f"delete {len(garbage)} unreferenced blob(s) ({render.human_size(size)})?", yes)
        removed = bank.gc(dry_run=False, min_age=min_age)
    note(f"deleted {len(removed)} blob(s)")


@command()
def verify(as_json: bool = JSON) -> None:
    """Re-hash every blob and check the index; exit 1 when anything is missing or corrupt."""
    with open_bank() as bank:
        report = bank.verify()
    fields = (
        "missing_blobs",
        "corrupt_blobs",
        "orphan_blobs",
        "index_without_rows",
        "rows_without_index",
    )
    if as_json:
        emit_json({"ok": report.ok, **{f: list(getattr(report, f)) for f in fields}})
    else:
        table = Table(title="verify", title_justify="left")
        table.add_column("check")
        table.add_column("count", justify="right")
        table.add_column("items")
        for f in fields:
            items = getattr(report, f)
            style = "green" if not items else ("yellow" if f == "orphan_blobs" else "red")
            table.add_row(
                Text(f.replace("_", " ")),
                Text(str(len(items)), style=style),
                Text(
                    "\n".join(items[:20])
                    + (f"\n... {len(items) - 20} more" if len(items) > 20 else "")
                ),
            )
        out().print(table)
        note("ok" if report.ok else "the bank is damaged: see above")
    if not report.ok:
        raise typer.Exit(1)


@command(db_app, name="upgrade")
def db_upgrade() -> None:
    """Apply pending catalog migrations and print the schema revision."""
    from skillbank import SkillBank

    st = state()
    if not is_url(st.bank) and not Path(st.bank).exists():
        raise fail(f"no skill bank at {st.bank!r}")
    before, after = SkillBank.db_upgrade(st.bank)
    note(
        f"schema {before or 'empty'} -> {after}"
        if before != after
        else f"schema already at {after} (head)"
    )
    out().print(Text(after))


@command(db_app, name="current")
def db_current() -> None:
    """Print the catalog's schema revision and the newest this skillbank knows."""
    from skillbank import SkillBank

    st = state()
    if not is_url(st.bank) and not (Path(st.bank) / "catalog.db").is_file():
        raise fail(f"no skill bank at {st.bank!r}")
    current, head = SkillBank.db_revision(st.bank)
    note("up to date" if current == head else f"behind head {head}: run `skillbank db upgrade`")
    out().print(Text(current or "empty"))


# ---------------------------------------------------------------- index
index_app = typer.Typer(
    help="The retrieval index: offline builds and what the cache holds.", no_args_is_help=True
)
app.add_typer(index_app, name="index")


def _spaces(bank, space: list[str] | None) -> list[str]:
    known = sorted(bank.spaces())
    if not space:
        return known
    unknown = sorted(set(space) - set(known))
    if unknown:
        raise fail(f"no embedding space {', '.join(unknown)}; spaces: {', '.join(known) or 'none'}")
    return list(dict.fromkeys(space))


@command(index_app, name="build")
def index_build(
    space: list[str] | None = typer.Option(
        None, "--space", "-s", help="Embedding space (repeatable; default: all)."
    ),
    kind: str | None = typer.Option(
        None,
        "--kind",
        help="auto | flat | hnsw | ivfpq (default: keep a pinned "
        "kind, else auto). An explicit kind is pinned until the next build.",
    ),
    nlist: int | None = typer.Option(
        None, "--nlist", min=1, help="IVF-PQ lists (default 4*sqrt(n), a power of two)."
    ),
    m: int | None = typer.Option(
        None, "--m", min=1, help="IVF-PQ bytes per code (default d/4, at most 64)."
    ),
    nprobe: int | None = typer.Option(
        None, "--nprobe", min=1, help="IVF-PQ lists scanned per query (default 32)."
    ),
    rerank: int | None = typer.Option(
        None, "--rerank", min=0, help="Exact re-ranking of rerank x fetch PQ candidates."
    ),
    train_per_list: int | None = typer.Option(
        None, "--train-per-list", min=39, help="Training vectors per list."
    ),
    hnsw_m: int | None = typer.Option(None, "--hnsw-m", min=2, help="HNSW links per node."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="FAISS threads for the build."
    ),
    as_json: bool = JSON,
) -> None:
    """Rebuild the index of each space from the catalog now (offline), and save it."""
    import time

    import faiss

    from skillbank import SkillBank

    if kind not in (None, *SkillBank.INDEX_KINDS):
        raise typer.BadParameter(
            f"{kind!r}: expected {', '.join(SkillBank.INDEX_KINDS)}", param_hint="--kind"
        )
    given = {
        k: v
        for k, v in dict(
            nlist=nlist,
            pq_m=m,
            nprobe=nprobe,
            rerank=rerank,
            train_per_list=train_per_list,
            hnsw_m=hnsw_m,
        ).items()
        if v is not None
    }
    if threads:
        faiss.omp_set_num_threads(threads)
    rows = []
    with open_bank() as bank:
        for sp in _spaces(bank, space):
            t = time.perf_counter()
            built = bank.index_build(sp, kind, **given)
            seconds = time.perf_counter() - t
            rows.append({"space": sp, **built, "seconds": round(seconds, 3)})
            note(f"{sp}: {built['kind']} over {built['vectors']:,} vectors in {seconds:.1f}s")
    if as_json:
        emit_json(rows)
        return
    table = Table(title="index build", title_justify="left")
    for col in ("space", "kind", "vectors", "pinned", "bytes", "seconds"):
        table.add_column(col, justify="right" if col in ("vectors", "bytes", "seconds") else "left")
    for r in rows:
        table.add_row(
            r["space"],
            r["kind"],
            f"{r['vectors']:,}",
            "yes" if r["pinned"] else "no",
            render.human_size(r["bytes"] or 0),
            f"{r['seconds']:.1f}",
        )
    out().print(table)


@command(index_app, name="info")
def index_info(as_json: bool = JSON) -> None:
    """Kind, size, bytes on disk and catalog stamp of each space's index cache."""
    with open_bank() as bank:
        index_dir = bank.index_dir
        rows = []
        for sp, info in bank.index_info().items():
            if info is None:
                rows.append({"space": sp, "kind": None, "state": "none (built on the next search)"})
                continue
            fresh = info.pop("fresh")
            rows.append(
                {
                    "space": sp,
                    **info,
                    "state": "fresh"
                    if fresh
                    else "behind (caught up or rebuilt on the next search)",
                }
            )
    if as_json:
        emit_json(rows)
        return
    table = Table(title=f"index ({index_dir})", title_justify="left")
    cols = ("space", "kind", "vectors", "bytes", "pinned", "stamp", "state", "settings")
    for col in cols:
        table.add_column(col, justify="right" if col in ("vectors", "bytes", "stamp") else "left")
    for r in rows:
        settings = ""
        if r.get("kind") == "ivfpq":
            settings = (
                f"nlist={r['nlist']} m={r['pq_m']} nprobe={r['nprobe']} rerank={r['rerank']} "
                f"delta={r['delta']:,}"
            )
        if r.get("tombstones"):
            settings += f" tombstones={r['tombstones']:,}"
        table.add_row(
            r["space"],
            r.get("kind") or "-",
            f"{r['ntotal']:,}" if r.get("kind") else "-",
            render.human_size(r["bytes"]) if r.get("kind") else "-",
            ("yes" if r.get("pinned") else "no") if r.get("kind") else "-",
            str(r.get("generation", "-")),
            r["state"],
            settings.strip(),
        )
    out().print(table)


# ---------------------------------------------------------------- stats
stats_app = typer.Typer(
    help="Routing statistics of stored versions (what the statistics routers read).",
    no_args_is_help=True,
)
app.add_typer(stats_app, name="stats")


def _labelled_arrays(path: Path):
    """(x float32 tensor, y int64 tensor) from an .npz holding ``x`` and ``y`` (no pickles)."""
    import numpy as np
    import torch

    if not path.is_file():
        raise fail(f"no data file {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = sorted({"x", "y"} - set(arrays.files))
            if missing:
                raise fail(f"{path} needs arrays 'x' and 'y'; it lacks {', '.join(missing)}")
            x, y = arrays["x"], arrays["y"]
    except ValueError as e:  # object arrays: never unpickled
        raise fail(f"{path}: {e}") from None
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "iu":
        raise fail(f"{path}: x must be numbers and y integer labels, got {x.dtype} and {y.dtype}")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or not len(x):
        raise fail(f"{path}: x is {x.shape} and y {y.shape}; want N samples and N labels")
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


@command(stats_app, name="rebuild")
def stats_rebuild(
    ref: str = typer.Argument(..., help="A version without routing statistics."),
    data: Path = typer.Option(
        ..., "--data", help=".npz with x (the skill's training inputs) and y (labels)."
    ),
    backbone: str = typer.Option(
        ..., "--backbone", help="The base the skill was trained on: preset or timm name."
    ),
    weights: Path | None = typer.Option(
        None, "--weights", help="The base's weights (.safetensors, or .pt read weights-only)."
    ),
    num_classes: int = typer.Option(10, "--num-classes", min=1, help="The base's head width."),
    head: str | None = typer.Option(
        None, "--head", help="Module whose input is the pre-logit feature (timm: none needed)."
    ),
) -> None:
    """Compute a version's routing statistics on the bare base and store them with it (a
    version from 0.1.0, or one added without stats=); a version that has them is left as is."""
    import skillbank as sb
    from eval.backbones import create_backbone

    x, y = _labelled_arrays(data)
    with open_bank() as bank:
        skill = bank.get(ref)
        shape = dict(in_chans=x.shape[1], img_size=tuple(x.shape[2:])) if x.ndim == 4 else {}
        model = create_backbone(backbone, num_classes=num_classes, weights=weights, **shape)
        model.eval()
        diff = skill.base_difference(model, strict=False)
        if diff:
            raise fail(f"{ref} was not trained on this {backbone}: {diff}")
        stats = sb.compute_stats(model, x, y, head=head)
        bank.put_stats(ref, stats)
    note(
        f"stored routing statistics of {ref}: {len(stats.classes)} classes, {int(stats.n)} "
        f"samples, layers {', '.join(stats.layers) or 'none'}"
        + (", pixel moments" if stats.pixel_sums is not None else "")
    )
