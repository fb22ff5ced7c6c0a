"""The workflow end to end on the tiny generated config (the session's `tiny_run`): per-task files for 2 seeds,
metrics, summary, figures and report; nothing to do on a second run; a task-level change re-runs exactly the affected
tasks; re-running tasks reproduces their files. DIKI's own checks are in test_diki_pipeline.py."""
import copy
import hashlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CIL_EXPERIMENTS, TINY_CONFIG, snakemake
from ifcl.files import read_json
from ifcl.state import load_state

pytestmark = pytest.mark.pipeline
EXP = "tiny_seq-lora"
TASK_FILES = ("reduction.safetensors", "adapter.safetensors", "train_log.csv", "eval.json")


@pytest.fixture
def workdir(tiny_run):
    return tiny_run


def run_dir(wd, seed):
    return wd / "results" / "runs" / EXP / f"seed{seed}"


def planned_jobs(proc):
    """(rule, output) pairs of a dry run's job list."""
    return re.findall(r"^rule (\w+):\n(?:    .*\n)*?    output: (.*)$", proc.stdout, flags=re.M)


def test_every_run_has_per_task_files_matrix_and_metrics(workdir):
    for seed in (0, 1):
        run = run_dir(workdir, seed)
        tasks = read_json(run / "tasks.json")
        assert len(tasks["tasks"]) == 3 and sorted(sum(tasks["tasks"], [])) == list(range(6))
        for t in range(3):
            for name in TASK_FILES:
                assert (run / f"task{t}" / name).is_file(), (seed, t, name)
            adapter, meta = load_state(run / f"task{t}" / "adapter.safetensors")
            assert meta["task"] == t and meta["trainable_parameters"] == 2 * 2 * 16 * 2 + 2 * 16 + 2  # blocks x (k, v) x d x rank + head
        acc = pd.read_csv(run / "acc_matrix.csv", index_col=0).to_numpy()
        assert acc.shape == (3, 3)
        assert np.isnan(acc[np.triu_indices(3, 1)]).all() and not np.isnan(acc[np.tril_indices(3)]).any()
        metrics = read_json(run / "metrics.json")
        assert metrics["final"] == pytest.approx(read_json(run / "task2" / "eval.json")["accuracy"], abs=1e-6)
        assert set(metrics) >= {"final", "average", "forgetting", "bwt", "curve"}
        assert (workdir / "logs" / "train_task" / EXP / f"seed{seed}" / "task2.log").read_text().strip()
    # the two seeds use different class orders (shuffled) and different random reductions
    assert read_json(run_dir(workdir, 0) / "tasks.json") != read_json(run_dir(workdir, 1) / "tasks.json")
    summary = pd.read_csv(workdir / "results" / "summary" / "summary.csv")  # one row per (experiment, metric)
    assert sorted(summary.experiment.unique()) == ["tiny_diki", "tiny_icarl", "tiny_inflora", "tiny_inflora-ca",
                                                   "tiny_lwf-vr", "tiny_moe-adapters", EXP, "tiny_wise-ft",
                                                   "tiny_zscl"]
    final = summary[(summary.experiment == EXP) & (summary.metric == "final")].iloc[0]
    finals = [read_json(run_dir(workdir, s) / "metrics.json")["final"] for s in (0, 1)]
    assert final.seeds == 2 and pd.isna(final.paper)  # nothing published for the tiny experiments
    assert final["mean"] == pytest.approx(np.mean(finals)) and final["std"] == pytest.approx(np.std(finals, ddof=1))
    assert "± " in (workdir / "results" / "summary" / "summary.md").read_text()


