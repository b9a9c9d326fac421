"""Task streams: a base dataset cut into a sequence of tasks, one scenario each.

Scenarios (van de Ven & Tolias 2019, plus continual test-time adaptation):

- ``"class"``: disjoint class groups; labels stay global, no task id at test time.
- ``"task"``: the same groups and labels, but the task id (its ``classes``) is
  known at test time, so an evaluator masks logits to the task's classes.
- ``"domain"``: every task has all classes, under a different input transform
  (pixel permutation, rotation). (``digit_domains`` changes the domain *and*
  brings new classes, so it is class-IL.)
- ``"tta"``: one domain per image corruption, for test-time adaptation.

Images are float32 N x C x H x W in [0, 1], unnormalised (see `eval.data`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.corruptions import CORRUPTIONS, COTTA_ORDER, corrupt
from eval.data import (
    ImageData,
    Task,
    as_images,
    as_labels,
    digits,
    load_image_folder,
    make_data,
    mnist,
)
from eval.errors import InvalidStream

SCENARIOS = ("class", "task", "domain", "tta")

__all__ = [
    "DIGIT_DOMAINS",
    "SCENARIOS",
    "ImageData",
    "Stream",
    "Task",
    "corrupted",
    "digit_domains",
    "digits",
    "from_datasets",
    "from_tasks",
    "from_tensors",
    "image_folder",
    "legacy_order",
    "load_image_folder",
    "make_data",
    "mnist",
    "permuted",
    "rotated",
    "split",
]


@dataclass(frozen=True, eq=False)
class Stream:
    """An ordered sequence of tasks sharing one image shape and one label space.

    ``n_classes`` is the size of the output head (max label + 1 by default);
    ``source`` is a held-out split for pretraining the backbone, or None.
    """

    tasks: tuple[Task, ...]
    scenario: str
    n_classes: int
    source: Task | None = None
    name: str = "stream"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.scenario not in SCENARIOS:
            raise InvalidStream(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if not self.tasks:
            raise InvalidStream("a stream needs at least one task")
        shape = self.tasks[0].image_shape
        for i, t in enumerate(self.tasks):
            if t.task_id != i:
                raise InvalidStream(f"task {t.name!r} at position {i} has task_id {t.task_id}")
            if t.image_shape != shape:
                raise InvalidStream(
                    f"task {t.name!r} has images {t.image_shape}, task 0 has {shape}"
                )
            if max(t.classes) >= self.n_classes:
                raise InvalidStream(
                    f"task {t.name!r} declares class {max(t.classes)} but the stream has "
                    f"n_classes={self.n_classes}"
                )
        if self.source is not None and self.source.image_shape != shape:
            raise InvalidStream(f"source images are {self.source.image_shape}, tasks have {shape}")

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) shared by every task."""
        return self.tasks[0].image_shape

    @property
    def task_il(self) -> bool:
        """True when the task id is known at test time (logits masked to a task's classes)."""
        return self.scenario == "task"

    def __repr__(self) -> str:
        return (
            f"Stream({self.name!r}, scenario={self.scenario!r}, tasks={len(self)}, "
            f"n_classes={self.n_classes}, image_shape={self.image_shape}, "
            f"source={'yes' if self.source is not None else 'no'})"
        )


def from_tasks(
    tasks: Sequence[Task],
    scenario: str,
    *,
    n_classes: int | None = None,
    source: Task | None = None,
    name: str = "stream",
) -> Stream:
    """Build a stream from hand-made tasks, numbering them 0..T-1 in order."""
    tasks = [replace(t, task_id=i) for i, t in enumerate(tasks)]
    if not tasks:
        raise InvalidStream("a stream needs at least one task")
    n = n_classes if n_classes is not None else 1 + max(max(t.classes) for t in tasks)
    return Stream(tuple(tasks), scenario, n, source, name)


def _n_classes(data: ImageData) -> int:
    return 1 + max(data.classes)


