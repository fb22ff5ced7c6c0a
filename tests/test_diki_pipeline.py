"""DIKI through the workflow (the session's `tiny_run`: a tiny CLIP pretrained in the pipeline): per-task files, a
complete MTIL matrix with Transfer / Average / Last, λ per test image, tasks independent of each other and the
sequential-RNG option. Exact re-runs and the decoded-image caches of DIKI tasks are checked with the other methods'
in test_pipeline.py."""
import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_CONFIG, snakemake
from ifcl.files import read_json
from ifcl.state import load_state

pytestmark = pytest.mark.pipeline
RUN = ("results", "runs", "tiny_diki", "seed0")


@pytest.fixture
def workdir(tiny_run):
    return tiny_run


def test_per_task_files_and_a_complete_mtil_matrix(workdir):
    run = workdir.joinpath(*RUN)
    for t in range(2):
        for name in ("gaussian.safetensors", "prefix.safetensors", "train_log.csv", "eval.json"):
            assert (run / f"task{t}" / name).is_file(), (t, name)
    prefix, meta = load_state(run / "task0" / "prefix.safetensors")
    assert meta["trainable_parameters"] == 2 * 4 * 32 + 2 * 4 * 32 == sum(v.numel() for v in prefix.values())
    assert sorted(prefix) == ["text.0.key", "text.0.value", "visual.0.key", "visual.0.value"]
    assert meta["best_epoch"] in (0, 1) and meta["val_accuracy"] >= 0  # tc_shapes has a validation split
    _, meta1 = load_state(run / "task1" / "prefix.safetensors")
    assert meta1["best_epoch"] == 1 and np.isnan(meta1["val_accuracy"])  # tc_textures has none: last epoch
    gauss, gmeta = load_state(run / "task0" / "gaussian.safetensors")
    assert gauss["covariance"].shape == (16, 16) and gmeta["images"] == 24
    acc = pd.read_csv(run / "acc_matrix.csv", index_col=0).to_numpy()
    assert acc.shape == (2, 2) and not np.isnan(acc).any()  # unseen datasets are evaluated too
    metrics = read_json(run / "metrics.json")
    assert metrics["transfer"] == pytest.approx(acc[0, 1], abs=1e-3)  # the CSV keeps 4 decimals
    assert metrics["last"] == pytest.approx(acc[1].mean(), abs=1e-3) and metrics["average"] == pytest.approx(acc.mean(), abs=1e-3)
    assert len(metrics["zero_shot_per_task"]) == 2
    assert metrics["zero_shot_transfer"] == metrics["zero_shot_per_task"][1]  # the frozen CLIP's Transfer
    summary = (workdir / "results" / "summary" / "summary.md").read_text()
    assert "| tiny_diki | diki | tc_shapes > tc_textures | 2 | 1 |" in summary and "Transfer" in summary
    assert "### tiny_diki: per dataset" in summary


