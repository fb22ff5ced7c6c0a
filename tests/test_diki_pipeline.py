"""DIKI through the workflow on a tiny CLIP pretrained in the pipeline: per-task files, a complete MTIL matrix with
Transfer / Average / Last, tasks independent of each other, exact re-runs, and the sequential-RNG option."""
import copy
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_DIKI_CONFIG, snakemake
from ifcl.files import read_json
from ifcl.state import load_state

pytestmark = pytest.mark.pipeline
RUN = ("results", "runs", "tiny_diki", "seed0")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("diki")
    snakemake(wd, TINY_DIKI_CONFIG)
    return wd


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
    from ifcl.diki_chain import DIKIModel, _batches
    from ifcl.models.clip_prefix import prompts, tokenize
    from ifcl.runs import load_model

    model = load_model(TINY_DIKI_CONFIG, "tiny_diki", 0, 1, root=workdir)
    assert isinstance(model, DIKIModel) and len(model.task_prefixes()) == 2 and len(model.gaussians) == 2
    monkeypatch.chdir(workdir)
    accuracies = []
    for name in TINY_DIKI_CONFIG["experiments"]["tiny_diki"]["sequence"]:
        test = f"data/prepared/{name}/test.csv"
        images, labels = next(iter(_batches(test, TINY_DIKI_CONFIG["backbones"]["tiny_clip"], 1000, "cpu")))
        names = class_names_of(read_manifest(test))
        tokens = tokenize(prompts(names, TINY_DIKI_CONFIG["datasets"][name]["template"]), model.model.clip.context_length)
        logits = model(images, tokens)
        accuracies.append(100.0 * float((logits.argmax(1) == labels).float().mean()))
    assert accuracies == pytest.approx(read_json(workdir.joinpath(*RUN) / "task1" / "eval.json")["accuracy"], abs=1e-6)


def test_frozen_features_are_shared_and_tasks_do_not_depend_on_each_other(workdir):
    proc = snakemake(workdir, TINY_DIKI_CONFIG, "--dry-run", "--forcerun", "gaussian", "train_prefix")
    planned = re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    output: (.*)$", proc.stdout, flags=re.M)
    assert sorted(r for r, _ in planned) == ["accuracy_curves", "accuracy_matrix", "aggregate_run", "evaluate_diki",
                                            "evaluate_diki", "gaussian", "gaussian", "lambda_histograms", "overview",
                                            "summarize", "train_prefix", "train_prefix"]
    # task 1's prefix needs nothing of task 0
    dag = snakemake(workdir, TINY_DIKI_CONFIG, "results/runs/tiny_diki/seed0/task1/prefix.safetensors",
                    "--dry-run", "--forcerun", "train_prefix").stdout  # (targets before --forcerun's list)
    assert "task1/prefix.safetensors" in dag
    assert "task0" not in dag


def test_rerunning_a_task_reproduces_its_files_exactly(workdir):
    run = workdir.joinpath(*RUN)
    files = [run / "task1" / n for n in ("gaussian.safetensors", "prefix.safetensors", "eval.json")]
    before = {p: p.read_bytes() for p in files}
    for p in files:
        p.unlink()
    snakemake(workdir, TINY_DIKI_CONFIG)
    assert {p: p.read_bytes() for p in files} == before


def test_sequential_rng_chains_the_tasks(tmp_path):
    config = copy.deepcopy(TINY_DIKI_CONFIG)
    config["experiments"]["tiny_diki"]["rng"] = "sequential"
    config["experiments"]["tiny_diki"]["calibration"]["batchwise"] = False  # the per-sample path works too
    snakemake(tmp_path, config)
    run = tmp_path.joinpath(*RUN)
    state0, _ = load_state(run / "task0" / "prefix.safetensors")
    assert state0["rng_state"].dtype == torch.uint8
    # task 1's training continues task 0's random stream, so it needs task 0's prefix file
    dag = snakemake(tmp_path, config, "results/runs/tiny_diki/seed0/task1/prefix.safetensors",
                    "--dry-run", "--forcerun", "train_prefix").stdout
    assert "task0/prefix.safetensors" in dag
    assert not np.isnan(pd.read_csv(run / "acc_matrix.csv", index_col=0).to_numpy()).any()


def test_decoded_image_caches_give_the_same_files(workdir, tmp_path):
    """image_cache: deterministic: training, validation and evaluation read CLIP-preprocessed images from the
    decoded-image caches, and every file of the run is the same bit for bit."""
    wd = tmp_path / "cached"
    shutil.copytree(workdir, wd, symlinks=True)
    config = copy.deepcopy(TINY_DIKI_CONFIG)
    config["experiments"]["tiny_diki"]["image_cache"] = "deterministic"
    snakemake(wd, config, "runs")
    run, cached_run = workdir.joinpath(*RUN), wd.joinpath(*RUN)
    before = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    after = {p.relative_to(cached_run): p.read_bytes() for p in sorted(cached_run.rglob("*")) if p.is_file()}
    assert after == before
    assert "decoded-image cache data/decoded/tc_shapes/val-clip-16.npy" in \
        (wd / "logs" / "train_prefix" / "tiny_diki" / "seed0" / "task0.log").read_text()
    assert "decoded-image cache data/decoded/tc_textures/test-clip-16.npy" in \
        (wd / "logs" / "evaluate_diki" / "tiny_diki" / "seed0" / "task1.log").read_text()
