"""The benchmark runner: learners over a task stream, into a skill bank.

For every learner and seed: start from the pretrained backbone, train task
after task, add each task's skill to the bank with its example embedding, and
fill the accuracy matrix R (row 0 before any training). Routed learners are
scored task-agnostically (each test sample routed by retrieval and run with
``mixed_batch``); direct ones as the model stands. A checkpoint after every
task lets ``resume=True`` continue an interrupted run.

Under ``torchrun`` (a process group is up) every rank trains the same seed on
its shard of each batch; rank 0 alone adds the skill to the bank while the
others wait, then all register the ref it broadcasts. Every rank has the bank
open (rank 0 opens it first, so only it creates or migrates the schema) and
reads it for routing; scoring is sharded over ranks and the counts summed.
Only rank 0 writes the checkpoint and results.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import skillbank as sb
from eval import backbones, logs, metrics
from eval.baselines import BASELINES, union
from eval.describe import describe, describe_all
from eval.driver import RESULTS, Context, Protocol, open_context, open_run
from eval.protocol import Score, score_direct, score_routed
from eval.streams import Stream
from learners import Learner, create_learner, distributed, list_learners


@dataclass
class SeedRun:
    """One learner, one seed: matrices, routing and cost, filled row by row."""

    R: list[list[float]] = field(default_factory=list)  # class-IL, (T+1) x T
    R_task: list[list[float]] = field(default_factory=list)  # task-IL
    routing: list[float | None] = field(default_factory=list)  # mean routing accuracy per row
    retention: list[float] = field(default_factory=list)  # source-task accuracy per row
    seconds: list[float] = field(default_factory=list)  # training time per task
    skills: list[str] = field(default_factory=list)  # bank refs, one per task
    adapters: list[str] = field(default_factory=list)  # adapter name of each task's skill
    params: list[int] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)

    @property
    def done(self) -> int:
        return len(self.skills)


@dataclass(frozen=True)
class Routing:
    """How routed learners find their skills, passed whole (see ``sb.Router``).

    ``router`` None stands for the stream scenario's default until ``resolved``.
    """

    router: str | None = None
    rerank: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def resolved(self, scenario: str) -> Routing:
        from skillbank.routers import default_router

        return replace(self, router=self.router or default_router(scenario))

    def build(self, model: nn.Module, bank: sb.SkillBank, where: dict[str, str]) -> sb.Router:
        return sb.Router(
            model,
            bank,
            where=where,
            router=self.router or "examples",
            rerank=self.rerank,
            router_options=self.options,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"router": self.router, "rerank": self.rerank, "router_options": dict(self.options)}


def make_learner(spec: str | Learner, **kwargs: Any) -> Learner:
    """A learner from a name (registry or baseline) or an instance."""
    if isinstance(spec, Learner):
        return spec
    if spec in BASELINES:
        return BASELINES[spec](**kwargs)
    if spec not in list_learners():
        raise sb.ConfigError(
            f"unknown learner {spec!r}; choose from {sorted(list_learners() + list(BASELINES))}"
        )
    return create_learner(spec, **kwargs)


def _schedule(learner: Learner) -> str:
    return getattr(learner, "schedule", "sequential")


def _row(model: nn.Module, learner: Learner, stream: Stream, router, skill_of_task) -> list[Score]:
    if learner.inference == "route" and skill_of_task:
        return [score_routed(router, t, skill_of_task) for t in stream]
    return [score_direct(model, t) for t in stream]


def run_seed(
    stream: Stream,
    learner: Learner,
    base: nn.Module,
    bank: sb.SkillBank,
    seed: int,
    *,
    device: torch.device,
    run_id: str,
    state: SeedRun | None = None,
    on_task=None,
    routing: Routing | None = None,
) -> SeedRun:
    """Train ``learner`` over ``stream`` from ``base`` (copied); resumes from ``state``.

    The global RNG (adapter inits draw from it) is seeded with ``seed`` for the
    run, inside a fork: a seed's run is reproducible, and every rank of a process
    group starts its adapters where one process would.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        state = state or SeedRun()
        learner = learner.with_train(seed=seed, device=str(device))
        model = copy.deepcopy(base).to(device).eval()
        tags = {"run": run_id, "seed": str(seed), "stream": stream.name}
        where = {"learner": learner.name, **tags}
        router = (routing or Routing("examples")).build(model, bank, where)
        skill_of_task: dict[int, str] = {}
        for i, ref in enumerate(state.skills):  # resume: put the finished tasks back
            if not ref:
                continue
            if ref not in skill_of_task.values():  # joint repeats one skill on every row
                if state.adapters[i] in sb.adapter_names(model):
                    sb.remove_adapter(model, state.adapters[i])
                sb.attach(
                    model, bank.get(ref), state.adapters[i], load_head=learner.inference == "direct"
                )
            skill_of_task[i] = ref
        if not state.R:
            _record(state, _row(model, learner, stream, router, {}), model, stream, learner)
        schedule = _schedule(learner)
        whole = union(list(stream)) if schedule == "joint" else None
        for i in range(state.done, len(stream)):
            task = whole or stream[i]
            start = time.perf_counter()
            if schedule == "none":
                ref = ""
            elif schedule == "joint" and i > 0:  # trained once; every row is that model
                ref = state.skills[0]
                state.params.append(state.params[0])
                state.bytes.append(state.bytes[0])
            else:
                skill = learner.fit(model, task, bank)
                ref = distributed.on_main(  # one writer; the other ranks wait for its ref
                    lambda task=task, skill=skill, i=i: _bank_skill(
                        bank, stream, learner, task, skill, model, seed, tags, i
                    )
                )
                router.register(ref, learner.adapter_name(task), skill)
                state.params.append(skill.num_params)
                state.bytes.append(bank.record(ref).size)
            state.seconds.append(time.perf_counter() - start)
            if not ref:
                state.params.append(0)
                state.bytes.append(0)
            state.skills.append(ref)
            state.adapters.append(learner.adapter_name(task) if ref else "")
            if ref:
                skill_of_task[i] = ref
            _record(
                state, _row(model, learner, stream, router, skill_of_task), model, stream, learner
            )
            if on_task is not None:
                on_task(state)
        return state


