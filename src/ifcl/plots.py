"""Figures of the results (matplotlib, no display needed), each written as PNG and PDF with the same bytes on every
run (the PDF carries no creation date).

Plot settings live in ``params.yaml`` under ``figures:`` (DVC's parameter file: `dvc repro` rebuilds only the figure
stage when they change; the Snakemake rule reads the same file).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from .files import atomic_path, read_json, read_text

DEFAULT_SETTINGS = {
    "dpi": 150,  # PNG resolution
    "width": 6.4,  # inches
    "height": 4.0,
    "band": "std",  # shaded band over seeds: "std" (mean ± sample std), "range" (min to max) or "none"
}
BANDS = ("std", "range", "none")


def load_settings(path: str | Path) -> dict:
    """The ``figures:`` section of a parameter file, on top of the defaults; unknown keys or bad values raise
    ValueError naming them. A missing file gives the defaults."""
    path = Path(path)
    given = (yaml.safe_load(path.read_text()) or {}).get("figures") or {} if path.is_file() else {}
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ValueError(f"{path}: unknown figure settings {unknown} (known: {sorted(DEFAULT_SETTINGS)})")
    settings = {**DEFAULT_SETTINGS, **given}
    for key in ("dpi", "width", "height"):
        if not isinstance(settings[key], (int, float)) or isinstance(settings[key], bool) or settings[key] <= 0:
            raise ValueError(f"{path}: figures.{key} must be a positive number, got {settings[key]!r}")
    if settings["band"] not in BANDS:
        raise ValueError(f"{path}: figures.band must be one of {BANDS}, got {settings['band']!r}")
    return settings


# ---- one colour per experiment, the same in every figure ----

# matplotlib's tab10 (also Vega's category10, the scheme of the DVC plot templates in .dvc/plots/), then ten more
# that differ from them and from each other: the dark and the light shade of each of tab20b's five hues
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
MORE_COLOURS = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
                "#9c9ede", "#b5cf6b", "#e7cb94", "#e7969c", "#de9ed6"]
PALETTE = TAB10 + MORE_COLOURS


def extra_colour(k: int) -> str:
    """Colour number ``k`` past the palette: hues a golden angle apart, so that no two are close."""
    from matplotlib.colors import hsv_to_rgb, to_hex

    hue = (0.1 + 0.618034 * k) % 1.0
    return to_hex(hsv_to_rgb((hue, 0.65, 0.75)))


def experiment_colours(names: list[str]) -> dict[str, str]:
    """A colour (hex string) for each experiment, by its place in ``names``: the workflow passes every configured
    experiment in the config's order, so an experiment has the same colour in every figure, whichever others the
    figure shows."""
    return {name: PALETTE[k] if k < len(PALETTE) else extra_colour(k - len(PALETTE)) for k, name in enumerate(names)}


def shades(colour: str, n: int) -> list:
    """``n`` shades of one colour from light to dark (the colour itself when n is 1), for ordered items of one
    experiment (the adapted blocks of a run)."""
    from matplotlib.colors import to_rgb

    base = np.array(to_rgb(colour))
    mixes = np.linspace(-0.55, 0.45, n) if n > 1 else [0.0]  # < 0: towards white, > 0: towards black
    return [tuple(base + (1 - base) * -f if f < 0 else base * (1 - f)) for f in mixes]


def read_matrix(path: str | Path) -> np.ndarray:
    """A run's acc_matrix.csv as an array (row i: after task i; blank cells: NaN)."""
    rows = [line.split(",")[1:] for line in read_text(path).splitlines()[1:]]
    return np.array([[float(v) if v else np.nan for v in row] for row in rows])


def accuracy_curve(matrix_csv: str | Path, metrics_json: str | Path, protocol: str) -> np.ndarray:
    """Accuracy after each task of one run: A_t (class-incremental: over all classes seen so far, sample-weighted,
    as metrics.json's ``curve``) or, for MTIL, the mean over the datasets learnt so far (row t of the matrix)."""
    if protocol == "cil":
        return np.asarray(read_json(metrics_json)["curve"], dtype=float)
    acc = read_matrix(matrix_csv)
    return np.array([acc[t, : t + 1].mean() for t in range(len(acc))])