def test_lambda_is_counted_per_test_image_and_plotted(workdir):
    """eval.json holds a 20-bin histogram of λ per dataset (every test image once) beside the mean λ; the λ figure
    and the run's other figures are drawn."""
    run = workdir.joinpath(*RUN)
    for t in range(2):
        e = read_json(run / f"task{t}" / "eval.json")
        assert e["weight_bin_edges"] == pytest.approx(np.linspace(0, 1, 21))
        assert [sum(h) for h in e["weight_histogram"]] == [9, 9]  # 3 classes x 3 test images per dataset
        centres = (np.arange(20) + 0.5) / 20
        for counts, mean in zip(e["weight_histogram"], e["mean_weight"]):  # the binned mean is within half a bin
            assert np.dot(counts, centres) / 9 == pytest.approx(mean, abs=0.025)
    figures = workdir.joinpath("results", "figures", *RUN[2:])
    for name in ("lambda", "acc_matrix"):
        assert (figures / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (figures / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (workdir / "results" / "figures" / "tiny_diki" / "forgetting.png").exists()  # class-incremental only


def test_the_model_after_task_1_classifies_as_its_evaluation_did(workdir, monkeypatch):
    """ifcl.runs.load_model on a DIKI run: a module with the prefixes and Gaussians of tasks 0 and 1 whose calibrated
    logits give the accuracies of task1/eval.json (each tiny test set is one evaluation batch)."""
    from ifcl.data.manifest import class_names_of, read_manifest
    from ifcl.models.diki import DIKIModel
    from ifcl.steps.diki import _batches
    from ifcl.models.clip_prefix import prompts, tokenize
    from ifcl.runs import load_model

    model = load_model(TINY_CONFIG, "tiny_diki", 0, 1, root=workdir)
    assert isinstance(model, DIKIModel) and len(model.task_prefixes()) == 2 and len(model.gaussians) == 2
    monkeypatch.chdir(workdir)
    accuracies = []
    for name in TINY_CONFIG["experiments"]["tiny_diki"]["sequence"]:
        test = f"data/prepared/{name}/test.csv"
        images, labels = next(iter(_batches(test, TINY_CONFIG["backbones"]["tiny_clip"], 1000, "cpu")))
        names = class_names_of(read_manifest(test))
        tokens = tokenize(prompts(names, TINY_CONFIG["datasets"][name]["template"]), model.model.clip.context_length)
        logits = model(images, tokens)
        accuracies.append(100.0 * float((logits.argmax(1) == labels).float().mean()))
    assert accuracies == pytest.approx(read_json(workdir.joinpath(*RUN) / "task1" / "eval.json")["accuracy"], abs=1e-6)


def test_frozen_features_are_shared_and_tasks_do_not_depend_on_each_other(workdir):
    proc = snakemake(workdir, TINY_CONFIG, "--dry-run", "--forcerun", "gaussian", "train_prefix")
    planned = re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    output: (.*)$", proc.stdout, flags=re.M)
    assert sorted(r for r, _ in planned) == ["accuracy_curves", "accuracy_matrix", "aggregate_run", "evaluate_diki",
                                            "evaluate_diki", "gaussian", "gaussian", "lambda_histograms", "overview",
                                            "summarize", "train_prefix", "train_prefix", "training_curves",
                                            "training_curves_data"]
    # task 1's prefix needs nothing of task 0
    dag = snakemake(workdir, TINY_CONFIG, "results/runs/tiny_diki/seed0/task1/prefix.safetensors",
                    "--dry-run", "--forcerun", "train_prefix").stdout  # (targets before --forcerun's list)
    assert "task1/prefix.safetensors" in dag
    assert "task0" not in dag


def test_sequential_rng_chains_the_tasks(copy_of_tiny_run):
    config = copy.deepcopy(TINY_CONFIG)
    config["experiments"]["tiny_diki"]["rng"] = "sequential"
    config["experiments"]["tiny_diki"]["calibration"]["batchwise"] = False  # the per-sample path works too
    proc = snakemake(copy_of_tiny_run, config, "runs")
    ran = re.findall(r"^(?:local)?rule (\w+):", proc.stdout + proc.stderr, re.M)
    assert ran.count("train_prefix") == ran.count("evaluate_diki") == 2 and "gaussian" not in ran
    run = copy_of_tiny_run.joinpath(*RUN)
    state0, _ = load_state(run / "task0" / "prefix.safetensors")
    assert state0["rng_state"].dtype == torch.uint8
    # task 1's training continues task 0's random stream, so it needs task 0's prefix file
    dag = snakemake(copy_of_tiny_run, config, "results/runs/tiny_diki/seed0/task1/prefix.safetensors",
                    "--dry-run", "--forcerun", "train_prefix").stdout
    assert "task0/prefix.safetensors" in dag
    assert not np.isnan(pd.read_csv(run / "acc_matrix.csv", index_col=0).to_numpy()).any()


def test_bench_bf16_reports_the_drift_of_a_diki_run(workdir):
    """`ifcl bench bf16` on a finished DIKI run: one row per dataset of the sequence, a small drift."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ifcl.cli", "bench", "bf16", "--configfile", "config.yaml",
                           "tiny_diki"], cwd=workdir, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tc_")]
    assert [r.split("|")[1].strip() for r in rows] == TINY_CONFIG["experiments"]["tiny_diki"]["sequence"]
    assert all(0.99 < float(r.split("|")[4]) <= 1.0 for r in rows)  # min cosine
