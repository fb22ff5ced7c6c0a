"""The state chain's methods end to end on a tiny generated config, in their own working directory: L2P,
DualPrompt, CODA-Prompt, SD-LoRA and a method from a package of its own (examples/ifcl-linear-probe, found through
its entry point, as if installed; rules train_state / evaluate_state) and the joint upper bound, 3 tasks each (joint:
one). Every run has its per-task files, matrix and metrics; "the model after task t" rebuilt from the files gives the
recorded evaluation; a second run has nothing to do; a deleted task file is made again byte for byte."""
import copy
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_CONFIG, changed, scheduled_rules, snakemake, tree
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
    "tiny_ranpac": {"method": "ranpac", "ranpac": {"projection": 32, "ridges": [0.01, 1.0, 100.0],
                                                    "fit_fraction": 0.75}},
    "tiny_linear-probe": {"method": "linear-probe", "probe": {"normalize": True}},
    "tiny_lae": {"method": "lae", "lae": {"adapt_blocks": [0, 1], "bottleneck": 3, "ema_decay": 0.9,
                                          "freeze_epochs": 1, "only_offline": False},
                 "train": {**TRAIN, "epochs": 2, "schedule": "constant"}},
    "tiny_c-lora": {"method": "c-lora", "rank": 2, "lora_blocks": "all", "clora": {"weight": 1.0, "projections": "kv"}},
    "tiny_slca": {"method": "slca", "final_norm": "reset", "freeze_backbone": False,
                  "ca": {"samples_per_class": 8, "epochs": 1, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005,
                         "logit_norm": 0.1, "covariance_eps": 0.0001},
                  "train": {**TRAIN, "optimizer": "sgd", "lr": 1e-4, "head_lr": 1e-2, "momentum": 0.9,
                            "weight_decay": 5e-4, "schedule": "multistep", "milestones": [1], "gamma": 0.1}},
    "tiny_ease": {"method": "ease", "ease": {"bottleneck": 4, "adapter_scale": 0.1, "adapter_dropout": 0.1, "alpha": 0.1,
                                            "use_init_ptm": False, "beta": 0.0, "recalc_sim": True, "reweight": True},
                  "train": {**TRAIN, "optimizer": "sgd", "momentum": 0.9, "lr": 0.025, "weight_decay": 5e-4,
                            "schedule": "cosine"}},
    "tiny_mos": {"method": "mos", "mos": {"bottleneck": 4, "statistics_batch_size": 3,
                                          "alignment": {"epochs": 2, "weight_decay": 5e-4, "samples_per_class": 8}},
                 "train": {**TRAIN, "optimizer": "sgd", "lr": 0.05, "head_lr": 0.005, "weight_decay": 5e-4,
                           "momentum": 0.9, "schedule": "cosine"}},
    "tiny_hide-prompt": {"method": "hide-prompt",
                         "hide": {"prompt": {"length": 2, "layers": [0, 1], "contrastive": 0.1, "devices": 2,
                                             "device_batch": 4},
                                  "tii": {"epochs": 1, "lr": 1e-3},
                                  "tii_alignment": {"epochs": 1, "lr": 0.01, "samples": 4},
                                  "alignment": {"epochs": 1, "lr": 0.01, "samples": 4}, "centroids": 2},
                         "train": {**TRAIN, "head_lr": 1e-3, "schedule": "timm-cosine", "min_lr": 1e-4,
                                   "clip_grad_norm": 1.0}},
}
BASELINES = ("tiny_l2p", "tiny_dualprompt", "tiny_coda-prompt", "tiny_sd-lora", "tiny_ranpac", "tiny_linear-probe",
             "tiny_lae", "tiny_c-lora", "tiny_slca", "tiny_ease", "tiny_mos", "tiny_hide-prompt")
EXAMPLE = REPO / "examples" / "ifcl-linear-probe"

