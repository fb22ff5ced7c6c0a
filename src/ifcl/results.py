"""Aggregation of a run's per-task evaluations and the summary over seeds next to the published numbers (NumPy only,
no torch)."""
from __future__ import annotations

from html import escape
from pathlib import Path

import numpy as np
import yaml

from .files import read_json, write_csv, write_json, write_text
from .metrics import cil_metrics, mtil_metrics
from .protocols import PROTOCOLS
from .registry import protocol_of


def aggregate_run(eval_files: list[str], matrix_out: str, metrics_out: str, protocol: str = "cil",
                  zero_shot_files: list[str] = ()) -> None:
    """acc_matrix.csv (row i = after task i) and metrics.json of one run.

    ``cil`` (InfLoRA): row i holds the seen tasks 0..i (NaN above the diagonal); A_T, Ā, forgetting, BWT, plus the
    task-aware accuracy and the task-id accuracy of the last row. ``mtil`` (DIKI): every row is complete (unseen
    datasets included); Transfer, Average, Last, and the frozen model's zero-shot accuracy per dataset, read from
    the metadata of the frozen test features (``zero_shot_files``), with its Transfer (the mean over datasets 1 …)
    and its mean (its Average and Last)."""
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
        metrics["zero_shot"] = float(np.mean(zero_shot))  # the frozen model's Average and Last
        # the frozen model's Transfer: mean over datasets j >= 1 of its accuracy on j (the zero-shot row of the tables)
        metrics["zero_shot_transfer"] = float(np.mean(zero_shot[1:])) if T > 1 else float("nan")
        if "mean_weight" in evals[-1]:  # DIKI: the mean λ per dataset
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
    write_text(matrix_out, "\n".join(lines) + "\n", rows=T)
    write_json(metrics_out, metrics)


# ---- summary over seeds, next to the published numbers ----