# --------------------------------------------------------------------------- scenarios


def split(
    data: ImageData,
    n_tasks: int = 5,
    scenario: str = "class",
    seed: int = 0,
    class_order: Sequence[int] | str | None = None,
) -> Stream:
    """Partition the classes into ``n_tasks`` equal groups, one task each.

    ``class_order``: None keeps sorted order (split MNIST: 0-1, 2-3, ...);
    ``"random"`` shuffles the classes with ``seed``; a sequence fixes the order.
    Labels stay global in both scenarios; they differ only in what the
    evaluator may know (``Stream.task_il``).
    """
    if scenario not in ("class", "task"):
        raise InvalidStream(f"split() builds 'class' or 'task' streams, got {scenario!r}")
    classes = list(data.classes)
    if class_order is None:
        order = sorted(classes)
    elif isinstance(class_order, str):
        if class_order != "random":
            raise InvalidStream(
                f"class_order must be None, 'random' or a sequence, got {class_order!r}"
            )
        order = [int(c) for c in np.random.default_rng(seed).permutation(sorted(classes))]
    else:
        order = [int(c) for c in class_order]
        if sorted(order) != sorted(classes):
            raise InvalidStream(
                f"class_order {order} is not a permutation of the classes {classes}"
            )
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise InvalidStream(f"n_tasks must be a positive int, got {n_tasks!r}")
    if n_tasks > len(order):
        raise InvalidStream(f"n_tasks={n_tasks} exceeds the {len(order)} classes of {data.name}")
    if len(order) % n_tasks:
        raise InvalidStream(
            f"n_tasks={n_tasks} does not divide the {len(order)} classes of {data.name}; "
            "choose a divisor of the number of classes"
        )
    per = len(order) // n_tasks
    tasks = []
    for i in range(n_tasks):
        group = tuple(order[i * per : (i + 1) * per])
        g = torch.tensor(group)
        tr, te = torch.isin(data.y_train, g), torch.isin(data.y_test, g)
        if not tr.any() or not te.any():
            raise InvalidStream(
                f"task {i} (classes {group}) has no {'train' if not tr.any() else 'test'} examples"
            )
        tasks.append(
            Task(
                f"{data.name}-{'-'.join(map(str, group))}",
                data.x_train[tr],
                data.y_train[tr],
                data.x_test[te],
                data.y_test[te],
                group,
                i,
                {"scenario": scenario, "classes": list(group)},
            )
        )
    return Stream(tuple(tasks), scenario, _n_classes(data), data.source, f"split-{data.name}")


def legacy_order(classes: Sequence[int], seed: int) -> list[int]:
    """The class order PyCIL and LAMDA-PILOT use: ``np.random.seed(seed);
    np.random.permutation(n)`` over the sorted classes (their CIFAR-100 order is seed 1993).

    NumPy's legacy generator keeps this stable across NumPy versions; a private
    ``RandomState`` leaves the global one alone.
    """
    ordered = sorted(int(c) for c in classes)
    return [ordered[i] for i in np.random.RandomState(seed).permutation(len(ordered))]