# the compared methods' own keys (test_config_audit.py audits the rest): key -> (change, the rules that must re-run)
STEPS = {"train_state", "evaluate_state"}
L2P, DUAL, CODA, SD, RANPAC, PROBE, LAE, CLORA, SL, EASE, MOS, HIDE = (f"experiments.{n}" for n in BASELINES)
READERS = {
    "prompts.prompt.pool_size": ({f"{L2P}.prompt.pool_size": 5}, STEPS),
    "prompts.prompt.length": ({f"{CODA}.prompt.length": 4}, STEPS),
    "prompts.prompt.layers": ({f"{DUAL}.prompt.layers": [0]}, STEPS),
    "prompts.prompt.top_k": ({f"{L2P}.prompt.top_k": 1}, STEPS),
    "prompts.prompt.key_loss": ({f"{L2P}.prompt.key_loss": "per_image"}, STEPS),
    "prompts.prompt.g_length": ({f"{DUAL}.prompt.g_length": 4}, STEPS),
    "prompts.prompt.g_layers": ({f"{DUAL}.prompt.g_layers": [1]}, STEPS),
    "prompts.prompt.ortho_mu": ({f"{CODA}.prompt.ortho_mu": 0.0}, STEPS),
    "sdlora.sdlora.init_magnitude": ({f"{SD}.sdlora.init_magnitude": 1.0}, STEPS),
    "sdlora.sdlora.reset_magnitudes": ({f"{SD}.sdlora.reset_magnitudes": False}, STEPS),
    "sdlora.sdlora.ranks": ({f"{SD}.sdlora.ranks": [2, 2]}, STEPS),
    "sdlora.sdlora.rank_starts": ({f"{SD}.sdlora.rank_starts": [0, 1]}, STEPS),
    "sdlora.rank": ({f"{SD}.rank": 1}, STEPS),
    "sdlora.lora_blocks": ({f"{SD}.lora_blocks": [0]}, STEPS),
    "ranpac.ranpac.projection": ({f"{RANPAC}.ranpac.projection": 0}, STEPS),
    "ranpac.ranpac.ridges": ({f"{RANPAC}.ranpac.ridges": [1.0]}, STEPS),
    "ranpac.ranpac.fit_fraction": ({f"{RANPAC}.ranpac.fit_fraction": 0.5}, STEPS),
    "lae.lae.adapt_blocks": ({f"{LAE}.lae.adapt_blocks": [1]}, STEPS),
    "lae.lae.bottleneck": ({f"{LAE}.lae.bottleneck": 2}, STEPS),
    "lae.lae.ema_decay": ({f"{LAE}.lae.ema_decay": 0.5}, STEPS),
    "lae.lae.freeze_epochs": ({f"{LAE}.lae.freeze_epochs": 0}, STEPS),
    "lae.lae.only_offline": ({f"{LAE}.lae.only_offline": True}, STEPS),
    "clora.rank": ({f"{CLORA}.rank": 1}, STEPS),
    "clora.lora_blocks": ({f"{CLORA}.lora_blocks": [0]}, STEPS),
    "clora.clora.weight": ({f"{CLORA}.clora.weight": 0.0}, STEPS),
    "clora.clora.projections": ({f"{CLORA}.clora.projections": "qkv"}, STEPS),
    "slca.final_norm": ({f"{SL}.final_norm": "pretrained"}, STEPS),
    "slca.freeze_backbone": ({f"{SL}.freeze_backbone": True}, STEPS),
    "slca.ca.samples_per_class": ({f"{SL}.ca.samples_per_class": 4}, STEPS),
    "slca.ca.epochs": ({f"{SL}.ca.epochs": 2}, STEPS),
    "slca.ca.lr": ({f"{SL}.ca.lr": 0.02}, STEPS),
    "slca.ca.momentum": ({f"{SL}.ca.momentum": 0.5}, STEPS),
    "slca.ca.weight_decay": ({f"{SL}.ca.weight_decay": 0.0}, STEPS),
    "slca.ca.logit_norm": ({f"{SL}.ca.logit_norm": None}, STEPS),
    "slca.ca.covariance_eps": ({f"{SL}.ca.covariance_eps": 1e-3}, STEPS),
    "ease.ease.bottleneck": ({f"{EASE}.ease.bottleneck": 2}, STEPS),
    "ease.ease.adapter_scale": ({f"{EASE}.ease.adapter_scale": 0.5}, STEPS),
    "ease.ease.adapter_dropout": ({f"{EASE}.ease.adapter_dropout": 0.0}, STEPS),
    "ease.ease.alpha": ({f"{EASE}.ease.alpha": 0.5}, STEPS),
    "ease.ease.use_init_ptm": ({f"{EASE}.ease.use_init_ptm": True}, STEPS),
    "ease.ease.beta": ({f"{EASE}.ease.beta": 0.5}, STEPS),
    "ease.ease.recalc_sim": ({f"{EASE}.ease.recalc_sim": False}, STEPS),
    "ease.ease.reweight": ({f"{EASE}.ease.reweight": False}, STEPS),
    "mos.mos.bottleneck": ({f"{MOS}.mos.bottleneck": 2}, STEPS),
    "mos.mos.adapter_scale": ({f"{MOS}.mos.adapter_scale": 0.5}, STEPS),
    "mos.mos.adapter_dropout": ({f"{MOS}.mos.adapter_dropout": 0.0}, STEPS),
    "mos.mos.adapter_momentum": ({f"{MOS}.mos.adapter_momentum": 0.0}, STEPS),
    "mos.mos.merge": ({f"{MOS}.mos.merge": "functional"}, STEPS),
    "mos.mos.ortho_weight": ({f"{MOS}.mos.ortho_weight": 0.0}, STEPS),
    "mos.mos.statistics_batch_size": ({f"{MOS}.mos.statistics_batch_size": 2}, STEPS),
    "mos.mos.prototype_dropout": ({f"{MOS}.mos.prototype_dropout": False}, STEPS),
    "mos.mos.refine_steps": ({f"{MOS}.mos.refine_steps": 1}, STEPS),
    "mos.mos.ensemble": ({f"{MOS}.mos.ensemble": False}, STEPS),
    "mos.mos.alignment.epochs": ({f"{MOS}.mos.alignment.epochs": 1}, STEPS),
    "mos.mos.alignment.lr": ({f"{MOS}.mos.alignment.lr": 0.01}, STEPS),
    "mos.mos.alignment.momentum": ({f"{MOS}.mos.alignment.momentum": 0.5}, STEPS),
    "mos.mos.alignment.weight_decay": ({f"{MOS}.mos.alignment.weight_decay": 0.0}, STEPS),
    "mos.mos.alignment.samples_per_class": ({f"{MOS}.mos.alignment.samples_per_class": 4}, STEPS),
    "hide-prompt.hide.prompt.length": ({f"{HIDE}.hide.prompt.length": 3}, STEPS),
    "hide-prompt.hide.prompt.layers": ({f"{HIDE}.hide.prompt.layers": [1]}, STEPS),
    "hide-prompt.hide.prompt.momentum": ({f"{HIDE}.hide.prompt.momentum": 0.2}, STEPS),
    "hide-prompt.hide.prompt.contrastive": ({f"{HIDE}.hide.prompt.contrastive": 0.0}, STEPS),
    "hide-prompt.hide.prompt.temperature": ({f"{HIDE}.hide.prompt.temperature": 0.5}, STEPS),
    "hide-prompt.hide.prompt.layout": ({f"{HIDE}.hide.prompt.layout": 'key_value'}, STEPS),
    "hide-prompt.hide.prompt.devices": ({f"{HIDE}.hide.prompt.devices": 1}, STEPS),
    "hide-prompt.hide.prompt.device_batch": ({f"{HIDE}.hide.prompt.device_batch": 2}, STEPS),
    "hide-prompt.hide.tii.ratio": ({f"{HIDE}.hide.tii.ratio": 1}, STEPS),
    "hide-prompt.hide.tii.epochs": ({f"{HIDE}.hide.tii.epochs": 2}, STEPS),
    "hide-prompt.hide.tii.lr": ({f"{HIDE}.hide.tii.lr": 0.01}, STEPS),
    "hide-prompt.hide.tii.clip_grad": ({f"{HIDE}.hide.tii.clip_grad": 0.5}, STEPS),
    "hide-prompt.hide.tii.images": ({f"{HIDE}.hide.tii.images": 'test_transform'}, STEPS),
    "hide-prompt.hide.centroids": ({f"{HIDE}.hide.centroids": 3}, STEPS),
    "hide-prompt.hide.tii_alignment.epochs": ({f"{HIDE}.hide.tii_alignment.epochs": 2}, STEPS),
    "hide-prompt.hide.tii_alignment.lr": ({f"{HIDE}.hide.tii_alignment.lr": 0.02}, STEPS),
    "hide-prompt.hide.tii_alignment.samples": ({f"{HIDE}.hide.tii_alignment.samples": 3}, STEPS),
    "hide-prompt.hide.tii_alignment.momentum": ({f"{HIDE}.hide.tii_alignment.momentum": 0.5}, STEPS),
    "hide-prompt.hide.tii_alignment.weight_decay": ({f"{HIDE}.hide.tii_alignment.weight_decay": 0.0001}, STEPS),
    "hide-prompt.hide.alignment.epochs": ({f"{HIDE}.hide.alignment.epochs": 2}, STEPS),
    "hide-prompt.hide.alignment.lr": ({f"{HIDE}.hide.alignment.lr": 0.02}, STEPS),
    "hide-prompt.hide.alignment.samples": ({f"{HIDE}.hide.alignment.samples": 3}, STEPS),
    "hide-prompt.hide.alignment.momentum": ({f"{HIDE}.hide.alignment.momentum": 0.5}, STEPS),
    "hide-prompt.hide.alignment.weight_decay": ({f"{HIDE}.hide.alignment.weight_decay": 0.0001}, STEPS),
}
# the example package's own key (audited here only: the other test modules run without the example installed)
EXAMPLE_READERS = {"linear-probe.probe.normalize": ({f"{PROBE}.probe.normalize": False}, STEPS)}