def _bank_skill(
    bank: sb.SkillBank,
    stream: Stream,
    learner: Learner,
    task,
    skill: sb.Skill,
    model: nn.Module,
    seed: int,
    tags: dict[str, str],
    index: int,
) -> str:
    """Add a task's skill to the bank with its example embedding and routing statistics
    (base features, adapters off); its ref.

    The description says what the skill knows in words (``eval.describe``) and is
    embedded into the bank's text space when a text encoder is installed, so
    ``skillbank search "digits 0 and 1"`` finds the skill.
    """
    with sb.disabled(model):
        emb = sb.example_embedding(model, task.x_train, centres=4, seed=seed)
        stats = sb.compute_stats(model, task.x_train, task.y_train)
    joint = _schedule(learner) == "joint"
    return str(
        bank.add(
            f"{stream.name}-{learner.name}-s{seed}-{task.name}",
            skill,
            embedding=emb,
            description=describe_all(stream, learner.name)
            if joint
            else describe(stream, index, learner.name),
            tags={**tags, "task": task.name},
            learner=learner.name,
            embed_text=None,  # embedded when an encoder is installed, skipped otherwise
            stats=stats,
        )
    )


def _record(
    state: SeedRun, scores: list[Score], model: nn.Module, stream: Stream, learner: Learner
) -> None:
    state.R.append([s.class_il for s in scores])
    state.R_task.append([s.task_il for s in scores])
    routed = [s.routing for s in scores if s.routing is not None]
    state.routing.append(float(np.mean(routed)) if routed else None)
    if stream.source is not None:  # the source task, on what serves it: the bare base when routing
        with sb.disabled(model) if learner.inference == "route" else contextlib.nullcontext():
            state.retention.append(score_direct(model, stream.source).class_il)


@dataclass
class RunResult:
    """All seeds of one learner on one stream."""

    learner: str
    stream: str
    scenario: str
    seeds: list[int]
    runs: list[SeedRun]
    device: str
    router: str = ""  # how routed learners found their skills

    @property
    def R(self) -> np.ndarray:
        """The accuracy matrix, averaged over seeds: (T+1) x T."""
        return np.mean([np.asarray(r.R) for r in self.runs], axis=0)

    @property
    def metrics(self) -> dict[str, Any]:
        from eval.report import learner_metrics

        return learner_metrics(self)

    def save(self, out: str | Path) -> Path:
        from eval.report import write_results

        return write_results({self.learner: self}, out)


