"""Streams: deterministic disjoint splits, scenarios, user data, and early errors."""

import numpy as np
import pytest
import torch

from eval import streams
from eval.corruptions import COTTA_ORDER
from eval.data import Task
from eval.errors import InvalidStream


@pytest.fixture(scope="module")
def data():
    return streams.mnist(seed=0)


@pytest.fixture(scope="module")
def small():
    """A 200/100-image slice of digits: cheap for the scenarios that transform images."""
    d = streams.digits(seed=0)
    return streams.make_data(
        d.x_train[:200], d.y_train[:200], d.x_test[:100], d.y_test[:100], name="digits-small"
    )


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


def test_mnist_parts_are_disjoint_and_cover_everything(data):
    src = data.source
    parts = [src.x_train, src.x_test, data.x_train, data.x_test]
    assert sum(len(p) for p in parts) == 5000
    seen: set[bytes] = set()
    for p in parts:
        rows = _rows(p)
        assert not rows & seen
        seen |= rows
    assert len(seen) == 5000  # mnist-5k has no duplicate images, so no example was reused
    assert data.x_train.shape[1:] == (1, 28, 28) and data.x_train.dtype == torch.float32
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0


def test_split_is_stratified_and_deterministic(data):
    again = streams.mnist(seed=0)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    other = streams.mnist(seed=1)
    assert not torch.equal(other.y_train, data.y_train) or not torch.equal(
        other.x_train, data.x_train
    )
    counts = torch.bincount(data.y_test, minlength=10)
    assert (counts == counts[0]).all()  # 100 test images per digit
    assert len(data.source.x_train) == 10 * round(0.3 * 0.8 * 500)


def test_digits_loader():
    d = streams.digits(seed=0)
    assert d.image_shape == (1, 8, 8) and d.classes == tuple(range(10))
    assert len(d.x_train) + len(d.x_test) + len(d.source.x_train) + len(d.source.x_test) == 1797


def test_split_class_il(data):
    s = streams.split(data, n_tasks=5, scenario="class")
    assert len(s) == 5 and s.scenario == "class" and s.n_classes == 10 and not s.task_il
    assert [t.classes for t in s] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    assert sum(len(t.x_train) for t in s) == len(data.x_train)
    for i, t in enumerate(s):
        assert t.task_id == i and s[i] is t
        assert set(t.y_train.tolist()) == set(t.classes) == set(t.y_test.tolist())
    assert s.source is data.source and s.image_shape == (1, 28, 28)


def test_split_task_il_keeps_global_labels(data):
    s = streams.split(data, n_tasks=2, scenario="task")
    assert s.task_il and s[1].classes == (5, 6, 7, 8, 9)
    assert int(s[1].y_train.min()) == 5


def test_random_class_order_depends_on_seed(data):
    a = streams.split(data, 5, "class", seed=3, class_order="random")
    b = streams.split(data, 5, "class", seed=3, class_order="random")
    c = streams.split(data, 5, "class", seed=4, class_order="random")
    order = [k for t in a for k in t.classes]
    assert sorted(order) == list(range(10))
    assert [t.classes for t in a] == [t.classes for t in b]
    assert [t.classes for t in a] != [t.classes for t in c]


@pytest.mark.parametrize("n_tasks", [3, 11, 0])
def test_split_rejects_bad_n_tasks(data, n_tasks):
    with pytest.raises(InvalidStream):
        streams.split(data, n_tasks=n_tasks)


def test_permuted(small):
    s = streams.permuted(small, n_tasks=3, seed=0)
    assert s.scenario == "domain" and len(s) == 3
    assert torch.equal(s[0].x_train, small.x_train)
    x1 = s[1].x_train
    assert not torch.equal(x1, small.x_train)
    # a permutation moves pixels, it does not change them
    assert torch.equal(x1.flatten(1).sort(1).values, small.x_train.flatten(1).sort(1).values)
    assert torch.equal(s[1].y_train, small.y_train) and s[1].classes == small.classes
    assert not torch.equal(s[1].x_train, s[2].x_train)


def test_permuted_disjoint_gives_every_task_new_images(small):
    s = streams.permuted(small, n_tasks=3, seed=0, keep_first=False, disjoint=True)
    assert s.name == "permuted-digits-small-disjoint"
    assert sum(len(t.x_train) for t in s) == len(small.x_train)
    assert sum(len(t.x_test) for t in s) == len(small.x_test)
    # every task permuted (none is the source's pixel order), each on its own images
    assert all(not t.metadata["identity"] for t in s)
    firsts = [t.x_train.flatten(1).sort(1).values for t in s]
    assert all(not (_rows(a) & _rows(b)) for i, a in enumerate(firsts) for b in firsts[i + 1 :])
    # class-balanced: each class's count differs by at most one between tasks
    counts = torch.stack([t.y_train.bincount(minlength=10) for t in s])
    assert int((counts.max(0).values - counts.min(0).values).max()) <= 1