def config() -> dict:
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["experiments"] = {name: {**COMMON, **spec} for name, spec in EXPERIMENTS.items()}
    return cfg


def install(package: Path, site: Path) -> None:
    """What `pip install` leaves of ``package`` (a folder with pyproject.toml) for Python to find: its modules and a
    dist-info folder with its entry points, in ``site``."""
    import tomllib

    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    for module in (package / "ifcl_linear_probe",):
        shutil.copytree(module, site / module.name)
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items())
        for group, points in groups.items()))


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory):
    """examples/ifcl-linear-probe as if installed: on the path of this process and of every Snakemake it starts."""
    from ifcl.registry import methods

    site = tmp_path_factory.mktemp("site")
    install(EXAMPLE, site)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        methods.cache_clear()
        yield site
    methods.cache_clear()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, example_installed):
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
    ranpac = [load_state(run / "tiny_ranpac" / "seed0" / f"task{t}" / "state.safetensors")[0] for t in range(3)]
    assert "projection" in ranpac[0] and ranpac[0]["projection"].shape == (16, 32)
    assert [r["weight"].shape for r in ranpac] == [(2, 32), (4, 32), (6, 32)]  # the head over every seen class
    assert all(r["gram"].shape == (32, 32) for r in ranpac) and "projection" not in ranpac[1]
    log = (run / "tiny_ranpac" / "seed0" / "task1" / "train_log.csv").read_text().splitlines()
    assert log[0].split(",") == ["epoch", "loss", "train_acc", "ridge"] and len(log) == 2  # one closed-form fit
    probe, meta = load_state(run / "tiny_linear-probe" / "seed0" / "task1" / "state.safetensors")
    assert meta["method"] == "linear-probe" and sorted(probe) == ["head.bias", "head.weight"]
    assert probe["head.weight"].shape == (2, 16)
    lae = [load_state(run / "tiny_lae" / "seed0" / f"task{t}" / "state.safetensors")[0] for t in range(3)]
    assert [any(k.startswith("offline.") for k in s) for s in lae] == [False, True, True]  # the average from task 1
    assert lae[0]["online.0.up.weight"].shape == (16, 3) and lae[2]["online.0.up.weight"].abs().max() > 0
    assert not torch.equal(lae[2]["offline.1.down.weight"], lae[2]["online.1.down.weight"])