def permuted(
    data: ImageData,
    n_tasks: int = 5,
    seed: int = 0,
    keep_first: bool = True,
    disjoint: bool = False,
) -> Stream:
    """Domain-IL: each task applies one fixed random pixel permutation (all channels alike).

    With ``keep_first`` task 0 is the unpermuted data, matching a backbone
    pretrained on the (unpermuted) source split. With ``disjoint`` every task
    gets its own class-balanced ``1/n_tasks`` of the train and test images
    instead of all of them: new images in every task, at ``1/n_tasks`` of the
    compute (the main job's stream).
    """
    _check_n_tasks(n_tasks)
    c, h, w = data.image_shape
    rng = np.random.default_rng(seed)
    perms = [
        np.arange(h * w) if (i == 0 and keep_first) else rng.permutation(h * w)
        for i in range(n_tasks)
    ]
    train = _shares(data.y_train, n_tasks, seed) if disjoint else [slice(None)] * n_tasks
    test = _shares(data.y_test, n_tasks, seed + 1) if disjoint else [slice(None)] * n_tasks
    tasks = []
    for i, perm in enumerate(perms):
        p = torch.from_numpy(perm)

        def apply(x: torch.Tensor, p: torch.Tensor = p) -> torch.Tensor:
            return x.reshape(len(x), c, h * w)[:, :, p].reshape(len(x), c, h, w).contiguous()

        tasks.append(
            Task(
                f"{data.name}-perm{i}",
                apply(data.x_train[train[i]]),
                data.y_train[train[i]],
                apply(data.x_test[test[i]]),
                data.y_test[test[i]],
                data.classes,
                i,
                {
                    "scenario": "domain",
                    "transform": "permutation",
                    "seed": seed,
                    "identity": i == 0 and keep_first,
                    "disjoint": disjoint,
                },
            )
        )
    name = f"permuted-{data.name}" + ("-disjoint" if disjoint else "")
    return Stream(tuple(tasks), "domain", _n_classes(data), data.source, name)


