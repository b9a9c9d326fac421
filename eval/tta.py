"""The continual test-time adaptation protocol (CoTTA / ViDA), ``bench --protocol tta``.

Per seed: a source model is pretrained on the clean source split (cached,
``eval.backbones.pretrain`` with that seed); every method then adapts a copy of
it online over the corruption stream (15 domains at severity 5 in CoTTA order
by default, ``corrupted-mnist-s3`` for severity 3), batch by batch, without
labels and without a reset between domains; each domain's images in one fixed
shuffled order (``shuffled``: the data are stored sorted by class, CoTTA's test
sets are not). Each domain's test labels only score the predictions made on the
fly.
Reported: error per domain and the mean, per method, mean and std over seeds,
as ``results.json``, a rich table, ``table.md`` and ``tta_error.png``.

Every method runs under its reset guard (``learners.tta.ResetGuard``; the
method's ``reset`` option); the resets are counted per domain and reported.

Lifelong record: with a bank, a method that banks domain skills (ViDA) has its
adapted state banked at the end of every domain with that domain's example
embedding and layer statistics, tagged with the run, seed and source model; when
it also ``retrieve``s, a second pass over the same domains starts each one from
the skill the first batch's statistics retrieve (the ``<method> pass 2`` row,
with how many domains found their own skill).
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import skillbank as sb
from eval import backbones
from eval.driver import RESULTS, Context, Protocol, open_run
from eval.report import stats
from eval.streams import Stream
from learners.tta import ResetGuard, TTAMethod, create_method, online

SHORT = {
    "gaussian_noise": "gauss",
    "shot_noise": "shot",
    "impulse_noise": "impul",
    "defocus_blur": "defoc",
    "glass_blur": "glass",
    "motion_blur": "motn",
    "zoom_blur": "zoom",
    "snow": "snow",
    "frost": "frost",
    "fog": "fog",
    "brightness": "brit",
    "contrast": "contr",
    "elastic_transform": "elast",
    "pixelate": "pixel",
    "jpeg_compression": "jpeg",
}


@dataclass
class TTARun:
    """One method over one stream, one seed (one pass)."""

    errors: list[float] = field(default_factory=list)  # per domain, in stream order
    seconds: list[float] = field(default_factory=list)  # adaptation time per domain
    # bank refs of the domain skills ("" when not banked)
    skills: list[str] = field(default_factory=list)
    # the skill each domain started from ("" if none)
    retrieved: list[str] = field(default_factory=list)
    # per domain: whether the skill retrieved at its start was its own (second pass)
    found: list[bool] = field(default_factory=list)
    resets: list[int] = field(default_factory=list)  # per domain: resets the guard made
    notes: list[str] = field(default_factory=list)
    second: TTARun | None = None  # the second pass, each domain from its retrieved skill

    @property
    def mean_error(self) -> float:
        return float(np.mean(self.errors))


def shuffled(stream: Stream, seed: int) -> Stream:
    """Each domain's test set in one fixed random order (the same for every method).

    The evaluation data keep each split sorted by class; CoTTA's streams (the
    CIFAR-10-C / ImageNet-C test sets) are not. A class-sorted stream is a much
    harder, non-i.i.d. setting (batches of a single class), so the protocol
    shuffles within each domain, never across domains.
    """
    tasks = []
    for i, t in enumerate(stream):
        order = torch.randperm(
            len(t.x_test), generator=torch.Generator().manual_seed(seed * 1000 + i)
        )
        tasks.append(replace(t, x_test=t.x_test[order], y_test=t.y_test[order]))
    return Stream(tuple(tasks), stream.scenario, stream.n_classes, stream.source, stream.name)


def domain_name(task) -> str:
    return str(task.metadata.get("corruption", task.name))


def run_stream(
    method: TTAMethod,
    model: nn.Module,
    stream: Stream,
    *,
    batch_size: int = 64,
    bank: sb.SkillBank | None = None,
    tags: dict[str, str] | None = None,
    log=None,
    label: str | None = None,
) -> TTARun:
    """Adapt ``method`` online over every domain of ``stream`` in order (no reset between
    domains; the method's reset guard may reset it), from a copy of ``model``; per-domain
    error from predictions made before each batch's labels are ever looked at (the
    loop gets inputs only).

    With a ``bank`` and a method that banks domain skills, each domain's adapted
    state is banked with its statistics; when the method also ``retrieve``s, a
    second pass over the same domains starts each one from the skill the batch's
    statistics retrieve (``run.second``).
    """
    if not isinstance(stream, Stream) or stream.scenario != "tta":
        raise sb.ConfigError(
            "the tta protocol needs a test-time adaptation stream (e.g. eval.streams.corrupted)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise sb.ConfigError(f"batch_size must be an int >= 2, got {batch_size!r}")
    tags = dict(tags or {})
    method.setup(copy.deepcopy(model), stream.source)
    guard = ResetGuard.from_option(method.reset)
    if guard is not None:
        guard.attach(method)
    banks = bank is not None and getattr(method, "bank_skills", False)
    args = dict(batch_size=batch_size, guard=guard, log=log)
    run = _one_pass(method, stream, bank=bank if banks else None, tags=tags, label=label, **args)
    if banks and getattr(method, "retrieve", False):
        where = {k: tags[k] for k in ("run", "seed", "method") if k in tags}
        run.second = _one_pass(method, stream, retrieve_from=(bank, where), **args)
        run.second.found = [
            bool(got) and got.split("@")[0] == own.split("@")[0]
            for got, own in zip(run.second.retrieved, run.skills, strict=True)
        ]
    return run


def _one_pass(
    method: TTAMethod,
    stream: Stream,
    *,
    batch_size: int,
    guard: ResetGuard | None,
    log=None,
    bank: sb.SkillBank | None = None,
    tags: dict[str, str] | None = None,
    label: str | None = None,
    retrieve_from: tuple[sb.SkillBank, dict[str, str]] | None = None,
) -> TTARun:
    run = TTARun(notes=list(method.notes))
    for task in stream:
        start = time.perf_counter()
        hit = None
        if retrieve_from is not None:
            hit = method.start_from_bank(
                retrieve_from[0], task.x_test[:batch_size], retrieve_from[1]
            )
        before = len(guard.resets) if guard is not None else 0
        preds = online(method, task.x_test, batch_size, guard=guard)
        run.seconds.append(time.perf_counter() - start)
        run.resets.append((len(guard.resets) if guard is not None else 0) - before)
        # scoring only, after the fact
        run.errors.append(float((preds != task.y_test).float().mean()))
        run.retrieved.append(hit or "")
        run.skills.append(
            bank_domain(bank, method, stream, task, tags or {}, label) if bank else ""
        )
        if log is not None:
            log(
                f"{method.name} {domain_name(task)}: error {100 * run.errors[-1]:.1f}%"
                + (f" (from {hit})" if hit else "")
                + (f", {run.resets[-1]} reset(s)" if run.resets[-1] else "")
            )
    return run


def bank_domain(
    bank: sb.SkillBank, method, stream: Stream, task, tags: dict[str, str], label: str | None = None
) -> str:
    """Bank the method's adapted state for ``task`` with the domain's example embedding
    and statistics (what finds it again); named after ``label`` (default: the method's
    name; ':' becomes '+')."""
    label = (label or method.name).replace(":", "+")
    skill = method.domain_skill(
        f"{stream.name}-{method.name}-{task.name}", {"task": task.name, "domain": domain_name(task)}
    )
    seed = tags.get("seed", "0")
    ref = bank.add(
        f"{stream.name}-{label}-s{seed}-{task.name}",
        skill,
        embedding=method.domain_embedding(task.x_test, centres=4),
        stats=method.domain_stats(task.x_test),
        description=f"{method.name} adapted state after domain {domain_name(task)} of {stream.name}",
        tags={**tags, "domain": domain_name(task)},
        learner=method.name,
        embed_text=False,
    )
    return str(ref)


# --------------------------------------------------------------------------- the benchmark


def method_for(label: str, seed: int, device: str, options: dict[str, Any]) -> TTAMethod:
    """``label`` is a method name, or ``name:variant`` for a second configuration of one
    (e.g. ``vida:aug`` with its own ``learner_options`` entry)."""
    return create_method(label.split(":", 1)[0], seed=seed, device=device, **options)


def _methods(cfg) -> dict[str, dict[str, Any]]:
    """Per-method options, every name and option checked before any data is loaded."""
    opts = {n: dict(cfg.learner_options.get(n, {})) for n in cfg.learners}
    for n, o in opts.items():
        method_for(n, 0, cfg.device, o)
    return opts


_TTA_STREAMS = "use 'corrupted-mnist' (severity 5) or 'corrupted-mnist-s3'"


def bench_protocol(cfg, bank: sb.SkillBank | str | None, console=None) -> dict[str, Any]:
    """``skillbank bench --protocol tta``: every method over the stream for every seed.

    ``bank`` None runs without one (nothing is banked or retrieved).
    """
    from eval.config import STREAMS, build_stream

    if len(set(cfg.learners)) != len(cfg.learners):
        raise sb.ConfigError("each method may appear once per run")
    opts = _methods(cfg)
    backbones.check_name(cfg.backbone)
    if cfg.stream not in STREAMS:
        raise sb.ConfigError(f"unknown stream {cfg.stream!r} for the tta protocol; {_TTA_STREAMS}")
    stream = build_stream(cfg)
    if stream.scenario != "tta":
        raise sb.ConfigError(
            f"stream {cfg.stream!r} is not a test-time adaptation stream; {_TTA_STREAMS}"
        )
    stream = shuffled(stream, cfg.data_seed)
    with open_run(cfg, bank, console) as ctx, _threads(ctx.device):
        doc = _run(ctx, stream, opts)
        ctx.write_results(doc, texts={"table.md": markdown(doc) + "\n"}, plots=_plot(doc))
    ctx.console.print(table(doc))
    out = ctx.out
    ctx.console.print(
        f"results: {out / RESULTS}; table: {out / 'table.md'}; plot: {out / 'tta_error.png'}"
    )
    return doc


@contextlib.contextmanager
def _threads(device: torch.device) -> Iterator[None]:
    """One CPU thread for the run (``SKILLBANK_TTA_THREADS``), the caller's count after."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # These models are tiny: per-op threading costs more than it gives, and on a
        # shared, busy machine 2 threads ran a forward many times slower than 1.
        torch.set_num_threads(int(os.environ.get("SKILLBANK_TTA_THREADS", "1")))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(ctx: Context, stream: Stream, opts: dict[str, dict[str, Any]]) -> dict:
    """Every method for every seed from that seed's source model; results after each seed."""
    cfg = ctx.cfg
    runs: dict[str, list[TTARun]] = {n: [] for n in cfg.learners}
    sources: list[dict[str, Any]] = []
    for seed in ctx.each_seed():
        model = ctx.pretrained(stream.source, stream.n_classes, seed=seed)
        info = model.pretrain_info
        sources.append({"seed": seed, "key": info["key"], "clean_test_acc": info["test_acc"]})
        ctx.log(
            f"seed {seed}: source model {info['key']} (clean accuracy {100 * info['test_acc']:.1f}%)"
        )
        tags = ctx.tags(seed, stream=stream.name, source=info["key"], protocol="tta")
        if ctx.bank is not None:
            check_bank_fits(ctx.bank, model, stream.source.x_test[:8])
        for name in cfg.learners:
            method = method_for(name, seed, cfg.device, opts[name])
            t0 = time.perf_counter()
            run = run_stream(
                method,
                model,
                stream,
                batch_size=cfg.batch_size,
                bank=ctx.bank,
                tags={**tags, "method": name},
                label=name,
            )
            runs[name].append(run)
            ctx.log(
                f"{name} seed {seed}: mean error {100 * run.mean_error:.1f}% "
                f"({time.perf_counter() - t0:.0f} s)"
            )
        doc = results_doc(cfg, stream, runs, sources, str(ctx.device), ctx.run_id)
        # after every seed, so a crash keeps the seeds done
        ctx.write_results(doc, texts={"table.md": markdown(doc) + "\n"})
    return doc


