"""Figures of the results (matplotlib, no display needed), each written as PNG and PDF with the same bytes on every
run (the PDF carries no creation date).

Plot settings live in ``params.yaml`` under ``figures:`` (DVC's parameter file: `dvc repro` rebuilds only the figure
stage when they change; the Snakemake rule reads the same file).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from .files import atomic_path, read_json

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


def accuracy_curve(matrix_csv: str | Path, metrics_json: str | Path, protocol: str) -> np.ndarray:
    """Accuracy after each task of one run: A_t (class-incremental: over all classes seen so far, sample-weighted,
    as metrics.json's ``curve``) or, for MTIL, the mean over the datasets learnt so far (row t of the matrix)."""
    if protocol == "cil":
        return np.asarray(read_json(metrics_json)["curve"], dtype=float)
    rows = [line.split(",")[1:] for line in Path(matrix_csv).read_text().splitlines()[1:]]
    acc = np.array([[float(v) for v in row] for row in rows])
    return np.array([acc[t, : t + 1].mean() for t in range(len(acc))])


def _save(fig, outputs: list[str | Path], dpi: int) -> None:
    for out in outputs:
        fmt = Path(out).suffix.lstrip(".")
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        with atomic_path(out) as f:
            fig.savefig(f, format=fmt, dpi=dpi, metadata=metadata)


def plot_accuracy_curves(curves: dict[str, list[np.ndarray]], settings: dict, outputs: list[str | Path]) -> None:
    """One line per experiment (mean over seeds) with a band over seeds, accuracy against the number of tasks
    learnt; ``curves[experiment]`` holds one curve per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(settings["width"], settings["height"]))
    for name, runs in curves.items():
        runs = np.stack(runs)
        tasks = np.arange(1, runs.shape[1] + 1)
        mean = runs.mean(axis=0)
        (line,) = ax.plot(tasks, mean, marker="o", markersize=3, label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        if len(runs) > 1 and settings["band"] != "none":
            if settings["band"] == "std":
                spread = runs.std(axis=0, ddof=1)
                low, high = mean - spread, mean + spread
            else:
                low, high = runs.min(axis=0), runs.max(axis=0)
            ax.fill_between(tasks, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("tasks learnt")
    ax.set_ylabel("accuracy on the tasks learnt (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, outputs, settings["dpi"])
    plt.close(fig)