def test_a_method_from_its_own_package_is_validated_summarised_plotted_and_loadable(workdir, example_installed,
                                                                                   monkeypatch):
    """The linear probe, known to ifcl only through its entry point: its settings are validated (a misspelt key is
    named), its run is in the summary and has its figures, `ifcl run model` rebuilds it, and an edit to its module
    changes its jobs' code digest and no other method's."""
    from ifcl.config import ConfigError, load_config
    from ifcl.runs import load_model

    bad = changed(config(), {"experiments.tiny_linear-probe.probe.normalise": True})
    with pytest.raises(ConfigError, match=r"tiny_linear-probe\.probe: .*'normalise': did you mean 'normalize'"):
        load_config(bad)
    assert "| tiny_linear-probe |" in (workdir / "results" / "summary" / "summary.md").read_text()
    figures = workdir / "results" / "figures" / "tiny_linear-probe"
    assert (figures / "seed0" / "acc_matrix.png").is_file() and (figures / "forgetting.png").is_file()
    monkeypatch.chdir(workdir)
    model = load_model("config.yaml", "tiny_linear-probe", 0, 2)
    assert type(model).__name__ == "LinearProbe" and len(model.heads) == 3 and model.normalize

    from ifcl.codeversion import code_version
    from ifcl.registry import method, method_code

    def digests():
        code_version.cache_clear()
        return {name: method_code(method(name), REPO / "src") for name in ("linear-probe", "l2p", "sd-lora")}

    module = example_installed / "ifcl_linear_probe" / "model.py"
    before, text = digests(), module.read_text()
    try:
        module.write_text(text + "\n\nEDITED = True\n")
        after = digests()
    finally:
        module.write_text(text)
    assert after["linear-probe"] != before["linear-probe"]
    assert after["l2p"] == before["l2p"] and after["sd-lora"] == before["sd-lora"]
    assert digests() == before


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
    from ifcl.config import schema_keys

    assert {r["key"] for r in schema_keys()} >= set(READERS) | set(EXAMPLE_READERS)
    assert scheduled_rules(workdir, workdir / "config.yaml") == set(), "the run is not complete"
    failures = []
    for key, (changes, readers) in {**READERS, **EXAMPLE_READERS}.items():
        configfile = tmp_path / "config.yaml"
        configfile.write_text(yaml.safe_dump(changed(config(), changes), sort_keys=False))
        rules = scheduled_rules(workdir, configfile)
        if not readers <= rules:
            failures.append(f"{key}: scheduled {sorted(rules)}, missing {sorted(readers - rules)}")
    assert not failures, "\n".join(failures)