def test_digit_domains_are_new_classes_on_new_images(data):
    s = streams.digit_domains(data, seed=0)
    assert s.scenario == "class" and s.n_classes == 50 and len(s) == 5
    assert [t.metadata["domain"] for t in s] == list(streams.DIGIT_DOMAINS)
    for t, task in enumerate(s):
        assert task.classes == tuple(range(10 * t, 10 * t + 10))
        assert set(task.y_train.tolist()) == set(task.classes) == set(task.y_test.tolist())
        assert task.x_train.shape[1:] == (1, 28, 28) and 0 <= task.x_train.min() <= 1
    plain, inverted, rot = s[0], s[1], s[4]
    # the MNIST-based domains share the task images out: no image in two of them
    assert not (_rows(plain.x_train) & _rows(1.0 - inverted.x_train))
    assert not (_rows(plain.x_train) & _rows(torch.rot90(rot.x_train, -1, dims=(2, 3))))
    assert abs(float(inverted.x_test.mean()) - (1 - float(plain.x_test.mean()))) < 0.03
    again = streams.digit_domains(data, seed=0)
    assert all(torch.equal(a.x_train, b.x_train) for a, b in zip(s, again, strict=True))
    with pytest.raises(InvalidStream, match="domains must be distinct"):
        streams.digit_domains(data, domains=["mnist", "sepia"])
    with pytest.raises(InvalidStream, match="domains must be distinct"):
        streams.digit_domains(data, domains=["mnist", "mnist"])


def test_rotated(small):
    s = streams.rotated(small, n_tasks=4)
    assert [t.metadata["angle"] for t in s] == [0.0, 45.0, 90.0, 135.0]
    assert torch.allclose(s[0].x_test, small.x_test, atol=1e-6)
    r = streams.rotated(small, n_tasks=2, angles=[0, 90])
    assert torch.allclose(r[1].x_test, torch.rot90(small.x_test, 1, dims=(2, 3)), atol=1e-5)
    rnd = streams.rotated(small, n_tasks=3, angles="random", seed=1)
    assert rnd[0].metadata["angle"] == 0.0 and rnd[1].metadata["angle"] != 60.0
    with pytest.raises(InvalidStream):
        streams.rotated(small, n_tasks=3, angles=[0, 90])


def test_corrupted_follows_cotta_order(small):
    s = streams.corrupted(small, severity=5)
    assert s.scenario == "tta" and [t.metadata["corruption"] for t in s] == list(COTTA_ORDER)
    for t in s:
        assert torch.equal(t.y_test, small.y_test)
        assert not torch.equal(t.x_test, small.x_test)
    few = streams.corrupted(small, ["fog", "snow"], severity=2, seed=1)
    assert [t.metadata["corruption"] for t in few] == ["fog", "snow"]
    assert torch.equal(few[0].x_test, streams.corrupted(small, ["fog"], 2, seed=1)[0].x_test)
    with pytest.raises(InvalidStream):
        streams.corrupted(small, ["rain"])


def test_from_tensors_numpy_uint8():
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (60, 12, 12), dtype=np.uint8)
    ytr = np.repeat(np.arange(6), 10)
    s = streams.from_tensors(xtr, ytr, xtr[::2], ytr[::2], n_tasks=3, scenario="task")
    assert len(s) == 3 and s.image_shape == (1, 12, 12) and s.n_classes == 6
    assert torch.allclose(s[0].x_train[0, 0], torch.from_numpy(xtr[0]).float() / 255)


def test_from_tensors_errors():
    x = torch.rand(20, 1, 8, 8)
    y = torch.arange(20) % 4
    with pytest.raises(InvalidStream, match=r"\[0, 1\]"):
        streams.from_tensors(x * 255, y, x, y, n_tasks=2)
    with pytest.raises(InvalidStream, match="channels-last"):
        streams.from_tensors(torch.rand(20, 8, 8, 3), y, x, y, n_tasks=2)
    with pytest.raises(InvalidStream, match="divide"):
        streams.from_tensors(x, y, x, y, n_tasks=3)
    with pytest.raises(InvalidStream, match="exceeds"):
        streams.from_tensors(x, y, x, y, n_tasks=5)
    with pytest.raises(InvalidStream, match="labels"):
        streams.from_tensors(x, y[:10], x, y, n_tasks=2)
    with pytest.raises(InvalidStream, match=r"N x H x W"):
        streams.from_tensors(x.flatten(1), y, x, y, n_tasks=2)
    with pytest.raises(InvalidStream, match="domain"):
        streams.from_tensors(x, y, x, y, n_tasks=2, scenario="domain")