PASS2 = " pass 2"  # the row of a method's second pass (each domain from its retrieved skill)


def _method_doc(rs: list[TTARun]) -> dict[str, Any]:
    err = np.asarray([r.errors for r in rs])
    resets = np.asarray([r.resets for r in rs])
    doc = {
        "mean_error": stats(err.mean(1).tolist()),
        "error_per_domain": {"mean": err.mean(0).tolist(), "std": err.std(0).tolist()},
        "errors": err.tolist(),
        "seconds": [float(np.sum(r.seconds)) for r in rs],
        "resets": resets.tolist(),  # per seed, per domain
        "total_resets": int(resets.sum()),
        "skills": [r.skills for r in rs],
        "retrieved": [r.retrieved for r in rs],
        "notes": sorted({n for r in rs for n in r.notes}),
    }
    if any(r.found for r in rs):
        found = np.asarray([r.found for r in rs])
        doc["found"] = found.tolist()
        doc["domains_found"] = stats(found.sum(1).astype(float).tolist())
    return doc


def check_bank_fits(bank: sb.SkillBank, model: nn.Module, x: torch.Tensor) -> None:
    """A bank space holds vectors of one dimension: refuse a bank that another backbone
    filled before any method runs, not at the end of the first domain."""
    from learners.tta import domain_layers
    from skillbank.embed import EXAMPLES
    from skillbank.route_stats import LAYER_STATS, route_features

    emb = sb.example_embedding(model, x)
    _, desc = route_features(model, x, layers=domain_layers(model))
    have = bank.spaces()
    for space, dim in ((EXAMPLES, emb.shape[1]), (LAYER_STATS, desc.shape[1])):
        if have.get(space, dim) != dim:
            raise sb.ConfigError(
                f"the bank's {space!r} space holds {have[space]}-d vectors (skills of another "
                f"backbone); this backbone's are {dim}-d: give this run its own bank (--bank)"
            )


