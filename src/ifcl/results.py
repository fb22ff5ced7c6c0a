"""Aggregation of a run's per-task evaluations and the summary over seeds (NumPy only, no torch)."""
from __future__ import annotations

import numpy as np

from .files import read_json, write_csv, write_json, write_text
from .metrics import cil_metrics


def aggregate_run(eval_files: list[str], matrix_out: str, metrics_out: str) -> None:
    """acc_matrix.csv (row i = after task i, NaN above the diagonal) and metrics.json of one run."""
    evals = [read_json(f) for f in eval_files]
    T = len(evals)
    acc = np.full((T, T), np.nan)
    for i, e in enumerate(evals):
        acc[i, : i + 1] = e["per_task_accuracy"]
    sizes = evals[-1]["per_task_count"]
    metrics = cil_metrics(acc, sizes)
    metrics["test_samples_per_task"] = sizes
    # task-aware accuracy of the last row (what the features still support given the task) and task-id accuracy
    til = np.asarray(evals[-1]["per_task_accuracy_task_aware"])
    metrics["final_task_aware"] = float(np.dot(til, sizes) / np.sum(sizes))
    metrics["task_id_accuracy"] = evals[-1]["task_id_accuracy"]
    header = ",".join(["after_task"] + [f"task{j}" for j in range(T)])
    lines = [header] + [",".join([str(i)] + ["" if np.isnan(v) else f"{v:.4f}" for v in acc[i]]) for i in range(T)]
    write_text(matrix_out, "\n".join(lines) + "\n")
    write_json(metrics_out, metrics)


SUMMARY_METRICS = ("final", "average", "forgetting", "bwt", "final_task_aware")


def summarize(runs: dict[str, dict[int, str]], experiments: dict, csv_out: str, md_out: str) -> None:
    """Mean ± sample std over seeds of every metric, one row per experiment (``runs[exp][seed]`` = metrics.json)."""
    rows = []
    for name, by_seed in runs.items():
        values = {k: [read_json(p)[k] for p in by_seed.values()] for k in SUMMARY_METRICS}
        row = {"experiment": name, "method": experiments[name]["method"], "dataset": experiments[name]["dataset"],
               "tasks": experiments[name]["num_tasks"], "seeds": len(by_seed)}
        for k, v in values.items():
            row[f"{k}_mean"] = float(np.mean(v))
            row[f"{k}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        rows.append(row)
    write_csv(csv_out, rows)
    md = ["| experiment | method | dataset | tasks | seeds | A_T (%) | Ā (%) | forgetting | BWT | A_T task-aware (%) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[f'{k}_mean']:.2f} ± {r[f'{k}_std']:.2f}" for k in SUMMARY_METRICS]
        md.append(f"| {r['experiment']} | {r['method']} | {r['dataset']} | {r['tasks']} | {r['seeds']} | " + " | ".join(cells) + " |")
    write_text(md_out, "\n".join(md) + "\n")
