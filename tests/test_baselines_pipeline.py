"""The compared methods end to end on a tiny generated config, in their own working directory: L2P, DualPrompt,
CODA-Prompt and SD-LoRA (rules train_baseline / evaluate_baseline) and the joint upper bound, 3 tasks each (joint:
one). Every run has its per-task files, matrix and metrics; "the model after task t" rebuilt from the files gives the
recorded evaluation; a second run has nothing to do; a deleted task file is made again byte for byte."""
import copy
import re

import pytest
import yaml

from conftest import TINY_CONFIG, changed, scheduled_rules, snakemake, tree
from ifcl.files import read_json
from ifcl.state import load_state

pytestmark = pytest.mark.pipeline

TRAIN = {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0, "epochs": 1, "batch_size": 8,
         "schedule": "inflora-cosine"}
COMMON = {"dataset": "tiny_shapes", "backbone": "tiny_vit", "seeds": [0], "num_tasks": 3, "class_order": "native",
          "train": TRAIN, "task_overrides": {}, "eval_batch_size": 16}
EXPERIMENTS = {
    "tiny_l2p": {"method": "l2p", "prompt": {"pool_size": 4, "length": 2, "layers": [0], "top_k": 2,
                                             "key_loss": "official"}},
    "tiny_dualprompt": {"method": "dualprompt", "prompt": {"pool_size": 3, "length": 2, "layers": [1],
                                                           "g_length": 2, "g_layers": [0]}},
    "tiny_coda-prompt": {"method": "coda-prompt", "prompt": {"pool_size": 6, "length": 2, "layers": [0, 1],
                                                             "ortho_mu": 0.1}},
    "tiny_sd-lora": {"method": "sd-lora", "rank": 2, "lora_blocks": "all",
                     "sdlora": {"init_magnitude": 0.8, "reset_magnitudes": True, "ranks": [2, 1],
                                "rank_starts": [0, 2]},
                     "train": {**TRAIN, "optimizer": "sgd", "momentum": 0.9, "schedule": "constant"}},
    "tiny_joint": {"method": "joint", "num_tasks": 1, "rank": 2, "lora_blocks": "all"},
}
BASELINES = ("tiny_l2p", "tiny_dualprompt", "tiny_coda-prompt", "tiny_sd-lora")

# the compared methods' own keys (test_config_audit.py audits the rest): key -> (change, the rules that must re-run)
STEPS = {"train_baseline", "evaluate_baseline"}
L2P, DUAL, CODA, SD = (f"experiments.{n}" for n in BASELINES)
READERS = {
    "cil_experiment.prompt.pool_size": ({f"{L2P}.prompt.pool_size": 5}, STEPS),
    "cil_experiment.prompt.length": ({f"{CODA}.prompt.length": 4}, STEPS),
    "cil_experiment.prompt.layers": ({f"{DUAL}.prompt.layers": [0]}, STEPS),
    "cil_experiment.prompt.top_k": ({f"{L2P}.prompt.top_k": 1}, STEPS),
    "cil_experiment.prompt.key_loss": ({f"{L2P}.prompt.key_loss": "per_image"}, STEPS),
    "cil_experiment.prompt.g_length": ({f"{DUAL}.prompt.g_length": 4}, STEPS),
    "cil_experiment.prompt.g_layers": ({f"{DUAL}.prompt.g_layers": [1]}, STEPS),
    "cil_experiment.prompt.ortho_mu": ({f"{CODA}.prompt.ortho_mu": 0.0}, STEPS),
    "cil_experiment.sdlora.init_magnitude": ({f"{SD}.sdlora.init_magnitude": 1.0}, STEPS),
    "cil_experiment.sdlora.reset_magnitudes": ({f"{SD}.sdlora.reset_magnitudes": False}, STEPS),
    "cil_experiment.sdlora.ranks": ({f"{SD}.sdlora.ranks": [2, 2]}, STEPS),
    "cil_experiment.sdlora.rank_starts": ({f"{SD}.sdlora.rank_starts": [0, 1]}, STEPS),
}