def results_doc(
    cfg, stream: Stream, runs: dict[str, list[TTARun]], sources, device: str, run_id: str
) -> dict:
    from eval.report import versions

    domains = [domain_name(t) for t in stream]
    seeds = list(cfg.seeds)[: max(len(r) for r in runs.values())]
    methods = {}
    for name, rs in runs.items():
        if rs:
            methods[name] = _method_doc(rs)
        if rs and all(r.second is not None for r in rs):
            methods[name + PASS2] = _method_doc([r.second for r in rs])
    return {
        "protocol": "tta",
        "stream": stream.name,
        "severity": stream[0].metadata.get("severity"),
        "order": "shuffled within each domain (seed: data_seed)",
        "domains": domains,
        "n_per_domain": len(stream[0].x_test),
        "backbone": cfg.backbone,
        "batch_size": cfg.batch_size,
        "seeds": seeds,
        "device": device,
        "run_id": run_id,
        "learner_options": cfg.learner_options,
        "sources": sources,
        "methods": methods,
        "goals": goals(methods),
        "versions": versions(),
    }


def goals(methods: dict[str, Any]) -> dict[str, Any]:
    """The protocol's goals, measured on what ran (variants ``name:...`` are reported,
    not judged): ViDA against source-only with the same source stage and against
    Tent, BN-adapt against source-only, no domain more than 2 points worse than
    source-only, and each banking method's second pass against its first (found:
    >= 14 domains on every seed for every one; lower: one of them lower on every
    seed, so that a difference within the noise of one seed does not count)."""
    if "source" not in methods:
        return {}
    source = methods["source"]
    src = source["mean_error"]["mean"]
    by_domain = np.asarray(source["error_per_domain"]["mean"])
    out: dict[str, Any] = {"source_mean_error": src}
    worst = {
        n: float((np.asarray(m["error_per_domain"]["mean"]) - by_domain).max())
        for n, m in methods.items()
        if n != "source"
    }
    if worst:
        out["worst_domain_gap_vs_source"] = worst
        out["met_no_domain_2pts_worse"] = max(worst.values()) <= 0.02
    if "bn_adapt" in methods:
        out["bn_adapt_relative_vs_source"] = 1 - methods["bn_adapt"]["mean_error"]["mean"] / src
        out["met_bn_adapt_10pct"] = out["bn_adapt_relative_vs_source"] >= 0.1
    if "vida" in methods and "source_stage" in methods:
        v, stage = (
            methods["vida"]["mean_error"]["mean"],
            methods["source_stage"]["mean_error"]["mean"],
        )
        out["vida_relative_vs_source_stage"] = 1 - v / stage
        out["met_vida_10pct"] = out["vida_relative_vs_source_stage"] >= 0.1
        if "tent" in methods:
            out["met_vida_le_tent"] = v <= methods["tent"]["mean_error"]["mean"]
    second = {}
    for n in methods:
        if n + PASS2 not in methods or ":" in n:
            continue
        first, again = (np.asarray(methods[k]["errors"]).mean(1) for k in (n, n + PASS2))
        second[n] = {
            "domains_found": methods[n + PASS2]["domains_found"]["mean"],
            "fewest_found": min(sum(f) for f in methods[n + PASS2]["found"]),
            "first_pass": float(first.mean()),
            "second_pass": float(again.mean()),
            "lower_on_every_seed": bool((again < first).all()),
        }
    if second:
        out["second_pass"] = second
        out["domains_found"] = min(m["domains_found"] for m in second.values())
        out["met_found_14"] = min(m["fewest_found"] for m in second.values()) >= 14
        lower = sorted(n for n, m in second.items() if m["lower_on_every_seed"])
        out["second_pass_lower"] = lower
        out["met_second_pass_lower"] = bool(lower)
    return out


