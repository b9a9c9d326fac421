"""Evaluation: task streams from real data, metrics, backbones and the benchmark runner."""

from eval import backbones, corruptions, metrics, streams
from eval.backbones import create_backbone, pretrain
from eval.runner import RunResult, bench, run
from eval.streams import Stream, Task

__all__ = [
    "RunResult",
    "Stream",
    "Task",
    "backbones",
    "bench",
    "corruptions",
    "create_backbone",
    "metrics",
    "pretrain",
    "run",
    "streams",
]
