"""Metrics on small hand-computed accuracy matrices (rows: before training, after task 1..T)."""

import math

import numpy as np
import pytest
import torch

from eval import metrics

# T = 3. Row 0 = b_j. Task 1 peaks *after* task 2 was trained (0.95 > 0.9), which
# separates Chaudhry's max-based forgetting from Avalanche's R[j][j]-based one.
R3 = np.array(
    [
        [0.10, 0.20, 0.10],
        [0.90, 0.30, 0.20],
        [0.95, 0.80, 0.40],
        [0.60, 0.70, 0.90],
    ]
)


def test_acc_is_mean_of_last_row():
    assert metrics.acc(R3) == pytest.approx((0.60 + 0.70 + 0.90) / 3)


def test_avg_incremental_acc():
    expected = (0.90 + (0.95 + 0.80) / 2 + (0.60 + 0.70 + 0.90) / 3) / 3
    assert metrics.avg_incremental_acc(R3) == pytest.approx(expected)


def test_bwt_gem():
    expected = ((0.60 - 0.90) + (0.70 - 0.80)) / 2
    assert metrics.bwt(R3) == pytest.approx(expected)


def test_fwt_gem():
    expected = ((0.30 - 0.20) + (0.40 - 0.10)) / 2
    assert metrics.fwt(R3) == pytest.approx(expected)


def test_forgetting_variants():
    chaudhry = ((max(0.90, 0.95) - 0.60) + (max(0.30, 0.80) - 0.70)) / 2
    avalanche = ((0.90 - 0.60) + (0.80 - 0.70)) / 2
    assert metrics.forgetting(R3) == pytest.approx(chaudhry)
    assert metrics.forgetting(R3, variant="avalanche") == pytest.approx(avalanche)
    assert metrics.forgetting(R3, variant="avalanche") == pytest.approx(-metrics.bwt(R3))
    with pytest.raises(ValueError):
        metrics.forgetting(R3, variant="nope")


def test_chaudhry_max_includes_rows_before_the_task_was_trained():
    R = R3.copy()
    R[1, 1] = 0.85  # task 2 scored 0.85 before it was trained
    expected = ((0.95 - 0.60) + (0.85 - 0.70)) / 2
    assert metrics.forgetting(R) == pytest.approx(expected)


def test_summary_keys_and_values():
    s = metrics.summary(R3)
    assert set(s) == {"acc", "avg_acc", "forgetting", "bwt", "fwt"}
    assert s["forgetting"] == pytest.approx(metrics.forgetting(R3))
    assert s["avg_acc"] == pytest.approx(metrics.avg_incremental_acc(R3))


def test_perfect_retention_has_zero_forgetting_and_bwt():
    b = [0.1, 0.1, 0.1, 0.1]
    diag = [0.9, 0.8, 0.95, 0.7]
    R = np.array([b] + [[diag[j] if j < i else b[j] for j in range(4)] for i in range(1, 5)])
    assert metrics.forgetting(R) == pytest.approx(0.0)
    assert metrics.forgetting(R, variant="avalanche") == pytest.approx(0.0)
    assert metrics.bwt(R) == pytest.approx(0.0)
    assert metrics.fwt(R) == pytest.approx(0.0)
    assert metrics.acc(R) == pytest.approx(np.mean(diag))


def test_single_task_is_undefined_not_zero():
    R = np.array([[0.1], [0.9]])
    assert metrics.acc(R) == pytest.approx(0.9)
    assert metrics.avg_incremental_acc(R) == pytest.approx(0.9)
    assert math.isnan(metrics.bwt(R))
    assert math.isnan(metrics.fwt(R))
    assert math.isnan(metrics.forgetting(R))


@pytest.mark.parametrize("shape", [(3, 3), (2, 3), (4,), (1, 0)])
def test_bad_shapes_raise(shape):
    with pytest.raises(ValueError):
        metrics.summary(np.zeros(shape))


def test_accuracy_class_il_vs_task_il_in_one_pass():
    # 4 classes; task = {2, 3}. Row 0: class-IL predicts 0 (wrong), task-IL predicts 2 (right).
    logits = torch.tensor(
        [
            [5.0, 0.0, 3.0, 1.0],
            [0.0, 0.0, 1.0, 4.0],
            [9.0, 0.0, 1.0, 2.0],
        ]
    )
    y = torch.tensor([2, 3, 2])
    assert metrics.accuracy(logits, y) == pytest.approx(1 / 3)
    mask = metrics.class_mask((2, 3), 4)
    assert mask.tolist() == [False, False, True, True]
    assert metrics.accuracy(logits, y, mask) == pytest.approx(2 / 3)
    assert metrics.class_and_task_correct(logits, y, (2, 3)) == (1, 2)
    with pytest.raises(ValueError):
        metrics.accuracy(logits, y[:2])