# (metric key of metrics.json, column title) per protocol; the summary reports every one
METRICS = {
    "cil": (("final", "A_T (%)"), ("average", "Ā (%)"), ("forgetting", "forgetting"), ("bwt", "BWT"),
            ("final_task_aware", "A_T task-aware (%)")),
    "mtil": (("transfer", "Transfer (%)"), ("average", "Average (%)"), ("last", "Last (%)"),
             ("zero_shot_transfer", "zero-shot Transfer (%)"), ("zero_shot", "zero-shot (%)")),
}
# the metrics a paper reports (config/published.yaml may give them), and MTIL's per-dataset ones
PUBLISHED_METRICS = {"cil": ("final", "average", "forgetting"), "mtil": ("transfer", "average", "last")}
PER_DATASET = ("transfer", "average", "last")
TITLES = {name: p.title for name, p in PROTOCOLS.items()}
INTRO = ("Mean ± sample standard deviation over seeds (one seed: its value). paper: the published number (its "
         "source is listed under the table); Δ = ours − paper, in points; —: no published number.")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def load_published(path: str | Path) -> dict:
    """The published numbers (config/published.yaml): ``{experiment: {source, <metric>: {mean, std?},
    per_dataset?: {source, <metric>: {dataset: value}}}}``. Raises ValueError naming the bad key."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must map experiment names to their published numbers")
    metrics = set(PUBLISHED_METRICS["cil"]) | set(PUBLISHED_METRICS["mtil"])
    for exp, entry in data.items():
        where = f"{path}: {exp}"
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str) or not entry["source"].strip():
            raise ValueError(f"{where}: needs a `source` saying where its numbers come from")
        for key, value in entry.items():
            if key == "per_dataset":
                if not isinstance(value, dict) or not isinstance(value.get("source"), str):
                    raise ValueError(f"{where}.per_dataset: needs a `source` and {{metric: {{dataset: value}}}}")
                for metric, by_dataset in value.items():
                    if metric == "source":
                        continue
                    if metric not in PER_DATASET or not isinstance(by_dataset, dict) or not all(
                            _is_number(v) for v in by_dataset.values()):
                        raise ValueError(f"{where}.per_dataset.{metric}: expected one of {PER_DATASET} "
                                         "mapping dataset names to numbers")
            elif key != "source":
                if key not in metrics:
                    raise ValueError(f"{where}.{key}: unknown metric (known: {sorted(metrics)})")
                if not isinstance(value, dict) or not _is_number(value.get("mean")) or set(value) - {"mean", "std"} \
                        or ("std" in value and not _is_number(value["std"])):
                    raise ValueError(f"{where}.{key}: expected {{mean: number, std: number (optional)}}")
    return data


def check_published(published: dict, experiments: dict) -> None:
    """The published numbers of the configured experiments fit them: the experiment's protocol has the metric, the
    per-dataset names are in its sequence. (Entries of experiments not configured are simply not used.)"""
    for exp in set(published) & set(experiments):
        spec, entry = experiments[exp], published[exp]
        protocol = protocol_of(spec).name
        extra = set(entry) - {"source", "per_dataset"} - set(PUBLISHED_METRICS[protocol])
        if extra:
            raise ValueError(f"published numbers of {exp}: {protocol} experiments have no metric {sorted(extra)}")
        per = entry.get("per_dataset")
        if per is not None and protocol != "mtil":
            raise ValueError(f"published numbers of {exp}: per_dataset numbers are for MTIL experiments")
        for metric, by_dataset in (per or {}).items():
            unknown = set(by_dataset) - set(spec["sequence"]) if metric != "source" else set()
            if unknown:
                raise ValueError(f"published numbers of {exp}: per_dataset.{metric} names {sorted(unknown)}, "
                                 f"not in its sequence")


# settings that change how fast a run goes, not what it computes (tests/test_pipeline.py, tests/test_precision.py)
EXECUTION_KEYS = ("loader_workers", "image_cache", "gpu_precision")


def _flatten(value, prefix: str) -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}.{key}").items()}
    return {prefix: value}


def experiment_protocol(config: dict, name: str) -> dict:
    """What an experiment computes: its settings (without the execution ones) and those of its datasets and backbone,
    as dotted keys (``seeds``, ``train.epochs``, ``dataset.cifar100.type``, ``backbone.name``)."""
    spec = config["experiments"][name]
    datasets = protocol_of(spec).datasets(spec)
    flat = _flatten({k: v for k, v in spec.items() if k not in EXECUTION_KEYS}, "")
    for ds in datasets:
        flat.update(_flatten(config["datasets"][ds], f".dataset.{ds}"))
    flat.update(_flatten(config["backbones"][spec["backbone"]], ".backbone"))
    return {k.lstrip("."): v for k, v in flat.items()}


def protocol_changes(config: dict, reference: dict, published: dict) -> dict[str, list[str]]:
    """For every configured experiment with published numbers: the settings in which it differs from the
    experiment of the same name in ``reference`` (the paper configs, config/experiments/*.yaml), which the published
    numbers were measured under. Empty lists are left out."""
    changes = {}
    for name in set(published) & set(config["experiments"]):
        if name not in reference["experiments"]:
            changes[name] = ["(not one of the paper configs)"]
            continue
        ours, theirs = experiment_protocol(config, name), experiment_protocol(reference, name)
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if differ:
            changes[name] = differ
    return dict(sorted(changes.items()))


def _stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def _compare(stats: dict, published: dict | None) -> dict:
    """``stats`` with the published number (``paper``, ``paper_std``) and ``difference`` = ours − paper."""
    if published is None:
        return stats
    out = {**stats, "paper": float(published["mean"]), "difference": stats["mean"] - float(published["mean"])}
    if "std" in published:
        out["paper_std"] = float(published["std"])
    return out


def experiment_summary(spec: dict, metrics: list[dict], published: dict | None = None,
                       differs: list[str] = ()) -> dict:
    """One experiment over its seeds (``metrics``: each seed's metrics.json): mean ± sample std of every metric,
    with the published number and the difference where ``published`` (its config/published.yaml entry) has one;
    MTIL adds the per-dataset Transfer / Average / Last (``per_dataset``). ``differs``: the settings in which the
    experiment differs from the protocol the published numbers were measured under (``protocol_differs``)."""
    protocol = protocol_of(spec).name
    published = published or {}
    mtil = protocol == "mtil"
    summary = {"method": spec["method"], "protocol": protocol, "dataset": protocol_of(spec).dataset_label(spec),
               "tasks": protocol_of(spec).num_tasks(spec), "seeds": len(metrics),
               "metrics": {k: _compare(_stats([m[k] for m in metrics]), published.get(k))
                           for k, _ in METRICS[protocol]}}
    if "source" in published:
        summary["source"] = published["source"]
        if differs:
            summary["protocol_differs"] = list(differs)
    if mtil:
        paper = published.get("per_dataset", {})
        per = {ds: {} for ds in spec["sequence"]}
        for k in PER_DATASET:
            values = np.array([m[f"{k}_per_task"] for m in metrics], dtype=float)  # seeds x datasets
            names = spec["sequence"][1:] if k == "transfer" else spec["sequence"]  # no Transfer on the first
            for j, ds in enumerate(names):
                given = paper.get(k, {}).get(ds)
                per[ds][k] = _compare(_stats(values[:, j]), None if given is None else {"mean": given})
        summary["per_dataset"] = per
        if "source" in paper:
            summary["per_dataset_source"] = paper["source"]
    return summary


def _value(stats: dict, seeds: int) -> str:
    return f"{stats['mean']:.2f} ± {stats['std']:.2f}" if seeds > 1 else f"{stats['mean']:.2f}"


DIFFERS = "≠"  # beside a published number measured under other settings than this run's


def _paper_cells(stats: dict | None, note: int | None, differs: bool = False) -> list[str]:
    if stats is None or "paper" not in stats:
        return ["—", "—"]
    paper = f"{stats['paper']:.2f}" + (f" ± {stats['paper_std']:.2f}" if "paper_std" in stats else "")
    mark = f" {DIFFERS}" if differs else ""
    return [f"{paper} [{note}]{mark}", f"{stats['difference']:+.2f}{mark}"]


def _differs_note(name: str, s: dict) -> str:
    return (f"{DIFFERS} {name} differs from the protocol of the published numbers in: "
            f"{', '.join(s['protocol_differs'])}; compare with care")


def summary_tables(summaries: dict[str, dict]) -> list[dict]:
    """The tables of summary.md / summary.html: one per protocol (a row per experiment), and for each MTIL
    experiment one per dataset. Each: ``{"title", "header", "rows" (cells as text), "notes" (sources)}``."""
    tables = []
    for protocol, metrics in METRICS.items():
        chosen = {name: s for name, s in summaries.items() if s["protocol"] == protocol}
        if not chosen:
            continue
        compared = PUBLISHED_METRICS[protocol]
        header = ["experiment", "method", "dataset", "tasks", "seeds"]
        for key, title in metrics:
            header += [title] + (["paper", "Δ"] if key in compared else [])
        rows, notes = [], []
        for name, s in chosen.items():
            note = None
            if "source" in s:
                notes.append(f"[{len(notes) + 1}] {name}: {s['source']}")
                note = len(notes)
            row = [name, s["method"], s["dataset"], str(s["tasks"]), str(s["seeds"])]
            for key, _ in metrics:
                row.append(_value(s["metrics"][key], s["seeds"]))
                if key in compared:
                    row += _paper_cells(s["metrics"][key], note, "protocol_differs" in s)
            rows.append(row)
            if "protocol_differs" in s:
                notes.append(_differs_note(name, s))
        tables.append({"title": TITLES[protocol], "header": header, "rows": rows, "notes": notes})
    titles = dict(METRICS["mtil"])
    for name, s in summaries.items():
        if "per_dataset" not in s:
            continue
        header = ["dataset"] + [c for k in PER_DATASET for c in (titles[k], "paper", "Δ")]
        rows = []
        for ds, stats in s["per_dataset"].items():
            row = [ds]
            for k in PER_DATASET:
                row += [_value(stats[k], s["seeds"]), *_paper_cells(stats[k], 1, "protocol_differs" in s)] \
                    if k in stats else ["—"] * 3
            rows.append(row)
        notes = [f"[1] {s['per_dataset_source']}"] if "per_dataset_source" in s else []
        if "protocol_differs" in s:
            notes.append(_differs_note(name, s))
        tables.append({"title": f"{name}: per dataset", "header": header, "rows": rows, "notes": notes})
    return tables


def markdown_tables(tables: list[dict]) -> str:
    parts = [INTRO]
    for t in tables:
        lines = [f"### {t['title']}", "", "| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
        lines += ["| " + " | ".join(row) + " |" for row in t["rows"]]
        if t["notes"]:
            lines += [""] + [f"- {note}" for note in t["notes"]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def html_tables(tables: list[dict]) -> str:
    """The same tables as a self-contained HTML page (what the Snakemake report shows)."""
    style = ("body{font-family:sans-serif;font-size:14px} table{border-collapse:collapse;margin-bottom:8px} "
             "th,td{border:1px solid #ccc;padding:3px 7px;text-align:right} th:first-child,td:first-child"
             "{text-align:left} th{background:#f0f0f0} li{font-size:12px}")
    body = [f"<p>{escape(INTRO)}</p>"]
    for t in tables:
        body.append(f"<h3>{escape(t['title'])}</h3>")
        body.append("<table>\n<tr>" + "".join(f"<th>{escape(h)}</th>" for h in t["header"]) + "</tr>\n" +
                    "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>\n" for row in t["rows"]) +
                    "</table>")
        if t["notes"]:
            body.append("<ul>" + "".join(f"<li>{escape(n)}</li>" for n in t["notes"]) + "</ul>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>ifcl: summary</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def summary_rows(summaries: dict[str, dict]) -> list[dict]:
    """summary.csv, one row per (experiment, dataset, metric): ``dataset`` is empty for the whole benchmark
    (``benchmark``: the dataset, or the MTIL sequence) and names the dataset for MTIL's per-dataset numbers;
    ``paper``, ``paper_std``, ``difference`` and ``source`` are empty without a published number."""
    rows = []
    for name, s in summaries.items():
        base = {"experiment": name, "method": s["method"], "protocol": s["protocol"], "benchmark": s["dataset"],
                "tasks": s["tasks"], "seeds": s["seeds"], "protocol_differs": ";".join(s.get("protocol_differs", []))}
        scopes = [("", s["metrics"], s.get("source", ""))]
        scopes += [(ds, stats, s.get("per_dataset_source", "")) for ds, stats in s.get("per_dataset", {}).items()]
        for dataset, metrics, source in scopes:
            for key, stats in metrics.items():
                rows.append({**base, "dataset": dataset, "metric": key, "mean": stats["mean"], "std": stats["std"],
                             "paper": stats.get("paper", ""), "paper_std": stats.get("paper_std", ""),
                             "difference": stats.get("difference", ""), "source": source if "paper" in stats else ""})
    return rows


def _flat(metrics: dict) -> dict:
    return {f"{key}_{field}": value for key, stats in metrics.items() for field, value in stats.items()}


def summary_json(summaries: dict[str, dict]) -> dict:
    """summary.json (DVC's metrics file): per experiment, ``<metric>_mean``, ``_std`` and, where published,
    ``_paper``, ``_paper_std``, ``_difference``; MTIL adds the same per dataset under ``per_dataset``."""
    out = {}
    for name, s in summaries.items():
        entry = {k: s[k] for k in ("method", "protocol", "dataset", "tasks", "seeds", "protocol_differs") if k in s}
        entry.update(_flat(s["metrics"]))
        if "per_dataset" in s:
            entry["per_dataset"] = {ds: _flat(stats) for ds, stats in s["per_dataset"].items()}
        out[name] = entry
    return out


def summarize(runs: dict[str, dict[int, dict]], experiments: dict, published: dict, csv_out: str, md_out: str,
              json_out: str, html_out: str, changes: dict[str, list[str]] | None = None) -> None:
    """Mean ± sample std over seeds of every metric of every experiment (``runs[exp][seed]["metrics"]`` =
    metrics.json), next to the published numbers (``published``: see :func:`load_published`) with the difference,
    marked where the experiment's settings differ from the published protocol (``changes``: see
    :func:`protocol_changes`): summary.csv (one row per number), summary.md and summary.html (tables per protocol,
    per dataset for MTIL) and summary.json (DVC's metrics file)."""
    changes = changes or {}
    summaries = {name: experiment_summary(experiments[name], [read_json(f["metrics"]) for f in by_seed.values()],
                                          published.get(name), changes.get(name, ()))
                 for name, by_seed in runs.items()}
    tables = summary_tables(summaries)
    write_csv(csv_out, summary_rows(summaries))
    write_text(md_out, markdown_tables(tables))
    write_text(html_out, html_tables(tables))
    write_json(json_out, summary_json(summaries))


# ---- what the overview figure shows (ifcl.plots.plot_overview) ----

def benchmark_groups(summary: dict) -> dict[str, list[str]]:
    """The experiments of summary.json grouped by benchmark (same dataset or sequence and number of tasks), each
    group named for a figure title; class-incremental benchmarks first. A one-task class-incremental experiment
    (joint training on every class, the upper bound) joins every benchmark of its dataset, after its methods; with
    none, it has its own."""
    groups: dict[str, list[str]] = {}
    cil = {n: s for n, s in summary.items() if s["protocol"] == "cil"}
    for name, s in cil.items():
        if s["tasks"] > 1:
            groups.setdefault(f"{s['dataset']}, {s['tasks']} tasks (class-incremental)", []).append(name)
    for name, s in cil.items():
        if s["tasks"] == 1:
            keys = [k for k, names in groups.items() if cil[names[0]]["dataset"] == s["dataset"]]
            for key in keys or [f"{s['dataset']}, all classes at once (class-incremental)"]:
                groups.setdefault(key, []).append(name)
    for name, s in summary.items():
        if s["protocol"] == "mtil":
            sequence = s["dataset"].split(" > ")
            shown = " > ".join(sequence) if len(sequence) <= 3 else f"{sequence[0]} > … > {sequence[-1]}"
            groups.setdefault(f"MTIL, {s['tasks']} datasets: {shown}", []).append(name)
    return groups


def _zero_shot_reference(row: dict) -> dict:
    """MTIL: the frozen CLIP's Transfer, Average and Last (the zero-shot row of the papers' tables), where known."""
    values = {"transfer": row.get("zero_shot_transfer_mean"), "average": row.get("zero_shot_mean"),
              "last": row.get("zero_shot_mean")}
    return {k: v for k, v in values.items() if v is not None}


def overview_benchmarks(summary: dict, curves: dict[str, list[np.ndarray]]) -> list[dict]:
    """What ifcl.plots.plot_overview draws, from summary.json and each experiment's accuracy curves (one per seed): per
    benchmark, the experiments' curves and the metrics a paper reports, with mean, std and the published number;
    MTIL's with the zero-shot CLIP's values (``reference``), the same for every run of a sequence and backbone."""
    benchmarks = []
    for title, names in benchmark_groups(summary).items():
        protocol = summary[names[0]]["protocol"]
        keys = PUBLISHED_METRICS[protocol]
        labels = {k: label.replace(" (%)", "") for k, label in METRICS[protocol]}
        benchmarks.append({
            "title": title, "metrics": [(k, labels[k]) for k in keys], "curves": {n: curves[n] for n in names},
            "values": {n: {k: {f: summary[n][f"{k}_{f}"] for f in ("mean", "std", "paper") if f"{k}_{f}" in summary[n]}
                           for k in keys} for n in names},
            "reference": _zero_shot_reference(summary[names[0]]) if protocol == "mtil" else {}})
    return benchmarks