def task_line(result: RunResult, stream: Stream, i: int) -> str:
    """One log line for task ``i`` of a learner, over its seeds: mean accuracy on the tasks
    seen so far after training it, and the training time."""
    # ACC of the matrix as it stood after task i: its tasks 0..i
    acc = [metrics.acc(np.asarray(r.R)[: i + 2, : i + 1]) * 100 for r in result.runs]
    line = f"{result.learner:<14} task {i + 1}/{len(stream)} {stream[i].name:<16} acc {np.mean(acc):5.1f}"
    if len(acc) > 1:
        line += f" ± {np.std(acc):.1f}"
    seconds = np.mean([r.seconds[i] for r in result.runs])
    return line + f"  {seconds:.1f} s/seed ({len(result.runs)} seeds)"


def _validate(stream: Stream, learners: list[Learner], backbone: str | nn.Module) -> None:
    """Everything that can be wrong with the input, before any training."""
    if not isinstance(stream, Stream):
        raise sb.ConfigError(f"stream must be an eval.streams.Stream, got {type(stream).__name__}")
    if isinstance(backbone, str):
        backbones.check_name(backbone)
    if len({lr.name for lr in learners}) != len(learners):
        raise sb.ConfigError("each learner may appear once per run")


def run(
    stream: Stream,
    learner: str | Learner = "lora",
    backbone: str | nn.Module = "vit_micro",
    bank: sb.SkillBank | str | Path | None = None,
    seeds=(0,),
    device: str = "auto",
    out: str | Path | None = None,
    resume: bool = False,
    **kwargs: Any,
) -> RunResult:
    """One learner over ``stream``; see ``bench`` for several learners."""
    return bench(
        stream,
        [learner],
        backbone=backbone,
        bank=bank,
        seeds=seeds,
        device=device,
        out=out,
        resume=resume,
        **kwargs,
    )[make_learner(learner).name]


def bench(
    stream: Stream,
    learners: list[str | Learner],
    *,
    backbone: str | nn.Module = "vit_micro",
    bank: sb.SkillBank | str | Path | None = None,
    seeds=(0, 1, 2),
    device: str = "auto",
    out: str | Path | None = None,
    resume: bool = False,
    pretrain_epochs: int | None = None,
    learner_kwargs: dict[str, dict] | None = None,
    progress=None,
    router: str | None = None,
    rerank: int = 0,
    router_options: dict[str, Any] | None = None,
    log: Sequence[str] = logs.DEFAULT_LOGS,
) -> dict[str, RunResult]:
    """Every learner over ``stream`` for every seed; results, checkpoints and plots under ``out``.
    ``router`` (default: the scenario's, ``skillbank.routers.DEFAULT_ROUTERS``), ``rerank``
    and ``router_options`` set how routed learners find skills (see ``sb.Router``). ``log``
    names the per-task sinks (``eval.logs.LOGGERS``; the CSV is written only with ``out``)."""
    objs = _learners(learners, learner_kwargs or {})
    _validate(stream, objs, backbone)
    log = logs.check(log)  # a missing optional sink fails before the bank and backbone
    out = Path(out) if out is not None else None
    ckpt = _load_checkpoint(out, resume)
    with open_context(
        bank if isinstance(bank, sb.SkillBank) else (bank or "skills"),
        seeds=seeds,
        device=device,
        out=out,
        backbone=backbone,
        pretrain_epochs=pretrain_epochs,
        run_id=ckpt.get("run_id"),  # a resumed run keeps its id
        progress=progress,
    ) as ctx:
        return _bench(ctx, stream, objs, ckpt, Routing(router, rerank, router_options or {}), log)


def bench_protocol(
    cfg, bank: sb.SkillBank | str | Path | None, console=None
) -> dict[str, RunResult]:
    """``skillbank bench`` (the continual protocol): ``bench`` with everything from ``cfg``."""
    from eval.config import build_stream
    from eval.report import print_table
    from learners import TrainConfig

    train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, device=cfg.device)
    kwargs = {
        n: {"train": train, "rank": cfg.rank, **cfg.learner_options.get(n, {})}
        for n in cfg.learners
    }
    objs = _learners(cfg.learners, kwargs)  # unknown names fail here, before any data is loaded
    logs.check(cfg.log)
    stream = build_stream(cfg)
    _validate(stream, objs, cfg.backbone)
    out = Path(cfg.out)
    ckpt = _load_checkpoint(out, cfg.resume)
    bank = bank if isinstance(bank, sb.SkillBank) else (bank or cfg.bank)
    with open_run(cfg, bank, console, run_id=ckpt.get("run_id")) as ctx:
        routing = Routing(cfg.router, cfg.rerank, cfg.router_options)
        results = _bench(ctx, stream, objs, ckpt, routing, cfg.log)
        if distributed.is_main():
            print_table(results)
            ctx.console.print(
                f"results: {out / RESULTS}; plots: {out}/*.png; skills in bank {cfg.bank}"
                + (
                    f"; {distributed.world_size()} processes"
                    if distributed.is_distributed()
                    else ""
                )
            )
    return results


