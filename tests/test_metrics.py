import numpy as np
import pytest

from ifcl.metrics import cil_accuracy_curve, cil_metrics, mtil_metrics

nan = np.nan

# The official InfLoRA CIFAR-100 seed 0 (2025-03-13 log), per-task accuracies after each task.
CIFAR_SEED0 = np.array([
    [99.4, nan, nan, nan, nan, nan, nan, nan, nan, nan],
    [98.1, 95.0, nan, nan, nan, nan, nan, nan, nan, nan],
    [97.4, 93.3, 92.7, nan, nan, nan, nan, nan, nan, nan],
    [97.2, 89.7, 92.3, 89.2, nan, nan, nan, nan, nan, nan],
    [95.5, 88.2, 90.9, 86.6, 93.7, nan, nan, nan, nan, nan],
    [94.2, 87.8, 90.5, 86.6, 93.2, 82.0, nan, nan, nan, nan],
    [94.1, 86.1, 89.5, 87.1, 93.1, 81.5, 86.8, nan, nan, nan],
    [93.6, 85.5, 88.9, 86.1, 93.3, 80.3, 85.4, 89.0, nan, nan],
    [93.7, 85.0, 88.6, 86.1, 92.3, 79.9, 85.4, 86.9, 93.5, nan],
    [92.7, 84.8, 88.1, 84.4, 90.8, 77.7, 84.0, 86.9, 93.1, 80.9],
])
CIFAR_SEED0_CURVE = [99.40, 96.55, 94.47, 92.10, 90.98, 89.05, 88.31, 87.76, 87.93, 86.34]


def test_official_cifar_seed0():
    m = cil_metrics(CIFAR_SEED0, [1000] * 10)  # 100 test images per class, 10 classes per task
    assert m["final"] == pytest.approx(86.34, abs=1e-9)
    assert m["average"] == pytest.approx(91.29, abs=0.01)  # the log's curve rounds each A_i to 2 decimals
    assert m["curve"] == pytest.approx(CIFAR_SEED0_CURVE, abs=0.01)


def test_hand_computed_cil():
    acc = np.array([[90.0, nan, nan], [70.0, 80.0, nan], [60.0, 75.0, 50.0]])
    m = cil_metrics(acc, [100, 300, 100])
    # A_1 = 90; A_2 = (70*100 + 80*300)/400 = 77.5; A_3 = (60*100 + 75*300 + 50*100)/500 = 67.0
    assert m["curve"] == pytest.approx([90.0, 77.5, 67.0])
    assert m["final"] == pytest.approx(67.0)
    assert m["average"] == pytest.approx((90 + 77.5 + 67) / 3)
    # forgetting: task0 max(90, 70) - 60 = 30; task1 80 - 75 = 5 -> 17.5; BWT: (60-90 + 75-80)/2 = -17.5
    assert m["forgetting"] == pytest.approx(17.5)
    assert m["bwt"] == pytest.approx(-17.5)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    acc = np.array([[50.0, nan, nan], [80.0, 70.0, nan], [40.0, 70.0, 90.0]])
    m = cil_metrics(acc, [1, 1, 1])
    assert m["forgetting"] == pytest.approx(((80 - 40) + (70 - 70)) / 2)
    assert m["bwt"] == pytest.approx(((40 - 50) + (70 - 70)) / 2)


def test_single_task_and_bad_inputs():
    m = cil_metrics(np.array([[42.0]]), [10])
    assert m["final"] == 42.0 and m["forgetting"] == 0.0 and m["bwt"] == 0.0
    with pytest.raises(ValueError):
        cil_metrics(np.zeros((2, 3)), [1, 1])
    with pytest.raises(ValueError):
        cil_accuracy_curve(np.array([[1.0, nan], [nan, 2.0]]), [1, 1])
    with pytest.raises(ValueError):
        cil_metrics(np.array([[1.0, nan], [1.0, 2.0]]), [1])


def test_hand_computed_mtil():
    # rows: after step s; columns: dataset j (zero-shot entries above the diagonal)
    acc = np.array([
        [80.0, 30.0, 40.0],
        [78.0, 90.0, 44.0],
        [76.0, 88.0, 70.0],
    ])
    m = mtil_metrics(acc)
    assert m["transfer_per_task"] == pytest.approx([30.0, 42.0])  # column 1: [30]; column 2: mean(40, 44)
    assert m["transfer"] == pytest.approx(36.0)
    assert m["average_per_task"] == pytest.approx([78.0, 208 / 3, 154 / 3])
    assert m["average"] == pytest.approx(acc.mean())
    assert m["last_per_task"] == pytest.approx([76.0, 88.0, 70.0])
    assert m["last"] == pytest.approx(78.0)
    with pytest.raises(ValueError):
        mtil_metrics(np.array([[1.0, nan], [1.0, 1.0]]))