def test_task_validation():
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    Task("ok", x, y, x, y, (0, 1))
    with pytest.raises(InvalidStream, match="empty"):
        Task("empty", x[:0], y[:0], x, y, (0, 1))
    with pytest.raises(InvalidStream, match="not among the declared classes"):
        Task("bad-labels", x, y, x, y + 1, (0, 1))
    with pytest.raises(InvalidStream, match="test images"):
        Task("shapes", x, y, torch.rand(4, 1, 9, 9), y, (0, 1))
    with pytest.raises(InvalidStream, match="float32"):
        Task("dtype", x.double(), y, x, y, (0, 1))


def test_stream_validation():
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    a = Task("a", x, y, x, y, (0, 1))
    b = Task("b", torch.rand(4, 1, 9, 9), y, torch.rand(4, 1, 9, 9), y, (0, 1))
    with pytest.raises(InvalidStream, match="images"):
        streams.from_tasks([a, b], "domain")
    with pytest.raises(InvalidStream, match="n_classes"):
        streams.from_tasks([a], "class", n_classes=1)
    with pytest.raises(InvalidStream, match="scenario"):
        streams.from_tasks([a], "online")
    s = streams.from_tasks([a, a], "domain")
    assert [t.task_id for t in s] == [0, 1] and s.n_classes == 2


def test_from_datasets_with_pil_images():
    from PIL import Image

    rng = np.random.default_rng(0)
    train = [
        (Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)), i % 4) for i in range(40)
    ]
    test = [(torch.rand(1, 10, 10), i % 4) for i in range(20)]
    s = streams.from_datasets(train, test, n_tasks=2)
    assert len(s) == 2 and s.image_shape == (1, 10, 10)
    bad = train[:5] + [(Image.fromarray(np.zeros((12, 12), np.uint8)), 0)]
    with pytest.raises(InvalidStream, match="shape"):
        streams.from_datasets(bad, test, n_tasks=2)


def _write_pngs(root, classes, n, size=(10, 10), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_layouts(tmp_path):
    _write_pngs(tmp_path / "flat", ["cat", "dog", "emu", "fox"], 10)
    s = streams.image_folder(tmp_path / "flat", n_tasks=2, test_fraction=0.2)
    assert s.image_shape == (1, 10, 10) and [t.classes for t in s] == [(0, 1), (2, 3)]
    assert sum(len(t.x_test) for t in s) == 8 and sum(len(t.x_train) for t in s) == 32
    _write_pngs(tmp_path / "tt" / "train", ["a", "b"], 6)
    _write_pngs(tmp_path / "tt" / "test", ["a", "b"], 2, seed=1)
    d = streams.load_image_folder(tmp_path / "tt", size=6)
    assert d.metadata["class_names"] == ["a", "b"]
    assert d.x_train.shape == (12, 1, 6, 6) and d.x_test.shape == (4, 1, 6, 6)


def test_image_folder_mismatched_sizes(tmp_path):
    _write_pngs(tmp_path, ["a"], 2, size=(10, 10))
    _write_pngs(tmp_path, ["b"], 2, size=(12, 12))
    with pytest.raises(InvalidStream, match="size"):
        streams.image_folder(tmp_path, n_tasks=2)
    with pytest.raises(InvalidStream):
        streams.image_folder(tmp_path / "missing")


def test_task_loader_is_seeded(small):
    t = streams.split(small, 5)[0]
    first = [yb.tolist() for _, yb in t.loader(batch_size=8, seed=3)]
    again = [yb.tolist() for _, yb in t.loader(batch_size=8, seed=3)]
    assert first == again and sum(len(b) for b in first) == len(t.y_train)


def test_fingerprint_tracks_content(small):
    t = streams.split(small, 5)[0]
    t2 = Task(t.name, t.x_train.clone(), t.y_train, t.x_test, t.y_test, t.classes)
    assert t.fingerprint() == t2.fingerprint()
    x = t.x_train.clone()
    x[0, 0, 0, 0] = 1.0 - x[0, 0, 0, 0]
    assert (
        Task(t.name, x, t.y_train, t.x_test, t.y_test, t.classes).fingerprint() != t.fingerprint()
    )
