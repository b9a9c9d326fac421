"""Words for what a task's skill knows, so a text search over the bank finds it.

The runner banks every skill with ``describe(stream, i, learner)``, e.g.
"digits 0 and 1 (zero, one), split MNIST-5k, task 1 of 5, lora". Numerals are
also spelled out because sentence encoders match words far better than digits.
"""

from __future__ import annotations

from collections.abc import Sequence

from eval.streams import Stream

DATASETS = {"mnist": "MNIST-5k", "digits": "8x8 digits"}
DIGIT_DATASETS = ("mnist", "digits")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
KINDS = ("split", "rotated", "permuted", "corrupted", "domains")
# How each domain of ``streams.digit_domains`` shows its digits.
DOMAIN_WORDS = {
    "mnist": "handwritten digits as they are",
    "inverted": "inverted digits (white background, black ink)",
    "digits": "8x8 scanned digits (scikit-learn), upscaled and blurry",
    "noise": "digits under heavy Gaussian noise",
    "rot90": "digits turned a quarter turn",
}


def stream_title(stream: Stream) -> str:
    """``split-mnist`` -> ``split MNIST-5k``; unknown names are kept as they are."""
    kind, _, dataset = stream.name.partition("-")
    if kind == "domains" and dataset:
        return f"digit domains of {DATASETS.get(dataset, dataset)}"
    if kind in KINDS and dataset:
        return f"{kind} {DATASETS.get(dataset, dataset)}"
    return stream.name


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


def _classes(stream: Stream, classes: Sequence[int], names: Sequence[str] | None) -> str:
    if names:
        return "classes " + _join([str(names[c]) if c < len(names) else str(c) for c in classes])
    dataset = stream.name.partition("-")[2]
    if dataset in DIGIT_DATASETS:
        spelled = ", ".join(WORDS[c] for c in classes if 0 <= c < len(WORDS))
        return f"digits {_join([str(c) for c in classes])}" + (f" ({spelled})" if spelled else "")
    return "classes " + _join([str(c) for c in classes])


def task_content(stream: Stream, i: int) -> str:
    """What task ``i`` holds: its classes (class/task-IL) or its shift (domain-IL, TTA)."""
    task = stream[i]
    meta = task.metadata
    transform = meta.get("transform")
    if transform == "rotation":
        return f"images rotated by {meta['angle']:g} degrees"
    if transform == "permutation":
        return "pixels in their usual order" if meta.get("identity") else "pixels permuted"
    if "domain" in meta:
        first, last = task.classes[0], task.classes[-1]
        span = f"{first - meta['digit_base']} to {last - meta['digit_base']}"
        return f"{DOMAIN_WORDS[meta['domain']]}, digits {span} as classes {first} to {last}"
    if "corruption" in meta:
        return f"{meta['corruption'].replace('_', ' ')} corruption, severity {meta['severity']}"
    return _classes(stream, list(task.classes), meta.get("class_names"))


def describe(stream: Stream, i: int, learner: str) -> str:
    """The description a skill for task ``i`` of ``stream`` is banked with."""
    return f"{task_content(stream, i)}, {stream_title(stream)}, task {i + 1} of {len(stream)}, {learner}"


def describe_all(stream: Stream, learner: str) -> str:
    """The description of a skill trained on every task at once (``joint``)."""
    return f"all {len(stream)} tasks of {stream_title(stream)}, {learner}"