def _learners(specs: list[str | Learner], kwargs: dict[str, dict]) -> list[Learner]:
    return [
        make_learner(spec, **kwargs.get(spec if isinstance(spec, str) else spec.name, {}))
        for spec in specs
    ]


def _bench(
    ctx: Context,
    stream: Stream,
    learners: list[Learner],
    ckpt: dict,
    routing: Routing,
    log: Sequence[str] = logs.DEFAULT_LOGS,
) -> dict[str, RunResult]:
    """The continual protocol in an open run: every learner, every seed; rank 0 writes."""
    from eval.plots import plot_all
    from eval.report import results_doc

    routing = routing.resolved(stream.scenario)
    setup = logs.LogSetup(
        ctx.out,
        ctx.run_id,
        len(stream),
        resume="run_id" in ckpt,  # a checkpoint was read: append to the run's rows
        config=ctx.cfg.to_dict() if ctx.cfg is not None else _config(ctx, stream, learners),
    )
    with logs.open_loggers(log, setup) as sinks:  # before pretraining: a missing sink fails first
        base = ctx.pretrained(stream.source, stream.n_classes)
        results: dict[str, RunResult] = {}
        for learner in learners:
            runs = _seed_runs(ctx, stream, learner, base, ckpt, sinks, routing)
            results[learner.name] = RunResult(
                learner.name,
                stream.name,
                stream.scenario,
                list(ctx.seeds),
                runs,
                str(ctx.device),
                routing.router,
            )
            for i in range(len(stream)):
                ctx.log(task_line(results[learner.name], stream, i))
        ctx.write_results(
            results_doc(
                results,
                extra={
                    "run_id": ctx.run_id,
                    "backbone": str(ctx.backbone),
                    **routing.to_dict(),
                },
            ),
            plots=lambda out: plot_all(results, out),
        )
        return results


def _seed_runs(
    ctx: Context,
    stream: Stream,
    learner: Learner,
    base: nn.Module,
    ckpt: dict,
    sinks: logs.Loggers,
    routing: Routing,
) -> list[SeedRun]:
    """Every seed of one learner, continuing checkpointed ones where they stopped."""
    runs = []
    for seed in ctx.each_seed():
        key = f"{learner.name}/{seed}"
        state = SeedRun(**ckpt["runs"][key]) if key in ckpt.get("runs", {}) else None
        if state is not None and state.done < len(stream) and not learner.resumable:
            ctx.log(f"{learner.name} seed {seed}: cannot resume mid-stream, starting over")
            state = None
        if state is None or state.done < len(stream):

            def save(st, key=key, seed=seed):
                _save_checkpoint(ctx, key, st, ckpt)
                sinks.log(logs.task_record(ctx.run_id, learner.name, seed, stream, st))

            state = run_seed(
                stream,
                learner,
                base,
                ctx.bank,
                seed,
                device=ctx.device,
                run_id=ctx.run_id,
                state=state,
                on_task=save,
                routing=routing,
            )
        runs.append(state)
    return runs


def _config(ctx: Context, stream: Stream, learners: list[Learner]) -> dict[str, Any]:
    """What a run from the Python API is, for sinks that record it (wandb)."""
    return {
        "stream": stream.name,
        "learners": [lr.name for lr in learners],
        "seeds": list(ctx.seeds),
        "backbone": str(ctx.backbone) if isinstance(ctx.backbone, str) else "module",
    }


def _load_checkpoint(out: Path | None, resume: bool) -> dict:
    path = out / "checkpoint.json" if out is not None else None
    if resume and path is not None and path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}}


def _save_checkpoint(ctx: Context, key: str, state: SeedRun, ckpt: dict) -> None:
    ckpt["run_id"] = ctx.run_id
    ckpt.setdefault("runs", {})[key] = {k: getattr(state, k) for k in SeedRun.__dataclass_fields__}
    ctx.write_json("checkpoint.json", ckpt, indent=None)


PROTOCOL = Protocol(
    "continual",
    stream="domains-mnist",
    # ours (routed skills; one summed model), the bounds (joint; frozen: the source model
    # left alone), and the field's references
    learners=(
        "lora",
        "orthogonal",
        "finetune",
        "joint",
        "frozen",
        "simplecil",
        "replay",
        "ewc",
        "lwf",
    ),
    run=bench_protocol,
    multi_process=True,
)
