"""Issue 9, results people can read: the summary over seeds next to the published numbers, and every figure rendered
from a small fabricated results tree (written with the library's own writers), as valid PNG and PDF files whose
drawn content is the data: the heatmap's numbers are the matrix, the memory lines the old-space dimensions, the λ
histograms the evaluation's counts, the overview's bars the summary, the training curves every epoch of the
task logs. Every figure gives an experiment the same colour and every panel with data a legend; class-incremental
and MTIL curves are in separate panels. The tiny run has a training figure and the training data of every run."""
import numpy as np
import pytest
import torch
from matplotlib.image import imread

from conftest import REPO
from ifcl.steps.inflora import save_memory
from ifcl.config import load_config
from ifcl.registry import LOG_COLUMNS
from ifcl.files import read_json, write_json
from ifcl.methods.inflora import LayerMemory
from ifcl.metrics import forgetting_per_task
from ifcl.plots import (CURVE_AXES, DEFAULT_SETTINGS, TAB10, accuracy_curve, curve_records, experiment_colours,
                        lambda_histograms, matrix_annotations, memory_dimensions, plot_accuracy_curves,
                        plot_accuracy_matrix, plot_forgetting, plot_lambda_histograms, plot_memory_sizes, plot_overview,
                        plot_training, read_matrix, shades, training_log, training_records)
from ifcl.results import (aggregate_run, benchmark_groups, check_published, load_published, overview_benchmarks,
                          summarize)
from ifcl.state import save_state

PUBLISHED = REPO / "config" / "published.yaml"
SETTINGS = {**DEFAULT_SETTINGS, "dpi": 50}
CIL = "cifar100_inflora"  # a real experiment name: config/published.yaml has its numbers
MTIL = "tiny_diki"  # none published
# after task i (rows), accuracy on task j (columns) of two seeds: class-incremental, so NaN above the diagonal
CIL_MATRICES = {0: [[90.0], [80.0, 70.0], [60.0, 65.0, 75.0]], 1: [[88.0], [84.0, 72.0], [70.0, 60.0, 71.0]]}
MTIL_MATRIX = [[80.0, 40.0, 30.0], [78.0, 90.0, 35.0], [77.0, 85.0, 70.0]]
SEQUENCE = ["shapes", "textures", "digits"]
TEST_IMAGES = [30, 20, 10]
EXPERIMENTS = {
    CIL: {"method": "inflora", "dataset": "cifar100", "num_tasks": 3, "seeds": [0, 1]},
    "demo_seq-lora": {"method": "seq-lora", "dataset": "demo_mixed", "num_tasks": 3, "seeds": [0]},
    MTIL: {"method": "diki", "sequence": SEQUENCE, "seeds": [0]},
}
PROTOCOLS = {CIL: "cil", "demo_seq-lora": "cil", MTIL: "mtil"}
COLOURS = experiment_colours(list(EXPERIMENTS))  # as the workflow computes them: every experiment, in config order


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_image(stem):
    """stem.png is a PNG matplotlib can read (an RGBA image of some size), stem.pdf a PDF; returns the image."""
    png, pdf = stem.with_suffix(".png"), stem.with_suffix(".pdf")
    assert is_png(png) and pdf.read_bytes()[:5] == b"%PDF-"
    image = imread(png)
    assert image.ndim == 3 and image.shape[2] == 4 and min(image.shape[:2]) > 50
    return image


def outputs(stem):
    return [stem.with_suffix(".png"), stem.with_suffix(".pdf")]