def config() -> dict:
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["experiments"] = {name: {**COMMON, **spec} for name, spec in EXPERIMENTS.items()}
    return cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("baselines")
    snakemake(wd, config(), "all")
    return wd


def test_every_method_has_its_task_files_matrix_and_metrics(workdir):
    for name, spec in config()["experiments"].items():
        run = workdir / "results" / "runs" / name / "seed0"
        names = ("state.safetensors", "train_log.csv", "eval.json") if name in BASELINES else (
            "reduction.safetensors", "adapter.safetensors", "train_log.csv", "eval.json")
        for t in range(spec["num_tasks"]):
            assert all((run / f"task{t}" / n).is_file() for n in names), (name, t)
        assert (run / "acc_matrix.csv").is_file() and (run / "metrics.json").is_file()
        evals = [read_json(run / f"task{t}" / "eval.json") for t in range(spec["num_tasks"])]
        assert [len(e["per_task_accuracy"]) for e in evals] == list(range(1, spec["num_tasks"] + 1))
    summary = (workdir / "results" / "summary" / "summary.csv").read_text()
    assert all(name in summary for name in EXPERIMENTS)


def test_task_files_hold_what_each_method_adds(workdir):
    run = workdir / "results" / "runs"
    coda, meta = load_state(run / "tiny_coda-prompt" / "seed0" / "task2" / "state.safetensors")
    assert meta["method"] == "coda-prompt" and meta["task"] == 2
    assert coda["pool.layers.0.prompts"].shape == (6, 2, 16) and coda["head.weight"].shape == (2, 16)
    sd = [load_state(run / "tiny_sd-lora" / "seed0" / f"task{t}" / "state.safetensors")[0] for t in range(3)]
    assert [s["magnitudes"].numel() for s in sd] == [1, 2, 3]
    assert [s["blocks.0.a_q"].shape[0] for s in sd] == [2, 2, 1]  # the rank schedule: 2 from task 0, 1 from task 2
    assert all(s["blocks.1.b_v"].abs().max() > 0 for s in sd)  # B starts at zero: trained


def test_the_model_after_each_task_reproduces_its_evaluation(workdir, tmp_path, monkeypatch):
    """`ifcl run evaluate` (the evaluation rule's step on the run's files) gives what eval.json records."""
    from ifcl.predict import evaluate

    (tmp_path / "config.yaml").write_text((workdir / "config.yaml").read_text())
    monkeypatch.chdir(workdir)
    for name in BASELINES:
        for t in (0, 2):
            result, recorded, _ = evaluate(str(workdir / "config.yaml"), name, 0, t, None)
            assert result["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-9), (name, t)
            assert result["per_task_accuracy"] == pytest.approx(recorded["per_task_accuracy"], abs=1e-9)


def test_a_second_run_has_nothing_to_do_and_a_deleted_task_file_comes_back_the_same(workdir, tmp_path):
    proc = snakemake(workdir, config(), "all", "-n")
    assert re.search(r"Nothing to be done", proc.stdout + proc.stderr), proc.stdout[-2000:]
    before = tree(workdir, "results/runs")
    for name in ("tiny_coda-prompt", "tiny_sd-lora"):
        (workdir / "results" / "runs" / name / "seed0" / "task1" / "state.safetensors").unlink()
    snakemake(workdir, config(), "all")
    assert tree(workdir, "results/runs") == before


def test_changing_any_of_their_settings_schedules_their_steps(workdir, tmp_path):
    assert scheduled_rules(workdir, workdir / "config.yaml") == set(), "the run is not complete"
    failures = []
    for key, (changes, readers) in READERS.items():
        configfile = tmp_path / "config.yaml"
        configfile.write_text(yaml.safe_dump(changed(config(), changes), sort_keys=False))
        rules = scheduled_rules(workdir, configfile)
        if not readers <= rules:
            failures.append(f"{key}: scheduled {sorted(rules)}, missing {sorted(readers - rules)}")
    assert not failures, "\n".join(failures)