def run_curves(runs: dict[str, dict[int, dict]], protocols: dict[str, str]) -> dict[str, dict[int, np.ndarray]]:
    """:func:`accuracy_curve` of every run (``runs[exp][seed]`` = its ``matrix`` and ``metrics`` files), by
    experiment and seed."""
    return {exp: {seed: accuracy_curve(files["matrix"], files["metrics"], protocols[exp])
                  for seed, files in by_seed.items()} for exp, by_seed in runs.items()}


def curve_records(curves: dict[str, dict[int, np.ndarray]]) -> list[dict]:
    """The accuracy curves as data (``dvc plots show``): one record per experiment, seed and number of tasks learnt."""
    return [{"experiment": exp, "seed": int(seed), "task": t + 1, "accuracy": float(a)}
            for exp, by_seed in curves.items() for seed, curve in by_seed.items() for t, a in enumerate(curve)]


def training_log(task_logs: list[list[dict]], columns: dict) -> list[dict]:
    """One run's training, one record per epoch of its tasks in order, from each task's train_log.csv rows
    (``columns``: the log's column of epoch, loss and accuracy, :meth:`ifcl.registry.Method.log_column`): task,
    epoch (within the task, from 0), global_epoch (running over the whole task sequence, from 0), loss, accuracy
    (training, %) and, where the log has it, val_accuracy. Rows of a later stage (a ``stage`` cell, e.g. a classifier
    alignment after the epochs) are left out."""
    records, global_epoch = [], 0
    for t, rows in enumerate(task_logs):
        for row in rows:
            if row.get("stage"):
                continue
            record = {"task": t, "epoch": int(row[columns["epoch"]]), "global_epoch": global_epoch,
                      "loss": float(row[columns["loss"]]), "accuracy": float(row[columns["accuracy"]])}
            if "val_accuracy" in row:
                record["val_accuracy"] = float(row["val_accuracy"])
            records.append(record)
            global_epoch += 1
    return records


TRAINING_FIELDS = ("task", "epoch", "global_epoch", "loss", "accuracy")  # per record, after experiment and seed


def training_records(logs: dict[str, dict[int, list[dict]]]) -> list[dict]:
    """The training curves as data (``dvc plots show``): the records of :func:`training_log` of every run
    (``logs[exp][seed]``), each with its experiment and seed, without the validation accuracy."""
    return [{"experiment": exp, "seed": int(seed), **{k: r[k] for k in TRAINING_FIELDS}}
            for exp, by_seed in logs.items() for seed, records in by_seed.items() for r in records]


def _save(fig, outputs: list[str | Path], dpi: int) -> None:
    for out in outputs:
        fmt = Path(out).suffix.lstrip(".")
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        with atomic_path(out) as f:
            fig.savefig(f, format=fmt, dpi=dpi, metadata=metadata)


# ---- one function per figure: plain arrays and dicts in, PNG + PDF out; each returns its Figure (made outside
# pyplot: nothing to close) so that tests can read what was drawn ----