def _plot(doc: dict):
    return lambda out: plot_errors(doc, out / "tta_error.png")


def _cols(doc: dict) -> list[str]:
    return [SHORT.get(d, d) for d in doc["domains"]]


def _rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """The table's header and its rows of cells: error (%) per domain (mean over seeds),
    the mean ± std over seeds, and the guard's resets."""
    head = ["method", *_cols(doc), "mean", "resets"]
    rows = [
        [
            name,
            *[f"{100 * e:.1f}" for e in m["error_per_domain"]["mean"]],
            f"{100 * m['mean_error']['mean']:.1f} ± {100 * m['mean_error']['std']:.1f}",
            str(m["total_resets"]),
        ]
        for name, m in doc["methods"].items()
    ]
    return head, rows


def table(doc: dict):
    """Rich table of ``_rows``."""
    from rich.table import Table

    t = Table(
        title=f"{doc['stream']}: online error (%) per domain, {doc['backbone']}, "
        f"{len(doc['seeds'])} seed(s), batch {doc['batch_size']}, "
        "no reset between domains (resets: the guard's)"
    )
    head, rows = _rows(doc)
    t.add_column(head[0])
    for c in head[1:]:
        t.add_column(c, justify="right")
    for row in rows:
        t.add_row(*row)
    return t


def markdown(doc: dict) -> str:
    head, rows = _rows(doc)
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot_errors(doc: dict, path: Path) -> Path:
    """Error per domain (in stream order) per method, mean over seeds with a std band."""
    from eval.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(doc["domains"]))
    for name, m in doc["methods"].items():
        mean = 100 * np.asarray(m["error_per_domain"]["mean"])
        std = 100 * np.asarray(m["error_per_domain"]["std"])
        ax.plot(x, mean, marker="o", label=f"{name} (mean {100 * m['mean_error']['mean']:.1f})")
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    ax.set_xticks(x, _cols(doc), rotation=45)
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{doc['stream']}, online, {doc['backbone']} ({len(doc['seeds'])} seeds)")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


PROTOCOL = Protocol(
    "tta",
    stream="corrupted-mnist",
    learners=("source", "source_stage", "bn_adapt", "tent", "vida"),
    run=bench_protocol,
)
