"""The transfer protocol: a new task from few shots, starting from banked skills.

For every seed: a library of skills is trained on single shifts of MNIST-5k
(rotation, a corruption, a block permutation, inversion) and banked with their
example embeddings; then a new task combining two shifts (rotation and noise)
is learned from ``shots`` labelled images per class by each method, and scored
on its full test split. Two ways to combine, both run: ``mixed`` (each image
under one of the two shifts: the skills apply per sample) and ``stacked``
(both shifts on every image: the skills would have to add up).

- ``compose`` / ``expand``: PSEC (learners/psec.py) over the skills retrieved
  for the task; ``output``: the same compositor mixing the skills' outputs;
- ``lora``: a fresh LoRA on the same shots, same steps;
- ``merge``: ``bank.compose`` of the retrieved skills at fixed equal weights
  (no training); ``nearest``: per-sample routing to one skill (``sb.route``).

``skillbank bench --protocol transfer`` runs it; results.json, a table and an
accuracy-against-shots plot go to ``cfg.out``.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import skillbank as sb
from eval import metrics
from eval.corruptions import corrupt
from eval.data import ImageData, Task, mnist
from eval.driver import RESULTS, Context, Protocol, open_run
from learners import PSEC, LoRALearner, TrainConfig
from learners.psec import restore, stack_heads

LIBRARY = ("rot90", "noise", "perm", "invert")
TARGET = ("rot90", "noise")  # the new task combines these two
METHODS = ("compose", "expand", "output", "lora", "merge", "nearest")
PLOT = "accuracy_vs_shots.png"
FEW_SHOT = TrainConfig(steps=200, batch_size=64, lr=3e-3, schedule="cosine")


def shift(name: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """One named input shift; deterministic in ``seed``."""
    if name == "rot90":
        return torch.rot90(x, 1, dims=(-2, -1)).contiguous()
    if name == "noise":
        return corrupt(x, "gaussian_noise", 5, seed=seed)
    if name == "invert":
        return 1.0 - x
    if name == "perm":  # the pixels of the central 14 x 14 block, shuffled
        h, w = x.shape[-2:]
        block = x[..., h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2]
        flat = block.reshape(*block.shape[:-2], -1)
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(flat.shape[-1]))
        out = x.clone()
        out[..., h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = flat[..., perm].reshape(
            block.shape
        )
        return out
    raise sb.ConfigError(f"unknown shift {name!r}; choose from {LIBRARY}")


def shifted_task(data: ImageData, names: tuple[str, ...], seed: int) -> Task:
    """``data``'s train and test splits under the shifts ``names`` (applied in order)."""
    xs = [data.x_train, data.x_test]
    for i, n in enumerate(names):
        xs = [shift(n, x, seed * 100 + 2 * i + j) for j, x in enumerate(xs)]
    return Task(
        f"{data.name}-{'+'.join(names)}",
        xs[0],
        data.y_train,
        xs[1],
        data.y_test,
        data.classes,
        0,
        {"shifts": list(names)},
    )


def mixed_task(data: ImageData, names: tuple[str, ...], seed: int) -> Task:
    """``data`` with each image under one of the shifts ``names``, drawn per image by ``seed``."""
    xs = []
    for j, x in enumerate((data.x_train, data.x_test)):
        which = torch.randint(
            len(names), (len(x),), generator=torch.Generator().manual_seed(seed * 100 + j)
        )
        if j == 1:
            test_shift = [names[i] for i in which]
        out = x.clone()
        for i, n in enumerate(names):
            rows = (which == i).nonzero().flatten()
            out[rows] = shift(n, x[rows], seed * 100 + 2 * i + j)
        xs.append(out)
    return Task(
        f"{data.name}-{'-or-'.join(names)}",
        xs[0],
        data.y_train,
        xs[1],
        data.y_test,
        data.classes,
        0,
        {"shifts": list(names), "test_shift": test_shift},
    )


TARGETS = {"mixed": mixed_task, "stacked": shifted_task}