def _figure(width: float, height: float):
    """A figure outside pyplot (no global state, nothing to close): Agg for PNG, the PDF backend for PDF."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _write(fig, outputs: list[str | Path], settings: dict):
    fig.tight_layout()
    _save(fig, outputs, settings["dpi"])
    return fig


def _band(ax, x, runs: np.ndarray, band: str, color) -> None:
    """Shade the spread over seeds (rows of ``runs``) around their mean: sample std, min-max, or nothing."""
    if len(runs) < 2 or band == "none":
        return
    mean = runs.mean(axis=0)
    if band == "std":
        spread = runs.std(axis=0, ddof=1)
        low, high = mean - spread, mean + spread
    else:
        low, high = runs.min(axis=0), runs.max(axis=0)
    ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)


# the axes of the accuracy curves, per protocol: title, x label, y label
CURVE_AXES = {
    "cil": ("class-incremental: A_t over the classes seen", "tasks learnt", "A_t: accuracy on all classes seen (%)"),
    "mtil": ("MTIL: mean over the datasets learnt", "datasets learnt", "mean accuracy on the datasets learnt (%)"),
}


def _seeds(n: int) -> str:
    return f"{n} seed{'s' * (n > 1)}"


def _min_span(ax, span: float) -> None:
    """Widen the y range of ``ax`` to at least ``span`` around its middle (a nearly flat curve is not blown up)."""
    low, high = ax.get_ylim()
    if high - low < span:
        middle = (low + high) / 2
        ax.set_ylim(middle - span / 2, middle + span / 2)


def _headroom(ax, fraction: float) -> None:
    """Free the top ``fraction`` of the y range of ``ax`` (room for a legend above the data)."""
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + fraction * (high - low) / (1 - fraction))


def _draw_curves(ax, curves: dict[str, list[np.ndarray]], protocol: str, colours: dict[str, str], band: str) -> None:
    """One line per experiment (mean over its seeds' curves, in the experiment's colour) with a band over seeds,
    against the tasks learnt; the axis labels of the protocol, and a legend. A one-task experiment among longer
    ones (joint training on every class at once, the upper bound) is a dashed horizontal line at its accuracy."""
    from matplotlib.ticker import MaxNLocator

    longest = max(len(runs[0]) for runs in curves.values())
    for name, runs in curves.items():
        runs = np.stack(runs)
        if runs.shape[1] == 1 < longest:
            x = np.array([1, longest])
            runs = np.repeat(runs, 2, axis=1)
            ax.plot(x, runs.mean(axis=0), linestyle="--", color=colours[name],
                    label=f"{name} (all classes at once, {_seeds(len(runs))})")
        else:
            x = np.arange(1, runs.shape[1] + 1)
            ax.plot(x, runs.mean(axis=0), marker="o", markersize=3, color=colours[name],
                    label=f"{name} ({_seeds(len(runs))})")
        _band(ax, x, runs, band, colours[name])
    _, xlabel, ylabel = CURVE_AXES[protocol]
    _min_span(ax, 10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")


def plot_accuracy_curves(curves: dict[str, list[np.ndarray]], protocols: dict[str, str], colours: dict[str, str],
                         settings: dict, outputs: list[str | Path]):
    """Accuracy against the number of tasks learnt, one panel per protocol (class-incremental, then MTIL), one
    line per experiment (mean over seeds, in its colour) with a band over seeds; ``curves[experiment]`` holds one
    curve per seed, ``protocols[experiment]`` is "cil" or "mtil"."""
    shown = [p for p in CURVE_AXES if any(protocols[name] == p for name in curves)]
    fig = _figure(settings["width"] * len(shown), settings["height"])
    axes = np.asarray(fig.subplots(1, len(shown), squeeze=False)).ravel()
    for ax, protocol in zip(axes, shown):
        _draw_curves(ax, {n: c for n, c in curves.items() if protocols[n] == protocol}, protocol, colours,
                     settings["band"])
        ax.set_title(CURVE_AXES[protocol][0], fontsize="medium")
    return _write(fig, outputs, settings)


def matrix_annotations(acc) -> list[list[str]]:
    """The text of each cell of the accuracy-matrix heatmap: the accuracy with one decimal, blank where it is NaN."""
    return [["" if np.isnan(v) else f"{v:.1f}" for v in row] for row in np.asarray(acc, dtype=float)]


def plot_accuracy_matrix(acc, labels: list[str], title: str, settings: dict, outputs: list[str | Path]):
    """Heatmap of one run's accuracy matrix (row i: after learning task i; column j: accuracy on task j; both
    named by ``labels``), every cell annotated with its value, NaN cells (tasks not learnt yet) blank."""
    acc = np.asarray(acc, dtype=float)
    n = len(acc)
    side = max(settings["height"], 0.5 * n + 1.5)
    fig = _figure(side * 1.25, side)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", vmin=0, vmax=100)
    for i, row in enumerate(matrix_annotations(acc)):
        for j, text in enumerate(row):
            if text:
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if n <= 10 else 6,
                        color="white" if acc[i, j] < 60 else "black")
    long = max(map(len, labels)) > 6
    ax.set_xticks(range(n), labels, rotation=45 if long else 0, ha="right" if long else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("accuracy on")
    ax.set_ylabel("after learning")
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return _write(fig, outputs, settings)


def plot_forgetting(per_seed: list[np.ndarray], title: str, colour: str, settings: dict, outputs: list[str | Path]):
    """Forgetting of each old task after the last task (``per_seed``: one array per seed, from
    ifcl.metrics.forgetting_per_task): bars at the mean over seeds in the experiment's colour, error bars at the
    sample std."""
    runs = np.stack(per_seed)
    mean = runs.mean(axis=0)
    std = runs.std(axis=0, ddof=1) if len(runs) > 1 else None
    fig = _figure(settings["width"], settings["height"])
    ax = fig.subplots()
    seeds = _seeds(len(runs)) + (", mean ± std" if len(runs) > 1 else "")
    ax.bar(np.arange(len(mean)), mean, yerr=std, capsize=3, color=colour, label=f"{title} ({seeds})")
    for j, v in enumerate(mean):  # the value, also where the bar is too small to see
        ax.annotate(f"{v:.1f}", (j, max(v + (std[j] if std is not None else 0), 0)), xytext=(0, 2),
                    textcoords="offset points", ha="center", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(mean)), [f"task {j}" for j in range(len(mean))])
    ax.set_ylabel("forgetting (points)")
    ax.set_title(f"{title}: best accuracy before the last task − final", fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="x-small")
    return _write(fig, outputs, settings)


def memory_dimensions(metas: list[dict]) -> tuple[list[str], np.ndarray, list[list[str]]]:
    """From the metadata of an InfLoRA run's memory.safetensors after tasks 0, 1, ...: the adapted blocks (in
    order), the dimension of the old tasks' space per task and block, and the kind of memory kept per task and
    block ("remove": a basis of the old space; "retain": a basis of its complement)."""
    layers = sorted(metas[0]["old_space_dims"], key=int)
    dims = np.array([[m["old_space_dims"][layer] for layer in layers] for m in metas])
    kinds = [[m["layer_kinds"][layer] for layer in layers] for m in metas]
    return layers, dims, kinds


def plot_memory_sizes(layers: list[str], dims: np.ndarray, kinds: list[list[str]], width: int | None, title: str,
                      colour: str, settings: dict, outputs: list[str | Path]):
    """The dimension of the old tasks' space in each adapted block after each task (one line per block, in shades
    of the experiment's colour from the first block, light, to the last, dark; hollow markers where the memory is
    kept as a basis of the complement), against the layer width."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = _figure(settings["width"], settings["height"])
    ax = fig.subplots()
    tasks = np.arange(len(dims))
    for i, (layer, color) in enumerate(zip(layers, shades(colour, len(layers)))):
        ax.plot(tasks, dims[:, i], color=color, label=f"block {layer}")
        retain = np.array([k[i] == "retain" for k in kinds])
        ax.scatter(tasks[~retain], dims[~retain, i], color=color, s=18, zorder=3)
        ax.scatter(tasks[retain], dims[retain, i], facecolors="white", edgecolors=color, s=18, zorder=3)
    handles = ax.get_legend_handles_labels()[0] + [
        Line2D([], [], marker="o", linestyle="", color="gray", label="kept: old space"),
        Line2D([], [], marker="o", linestyle="", markerfacecolor="white", color="gray", label="kept: complement")]
    if width:
        handles.append(ax.axhline(width, color="gray", linestyle="--", linewidth=1, label=f"layer width {width}"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("memory after task")
    ax.set_ylabel("dimension of the old tasks' space")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize="x-small", ncol=2 if len(handles) > 8 else 1, loc="best")
    return _write(fig, outputs, settings)


def lambda_histograms(evals: list[dict]) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """From a DIKI run's eval.json after each task (row t): the bin edges of λ and, per row, the counts over the
    datasets learnt so far (0..t) and over the unseen ones (t+1 onwards)."""
    edges = np.asarray(evals[0]["weight_bin_edges"], dtype=float)
    rows = []
    for e in evals:
        counts, t = np.asarray(e["weight_histogram"], dtype=np.int64), e["task"]
        rows.append((counts[: t + 1].sum(axis=0), counts[t + 1 :].sum(axis=0)))
    return edges, rows


def plot_lambda_histograms(edges: np.ndarray, rows: list[tuple[np.ndarray, np.ndarray]], names: list[str],
                           title: str, settings: dict, outputs: list[str | Path]):
    """DIKI's weight λ per test image after each task: its distribution over the datasets learnt so far and over
    the unseen ones (as fractions of their images), one panel per task (``names``: the sequence)."""
    n = len(rows)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig = _figure(settings["width"] * ncols / 2 + 1, settings["height"] * nrows * 0.75 + 0.5)
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False, sharex=True)).ravel()
    for t, (ax, (seen, unseen)) in enumerate(zip(axes, rows)):
        for counts, label, color in ((seen, "learnt", "C0"), (unseen, "unseen", "C1")):
            if counts.sum():
                ax.stairs(counts / counts.sum(), edges, fill=True, alpha=0.45, color=color,
                          label=f"{label} ({int(counts.sum())} images)")
        ax.set_title(f"after task {t} ({names[t]})", fontsize="small")
        ax.set_xlim(0, 1)
        ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[(nrows - 1) * ncols:]:
        ax.set_xlabel("λ (weight of the learnt knowledge)")
    for ax in axes[::ncols]:
        ax.set_ylabel("fraction of images")
    fig.suptitle(title, fontsize="medium")
    return _write(fig, outputs, settings)