def lambda_counts(t: int) -> list[list[int]]:
    """Fabricated λ histogram (20 bins) per dataset after task t: learnt datasets high, unseen ones low."""
    counts = []
    for j, n in enumerate(TEST_IMAGES):
        h = [0] * 20
        h[17 if j <= t else 1] = n - 3
        h[10] = 3
        counts.append(h)
    return counts


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results/runs/<experiment>/seed<k>/ written as the pipeline writes it: eval.json per task (the evaluation
    rules' format), acc_matrix.csv and metrics.json by ifcl.results.aggregate_run, memory.safetensors by
    ifcl.steps.inflora.save_memory, the frozen features' zero-shot accuracy by ifcl.state.save_state."""
    root = tmp_path_factory.mktemp("results")
    runs = {}
    for exp, spec in EXPERIMENTS.items():
        runs[exp] = {}
        for seed in spec["seeds"]:
            run = root / "runs" / exp / f"seed{seed}"
            evals = [run / f"task{t}" / "eval.json" for t in range(3)]
            if spec["method"] == "diki":
                for t, path in enumerate(evals):
                    write_json(path, {"task": t, "accuracy": MTIL_MATRIX[t], "mean_weight": [0.5] * 3,
                                      "selected_task_counts": [[1] * (t + 1)] * 3, "weight_histogram": lambda_counts(t),
                                      "weight_bin_edges": [b / 20 for b in range(21)]})
                zero_shot = []
                for j, acc in enumerate((41.0, 39.0, 30.0)):
                    zero_shot.append(run / f"zero_shot{j}.safetensors")
                    save_state(zero_shot[-1], {"features": torch.zeros(1, 2)}, {"zero_shot_accuracy": acc})
                aggregate_run([str(p) for p in evals], run / "acc_matrix.csv", run / "metrics.json", "mtil",
                              [str(p) for p in zero_shot])
            else:
                matrix = CIL_MATRICES[seed] if exp == CIL else CIL_MATRICES[0]
                for t, path in enumerate(evals):
                    write_json(path, {"task": t, "per_task_accuracy": matrix[t], "per_task_count": [20] * (t + 1),
                                      "per_task_accuracy_task_aware": [99.0] * (t + 1), "task_id_accuracy": 0.9})
                aggregate_run([str(p) for p in evals], run / "acc_matrix.csv", run / "metrics.json", "cil")
                # InfLoRA's memory after tasks 0 and 1 in blocks 0 and 1 of a 16-wide model; block 1 switches to retain
                for t, (k0, k1) in enumerate(((2, 5), (3, 7))):
                    memories = [LayerMemory(torch.eye(16)[:, :k0], "remove"),
                                LayerMemory(torch.eye(16)[:, :k1], "remove" if t == 0 else "retain")]
                    save_memory(run / f"task{t}" / "memory.safetensors", [0, 1], memories, {"task": t})
            runs[exp][seed] = {"matrix": str(run / "acc_matrix.csv"), "metrics": str(run / "metrics.json")}
    summary = root / "summary"
    summarize(runs, EXPERIMENTS, load_published(PUBLISHED), summary / "summary.csv", summary / "summary.md",
              summary / "summary.json", summary / "summary.html")
    return root, runs


def test_the_summary_puts_the_published_numbers_and_the_difference_next_to_ours(results):
    root, _ = results
    summary = read_json(root / "summary" / "summary.json")
    finals = [np.dot(m[-1], [20, 20, 20]) / 60 for m in CIL_MATRICES.values()]  # A_T: sample-weighted last row
    s = summary[CIL]
    assert s["final_mean"] == pytest.approx(np.mean(finals)) and s["final_std"] == pytest.approx(np.std(finals, ddof=1))
    assert s["final_paper"] == 86.51 and s["final_paper_std"] == 0.73 and s["average_paper"] == 91.70
    assert s["final_difference"] == pytest.approx(np.mean(finals) - 86.51)
    assert "forgetting_paper" not in s and "forgetting_mean" in s  # no published forgetting
    assert not any(k.endswith("_paper") for k in summary["demo_seq-lora"])
    # MTIL: per dataset, Transfer (from the second dataset on), Average and Last from the matrix
    m = np.array(MTIL_MATRIX)
    per = summary[MTIL]["per_dataset"]
    assert "transfer_mean" not in per["shapes"] and per["digits"]["transfer_mean"] == pytest.approx(m[:2, 2].mean())
    assert [per[d]["average_mean"] for d in SEQUENCE] == pytest.approx(m.mean(axis=0))
    assert [per[d]["last_mean"] for d in SEQUENCE] == pytest.approx(m[2])

    md = (root / "summary" / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {CIL} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    expected_final = f"{np.mean(finals):.2f} ± {np.std(finals, ddof=1):.2f}"
    assert cells[5:8] == [expected_final, "86.51 ± 0.73 [1]", f"{np.mean(finals) - 86.51:+.2f}"]
    assert cells[8:11][1:] == ["91.70 ± 0.32 [1]", f"{s['average_mean'] - 91.70:+.2f}"]
    assert cells[11:14][1:] == ["—", "—"]  # forgetting: none published
    assert "- [1] cifar100_inflora: InfLoRA paper (Liang & Li, CVPR 2024), Table 1" in md
    demo = next(line for line in md.splitlines() if line.startswith("| demo_seq-lora |"))
    assert demo.count("—") == 6
    assert "### tiny_diki: per dataset" in md and "| shapes | — | — | — |" in md
    html = (root / "summary" / "summary.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<table>") == 3 and "86.51 ± 0.73 [1]" in html

    import pandas as pd

    rows = pd.read_csv(root / "summary" / "summary.csv")  # empty cells: NaN
    final = rows[(rows.experiment == CIL) & rows.dataset.isna() & (rows.metric == "final")].iloc[0]
    assert final.paper == 86.51 and final.difference == pytest.approx(np.mean(finals) - 86.51)
    assert final.source.startswith("InfLoRA paper")
    digits = rows[(rows.experiment == MTIL) & (rows.dataset == "digits") & (rows.metric == "last")].iloc[0]
    assert digits["mean"] == 70.0 and pd.isna(digits.paper) and pd.isna(digits.source)
    assert len(rows) == 2 * 5 + 5 + 3 * 3 - 1  # CIL metrics x 2, MTIL's, per dataset (no Transfer on the first)


def test_the_repository_published_numbers_fit_the_paper_experiments():
    published = load_published(PUBLISHED)
    from ifcl.config import paper_configs

    experiments = paper_configs(REPO)["experiments"]  # every config/experiments/*.yaml
    assert set(published) <= set(experiments)
    check_published(published, experiments)  # metrics of the right protocol, datasets of the sequence
    assert all(entry["source"].strip() for entry in published.values())
    assert published["mtil_order1_diki"]["last"]["mean"] == 85.1
    assert np.mean(list(published["mtil_order1_diki"]["per_dataset"]["last"].values())) == pytest.approx(85.1, abs=0.05)


def test_a_run_under_other_settings_than_the_papers_is_marked_next_to_the_published_number(tmp_path, results):
    """A copy of cifar100_inflora.yaml with 1 seed and 1 epoch keeps its name, and so its published numbers: the
    summary marks the comparison and names the settings that differ (execution settings do not count)."""
    import copy

    from ifcl.results import protocol_changes

    reference = load_config(REPO / "config" / "config.yaml", root=REPO)
    published = load_published(PUBLISHED)
    assert protocol_changes(reference, reference, published) == {}
    mine = copy.deepcopy(reference)
    mine["experiments"][CIL].update(seeds=[0], loader_workers=4, image_cache="all")
    mine["experiments"][CIL]["train"]["epochs"] = 1
    changes = protocol_changes(mine, reference, published)
    assert changes == {CIL: ["seeds", "train.epochs"]}

    _, runs = results
    out = tmp_path / "summary"
    summarize(runs, EXPERIMENTS, published, out / "summary.csv", out / "summary.md", out / "summary.json",
              out / "summary.html", changes)
    md = (out / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {CIL} |"))
    assert "86.51 ± 0.73 [1] ≠" in row
    assert f"- ≠ {CIL} differs from the protocol of the published numbers in: seeds, train.epochs" in md
    assert read_json(out / "summary.json")[CIL]["protocol_differs"] == ["seeds", "train.epochs"]
    demo = next(line for line in md.splitlines() if line.startswith("| demo_seq-lora |"))
    assert "≠" not in demo


@pytest.mark.parametrize("text, error", [
    ("x: {final: {mean: 1}}", "source"),
    ("x: {source: s, acc: {mean: 1}}", "unknown metric"),
    ("x: {source: s, final: {mean: high}}", "x.final"),
    ("x: {source: s, final: {mean: 1, sd: 2}}", "x.final"),
    ("x: {source: s, per_dataset: {last: {a: 1}}}", "per_dataset"),
    ("x: {source: s, per_dataset: {source: t, first: {a: 1}}}", "per_dataset.first"),
])
def test_bad_published_numbers_are_refused_naming_the_key(tmp_path, text, error):
    path = tmp_path / "published.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ValueError, match=error):
        load_published(path)


def test_published_numbers_must_fit_the_experiment():
    with pytest.raises(ValueError, match="no metric"):
        check_published({CIL: {"source": "s", "transfer": {"mean": 1}}}, EXPERIMENTS)
    with pytest.raises(ValueError, match="not in its sequence"):
        check_published({MTIL: {"source": "s", "per_dataset": {"source": "t", "last": {"mnist": 1}}}}, EXPERIMENTS)
    check_published({"elsewhere": {"source": "s", "transfer": {"mean": 1}}}, EXPERIMENTS)  # not configured: unused


def test_the_heatmap_shows_every_matrix_value_and_blanks_the_unlearnt_tasks(results, tmp_path):
    root, runs = results
    acc = read_matrix(runs[CIL][1]["matrix"])
    assert np.isnan(acc[0, 1]) and acc[2, 0] == 70.0
    assert matrix_annotations(acc) == [["88.0", "", ""], ["84.0", "72.0", ""], ["70.0", "60.0", "71.0"]]
    fig = plot_accuracy_matrix(acc, ["task 0", "task 1", "task 2"], "run", SETTINGS, outputs(tmp_path / "m"))
    check_image(tmp_path / "m")
    drawn = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in fig.axes[0].texts}
    assert drawn == {(i, j): f"{v:.1f}" for (i, j), v in np.ndenumerate(acc) if not np.isnan(v)}
    # MTIL: every cell, named by the datasets
    mtil = read_matrix(runs[MTIL][0]["matrix"])
    fig = plot_accuracy_matrix(mtil, SEQUENCE, "mtil", SETTINGS, outputs(tmp_path / "d"))
    assert sorted(float(t.get_text()) for t in fig.axes[0].texts) == sorted(np.ravel(MTIL_MATRIX))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == SEQUENCE


def test_figures_are_byte_stable(results, tmp_path):
    _, runs = results
    acc = read_matrix(runs[CIL][0]["matrix"])
    for name in ("a", "b"):
        plot_accuracy_matrix(acc, ["0", "1", "2"], "run", SETTINGS, outputs(tmp_path / name))
    for ext in (".png", ".pdf"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_forgetting_bars_are_the_mean_over_seeds(results, tmp_path):
    _, runs = results
    per_seed = [forgetting_per_task(read_matrix(f["matrix"])) for f in runs[CIL].values()]
    # max over the rows from learning the task until before the last task, minus the last row
    assert per_seed[0] == pytest.approx([90 - 60, 70 - 65]) and per_seed[1] == pytest.approx([88 - 70, 72 - 60])
    stored = [read_json(f["metrics"])["forgetting"] for f in runs[CIL].values()]  # metrics.json: the mean over tasks
    assert [f.mean() for f in per_seed] == pytest.approx(stored)
    fig = plot_forgetting(per_seed, CIL, COLOURS[CIL], SETTINGS, outputs(tmp_path / "f"))
    check_image(tmp_path / "f")
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx(np.mean(per_seed, axis=0))


def test_the_memory_figure_draws_the_old_space_dimensions_of_each_block(results, tmp_path):
    from ifcl.state import load_state

    root, _ = results
    run = root / "runs" / CIL / "seed0"
    metas = [load_state(run / f"task{t}" / "memory.safetensors")[1] for t in (0, 1)]
    layers, dims, kinds = memory_dimensions(metas)
    # block 1 after task 1 keeps a 7-column basis of the complement: 16 - 7 = 9 dimensions of old space
    assert layers == ["0", "1"] and dims.tolist() == [[2, 5], [3, 9]]
    assert kinds == [["remove", "remove"], ["remove", "retain"]]
    fig = plot_memory_sizes(layers, dims, kinds, 16, "memory", COLOURS[CIL], SETTINGS, outputs(tmp_path / "mem"))
    check_image(tmp_path / "mem")
    lines = {line.get_label(): line.get_ydata().tolist() for line in fig.axes[0].lines
             if line.get_label().startswith("block")}
    assert lines == {"block 0": [2, 3], "block 1": [5, 9]}


def test_lambda_histograms_split_learnt_and_unseen_datasets(results, tmp_path):
    root, _ = results
    evals = [read_json(root / "runs" / MTIL / "seed0" / f"task{t}" / "eval.json") for t in range(3)]
    edges, rows = lambda_histograms(evals)
    assert len(edges) == 21 and edges[0] == 0 and edges[-1] == 1
    for t, (seen, unseen) in enumerate(rows):  # every test image counted once, on its side of the split
        assert seen.sum() == sum(TEST_IMAGES[: t + 1]) and unseen.sum() == sum(TEST_IMAGES[t + 1:])
        assert seen[17] == sum(TEST_IMAGES[: t + 1]) - 3 * (t + 1)
    fig = plot_lambda_histograms(edges, rows, SEQUENCE, "λ", SETTINGS, outputs(tmp_path / "lam"))
    check_image(tmp_path / "lam")
    panel = fig.axes[0]  # after task 0: shapes learnt, textures and digits unseen
    drawn = [p.get_data().values for p in panel.patches]
    assert [d.tolist() for d in drawn] == [(rows[0][0] / 30).tolist(), (rows[0][1] / 30).tolist()]
    assert "learnt (30 images)" in [t.get_text() for t in panel.get_legend().get_texts()]
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3


def test_the_overview_compares_the_experiments_per_benchmark(results, tmp_path):
    root, runs = results
    summary = read_json(root / "summary" / "summary.json")
    groups = benchmark_groups(summary)
    assert list(groups.values()) == [[CIL], ["demo_seq-lora"], [MTIL]]
    assert list(benchmark_groups({MTIL: summary[MTIL], CIL: summary[CIL]}).values()) == [[CIL], [MTIL]]
    curves = {exp: [accuracy_curve(f["matrix"], f["metrics"], "mtil" if exp == MTIL else "cil")
                    for f in by_seed.values()] for exp, by_seed in runs.items()}
    benchmarks = overview_benchmarks(summary, curves)
    assert benchmarks[0]["metrics"] == [("final", "A_T"), ("average", "Ā"), ("forgetting", "forgetting")]
    assert benchmarks[2]["metrics"] == [("transfer", "Transfer"), ("average", "Average"), ("last", "Last")]
    fig = plot_overview(benchmarks, PROTOCOLS, COLOURS, SETTINGS, outputs(tmp_path / "overview"))
    image = check_image(tmp_path / "overview")
    assert image.shape[0] > image.shape[1] / 2  # three rows of panels
    cil_bars = fig.axes[1]
    assert [p.get_height() for p in cil_bars.patches] == pytest.approx(
        [summary[CIL][f"{k}_mean"] for k in ("final", "average", "forgetting")])
    published = [line.get_ydata()[0] for line in cil_bars.lines if line.get_gid() == "published"]
    assert published == [86.51, 91.70]
    mtil_curve = fig.axes[4].lines[0].get_ydata()
    assert mtil_curve == pytest.approx([80.0, (78 + 90) / 2, (77 + 85 + 70) / 3])  # mean over the datasets learnt


def test_joint_training_joins_every_benchmark_of_its_dataset_as_a_dashed_line(tmp_path):
    """A one-task class-incremental experiment (joint training, the upper bound) is drawn with each benchmark of its
    dataset, after the methods, as a horizontal line across the tasks; on a dataset of its own it has its panel."""
    def entry(dataset, tasks, final):
        return {"protocol": "cil", "dataset": dataset, "tasks": tasks, "final_mean": final, "final_std": 1.0,
                "average_mean": final, "average_std": 1.0, "forgetting_mean": 0.0, "forgetting_std": 0.0}
    summary = {"a5": entry("imr", 5, 60.0), "a10": entry("imr", 10, 55.0), "joint": entry("imr", 1, 80.0),
               "alone": entry("other", 1, 70.0), "b5": entry("imr", 5, 50.0)}
    groups = benchmark_groups(summary)
    assert groups == {"imr, 5 tasks (class-incremental)": ["a5", "b5", "joint"],
                      "imr, 10 tasks (class-incremental)": ["a10", "joint"],
                      "other, all classes at once (class-incremental)": ["alone"]}
    curves = {"a5": [np.linspace(90, 60, 5)] * 2, "b5": [np.linspace(90, 50, 5)], "a10": [np.linspace(90, 55, 10)],
              "joint": [np.array([79.0]), np.array([81.0])], "alone": [np.array([70.0])]}
    fig = plot_overview(overview_benchmarks(summary, curves), {n: "cil" for n in summary},
                        {n: f"C{k}" for k, n in enumerate(summary)}, SETTINGS, outputs(tmp_path / "joint"))
    for row, tasks in ((0, 5), (1, 10)):
        line = [ln for ln in fig.axes[2 * row].lines if ln.get_label().startswith("joint")][0]
        assert line.get_linestyle() == "--" and list(line.get_xdata()) == [1, tasks]
        assert list(line.get_ydata()) == [80.0, 80.0]
        assert line.get_label() == "joint (all classes at once, 2 seeds)"
    assert fig.axes[4].lines[0].get_marker() == "o"  # alone: the one point of its own panel


def test_the_accuracy_curves_as_a_figure_and_as_data(results, tmp_path):
    _, runs = results
    curves = {CIL: {seed: accuracy_curve(f["matrix"], f["metrics"], "cil") for seed, f in runs[CIL].items()}}
    records = curve_records(curves)
    assert len(records) == 2 * 3 and records[0] == {"experiment": CIL, "seed": 0, "task": 1, "accuracy": 90.0}
    assert records[-1]["accuracy"] == pytest.approx(np.mean(CIL_MATRICES[1][2]))
    by_experiment = {CIL: list(curves[CIL].values()), MTIL: [accuracy_curve(runs[MTIL][0]["matrix"], None, "mtil")]}
    for band, shaded in (("std", 1), ("none", 0)):
        fig = plot_accuracy_curves(by_experiment, PROTOCOLS, COLOURS, {**SETTINGS, "band": band},
                                   outputs(tmp_path / band))
        check_image(tmp_path / band)
        cil_ax, mtil_ax = fig.axes
        assert np.allclose(cil_ax.lines[0].get_ydata(), np.mean(by_experiment[CIL], axis=0))
        assert np.allclose(mtil_ax.lines[0].get_ydata(), by_experiment[MTIL][0])
        assert len(cil_ax.collections) == shaded and not mtil_ax.collections  # a band only where there are two seeds


# ---- one colour per experiment, legends, separate protocol panels, training curves ----

EPOCHS = {CIL: [3, 1, 2], MTIL: [2, 2, 1]}  # epochs per task (unequal, as task_overrides allow)


def fake_log(exp: str, t: int, epochs: int) -> list[dict]:
    """A task's train_log.csv rows as its training step writes them (InfLoRA family or DIKI); DIKI's last dataset
    has no validation split (NaN)."""
    rows = []
    for e in range(epochs):
        loss, acc = 2.0 - 0.3 * e - 0.1 * t, 40.0 + 10 * e + t
        if exp == MTIL:
            val = float("nan") if t == 2 else acc - 5
            rows.append({"epoch": e, "loss": loss, "train_accuracy": acc, "val_accuracy": val, "lr_last": 0.1})
        else:
            rows.append({"epoch": e, "lr": 0.01, "loss": loss, "train_acc": acc})
    return rows


@pytest.fixture(scope="module")
def train_logs(tmp_path_factory):
    """Every task's train_log.csv of a class-incremental and a DIKI run, written and read back with the library's
    CSV functions (as the steps and the figure rules do), as :func:`ifcl.plots.training_log` records."""
    from ifcl.files import read_csv, write_csv

    root = tmp_path_factory.mktemp("train_logs")
    logs = {}
    for exp, epochs in EPOCHS.items():
        paths = []
        for t, n in enumerate(epochs):
            paths.append(root / exp / f"task{t}" / "train_log.csv")
            write_csv(paths[-1], fake_log(exp, t, n))
        columns = {**LOG_COLUMNS, "accuracy": "train_accuracy"} if exp == MTIL else LOG_COLUMNS
        logs[exp] = {0: training_log([read_csv(path) for path in paths], columns)}
    return logs


def task_labels(exp):
    return SEQUENCE if exp == MTIL else [f"task {t}" for t in range(len(EPOCHS[exp]))]


def training_figure(train_logs, exp, path):
    """The training figure of one fabricated run, written to path (.png, .pdf) unless path is None."""
    return plot_training(train_logs[exp][0], task_labels(exp), exp, COLOURS[exp], SETTINGS,
                         outputs(path) if path else [])


def test_experiment_colours_are_tab10_then_more_all_distinct():
    names = [f"exp{k:02d}" for k in range(30)]
    colours = experiment_colours(names)
    assert [colours[n] for n in names[:10]] == TAB10
    assert len(set(colours.values())) == 30
    assert experiment_colours(names[:12]) == {n: colours[n] for n in names[:12]}  # by place in the order only


def test_an_experiment_has_the_same_colour_in_every_figure_that_draws_it(results, train_logs):
    """Each figure gets the colours of all experiments in config order: a figure of some of them (a protocol's
    panel, a benchmark, one experiment) keeps each one's colour. (Figures not written to files: [] outputs.)"""
    from matplotlib.colors import to_hex

    root, runs = results
    drawn = {exp: {} for exp in EXPERIMENTS}  # experiment -> {where: colour}

    def lines_of(where, ax):
        for line in ax.lines:
            name = line.get_label().split(" (")[0]
            if name in drawn:
                drawn[name][f"{where}: {ax.get_title()}"] = to_hex(line.get_color())

    curves = {exp: [accuracy_curve(f["matrix"], f["metrics"], PROTOCOLS[exp]) for f in by_seed.values()]
              for exp, by_seed in runs.items()}
    for subset in (list(curves), ["demo_seq-lora", MTIL]):
        fig = plot_accuracy_curves({n: curves[n] for n in subset}, PROTOCOLS, COLOURS, SETTINGS, [])
        for ax in fig.axes:
            lines_of(f"curves of {subset}", ax)
    fig = plot_overview(overview_benchmarks(read_json(root / "summary" / "summary.json"), curves), PROTOCOLS, COLOURS,
                        SETTINGS, [])
    for curve_ax, bar_ax in zip(fig.axes[::2], fig.axes[1::2]):
        lines_of("overview", curve_ax)
        for bar in bar_ax.patches:
            drawn[bar.get_gid()][f"overview bars: {curve_ax.get_title()}"] = to_hex(bar.get_facecolor())
    for exp in (CIL, "demo_seq-lora"):
        per_seed = [forgetting_per_task(read_matrix(f["matrix"])) for f in runs[exp].values()]
        fig = plot_forgetting(per_seed, exp, COLOURS[exp], SETTINGS, [])
        drawn[exp]["forgetting"] = {to_hex(bar.get_facecolor()) for bar in fig.axes[0].patches}.pop()
    for exp in EPOCHS:
        fig = training_figure(train_logs, exp, None)
        drawn[exp]["training"] = {to_hex(line.get_color()) for ax in fig.axes for line in ax.lines
                                  if line.get_gid() in ("loss", "accuracy")}.pop()

    for exp, where in drawn.items():
        assert len(where) >= 4 and set(where.values()) == {COLOURS[exp]}, (exp, where)
    assert len(set(COLOURS.values())) == len(COLOURS)


def test_the_memory_lines_are_shades_of_the_experiment_colour(results):
    from matplotlib.colors import to_hex
    from ifcl.state import load_state

    root, _ = results
    metas = [load_state(root / "runs" / CIL / "seed0" / f"task{t}" / "memory.safetensors")[1] for t in (0, 1)]
    layers, dims, kinds = memory_dimensions(metas)
    fig = plot_memory_sizes(layers, dims, kinds, 16, "memory", COLOURS["demo_seq-lora"], SETTINGS, [])
    blocks = [to_hex(line.get_color()) for line in fig.axes[0].lines if line.get_label().startswith("block")]
    assert blocks == [to_hex(c) for c in shades(COLOURS["demo_seq-lora"], 2)] and len(set(blocks)) == 2
    assert shades(COLOURS[CIL], 1) == [pytest.approx(np.array([0x1F, 0x77, 0xB4]) / 255)]  # one block: the colour


def test_class_incremental_and_mtil_curves_are_in_separate_panels(results):
    _, runs = results
    curves = {exp: [accuracy_curve(f["matrix"], f["metrics"], PROTOCOLS[exp]) for f in by_seed.values()]
              for exp, by_seed in runs.items()}
    fig = plot_accuracy_curves(curves, PROTOCOLS, COLOURS, SETTINGS, [])
    assert len(fig.axes) == 2
    for ax, protocol in zip(fig.axes, ("cil", "mtil")):
        shown = {line.get_label().split(" (")[0] for line in ax.lines}
        assert shown == {exp for exp in curves if PROTOCOLS[exp] == protocol}
        assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == CURVE_AXES[protocol]
    assert fig.axes[0].get_ylabel() != fig.axes[1].get_ylabel()
    # one protocol configured: one panel
    fig = plot_accuracy_curves({MTIL: curves[MTIL]}, PROTOCOLS, COLOURS, SETTINGS, [])
    assert len(fig.axes) == 1 and fig.axes[0].get_xlabel() == CURVE_AXES["mtil"][1]


def test_every_panel_with_data_has_a_legend(results, train_logs):
    root, runs = results
    curves = {exp: [accuracy_curve(f["matrix"], f["metrics"], PROTOCOLS[exp]) for f in by_seed.values()]
              for exp, by_seed in runs.items()}
    summary = read_json(root / "summary" / "summary.json")
    evals = [read_json(root / "runs" / MTIL / "seed0" / f"task{t}" / "eval.json") for t in range(3)]
    edges, rows = lambda_histograms(evals)
    metas = [{"old_space_dims": {"0": 2, "1": 5}, "layer_kinds": {"0": "remove", "1": "retain"}}] * 2
    per_seed = [forgetting_per_task(read_matrix(f["matrix"])) for f in runs[CIL].values()]
    figures = {
        "accuracy curves": plot_accuracy_curves(curves, PROTOCOLS, COLOURS, SETTINGS, []),
        "overview": plot_overview(overview_benchmarks(summary, curves), PROTOCOLS, COLOURS, SETTINGS, []),
        "forgetting": plot_forgetting(per_seed, CIL, COLOURS[CIL], SETTINGS, []),
        "memory": plot_memory_sizes(*memory_dimensions(metas), 16, "m", COLOURS[CIL], SETTINGS, []),
        "lambda": plot_lambda_histograms(edges, rows, SEQUENCE, "λ", SETTINGS, []),
        **{f"training {exp}": training_figure(train_logs, exp, None) for exp in EPOCHS},
    }
    for name, fig in figures.items():
        panels = [ax for ax in fig.axes if ax.get_visible() and (ax.lines or ax.patches or ax.collections)]
        assert panels, name
        for ax in panels:
            legend = ax.get_legend()
            assert legend is not None and [t.get_text() for t in legend.get_texts()], (name, ax.get_title())
    for bar_ax in figures["overview"].axes[1::2]:  # the bars' legend names the experiments drawn
        names = {bar.get_gid() for bar in bar_ax.patches}
        assert names <= {t.get_text() for t in bar_ax.get_legend().get_texts()}


def test_the_training_figure_draws_every_epoch_of_every_task_and_the_task_boundaries(train_logs, tmp_path):
    for exp, epochs in EPOCHS.items():
        log = train_logs[exp][0]
        assert [r["global_epoch"] for r in log] == list(range(sum(epochs)))
        starts = list(np.cumsum(epochs)[:-1])  # global epoch of each task's first epoch, from the second task
        fig = training_figure(train_logs, exp, tmp_path / exp)
        check_image(tmp_path / exp)
        loss_ax, acc_ax = fig.axes
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            lines = [line for line in ax.lines if line.get_gid() == key]
            assert len(lines) == len(epochs) and all(line.get_marker() == "o" for line in lines)  # a line per task
            assert np.concatenate([line.get_xdata() for line in lines]).tolist() == [r["global_epoch"] for r in log]
            assert np.concatenate([line.get_ydata() for line in lines]) == pytest.approx([r[key] for r in log])
            boundaries = [line.get_xdata()[0] for line in ax.lines if line.get_gid() == "task boundary"]
            assert boundaries == pytest.approx([s - 0.5 for s in starts])
        names = [t.get_text() for t in loss_ax.child_axes[0].get_xticklabels()]
        assert names == task_labels(exp)
    # DIKI: the validation accuracy where the dataset has a validation split (not the last one here)
    log = train_logs[MTIL][0]
    fig = training_figure(train_logs, MTIL, tmp_path / "val")
    val = [line for line in fig.axes[1].lines if line.get_gid() == "val_accuracy"]
    assert np.concatenate([line.get_xdata() for line in val]).tolist() == [r["global_epoch"] for r in log if r["task"] < 2]
    assert np.concatenate([line.get_ydata() for line in val]) == pytest.approx(
        [r["val_accuracy"] for r in log if r["task"] < 2])


def test_the_training_curves_as_data(train_logs):
    log = train_logs[CIL][0]
    assert [(r["task"], r["epoch"], r["global_epoch"]) for r in log] == [
        (0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 3), (2, 0, 4), (2, 1, 5)]
    assert log[4]["loss"] == pytest.approx(2.0 - 0.2) and log[4]["accuracy"] == 42.0
    assert "val_accuracy" not in log[0] and np.isnan(train_logs[MTIL][0][-1]["val_accuracy"])
    records = training_records(train_logs)
    assert len(records) == sum(map(sum, EPOCHS.values()))
    assert records[0] == {"experiment": CIL, "seed": 0, "task": 0, "epoch": 0, "global_epoch": 0, "loss": 2.0,
                          "accuracy": 40.0}
    assert all(set(r) == set(records[0]) for r in records)  # nothing else: no validation, no times


def test_every_figure_rule_that_colours_by_experiment_gets_the_workflow_colour_table():
    """The table is computed once (common.smk) from every configured experiment; the rules pass it, or the
    experiment's own colour, to their scripts."""
    common = (REPO / "workflow/rules/common.smk").read_text()
    assert "EXPERIMENT_COLOURS = canonical(experiment_colours(list(EXPERIMENTS)))" in common
    rules = {block.split(":")[0]: block for block in (REPO / "workflow/rules/figures.smk").read_text().split("\nrule ")}
    for rule in ("accuracy_curves", "overview"):
        assert "colours=EXPERIMENT_COLOURS," in rules[rule], rule
    for rule in ("forgetting", "memory_sizes", "training_curves"):
        assert "colour=experiment_colour," in rules[rule], rule


def test_the_tiny_run_has_a_training_figure_and_the_training_data_of_every_run(tiny_run):
    from conftest import TINY_CONFIG
    from ifcl.files import read_csv
    from ifcl.registry import num_tasks

    figures = tiny_run / "results" / "figures"
    records = read_json(figures / "training_curves.json")
    for exp, spec in TINY_CONFIG["experiments"].items():
        for seed in spec["seeds"]:
            check_image(figures / exp / f"seed{seed}" / "training")
            run = tiny_run / "results" / "runs" / exp / f"seed{seed}"
            logs = [read_csv(run / f"task{t}" / "train_log.csv") for t in range(num_tasks(spec))]
            mine = [r for r in records if (r["experiment"], r["seed"]) == (exp, seed)]
            assert [(r["task"], r["epoch"]) for r in mine] == [(t, int(row["epoch"])) for t, rows in enumerate(logs)
                                                               for row in rows]
            assert [r["global_epoch"] for r in mine] == list(range(len(mine)))
            assert [r["loss"] for r in mine] == pytest.approx([float(row["loss"]) for rows in logs for row in rows])
    assert {(r["experiment"], r["seed"]) for r in records} == {(exp, s) for exp, spec in
                                                              TINY_CONFIG["experiments"].items() for s in spec["seeds"]}