def test_every_figure_and_the_report(workdir):
    """Per run an annotated accuracy matrix, per InfLoRA run its memory, per DIKI run its λ histograms, per
    class-incremental experiment the forgetting, the curves (also as data) and the overview, each PNG and PDF;
    `snakemake --report` puts them in one HTML file."""
    figures = workdir / "results" / "figures"
    experiments = TINY_CONFIG["experiments"]
    stems = ["accuracy_curves", "overview"] + [f"{exp}/forgetting" for exp in CIL_EXPERIMENTS]
    stems += [f"{exp}/seed{s}/acc_matrix" for exp, spec in experiments.items() for s in spec["seeds"]]
    stems += [f"{exp}/seed0/memory" for exp in ("tiny_inflora", "tiny_inflora-ca")] + ["tiny_diki/seed0/lambda"]
    stems += [f"{exp}/seed{s}/training" for exp, spec in experiments.items() for s in spec["seeds"]]
    for stem in stems:
        assert (figures / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
        assert (figures / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-", stem
    assert sorted(p.relative_to(figures).as_posix() for p in figures.rglob("*.png")) == sorted(f"{s}.png" for s in stems)
    curves = read_json(figures / "accuracy_curves.json")
    assert {(r["experiment"], r["seed"]) for r in curves} == {(exp, s) for exp, spec in experiments.items()
                                                              for s in spec["seeds"]}
    assert [r["accuracy"] for r in curves if r["experiment"] == EXP and r["seed"] == 1] == pytest.approx(
        read_json(run_dir(workdir, 1) / "metrics.json")["curve"])

    report = workdir / "report.html"
    snakemake(workdir, TINY_CONFIG, "--report", str(report))
    html = report.read_text()
    for text in ("InfLoRA and DIKI, task by task", "Summary", "Overview", "Accuracy matrices", "Forgetting",
                 "InfLoRA memory", "DIKI \\u03bb", "summary.html", "overview.png", "acc_matrix.png", "memory.png",
                 "lambda.png", "Training", "training.png"):
        assert text in html, text


def reversed_keys(obj):
    if isinstance(obj, dict):
        return {k: reversed_keys(obj[k]) for k in reversed(list(obj))}
    return obj


def test_second_run_has_nothing_to_do_whatever_the_key_order_of_the_config(workdir):
    proc = snakemake(workdir, TINY_CONFIG)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    proc = snakemake(workdir, reversed_keys(TINY_CONFIG))
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_a_task_level_change_reruns_only_that_task_and_its_dependants(copy_of_tiny_run):
    workdir = copy_of_tiny_run
    config = copy.deepcopy(TINY_CONFIG)
    config["experiments"][EXP]["task_overrides"] = {1: {"epochs": 2}}
    jobs = planned_jobs(snakemake(workdir, config, "--dry-run"))
    planned = {(rule, out.split(",")[0].strip()) for rule, out in jobs}
    expected_tasks = {(rule, f"results/runs/{EXP}/seed{s}/task{t}/{name}")
                      for s in (0, 1) for t in (1, 2)
                      for rule, name in (("train_task", "adapter.safetensors"), ("evaluate_task", "eval.json"))}
    task_jobs = {(r, o) for r, o in planned if r in ("reduction", "train_task", "evaluate_task")}
    assert task_jobs == expected_tasks
    assert {r for r, _ in planned} == {"train_task", "evaluate_task", "aggregate_run", "summarize", "accuracy_curves",
                                      "overview", "accuracy_matrix", "forgetting", "training_curves",
                                      "training_curves_data"}

    untouched = {p: p.read_bytes() for s in (0, 1) for p in (run_dir(workdir, s) / "task0").iterdir()}
    old_t1 = (run_dir(workdir, 0) / "task1" / "train_log.csv").read_text()
    snakemake(workdir, config, "runs")  # the jobs planned above, but for the summary and figures
    assert all(p.read_bytes() == b for p, b in untouched.items())
    new_t1 = (run_dir(workdir, 0) / "task1" / "train_log.csv").read_text()
    assert len(new_t1.splitlines()) == 3 and len(old_t1.splitlines()) == 2  # header + one row per epoch
    assert "Nothing to be done" in snakemake(workdir, config, "runs", "--dry-run").stdout


def test_moe_adapters_run_has_its_experts_routers_frozen_set_and_autoencoders(workdir):
    """Per task: the experts and the routers of the tasks so far with the experts frozen after it (state), its DDAS
    autoencoder, its log and evaluation; the reference autoencoder once, in task 0. The frozen set grows by the
    2 most chosen experts of every block and tower; DDAS sent every test image somewhere."""
    spec = TINY_CONFIG["experiments"]["tiny_moe-adapters"]
    run = workdir / "results" / "runs" / "tiny_moe-adapters" / "seed0"
    assert sorted(p.name for p in (run / "task0").iterdir() if not p.name.endswith(".sha256")) == [
        "autoencoder.safetensors", "eval.json", "reference_autoencoder.safetensors", "state.safetensors",
        "train_log.csv"]
    assert not (run / "task1" / "reference_autoencoder.safetensors").exists()
    frozen_after = []
    for t in (0, 1):
        state, meta = load_state(run / f"task{t}" / "state.safetensors")
        routers = {int(k.split(".")[3]) for k in state if ".router." in k}
        assert routers == set(range(t + 1)) and meta["task"] == t
        masks = {k: v for k, v in state.items() if k.startswith("frozen.")}
        assert len(masks) == 2 * 2 and all(v.shape == (4,) and v.dtype == torch.bool for v in masks.values())
        frozen_after.append({k: set(torch.nonzero(v).flatten().tolist()) for k, v in masks.items()})
        assert meta["frozen_after"] == sum(len(v) for v in frozen_after[-1].values())
        assert all(len(v) >= 2 for v in frozen_after[-1].values())  # at least the task's own top 2
        counts = meta["selection_counts"]
        assert all(len(c) == 4 and sum(c) > 0 for c in counts.values())
        ae, ae_meta = load_state(run / f"task{t}" / "autoencoder.safetensors")
        assert ae_meta["slot"] == t + 1 and ae_meta["iterations"] == spec["ddas"]["iterations"]
        assert ae["encoder.0.weight"].shape == (spec["ddas"]["hidden"], ae_meta["input_dim"])
        choices = read_json(run / f"task{t}" / "eval.json")["ddas_choices"]
        assert [sum(c) for c in choices] == [9, 9] and all(len(c) == 3 for c in choices)
    assert all(frozen_after[0][k] <= frozen_after[1][k] for k in frozen_after[0])
    _, meta1 = load_state(run / "task1" / "state.safetensors")
    assert meta1["frozen_before"] == sum(len(v) for v in frozen_after[0].values())
    _, ref = load_state(run / "task0" / "reference_autoencoder.safetensors")
    assert ref["slot"] == 0 and ref["iterations"] == spec["ddas"]["reference_iterations"]


def test_inflora_run_has_designed_reductions_and_memories(workdir):
    from ifcl.steps.inflora import load_memory

    run = workdir / "results" / "runs" / "tiny_inflora" / "seed0"
    assert not (run / "task2" / "memory.safetensors").exists()  # nothing reads the memory after the last task
    for t in range(3):
        red, meta = load_state(run / f"task{t}" / "reduction.safetensors")
        assert set(red) == {"blocks.1.down_k", "blocks.1.down_v"} and torch.equal(red["blocks.1.down_k"], red["blocks.1.down_v"])
        assert red["blocks.1.down_k"].norm(dim=1) == pytest.approx(torch.full((2,), 3 ** -0.5), abs=1e-5)
        if t:  # designed orthogonal to the old space of the memory after task t-1
            (mem,) = load_memory(run / f"task{t - 1}" / "memory.safetensors", [1])
            old_space = mem.basis if mem.kind == "remove" else torch.eye(16) - mem.projector()
            assert (red["blocks.1.down_k"] @ old_space).abs().max() < 1e-5
    (m0,) = load_memory(run / "task0" / "memory.safetensors", [1])
    (m1,) = load_memory(run / "task1" / "memory.safetensors", [1])
    assert m1.old_space_dim() >= m0.old_space_dim() >= 1


def test_inflora_ca_aligns_every_head_after_each_task(workdir):
    run = workdir / "results" / "runs" / "tiny_inflora-ca" / "seed0"
    stats, meta = load_state(run / "task1" / "class_stats.safetensors")
    assert stats["means"].shape == (2, 16) and stats["covs"].shape == (2, 16, 16) and meta["classes"] == [2, 3]
    assert not (run / "task0" / "aligned_heads.safetensors").exists()
    for t in (1, 2):
        heads, _ = load_state(run / f"task{t}" / "aligned_heads.safetensors")
        assert sorted(heads) == sorted(f"heads.{s}.{k}" for s in range(t + 1) for k in ("weight", "bias"))
        adapter, _ = load_state(run / f"task{t}" / "adapter.safetensors")
        assert not torch.equal(heads[f"heads.{t}.weight"], adapter["head.weight"])  # the new head was aligned too
    assert len(pd.read_csv(run / "task2" / "align_log.csv")) == 2


# Per run: the state files regenerated from those of the earlier tasks (with what depends on them). Between them,
# this test, the decoded-image cache test below (image_cache: deterministic re-runs InfLoRA+CA's class statistics,
# alignments and evaluations and DIKI's prefixes and evaluations, and must give the same bytes) and
# test_reproducibility.py (a deleted InfLoRA task regenerated with the task after it) re-run every kind of state file.
RERUN = {
    (EXP, 1): ("task2/reduction.safetensors", "task2/adapter.safetensors", "task2/eval.json"),
    ("tiny_inflora-ca", 0): ("task1/memory.safetensors", "task2/reduction.safetensors", "task2/adapter.safetensors",
                             "task2/class_stats.safetensors", "task2/aligned_heads.safetensors", "task2/eval.json"),
    ("tiny_diki", 0): ("task1/gaussian.safetensors", "task1/eval.json"),
    ("tiny_moe-adapters", 0): ("task0/reference_autoencoder.safetensors", "task1/state.safetensors",
                               "task1/autoencoder.safetensors", "task1/eval.json"),
}


def test_rerunning_tasks_from_earlier_files_reproduces_them_exactly(copy_of_tiny_run):
    """Deleted state files are made again from the earlier tasks' files, byte for byte (both runs in one Snakemake
    run)."""
    deleted = {}
    for (exp, seed), names in RERUN.items():
        run = copy_of_tiny_run / "results" / "runs" / exp / f"seed{seed}"
        deleted.update({run / name: (run / name).read_bytes() for name in names})
    for p in deleted:
        p.unlink()
    snakemake(copy_of_tiny_run, TINY_CONFIG, *(str(p.relative_to(copy_of_tiny_run)) for p in deleted))
    differ = [str(p.relative_to(copy_of_tiny_run)) for p, b in deleted.items() if p.read_bytes() != b]
    assert not differ


def test_a_users_class_folder_tree_goes_through_the_same_manifest_and_split_rules(tmp_path, tiny_config):
    from PIL import Image

    root = tmp_path / "my_images"
    for c, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (20, 20), colour).save(root / f"class_{c}" / f"{i}.jpg")
    tiny_config["datasets"]["mine"] = {"type": "folder", "path": str(root),
                                       "split": {"rule": "random", "test_fraction": 0.2, "seed": 0},
                                       "train_transform": "random-resized-crop-flip", "test_transform": "resize"}
    tiny_config["experiments"] = {"mine_seq-lora": {**tiny_config["experiments"][EXP], "dataset": "mine"}}
    wd = tmp_path / "wd"
    snakemake(wd, tiny_config, "results/runs/mine_seq-lora/seed0/tasks.json")
    train = pd.read_csv(wd / "data" / "prepared" / "mine" / "train.csv")
    assert len(train) == 12 and sorted(train["class_name"].unique()) == ["class_0", "class_1", "class_2"]
    tasks = read_json(wd / "results" / "runs" / "mine_seq-lora" / "seed0" / "tasks.json")
    assert tasks["class_names"] == ["class_0", "class_1", "class_2"] and len(tasks["tasks"]) == 3
    assert not (wd / "data" / "generated").exists() and sorted(p.name for p in root.iterdir()) == ["class_0", "class_1", "class_2"]


def test_the_model_after_task_k_loads_and_reproduces_its_evaluation(workdir, monkeypatch, tmp_path):
    """ifcl.runs.load_model: "the model after task 1" from the run's files gives the accuracy its eval.json records;
    `ifcl run show` lists every file with its sha256 and refuses a tampered state, naming it."""
    from ifcl.steps.cil import task_loader
    from ifcl.config import load_config
    from ifcl.runs import load_model
    from ifcl.training import predict_logits

    exp = "tiny_inflora"
    config = load_config(TINY_CONFIG)  # with the schema's defaults, as the rules saw it
    spec = config["experiments"][exp]
    run = workdir / "results" / "runs" / exp / "seed0"
    tasks = read_json(run / "tasks.json")
    seen = tasks["tasks"][0] + tasks["tasks"][1]
    model = load_model(TINY_CONFIG, exp, 0, 1, root=workdir)
    monkeypatch.chdir(workdir)  # manifests list paths relative to the pipeline's working directory
    loader = task_loader(f"data/prepared/{spec['dataset']}/test.csv", seen, tasks, config["datasets"][spec["dataset"]],
                     config["backbones"][spec["backbone"]], False, 64, "cpu")
    logits, targets = predict_logits(model, loader)
    assert logits.shape[1] == len(seen)
    accuracy = 100.0 * float((logits.argmax(1) == targets).float().mean())
    assert accuracy == pytest.approx(read_json(run / "task1" / "eval.json")["accuracy"], abs=1e-6)
    with pytest.raises(FileNotFoundError, match="no task9 folder"):
        load_model(TINY_CONFIG, exp, 0, 9, root=workdir)

    show = subprocess.run([sys.executable, "-m", "ifcl.cli", "run", "show", str(run)], capture_output=True, text=True)
    assert show.returncode == 0, show.stderr
    adapter = run / "task1" / "adapter.safetensors"
    assert f"task1/adapter.safetensors" in show.stdout
    assert hashlib.sha256(adapter.read_bytes()).hexdigest() in show.stdout
    tampered = tmp_path / "tampered"
    shutil.copytree(run, tampered)
    data = bytearray((tampered / "task1" / "adapter.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one byte of a tensor changed
    (tampered / "task1" / "adapter.safetensors").write_bytes(bytes(data))
    show = subprocess.run([sys.executable, "-m", "ifcl.cli", "run", "show", str(tampered)], capture_output=True, text=True)
    assert show.returncode != 0 and "task1/adapter.safetensors" in show.stderr and "digest" in show.stderr


def test_decoded_image_caches_change_nothing_or_only_what_the_option_says(workdir, copy_of_tiny_run):
    """image_cache: deterministic gives the same files bit for bit: InfLoRA+CA's evaluation and class statistics read
    the test-transform cache, DIKI's training, validation and evaluation read CLIP-preprocessed images. all
    (InfLoRA: also the training passes, cropped on the device) trains on the cache. One Snakemake run for the three."""
    wd = copy_of_tiny_run
    config = copy.deepcopy(TINY_CONFIG)
    config["experiments"]["tiny_inflora-ca"]["image_cache"] = "deterministic"
    config["experiments"]["tiny_diki"]["image_cache"] = "deterministic"
    config["experiments"]["tiny_inflora"]["image_cache"] = "all"
    # every file of the InfLoRA+CA and DIKI runs; InfLoRA's task 0 and the design of task 1 (each of its rules that
    # reads the training cache)
    inflora = "results/runs/tiny_inflora/seed0"
    snakemake(wd, config, "results/runs/tiny_inflora-ca/seed0/acc_matrix.csv", "results/runs/tiny_diki/seed0/acc_matrix.csv",
              f"{inflora}/task0/eval.json", f"{inflora}/task1/reduction.safetensors")
    assert sorted(p.name for p in (wd / "data" / "decoded" / "tiny_shapes").iterdir()) == ["test-resize-16.npy",
                                                                                       "train-resize-16.npy"]

    def files(root, exp):
        run = root / "results" / "runs" / exp / "seed0"
        return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    assert files(wd, "tiny_inflora-ca") == files(workdir, "tiny_inflora-ca")
    assert files(wd, "tiny_diki") == files(workdir, "tiny_diki")
    logs = wd / "logs"
    for rule, split in (("evaluate_task", "test"), ("class_stats", "train")):  # class statistics: train images
        assert f"decoded-image cache data/decoded/tiny_shapes/{split}-resize-16.npy" in \
            (logs / rule / "tiny_inflora-ca" / "seed0" / "task1.log").read_text()
    for rule, task, cache in (("train_prefix", 0, "tc_shapes/val"), ("evaluate_diki", 1, "tc_textures/test")):
        assert f"decoded-image cache data/decoded/{cache}-clip-16.npy" in \
            (logs / rule / "tiny_diki" / "seed0" / f"task{task}.log").read_text()
    for rule, task in (("train_task", 0), ("reduction", 0), ("memory", 0), ("reduction", 1)):
        assert "decoded-image cache data/decoded/tiny_shapes/train-resize-16.npy" in \
            (logs / rule / "tiny_inflora" / "seed0" / f"task{task}.log").read_text()
    cached, plain = files(wd, "tiny_inflora"), files(workdir, "tiny_inflora")
    assert cached["task0/adapter.safetensors"] != plain["task0/adapter.safetensors"]
