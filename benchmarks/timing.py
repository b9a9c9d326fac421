"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time


def race(fns: dict, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call; contenders alternate so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