def plot_overview(benchmarks: list[dict], protocols: dict[str, str], colours: dict[str, str], settings: dict,
                  outputs: list[str | Path]):
    """One row per benchmark: the accuracy after each task (mean over seeds with a band) and the final metrics
    (bars at the mean, error bars at the sample std, a black bar where a number is published), each experiment in
    its colour, a legend on every panel. Each benchmark: ``{"title", "metrics": [(key, label)],
    "curves": {experiment: [curve per seed]}, "values": {experiment: {key: {"mean", "std", "paper"?}}},
    "reference"?: {key: value}}`` (MTIL: the zero-shot CLIP's, a dashed line across the metric's bars);
    ``protocols[experiment]`` is "cil" or "mtil"."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = _figure(settings["width"] * 2, settings["height"] * len(benchmarks) + 0.4)
    axes = np.asarray(fig.subplots(len(benchmarks), 2, squeeze=False))
    for (curve_ax, bar_ax), bench in zip(axes, benchmarks):
        names = list(bench["curves"])
        _draw_curves(curve_ax, bench["curves"], protocols[names[0]], colours, settings["band"])
        curve_ax.set_title(bench["title"], fontsize="medium")

        width = 0.8 / len(names)
        handles = [Patch(color=colours[name], label=name) for name in names]
        for k, name in enumerate(names):
            for g, (key, _) in enumerate(bench["metrics"]):
                v = bench["values"][name][key]
                x = g - 0.4 + width * (k + 0.5)
                bar_ax.bar(x, v["mean"], width, yerr=v["std"] if v["std"] else None, capsize=2, color=colours[name],
                           gid=name)
                bar_ax.annotate(f"{v['mean']:.1f}", (x, v["mean"] + (v["std"] or 0)), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=6,
                                rotation=90 if len(names) > 4 else 0)  # side by side, the labels would overlap
                if "paper" in v:
                    bar_ax.plot([x - width / 2, x + width / 2], [v["paper"]] * 2, color="black", linewidth=2,
                                gid="published")
        for g, (key, _) in enumerate(bench["metrics"]):
            if key in bench.get("reference", {}):
                bar_ax.plot([g - 0.45, g + 0.45], [bench["reference"][key]] * 2, color="dimgrey", linestyle="--",
                            linewidth=1.2, gid="zero-shot")
        if any(line.get_gid() == "published" for line in bar_ax.lines):
            handles.append(Line2D([], [], color="black", linewidth=2, label="published"))
        if any(line.get_gid() == "zero-shot" for line in bar_ax.lines):
            handles.append(Line2D([], [], color="dimgrey", linestyle="--", linewidth=1.2, label="zero-shot CLIP"))
        bar_ax.set_xticks(range(len(bench["metrics"])), [label for _, label in bench["metrics"]])
        bar_ax.axhline(0, color="black", linewidth=0.8)
        bar_ax.set_ylabel("%")
        bar_ax.set_title("the metrics papers report (mean ± std over seeds)", fontsize="medium")
        bar_ax.grid(axis="y", alpha=0.3)
        columns = min(len(handles), 3 if len(handles) <= 9 else 4)
        rows = -(-len(handles) // columns)
        _headroom(bar_ax, 0.2 if rows <= 2 else min(0.45, 0.2 + 0.06 * (rows - 2)))  # the legend above the bars
        low, high = bar_ax.get_ylim()
        bar_ax.set_yticks([y for y in bar_ax.get_yticks() if 0 <= y <= 100 and low <= y <= high])  # none in the legend's band
        bar_ax.set_ylim(low, high)
        bar_ax.legend(handles=handles, fontsize="x-small", loc="upper center", ncol=columns)
    return _write(fig, outputs, settings)


def plot_training(log: list[dict], task_labels: list[str], title: str, colour: str, settings: dict,
                  outputs: list[str | Path]):
    """One run's training over its whole task sequence (``log``: :func:`training_log`): the loss (top) and the
    training accuracy (bottom, with the validation accuracy where it was logged) at every epoch, one point per
    epoch in the experiment's colour, a line per task; dotted lines at the task boundaries and each task's name
    (``task_labels``) above its epochs."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(settings["width"], settings["height"] * 1.5)
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    tasks = sorted({r["task"] for r in log})
    spans, val_label = [], "validation accuracy"
    for t in tasks:
        rows = [r for r in log if r["task"] == t]
        x = [r["global_epoch"] for r in rows]
        spans.append((x[0], x[-1]))
        first = t == tasks[0]
        loss_ax.plot(x, [r["loss"] for r in rows], marker="o", markersize=3, color=colour, gid="loss",
                     label="training loss" if first else "_nolegend_")
        acc_ax.plot(x, [r["accuracy"] for r in rows], marker="o", markersize=3, color=colour, gid="accuracy",
                    label="training accuracy" if first else "_nolegend_")
        val = [(xi, r["val_accuracy"]) for xi, r in zip(x, rows) if np.isfinite(r.get("val_accuracy", np.nan))]
        if val:
            acc_ax.plot(*zip(*val), marker="s", markersize=3, linestyle="--", color="dimgray", gid="val_accuracy",
                        label=val_label)
            val_label = "_nolegend_"  # one legend entry
    for k, (start, _) in enumerate(spans[1:]):
        for ax in (loss_ax, acc_ax):
            ax.axvline(start - 0.5, color="gray", linestyle=":", linewidth=1, gid="task boundary",
                       label="task boundary" if k == 0 else "_nolegend_")
    top = loss_ax.secondary_xaxis("top")
    tilt = len(spans) * max(len(task_labels[t]) for t in tasks) > 60  # side by side they would run into each other
    top.set_xticks([(a + b) / 2 for a, b in spans], [task_labels[t] for t in tasks], fontsize="x-small",
                   rotation=30 if tilt else 0, ha="left" if tilt else "center", rotation_mode="anchor")
    top.tick_params(length=0)
    loss_ax.set_ylabel("training loss")
    highest = max([r["loss"] for r in log if np.isfinite(r["loss"])], default=0.0)
    loss_ax.set_ylim(0, 1.05 * highest if highest > 0 else 1.0)
    acc_ax.set_ylabel("accuracy (%)")
    acc_ax.set_ylim(0, 102)
    acc_ax.set_yticks(range(0, 101, 20))
    acc_ax.set_xlabel("epoch (counted over the whole task sequence)")
    acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (loss_ax, acc_ax):  # the legend in a band above the curves
        _headroom(ax, 0.18)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", loc="upper center", ncol=3)
    fig.suptitle(title, fontsize="medium")
    return _write(fig, outputs, settings)
