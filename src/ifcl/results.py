"""Aggregation of a run's per-task evaluations and the summary over seeds (NumPy only, no torch)."""
from __future__ import annotations

import numpy as np

from .files import read_json, write_csv, write_json, write_text
from .metrics import cil_metrics, mtil_metrics


def aggregate_run(eval_files: list[str], matrix_out: str, metrics_out: str, protocol: str = "cil",
                  zero_shot_files: list[str] = ()) -> None:
    """acc_matrix.csv (row i = after task i) and metrics.json of one run.

    ``cil`` (InfLoRA): row i holds the seen tasks 0..i (NaN above the diagonal); A_T, Ā, forgetting, BWT, plus the
    task-aware accuracy and the task-id accuracy of the last row. ``mtil`` (DIKI): every row is complete (unseen
    datasets included); Transfer, Average, Last, and the frozen model's zero-shot accuracy per dataset, read from
    the metadata of the frozen test features (``zero_shot_files``)."""
    evals = [read_json(f) for f in eval_files]
    T = len(evals)
    acc = np.full((T, T), np.nan)
    if protocol == "mtil":
        for i, e in enumerate(evals):
            acc[i] = e["accuracy"]
        metrics = mtil_metrics(acc)
        from .state import load_state  # torch: only DIKI runs need it here

        zero_shot = [load_state(f)[1]["zero_shot_accuracy"] for f in zero_shot_files]
        metrics["zero_shot_per_task"] = zero_shot
        metrics["zero_shot"] = float(np.mean(zero_shot))
        metrics["mean_weight_last_row"] = evals[-1]["mean_weight"]
    else:
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


PROTOCOLS = {
    # protocol: (metric keys, markdown header of the metric columns)
    "cil": (("final", "average", "forgetting", "bwt", "final_task_aware"),
            "A_T (%) | Ā (%) | forgetting | BWT | A_T task-aware (%)"),
    "mtil": (("transfer", "average", "last", "zero_shot"), "Transfer (%) | Average (%) | Last (%) | zero-shot (%)"),
}


def summarize(runs: dict[str, dict[int, dict]], experiments: dict, csv_out: str, md_out: str, json_out: str) -> None:
    """Mean ± sample std over seeds of every metric, one row per experiment (``runs[exp][seed]["metrics"]`` =
    metrics.json). The Markdown has one table per protocol (class-incremental InfLoRA runs, MTIL DIKI runs); the
    JSON (DVC's metrics file) has the same numbers by experiment."""
    rows = []
    for name, by_seed in runs.items():
        spec = experiments[name]
        protocol = "mtil" if spec["method"] == "diki" else "cil"
        keys = PROTOCOLS[protocol][0]
        values = {k: [read_json(files["metrics"])[k] for files in by_seed.values()] for k in keys}
        row = {"experiment": name, "method": spec["method"], "protocol": protocol,
               "dataset": " > ".join(spec["sequence"]) if protocol == "mtil" else spec["dataset"],
               "tasks": len(spec["sequence"]) if protocol == "mtil" else spec["num_tasks"], "seeds": len(by_seed)}
        for k, v in values.items():
            row[f"{k}_mean"] = float(np.mean(v))
            row[f"{k}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(csv_out, [{c: r.get(c, "") for c in columns} for r in rows])
    tables = []
    for protocol, (keys, header) in PROTOCOLS.items():
        chosen = [r for r in rows if r["protocol"] == protocol]
        if not chosen:
            continue
        lines = [f"| experiment | method | dataset | tasks | seeds | {header} |", "|" + "---|" * (5 + len(keys))]
        for r in chosen:
            cells = [f"{r[f'{k}_mean']:.2f} ± {r[f'{k}_std']:.2f}" for k in keys]
            lines.append(f"| {r['experiment']} | {r['method']} | {r['dataset']} | {r['tasks']} | {r['seeds']} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines) + "\n")
    write_text(md_out, "\n".join(tables))
    write_json(json_out, {r["experiment"]: {k: v for k, v in r.items() if k != "experiment"} for r in rows})