def _ranked(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``y`` shuffled by ``seed``, and each one's rank within its class."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    rank = torch.empty(len(y), dtype=torch.long)
    for cls in y.unique():
        where = (y[order] == cls).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    return order, rank


def _round_robin(y: torch.Tensor, seed: int) -> torch.Tensor:
    """Indices dealt class by class (every class's first image, then every
    class's second, ...): any prefix is class-balanced."""
    order, rank = _ranked(y, seed)
    return order[torch.argsort(rank, stable=True)]


def _shares(y: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` disjoint index sets over ``y``, each holding about ``1/n`` of every class."""
    order, rank = _ranked(y, seed)
    return [order[rank % n == i].sort().values for i in range(n)]


DIGIT_DOMAINS = ("mnist", "inverted", "digits", "noise", "rot90")


def digit_domains(data: ImageData, domains: Sequence[str] = DIGIT_DOMAINS, seed: int = 0) -> Stream:
    """Class-IL over ways of seeing digits: one task per domain, ten new classes each.

    Like 5-datasets (where an MNIST 3 and an SVHN 3 are different classes), a
    digit in domain ``t`` has label ``10 * t + digit``. The domains: ``mnist``
    (as is), ``inverted`` (1 - x), ``digits`` (scikit-learn's 8 x 8 digits,
    another dataset, resized to ``data``'s size), ``noise`` (Gaussian noise,
    severity 5) and ``rot90`` (a quarter turn). The MNIST-based domains share
    ``data``'s train and test images out, class-balanced and disjoint, so every
    task brings new images; a backbone pretrained on ``data.source`` has seen
    only the first domain.
    """
    from torch.nn.functional import interpolate

    unknown = sorted(set(domains) - set(DIGIT_DOMAINS))
    if unknown or not domains or len(set(domains)) != len(domains):
        raise InvalidStream(
            f"domains must be distinct names from {DIGIT_DOMAINS}, got {list(domains)}"
        )
    c, h, w = data.image_shape
    mnist_like = [d for d in domains if d != "digits"]
    train = _shares(data.y_train, max(1, len(mnist_like)), seed)
    test = _shares(data.y_test, max(1, len(mnist_like)), seed + 1)
    per_train, per_test = len(train[0]), len(test[0])
    width = _n_classes(data)
    tasks = []
    for t, domain in enumerate(domains):
        if domain == "digits":
            small = digits(seed=seed)
            pick_tr = _round_robin(small.y_train, seed)[:per_train]
            pick_te = _round_robin(small.y_test, seed + 1)[:per_test]

            def look(x: torch.Tensor) -> torch.Tensor:
                x = interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
                return x.expand(-1, c, -1, -1).contiguous()

            parts = (look(small.x_train[pick_tr]), small.y_train[pick_tr])
            parts += (look(small.x_test[pick_te]), small.y_test[pick_te])
        else:
            k = mnist_like.index(domain)
            see = _DOMAIN_VIEWS[domain]
            parts = (see(data.x_train[train[k]], seed), data.y_train[train[k]])
            parts += (see(data.x_test[test[k]], seed + 1), data.y_test[test[k]])
        x_tr, y_tr, x_te, y_te = parts
        classes = tuple(width * t + int(digit) for digit in data.classes)
        tasks.append(
            Task(
                domain,
                x_tr,
                y_tr + width * t,
                x_te,
                y_te + width * t,
                classes,
                t,
                {
                    "scenario": "class",
                    "domain": domain,
                    "classes": list(classes),
                    "digit_base": width * t,
                },
            )
        )
    return Stream(tuple(tasks), "class", width * len(domains), data.source, f"domains-{data.name}")


_DOMAIN_VIEWS = {
    "mnist": lambda x, seed: x.clone(),
    "inverted": lambda x, seed: 1.0 - x,
    "noise": lambda x, seed: corrupt(x, "gaussian_noise", 5, seed),
    "rot90": lambda x, seed: torch.rot90(x, 1, dims=(2, 3)).contiguous(),
}


def rotated(
    data: ImageData, n_tasks: int = 5, angles: Sequence[float] | str | None = None, seed: int = 0
) -> Stream:
    """Domain-IL: each task rotates every image by one angle (degrees, bilinear, black fill).

    ``angles`` defaults to evenly spaced 0, 180/T, 2*180/T, ...; with
    ``angles="random"`` task 0 stays at 0 and the rest are drawn from [0, 180) by
    ``seed`` (GEM's rotated MNIST draws its angles at random).
    """
    from torchvision.transforms.functional import InterpolationMode, rotate

    _check_n_tasks(n_tasks)
    if angles is None:
        angles = [i * 180.0 / n_tasks for i in range(n_tasks)]
    elif isinstance(angles, str):
        if angles != "random":
            raise InvalidStream(f"angles must be None, 'random' or a sequence, got {angles!r}")
        rest = np.random.default_rng(seed).uniform(0, 180, n_tasks - 1)
        angles = [0.0, *(float(a) for a in rest)]
    angles = [float(a) for a in angles]
    if len(angles) != n_tasks:
        raise InvalidStream(f"{len(angles)} angles given for n_tasks={n_tasks}")
    tasks = []
    for i, a in enumerate(angles):

        def rot(x: torch.Tensor, a: float = a) -> torch.Tensor:
            return rotate(x, a, interpolation=InterpolationMode.BILINEAR).clamp(0, 1).contiguous()

        tasks.append(
            Task(
                f"{data.name}-rot{a:g}",
                rot(data.x_train),
                data.y_train,
                rot(data.x_test),
                data.y_test,
                data.classes,
                i,
                {"scenario": "domain", "transform": "rotation", "angle": a},
            )
        )
    return Stream(tuple(tasks), "domain", _n_classes(data), data.source, f"rotated-{data.name}")


def corrupted(
    data: ImageData,
    corruptions: Sequence[str] = COTTA_ORDER,
    severity: int = 5,
    seed: int = 0,
) -> Stream:
    """Continual test-time adaptation (CoTTA/ViDA): one task per corruption, in order.

    Both splits are corrupted (train and test with different seeds). The TTA
    protocol adapts online on ``x_test`` without its labels and scores the
    predictions on it; ``x_train`` (labelled) serves supervised baselines. The
    ``source`` split stays clean, for the source model.
    """
    names = list(corruptions)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if not names or unknown:
        raise InvalidStream(
            f"unknown or no corruptions {unknown or names}; choose from {COTTA_ORDER}"
        )
    tasks = []
    for i, n in enumerate(names):
        tasks.append(
            Task(
                f"{data.name}-{n}{severity}",
                corrupt(data.x_train, n, severity, seed=seed * 1000 + 2 * i),
                data.y_train,
                corrupt(data.x_test, n, severity, seed=seed * 1000 + 2 * i + 1),
                data.y_test,
                data.classes,
                i,
                {"scenario": "tta", "corruption": n, "severity": severity},
            )
        )
    name = f"corrupted-{data.name}" + ("" if severity == 5 else f"-s{severity}")
    return Stream(tuple(tasks), "tta", _n_classes(data), data.source, name)


def _check_n_tasks(n_tasks: int) -> None:
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1:
        raise InvalidStream(f"n_tasks must be a positive int, got {n_tasks!r}")


# --------------------------------------------------------------------------- user data


def from_tensors(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    n_tasks: int = 5,
    scenario: str = "class",
    seed: int = 0,
    *,
    class_order: Sequence[int] | str | None = None,
    source_fraction: float = 0.0,
    name: str = "tensors",
) -> Stream:
    """A class- or task-incremental stream from your own arrays or tensors.

    Images: N x H x W or N x C x H x W, uint8 (divided by 255) or float in [0, 1].
    For domain-IL or TTA, wrap them with `make_data` and call `permuted`,
    `rotated` or `corrupted`, or build tasks yourself and use `from_tasks`.
    """
    if scenario not in ("class", "task"):
        raise InvalidStream(
            f"from_tensors builds 'class' or 'task' streams, got {scenario!r}; for domain-IL use "
            "permuted/rotated/corrupted(make_data(...)) or from_tasks(...)"
        )
    data = make_data(
        x_train, y_train, x_test, y_test, name=name, source_fraction=source_fraction, seed=seed
    )
    return split(data, n_tasks, scenario, seed, class_order)


def _stack_dataset(ds: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every (x, y) of a map-style dataset; x may be a tensor, array or PIL image."""
    from PIL import Image

    xs, ys = [], []
    for i in range(len(ds)):
        x, y = ds[i][:2]
        if isinstance(x, Image.Image):
            arr = np.asarray(x.convert("L" if x.mode in ("1", "L", "I", "F") else "RGB"))
            x = torch.from_numpy(arr.copy())
            x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        x = torch.as_tensor(x)
        x = x.unsqueeze(0) if x.ndim == 2 else x
        if xs and x.shape != xs[0].shape:
            raise InvalidStream(
                f"{where}[{i}] has shape {tuple(x.shape)} but {where}[0] has {tuple(xs[0].shape)}; "
                "resize the images to one size"
            )
        xs.append(x)
        ys.append(int(y))
    if not xs:
        raise InvalidStream(f"{where} is empty")
    return as_images(torch.stack(xs), where), as_labels(ys, where)


def from_datasets(
    train_ds: Any,
    test_ds: Any,
    n_tasks: int = 5,
    scenario: str = "class",
    seed: int = 0,
    **kw: Any,
) -> Stream:
    """`from_tensors` over any map-style torch Dataset returning (image, label)."""
    xtr, ytr = _stack_dataset(train_ds, "train_ds")
    xte, yte = _stack_dataset(test_ds, "test_ds")
    return from_tensors(xtr, ytr, xte, yte, n_tasks, scenario, seed, **kw)


def image_folder(
    path: str | Path,
    n_tasks: int = 5,
    scenario: str = "class",
    seed: int = 0,
    *,
    test_fraction: float = 0.2,
    source_fraction: float = 0.0,
    size: int | tuple[int, int] | None = None,
    mode: str | None = None,
    class_order: Sequence[int] | str | None = None,
) -> Stream:
    """A class- or task-incremental stream from an ImageFolder-style tree (see `load_image_folder`)."""
    data = load_image_folder(
        path,
        seed=seed,
        test_fraction=test_fraction,
        source_fraction=source_fraction,
        size=size,
        mode=mode,
    )
    return split(data, n_tasks, scenario, seed, class_order)
