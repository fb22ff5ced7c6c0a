"""Continual-learning metrics computed from an accuracy matrix.

Convention for every function here: ``acc[i, j]`` is the accuracy (in %) on task ``j`` after training task ``i``
(both 0-based). For class-incremental runs the entries above the diagonal are NaN (a task's classes are not
predicted before it is learnt); for MTIL they hold the zero-shot accuracy on the not-yet-learnt dataset.
Definitions follow the InfLoRA paper's definitions (CIL) and lloongx/DIKI (MTIL).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _square(acc) -> np.ndarray:
    acc = np.asarray(acc, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[0] != acc.shape[1] or acc.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {acc.shape}")
    return acc


def cil_accuracy_curve(acc, task_sizes: Sequence[float]) -> np.ndarray:
    """A_1..A_T: accuracy over all test samples seen so far after each task, sample-weighted by ``task_sizes``
    (number of test samples of each task), as InfLoRA's `total` accuracy (liangyanshuo/InfLoRA)."""
    acc = _square(acc)
    sizes = np.asarray(task_sizes, dtype=np.float64)
    if sizes.shape != (acc.shape[0],) or np.any(sizes <= 0):
        raise ValueError(f"task_sizes must hold {acc.shape[0]} positive counts, got {list(task_sizes)}")
    lower = np.tril(np.ones_like(acc, dtype=bool))
    if np.isnan(acc[lower]).any():
        raise ValueError("accuracy matrix has NaN on or below the diagonal")
    return np.array([np.dot(acc[i, : i + 1], sizes[: i + 1]) / sizes[: i + 1].sum() for i in range(len(sizes))])


def forgetting_per_task(acc) -> np.ndarray:
    """Forgetting of each old task j < T-1 after the last task: max_{j <= l < T-1} acc[l, j] - acc[T-1, j], the
    best accuracy it had from when it was learnt until before the last task, minus its final accuracy (Chaudhry et
    al.). Empty for a single task."""
    acc = _square(acc)
    T = acc.shape[0]
    return np.array([acc[j : T - 1, j].max() - acc[T - 1, j] for j in range(T - 1)])


def cil_metrics(acc, task_sizes: Sequence[float]) -> dict:
    """Class-incremental metrics of one run.

    - ``final``: A_T, accuracy over all test samples of all tasks after the last task (sample-weighted);
    - ``average``: Ā = mean of A_1..A_T (Rebuffi et al.);
    - ``forgetting``: mean over the old tasks j < T-1 of max_{l < T-1} acc[l, j] - acc[T-1, j] (Chaudhry et al.);
    - ``bwt``: mean over j < T-1 of acc[T-1, j] - acc[j, j] (Lopez-Paz & Ranzato);
    - ``curve``: [A_1, ..., A_T].
    With a single task, forgetting and BWT are 0.
    """
    acc = _square(acc)
    curve = cil_accuracy_curve(acc, task_sizes)
    T = acc.shape[0]
    if T > 1:
        forgetting = float(np.mean(forgetting_per_task(acc)))
        bwt = float(np.mean(acc[T - 1, : T - 1] - np.diag(acc)[: T - 1]))
    else:
        forgetting = bwt = 0.0
    return {
        "final": float(curve[-1]),
        "average": float(curve.mean()),
        "forgetting": forgetting,
        "bwt": bwt,
        "curve": [float(a) for a in curve],
    }


def mtil_metrics(acc) -> dict:
    """MTIL metrics (ZSCL definitions, as DIKI's `cal_MTIL_metrics`, lloongx/DIKI).

    - ``transfer``: mean over datasets j >= 1 of mean_{s < j} acc[s, j] (accuracy before dataset j is learnt);
    - ``average``: mean over datasets of the mean of the whole column;
    - ``last``: mean of the last row.
    The per-dataset values are returned as ``transfer_per_task`` (length T-1, for j = 1..T-1),
    ``average_per_task`` and ``last_per_task`` (length T). Nothing is rounded here.
    """
    acc = _square(acc)
    if np.isnan(acc).any():
        raise ValueError("MTIL accuracy matrix must be complete (zero-shot entries above the diagonal)")
    T = acc.shape[0]
    transfer = np.array([acc[:j, j].mean() for j in range(1, T)])
    average = acc.mean(axis=0)
    last = acc[T - 1]
    return {
        "transfer": float(transfer.mean()) if T > 1 else float("nan"),
        "average": float(average.mean()),
        "last": float(last.mean()),
        "transfer_per_task": [float(v) for v in transfer],
        "average_per_task": [float(v) for v in average],
        "last_per_task": [float(v) for v in last],
    }
