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
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import skillbank as sb
from eval import backbones
from eval.baselines import BASELINES, union
from eval.protocol import Score, score_direct, score_routed
from eval.streams import Stream
from learners import Learner, create_learner, distributed, list_learners, resolve_device


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
    router: str = "examples",
    rerank: int = 0,
) -> SeedRun:
    """Train ``learner`` over ``stream`` from ``base`` (copied); resumes from ``state``.

    The global RNG (adapter inits draw from it) is seeded with ``seed`` for the
    run, inside a fork: a seed's run is reproducible, and every rank of a process
    group starts its adapters where one process would.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _run_seed(
            stream,
            learner,
            base,
            bank,
            seed,
            device=device,
            run_id=run_id,
            state=state,
            on_task=on_task,
            router=router,
            rerank=rerank,
        )


def _run_seed(
    stream: Stream,
    learner: Learner,
    base: nn.Module,
    bank: sb.SkillBank,
    seed: int,
    *,
    device: torch.device,
    run_id: str,
    state: SeedRun | None,
    on_task,
    router: str = "examples",
    rerank: int = 0,
) -> SeedRun:
    state = state or SeedRun()
    learner = learner.with_train(seed=seed, device=str(device))
    model = copy.deepcopy(base).to(device).eval()
    tags = {"run": run_id, "seed": str(seed), "stream": stream.name}
    where = {"learner": learner.name, **tags}
    router = sb.Router(model, bank, where=where, router=router, rerank=rerank)
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
                lambda task=task, skill=skill: _bank_skill(
                    bank, stream, learner, task, skill, model, seed, tags
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
        _record(state, _row(model, learner, stream, router, skill_of_task), model, stream, learner)
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
) -> str:
    """Add a task's skill to the bank with its example embedding and routing statistics
    (base features, adapters off); its ref."""
    with sb.disabled(model):
        emb = sb.example_embedding(model, task.x_train, centres=4, seed=seed)
        stats = sb.compute_stats(model, task.x_train, task.y_train)
    return str(
        bank.add(
            f"{stream.name}-{learner.name}-s{seed}-{task.name}",
            skill,
            embedding=emb,
            description=f"{learner.name} skill for {task.name} of {stream.name}",
            tags={**tags, "task": task.name},
            learner=learner.name,
            embed_text=False,
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


def _validate(stream: Stream, learners: list[Learner], backbone: str | nn.Module) -> None:
    """Everything that can be wrong with the input, before any training."""
    if not isinstance(stream, Stream):
        raise sb.ConfigError(f"stream must be an eval.streams.Stream, got {type(stream).__name__}")
    if isinstance(backbone, str):
        backbones.check_name(backbone)
    if len({lr.name for lr in learners}) != len(learners):
        raise sb.ConfigError("each learner may appear once per run")


def _prepare_backbone(
    backbone: str | nn.Module,
    stream: Stream,
    device: torch.device,
    seed: int = 0,
    epochs: int | None = None,
) -> nn.Module:
    if isinstance(backbone, nn.Module):
        return backbone
    if stream.source is None:
        raise sb.ConfigError(
            f"backbone {backbone!r} by name needs a stream with a source split to pretrain on"
        )
    kw = {} if epochs is None else {"epochs": epochs}
    return backbones.pretrain(
        backbone, stream.source, seed=seed, device=str(device), num_classes=stream.n_classes, **kw
    )


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
) -> dict[str, RunResult]:
    """Every learner over ``stream`` for every seed; results, checkpoints and plots under ``out``.
    ``router`` (default: the scenario's, ``skillbank.routers.DEFAULT_ROUTERS``) and
    ``rerank`` set how routed learners find skills."""
    from skillbank.routers import default_router

    router = router or default_router(stream.scenario)
    learner_kwargs = learner_kwargs or {}
    objs = [
        make_learner(spec, **learner_kwargs.get(spec if isinstance(spec, str) else spec.name, {}))
        for spec in learners
    ]
    _validate(stream, objs, backbone)
    dev = resolve_device(device)
    own_bank = not isinstance(bank, sb.SkillBank)
    if own_bank:
        with distributed.main_first():  # rank 0 creates the catalog and its schema
            bank = sb.SkillBank.open(bank or "skills")
    out = Path(out) if out is not None else None
    ckpt = _load_checkpoint(out, resume)
    run_id = distributed.broadcast(
        ckpt.get("run_id") or uuid.uuid4().hex[:12]
    )  # tags must agree across ranks
    try:
        base = _prepare_backbone(backbone, stream, dev, epochs=pretrain_epochs)
        results: dict[str, RunResult] = {}
        for learner in objs:
            runs = []
            for seed in seeds:
                key = f"{learner.name}/{seed}"
                state = SeedRun(**ckpt["runs"][key]) if key in ckpt.get("runs", {}) else None
                if state is None or state.done < len(stream):

                    def save(st, key=key):
                        _save_checkpoint(out, run_id, key, st, ckpt)

                    if progress is not None and distributed.is_main():
                        progress(f"{learner.name} seed {seed}")
                    state = run_seed(
                        stream,
                        learner,
                        base,
                        bank,
                        seed,
                        device=dev,
                        run_id=run_id,
                        state=state,
                        on_task=save,
                        router=router,
                        rerank=rerank,
                    )
                runs.append(state)
            results[learner.name] = RunResult(
                learner.name, stream.name, stream.scenario, list(seeds), runs, str(dev), router
            )
        if out is not None and distributed.is_main():
            from eval.report import write_results

            write_results(
                results,
                out,
                extra={
                    "run_id": run_id,
                    "backbone": str(backbone),
                    "router": router,
                    "rerank": rerank,
                },
            )
        return results
    finally:
        if own_bank:
            bank.close()


def _load_checkpoint(out: Path | None, resume: bool) -> dict:
    path = out / "checkpoint.json" if out is not None else None
    if resume and path is not None and path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}}


def _save_checkpoint(out: Path | None, run_id: str, key: str, state: SeedRun, ckpt: dict) -> None:
    if out is None or not distributed.is_main():
        return
    from eval.report import write_json

    ckpt["run_id"] = run_id
    ckpt.setdefault("runs", {})[key] = {k: getattr(state, k) for k in SeedRun.__dataclass_fields__}
    write_json(out / "checkpoint.json", ckpt, indent=None)