def few_shot(task: Task, shots: int, seed: int) -> Task:
    """``shots`` training images per class, drawn by ``seed``; the test split stays whole."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in task.classes:
        pool = (task.y_train == c).nonzero().flatten()
        if len(pool) < shots:
            raise sb.ConfigError(
                f"class {c} has {len(pool)} training images, fewer than {shots} shots"
            )
        idx.append(pool[torch.randperm(len(pool), generator=g)[:shots]])
    idx = torch.cat(idx)
    return replace(
        task, name=f"{task.name}-{shots}shot", x_train=task.x_train[idx], y_train=task.y_train[idx]
    )


@torch.no_grad()
def accuracy(forward, task: Task, batch_size: int = 500) -> float:
    right = sum(
        metrics.correct(forward(x), y)
        for x, y in zip(task.x_test.split(batch_size), task.y_test.split(batch_size), strict=True)
    )
    return right / len(task.y_test)


def build_library(
    base: nn.Module,
    data: ImageData,
    bank: sb.SkillBank,
    seed: int,
    train: TrainConfig,
    rank: int,
    tags: dict[str, str],
) -> dict[str, str]:
    """One LoRA skill per single shift, banked with its example embedding; refs by shift."""
    refs = {}
    for name in LIBRARY:
        task = replace(shifted_task(data, (name,), seed), name=f"{data.name}-{name}")
        model = copy.deepcopy(base)
        skill = LoRALearner(rank=rank, train=replace(train, seed=seed)).fit(model, task)
        with sb.disabled(model):
            emb = sb.example_embedding(model, task.x_train, centres=4, seed=seed)
        refs[name] = str(
            bank.add(
                f"transfer-s{seed}-{tags['run']}-{name}",
                skill,
                embedding=emb,
                description=f"LoRA skill for MNIST under {name}",
                embed_text=False,
                tags={**tags, "role": "library", "shift": name},
                learner="lora",
            )
        )
    return refs


def run_method(
    method: str,
    base: nn.Module,
    task: Task,
    bank: sb.SkillBank,
    where: dict[str, str],
    seed: int,
    rank: int,
    options: dict[str, Any],
) -> tuple[float, dict[str, Any]]:
    """Train ``method`` on the few-shot ``task``; its test accuracy and what it learned."""
    model = copy.deepcopy(base).eval()
    train_kw = dict(options.pop("train", {}))
    cfg = replace(FEW_SHOT, seed=seed, **train_kw)
    if method in ("compose", "expand", "output"):
        learner = PSEC(
            mode="expand" if method == "expand" else "compose",
            space="output" if method == "output" else "parameter",
            rank=rank,
            where=where,
            train=cfg,
            **options,
        )
        skill = learner.fit(model, task, bank)
        # scored as reloaded: the compositor travels with the skill
        comp = restore(model, skill, bank)
        info = {
            "alpha": skill.metadata["psec"]["mean_alpha"],
            "skills": skill.metadata["psec"]["skills"],
            "skill": skill,
        }
        if "test_shift" in task.metadata:  # what the compositor does with each kind of image
            shifts = np.asarray(task.metadata["test_shift"])
            info["alpha_by_shift"] = {
                str(s): [
                    round(float(a), 4)
                    for a in comp.mean_alpha(task.x_test[torch.as_tensor(shifts == s)])
                ]
                for s in sorted(set(shifts))
            }
        return accuracy(comp, task), info
    if method == "lora":
        skill = LoRALearner(rank=rank, train=cfg, **options).fit(model, task)
        sb.attach(model, skill, "fresh", load_head=True)
        return accuracy(model, task), {"skill": skill}
    refs = [
        str(h.ref)
        for h in bank.retrieve(
            sb.example_embedding(model, task.x_train)[:1], k=len(LIBRARY), where=where
        )[0]
    ]
    if method == "merge":
        skills = [bank.get(r) for r in refs]
        merged = bank.compose(refs, [1.0 / len(refs)] * len(refs), method="cat")
        sb.attach(model, merged, "merged", load_head=False)
        w, b = stack_heads(skills, model, "head")
        model.head.weight.data.copy_(w.mean(0))
        model.head.bias.data.copy_(b.mean(0))
        return accuracy(model, task), {"skills": refs}
    if method == "nearest":
        router = sb.Router(model, bank, where=where, mask_classes=False)
        return accuracy(lambda x: router(x).logits, task), {}
    raise sb.ConfigError(f"unknown transfer method {method!r}; choose from {METHODS}")


def bench_protocol(cfg, bank: sb.SkillBank | str | None, console=None) -> dict[str, Any]:
    """Run the transfer protocol of ``cfg`` (an ``eval.config.BenchConfig``); ``bank`` None
    means ``cfg.bank`` (the library needs one)."""
    unknown = [m for m in cfg.learners if m not in METHODS]
    if unknown:
        raise sb.ConfigError(f"unknown transfer methods {unknown}; choose from {list(METHODS)}")
    if cfg.stream != "composite-mnist":
        raise sb.ConfigError(f"the transfer protocol runs on 'composite-mnist', not {cfg.stream!r}")
    with open_run(cfg, bank if bank is not None else cfg.bank, console) as ctx:
        results = _run(ctx)
        ctx.write_results(results, plots=lambda out: plot_accuracy(results, out / PLOT))
    ctx.console.print(table(results))
    ctx.console.print(f"results: {ctx.out / RESULTS}; plot: {ctx.out / PLOT}")
    return results


def _run(ctx: Context) -> dict[str, Any]:
    """Per seed: the library, then every target, shot count and method on it."""
    cfg = ctx.cfg
    data = mnist(seed=cfg.data_seed, source_fraction=cfg.source_fraction)
    base = ctx.pretrained(data.source, len(data.classes))
    library_train = TrainConfig(
        epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, device=str(ctx.device)
    )
    rows = {kind: {m: {s: [] for s in cfg.shots} for m in cfg.learners} for kind in TARGETS}
    alphas: dict[str, list] = {}
    for seed in ctx.each_seed(f"library of {len(LIBRARY)} skills"):
        tags = ctx.tags(seed, protocol="transfer")
        library = build_library(base, data, ctx.bank, seed, library_train, cfg.rank, tags)
        where = {**tags, "role": "library"}
        for (kind, make), shots, method in itertools.product(
            TARGETS.items(), cfg.shots, cfg.learners
        ):
            task = few_shot(make(data, TARGET, seed + 1000), shots, seed)
            start = time.perf_counter()
            acc, info = run_method(
                method,
                base,
                task,
                ctx.bank,
                where,
                seed,
                cfg.rank,
                copy.deepcopy(cfg.learner_options.get(method, {})),
            )
            rows[kind][method][shots].append(acc)
            if "alpha" in info:
                names = [{v: k for k, v in library.items()}.get(r, r) for r in info["skills"]]
                record = {"mean": dict(zip(names, info["alpha"], strict=True))}
                for group, a in info.get("alpha_by_shift", {}).items():
                    record[f"on {group} images"] = dict(zip(names, a, strict=True))
                alphas.setdefault(f"{kind}/{method}/{shots}", []).append(record)
                ctx.bank.add(
                    f"transfer-s{seed}-{ctx.run_id}-{kind}-{method}-{shots}shot",
                    info["skill"],
                    description=f"PSEC {method} on {task.name}",
                    embed_text=False,
                    tags={**tags, "role": method},
                    learner="psec",
                    metrics={"accuracy": acc},
                )
            ctx.log(
                f"seed {seed} {kind} {shots:>2} shots {method:<8} {100 * acc:5.1f}%  "
                f"({time.perf_counter() - start:.1f} s)"
            )
    return {
        "protocol": "transfer",
        "backbone": cfg.backbone,
        "seeds": list(cfg.seeds),
        "library": list(LIBRARY),
        "target": list(TARGET),
        "shots": list(cfg.shots),
        "run_id": ctx.run_id,
        "accuracy": {
            kind: {m: {str(s): v for s, v in by.items()} for m, by in methods.items()}
            for kind, methods in rows.items()
        },
        "mean_alpha": alphas,
    }


def table(results: dict[str, Any]):
    """Rich table: accuracy (%) per target, method and shot count, mean ± std over seeds."""
    from rich.table import Table

    shots = results["shots"]
    t = Table(
        title=f"few-shot transfer to {' and '.join(results['target'])}: accuracy % (mean ± std over seeds)"
    )
    t.add_column("target")
    t.add_column("method")
    for s in shots:
        t.add_column(f"{s} shots/class", justify="right")
    for kind, methods in results["accuracy"].items():
        for method, by in methods.items():
            t.add_row(
                kind,
                method,
                *(
                    f"{100 * np.mean(by[str(s)]):.1f} ± {100 * np.std(by[str(s)]):.1f}"
                    for s in shots
                ),
            )
    return t


def plot_accuracy(results: dict[str, Any], path: Path) -> Path:
    """Accuracy against shots per class, one panel per target, mean ± std over seeds."""
    from eval.plots import _pyplot, _save

    shots = results["shots"]
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(results["accuracy"]), figsize=(5 * len(results["accuracy"]), 3.5), squeeze=False
    )
    for ax, (kind, methods) in zip(axes[0], results["accuracy"].items(), strict=True):
        for method, by in methods.items():
            means = [100 * np.mean(by[str(s)]) for s in shots]
            ax.errorbar(
                shots,
                means,
                yerr=[100 * np.std(by[str(s)]) for s in shots],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set_title(f"{kind}: {' and '.join(results['target'])}")
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_xticks(shots)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


PROTOCOL = Protocol(
    "transfer",
    stream="composite-mnist",
    learners=METHODS,
    run=bench_protocol,
)
