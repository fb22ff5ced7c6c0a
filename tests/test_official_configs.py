"""The official InfLoRA and DIKI configs (config/experiments/*.yaml): valid, faithful to the official configs of
liangyanshuo/InfLoRA (configs/*.json) and lloongx/DIKI (configs/*.yaml), and a dry run builds every task of every seed, from the download rules on."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from ifcl.config import check, load_yaml, merge_includes, validate_with_defaults

EXPERIMENT_FILES = sorted((REPO / "config" / "experiments").glob("*.yaml"))


def load(path: Path) -> dict:
    config = merge_includes(load_yaml(path), REPO)
    validate_with_defaults(config)  # the workflow's validation: the schema with the registered methods' settings
    check(config)
    return config


# name: (method, dataset, tasks, rank, lamb, memory, lora_blocks, optimizer, lr, epochs) from the released JSON files
RELEASED = {
    "cifar100_inflora": ("inflora", "cifar100", 10, 10, 0.95, "dualgpm", "all", "adam", 5e-4, 20),
    "cifar100_inflorab5": ("inflora", "cifar100", 10, 10, 0.95, "gpm", [0, 1, 2, 3, 4], "adam", 1e-3, 20),
    "cifar100_infloraca": ("inflora-ca", "cifar100", 10, 5, 0.95, "gpm", "all", "sgd", 1e-3, 20),
    "domainnet_inflora": ("inflora", "domainnet", 5, 30, 0.95, "gpm", "all", "sgd", 5e-3, 5),
    "domainnet_inflorab5": ("inflora", "domainnet", 5, 30, 0.95, "gpm", [0, 1, 2, 3, 4], "sgd", 5e-3, 5),
    "mimg5_inflora": ("inflora", "imagenet-r", 5, 10, 0.98, "dualgpm", "all", "adam", 5e-4, 50),
    "mimg5_inflorab5": ("inflora", "imagenet-r", 5, 10, 0.98, "gpm", [0, 1, 2, 3, 4], "adam", 5e-4, 50),
    "mimg10_inflora": ("inflora", "imagenet-r", 10, 10, 0.98, "dualgpm", "all", "adam", 5e-4, 50),
    "mimg10_inflorab5": ("inflora", "imagenet-r", 10, 10, 0.99, "gpm", [0, 1, 2, 3, 4], "adam", 5e-4, 50),
    "mimg10_infloraca": ("inflora-ca", "imagenet-r", 10, 10, 0.95, "gpm", "all", "sgd", 1e-3, 50),
    "mimg20_inflora": ("inflora", "imagenet-r", 20, 10, 0.98, "dualgpm", "all", "adam", 5e-4, 50),
    "mimg20_inflorab5": ("inflora", "imagenet-r", 20, 10, 0.99, "gpm", [0, 1, 2, 3, 4], "adam", 5e-4, 50),
}


# DIKI: name -> the sequence of the official configs (MTIL.yaml, MTIL-order-II.yaml, MTIL-FS.yaml of lloongx/DIKI configs/)
ORDER_1 = ["aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
           "stanford_cars", "sun397"]
RELEASED_DIKI = {
    "mtil_order1_diki": ORDER_1,
    "mtil_order2_diki": ["stanford_cars", "food", "mnist", "oxford_pet", "flowers", "sun397", "aircraft", "caltech101",
                         "dtd", "eurosat", "cifar100"],
    "mtil_fs_diki": ["aircraft", "caltech101", "cifar100", "dtd", "flowers", "food", "stanford_cars", "sun397"],
}
# the single template each official loader uses (the first of its list, lloongx/DIKI DIKI/MTIL_datasets/*.py)
TEMPLATES = {
    "aircraft": "a photo of a {}, a type of aircraft.", "caltech101": "a photo of a {}.", "cifar100": "a photo of a {}.",
    "dtd": "a photo of a {} texture.", "eurosat": "a centered satellite photo of {}.",
    "flowers": "a photo of a {}, a type of flower.", "food": "a photo of a {}, a type of food.",
    "mnist": 'a photo of the number: "{}".', "oxford_pet": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}, a type of car.", "sun397": "a photo of a {}.",
}


# The baselines of InfLoRA's tables on its benchmarks: name -> (method, dataset, tasks, epochs, prompt) as
# GT-RIPL/CODA-Prompt experiments/*.sh and configs/*_prompt*.yaml run them (Adam 0.001, batch 128, cosine)
L2P = {"pool_size": 30, "length": 20, "layers": [0], "top_k": 5, "key_loss": "official"}
CODA = {"pool_size": 100, "length": 8, "layers": [0, 1, 2, 3, 4], "ortho_mu": 0.0}


def dual(tasks):
    return {"pool_size": tasks, "length": 20, "layers": [2, 3, 4], "g_length": 6, "g_layers": [0, 1]}


BENCHMARKS = {"cifar100": ("cifar100", 10, 20), "mimg5": ("imagenet-r", 5, 50), "mimg10": ("imagenet-r", 10, 50),
              "mimg20": ("imagenet-r", 20, 50), "domainnet": ("domainnet", 5, 5)}
BASELINES = {f"{b}_{name}": (method, ds, tasks, epochs, prompt(tasks))
             for b, (ds, tasks, epochs) in BENCHMARKS.items()
             for name, method, prompt in (("l2p", "l2p", lambda t: L2P), ("dualprompt", "dualprompt", dual),
                                          ("codaprompt", "coda-prompt", lambda t: CODA))}
# SD-LoRA (WuYichen-97/SD-Lora-CL exps/sdlora_c100.json, sdlora_inr.json): name -> (dataset, tasks, lr, RR schedule)
SDLORA = {f"{b}_sdlora": (ds, tasks, lr, None) for b, ds, tasks, lr in (
    ("cifar100", "cifar100", 10, 8e-3), ("mimg5", "imagenet-r", 5, 1e-2), ("mimg10", "imagenet-r", 10, 1e-2),
    ("mimg20", "imagenet-r", 20, 1e-2))}
SDLORA |= {"cifar100_sdlorarr": ("cifar100", 10, 8e-3, ([10, 8, 6], [0, 4, 8])),
           "mimg10_sdlorarr": ("imagenet-r", 10, 1e-2, ([10, 8, 6], [0, 4, 8]))}
# the full fine-tuning baselines of DIKI's MTIL tables and ZSCL, as ZSCL's scripts run them (Thunderbeee/ZSCL
# mtil/scripts/finetune.sh, WiSE_finetune.sh, lwf.sh, lwf_vr.sh, ZSCL.sh; iCaRL: icarl.py with the other scripts'
# optimisation; order II: ZSCL_minus.sh): name -> (method, the method's own keys)
ZSCL_FT = {f"mtil_order{o}_{stem}": (method, keys) for o in (1, 2) for stem, method, keys in (
    ("continualft", "continual-ft", {}), ("wiseft", "wise-ft", {"wise_alpha": 0.8}),
    ("lwf", "lwf", {"temperature": 2.0}),
    ("lwfvr", "lwf-vr", {"temperature": 2.0, "vocabulary_size": 1000, "vocabulary_length": 10}),
    ("icarl", "icarl", {"temperature": 2.0, "memory_size": 10000, "candidates": 30000, "herding_indices": "official"}),
    ("zscl", "zscl", {"temperature": 2.0, "l2": 1.0, "average_every": 100,
                      "reference": {"images": "imagenet", "texts": "conceptual_captions"}}))}
# MoE-Adapters (JiazuoYu/MoE-Adapters4CL mtil/scripts/train/train_full_shot_router11_experts22_1000iters.sh): each
# dataset's learning rate in the script (order I; order II has no script: the same rate per dataset)
MOE = {f"mtil_order{o}_moeadapters" for o in (1, 2)}
MOE_LR = {"aircraft": 5e-3, "caltech101": 1e-3, "cifar100": 5e-3, "dtd": 1e-3, "eurosat": 1e-4, "flowers": 1e-3,
          "food": 1e-3, "mnist": 1e-4, "oxford_pet": 1e-3, "stanford_cars": 1e-3, "sun397": 1e-3}
# LAE (gqk/LAE config/base/*_order1.yaml): per benchmark its dataset, tasks, epochs and Adam's lr (24 · base / 256)
LAE = {f"{b}_lae": (ds, tasks, epochs, lr) for b, ds, tasks, epochs, lr in (
    ("cifar100", "cifar100", 10, 5, 0.0028125), ("mimg5", "imagenet-r", 5, 50, 0.00046875),
    ("mimg10", "imagenet-r", 10, 50, 0.00046875), ("mimg20", "imagenet-r", 20, 50, 0.00046875),
    ("domainnet", "domainnet", 5, 50, 0.00046875))}
# C-LoRA: the InfLoRA config of its benchmark with the method, λ its lamb
CLORA = {f"{b}_clora" for b in ("cifar100", "mimg5", "mimg10", "mimg20", "domainnet")}
# SLCA (GengDavid/SLCA exps/slca/slca_cifar.json, slca_imgnetr.json): epochs and the milestone
SLCA = {"cifar100_slca": (20, 18), "mimg10_slca": (50, 40)}
# EASE (sun-hailong/CVPR24-Ease exps/ease_cifar_in21k.json, ease_inr_in21k.json): lr, batch, weight decay
EASE = {f"{b}_ease": (ds, tasks) + recipe for b, ds, tasks, recipe in (
    ("cifar100", "cifar100", 10, (0.025, 48, 5e-4)), ("mimg5", "imagenet-r", 5, (0.05, 16, 5e-3)),
    ("mimg10", "imagenet-r", 10, (0.05, 16, 5e-3)), ("mimg20", "imagenet-r", 20, (0.05, 16, 5e-3)))}
# MOS (sun-hailong/AAAI25-MOS exps/mos_cifar_in21k.json, mos_inr_in21k.json): lr, batch, epochs, weight decay and
# the statistics batch (3 x batch) and alignment samples (5 x batch)
MOS = {f"{b}_mos": (ds, tasks) + recipe for b, ds, tasks, recipe in (
    ("cifar100", "cifar100", 10, (0.03, 48, 20, 5e-4)), ("mimg5", "imagenet-r", 5, (0.05, 16, 10, 5e-3)),
    ("mimg10", "imagenet-r", 10, (0.05, 16, 10, 5e-3)), ("mimg20", "imagenet-r", 20, (0.05, 16, 10, 5e-3)))}
# HiDe-Prompt (thu-ml/HiDe-Prompt training_scripts/train_{cifar100,imr}_vit.sh): prompt length, reg, epochs, schedule
HIDE = {"cifar100_hideprompt": ("cifar100", 5, 0.1, 50, {"schedule": "multistep", "milestones": [31], "gamma": 0.1}),
        "mimg10_hideprompt": ("imagenet-r", 20, 0.5, 150, {"schedule": "timm-cosine", "min_lr": 1e-5})}
# the upper bounds: one task of every class, with the optimisation of an InfLoRA config of the benchmark
JOINT = {"cifar100_joint": "cifar100_inflora", "mimg_joint": "mimg10_inflora", "domainnet_joint": "domainnet_inflora"}


def test_one_file_per_released_config_and_the_papers_own_included_by_default():
    assert [p.stem for p in EXPERIMENT_FILES] == sorted(RELEASED | RELEASED_DIKI | BASELINES | JOINT | SDLORA | ZSCL_FT
                                                        | dict.fromkeys(RANPAC) | dict.fromkeys(MOE) | LAE
                                                        | dict.fromkeys(CLORA) | SLCA | EASE | MOS | HIDE)
    default = load_yaml(REPO / "config" / "config.yaml")
    assert sorted(Path(p).stem for p in default["include"]) == sorted(RELEASED | RELEASED_DIKI)
    tables = load_yaml(REPO / "config" / "comparisons" / "inflora_tables.yaml")
    assert sorted(Path(p).stem for p in tables["include"]) == sorted(RELEASED | BASELINES | JOINT | LAE
                                                                      | dict.fromkeys(CLORA) | SLCA | EASE | MOS | HIDE)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_config_is_codas_recipe_on_the_inflora_benchmark(name):
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (got, exp), = config["experiments"].items()
    method, dataset, tasks, epochs, prompt = BASELINES[name]
    assert got == name and (exp["method"], exp["dataset"], exp["num_tasks"]) == (method, dataset, tasks)
    assert exp["prompt"] == prompt
    assert exp["train"] == {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "epochs": epochs, "batch_size": 128,
                            "schedule": "inflora-cosine"}
    inflora = load(REPO / "config" / "experiments" / f"{name.split('_')[0]}_inflora.yaml")
    (theirs,) = inflora["experiments"].values()
    assert (exp["backbone"], exp["seeds"], exp["class_order"]) == (theirs["backbone"], theirs["seeds"], theirs["class_order"])
    assert config["datasets"][dataset] == inflora["datasets"][dataset]


@pytest.mark.parametrize("name", sorted(LAE))
def test_lae_config_is_the_official_recipe_on_the_inflora_benchmark(name):
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (got, exp), = config["experiments"].items()
    dataset, tasks, epochs, lr = LAE[name]
    assert got == name and (exp["method"], exp["dataset"], exp["num_tasks"]) == ("lae", dataset, tasks)
    assert exp["lae"] == {"adapt_blocks": [0, 1, 2, 3, 4], "bottleneck": 5, "ema_decay": 0.9999, "freeze_epochs": 3,
                          "only_offline": False}
    # main.py / libml: Adam without weight decay, the linear scheduler over an infinite length, batch 24 (drop_last)
    assert exp["train"] == {"optimizer": "adam", "lr": lr, "weight_decay": 0.0, "epochs": epochs, "batch_size": 24,
                            "schedule": "constant"}
    inflora = load(REPO / "config" / "experiments" / f"{name.split('_')[0]}_inflora.yaml")
    (theirs,) = inflora["experiments"].values()
    assert (exp["backbone"], exp["seeds"], exp["class_order"]) == (theirs["backbone"], theirs["seeds"], theirs["class_order"])
    assert config["datasets"][dataset] == inflora["datasets"][dataset]
    assert config["backbones"]["vit_b16_in21k_orig"]["name"] == "vit_base_patch16_224.orig_in21k"  # LAE's own


@pytest.mark.parametrize("name", sorted(CLORA))
def test_clora_config_is_its_inflora_config_with_the_penalty(name):
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (got, exp), = config["experiments"].items()
    inflora = load(REPO / "config" / "experiments" / f"{name.split('_')[0]}_inflora.yaml")
    (theirs,) = inflora["experiments"].values()
    assert got == name and exp["method"] == "c-lora" and exp["lora_blocks"] == "all"
    assert exp["clora"] == {"weight": theirs["lamb"], "projections": "kv"}
    for key in ("dataset", "backbone", "seeds", "num_tasks", "class_order", "rank", "train", "eval_batch_size"):
        assert exp[key] == theirs[key], key
    assert config["datasets"][exp["dataset"]] == inflora["datasets"][exp["dataset"]]


@pytest.mark.parametrize("name", sorted(SLCA))
def test_slca_config_is_the_official_recipe_on_the_inflora_benchmark(name):
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (got, exp), = config["experiments"].items()
    epochs, milestone = SLCA[name]
    assert got == name and exp["method"] == "slca" and exp["num_tasks"] == 10
    assert (exp["final_norm"], exp["freeze_backbone"]) == ("reset", False)
    assert exp["ca"] == {"samples_per_class": 256, "epochs": 5, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005,
                         "logit_norm": 0.1, "covariance_eps": 0.0001}
    # models/slca.py _stage1_training: backbone 0.01 x bcb_lrscale 1/100, head 0.01, MultiStepLR per epoch
    assert exp["train"] == {"optimizer": "sgd", "lr": 1e-4, "head_lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                            "epochs": epochs, "batch_size": 128, "schedule": "multistep", "milestones": [milestone],
                            "gamma": 0.1}
    inflora = load(REPO / "config" / "experiments" / f"{name.split('_')[0]}_inflora.yaml")
    (theirs,) = inflora["experiments"].values()
    for key in ("dataset", "backbone", "seeds", "class_order"):
        assert exp[key] == theirs[key], key


@pytest.mark.parametrize("name", sorted(EASE))
def test_ease_config_is_the_official_recipe_on_the_inflora_benchmark(name):
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (got, exp), = config["experiments"].items()
    dataset, tasks, lr, batch, wd = EASE[name]
    assert got == name and (exp["method"], exp["dataset"], exp["num_tasks"]) == ("ease", dataset, tasks)
    assert exp["ease"] == {"bottleneck": 64, "adapter_scale": 0.1, "adapter_dropout": 0.1, "alpha": 0.1,
                           "use_init_ptm": False, "beta": 0.0, "recalc_sim": True, "reweight": True}
    # models/ease.py _train: SGD momentum 0.9, CosineAnnealingLR(T_max=epochs, eta_min 0) stepped per epoch
    assert exp["train"] == {"optimizer": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": wd, "epochs": 20,
                            "batch_size": batch, "schedule": "cosine"}
    inflora = load(REPO / "config" / "experiments" / f"{name.split('_')[0]}_inflora.yaml")
    (theirs,) = inflora["experiments"].values()
    for key in ("backbone", "seeds", "class_order"):
        assert exp[key] == theirs[key], key
    assert config["datasets"][dataset] == inflora["datasets"][dataset]


@pytest.mark.parametrize("name", sorted(MOS))
def test_mos_config_is_the_official_recipe_on_the_inflora_benchmark(name):
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (got, exp), = config["experiments"].items()
    dataset, tasks, lr, batch, epochs, wd = MOS[name]
    assert got == name and (exp["method"], exp["dataset"], exp["num_tasks"]) == ("mos", dataset, tasks)
    assert exp["mos"] == {"bottleneck": 16, "adapter_scale": 0.1, "adapter_dropout": 0.1, "adapter_momentum": 0.1,
                          "merge": "official", "ortho_weight": 0.1, "statistics_batch_size": 3 * batch,
                          "prototype_dropout": True, "refine_steps": 4, "ensemble": True,
                          "alignment": {"epochs": 30, "lr": 0.005, "momentum": 0.9, "weight_decay": wd,
                                        "samples_per_class": 5 * batch}}
    # models/mos.py _train: SGD momentum 0.9, the head at lr / 10, CosineAnnealingLR per epoch
    assert exp["train"] == {"optimizer": "sgd", "lr": lr, "head_lr": lr / 10, "momentum": 0.9, "weight_decay": wd,
                            "epochs": epochs, "batch_size": batch, "schedule": "cosine"}
    inflora = load(REPO / "config" / "experiments" / f"{name.split('_')[0]}_inflora.yaml")
    (theirs,) = inflora["experiments"].values()
    for key in ("backbone", "seeds", "class_order"):
        assert exp[key] == theirs[key], key
    assert config["datasets"][dataset] == inflora["datasets"][dataset]


@pytest.mark.parametrize("name", sorted(HIDE))
def test_hide_prompt_config_is_the_official_script_on_the_inflora_benchmark(name):
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (got, exp), = config["experiments"].items()
    dataset, length, reg, epochs, schedule = HIDE[name]
    assert got == name and (exp["method"], exp["dataset"], exp["num_tasks"]) == ("hide-prompt", dataset, 10)
    hide = exp["hide"]
    assert hide["prompt"] == {"length": length, "layers": [0, 1, 2, 3, 4], "momentum": 0.01, "contrastive": reg,
                              "temperature": 0.8, "layout": "official", "devices": 8, "device_batch": 24}
    assert hide["tii"] == {"ratio": 2, "epochs": 20, "lr": 0.0005 * 24 / 256, "clip_grad": 1.0,
                           "images": "train_transform"}
    assert hide["tii_alignment"] == {"epochs": 30, "lr": 0.005 * 24 / 256, "samples": 24, "momentum": 0.9,
                                     "weight_decay": 0.0}
    assert hide["alignment"] == {"epochs": 30, "lr": 0.005, "samples": 120, "momentum": 0.9, "weight_decay": 0.0}
    # 8 GPUs x 24, Adam at 0.03 x 24/256 (the head x 0.1), no weight decay, gradient norm clipped to 1
    assert exp["train"] == {"optimizer": "adam", "lr": 0.03 * 24 / 256, "head_lr": 0.00028125,  # 0.003 x 24 / 256
                            "weight_decay": 0.0, "epochs": epochs, "batch_size": 192, "clip_grad_norm": 1.0,
                            **schedule}
    inflora = load(REPO / "config" / "experiments" / f"{name.split('_')[0]}_inflora.yaml")
    (theirs,) = inflora["experiments"].values()
    for key in ("backbone", "seeds", "class_order"):
        assert exp[key] == theirs[key], key
    assert config["datasets"][dataset] == inflora["datasets"][dataset]


@pytest.mark.parametrize("name", sorted(SDLORA))
def test_sdlora_config_is_the_official_recipe_on_the_inflora_benchmark(name):
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (got, exp), = config["experiments"].items()
    dataset, tasks, lr, rr = SDLORA[name]
    assert got == name and (exp["method"], exp["dataset"], exp["num_tasks"]) == ("sd-lora", dataset, tasks)
    assert (exp["rank"], exp["lora_blocks"]) == (10, "all")
    assert exp["sdlora"] == {"init_magnitude": 0.8, "reset_magnitudes": True,
                             **({"ranks": rr[0], "rank_starts": rr[1]} if rr else {})}
    # models/sdlora.py _train: SGD(momentum 0.9), no weight decay, MultiStepLR that never steps down in 20 epochs
    assert exp["train"] == {"optimizer": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 0.0, "epochs": 20,
                            "batch_size": 128, "schedule": "constant"}
    inflora = load(REPO / "config" / "experiments" / f"{name.split('_')[0]}_inflora.yaml")
    (theirs,) = inflora["experiments"].values()
    assert (exp["backbone"], exp["seeds"], exp["class_order"]) == (theirs["backbone"], theirs["seeds"], theirs["class_order"])


@pytest.mark.parametrize("name", sorted(JOINT))
def test_joint_config_is_one_task_with_the_inflora_optimisation(name):
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (exp,) = config["experiments"].values()
    (theirs,) = load(REPO / "config" / "experiments" / f"{JOINT[name]}.yaml")["experiments"].values()
    assert exp["method"] == "joint" and exp["num_tasks"] == 1
    assert {k: exp[k] for k in ("dataset", "backbone", "seeds", "train", "rank", "lora_blocks")} == \
        {k: theirs[k] for k in ("dataset", "backbone", "seeds", "train", "rank", "lora_blocks")}


RANPAC = {"cifar100_ranpac", "mimg10_ranpac"}


@pytest.mark.parametrize("benchmark", ["cifar100", "mimg10"])
def test_ranpac_config_is_the_official_no_phase_1_run_on_the_inflora_benchmark(benchmark):
    """RanPAC/RanPAC args/{cifar224,imagenetr}_publish.csv, ID 4: ncm with use_RP, M 10000, batch 128; the ridge
    candidates 10^-8..10^8 and the 80/20 split of RanPAC.py optimise_ridge_parameter (the defaults)."""
    (exp,) = load(REPO / "config" / "experiments" / f"{benchmark}_ranpac.yaml")["experiments"].values()
    (theirs,) = load(REPO / "config" / "experiments" / f"{benchmark}_inflora.yaml")["experiments"].values()
    assert exp["method"] == "ranpac" and exp["train"]["batch_size"] == 128
    assert exp["ranpac"] == {"projection": 10000, "fit_fraction": 0.8, "ridges": [10.0 ** k for k in range(-8, 9)]}
    assert {k: exp[k] for k in ("dataset", "backbone", "seeds", "num_tasks", "class_order")} == \
        {k: theirs[k] for k in ("dataset", "backbone", "seeds", "num_tasks", "class_order")}


@pytest.mark.parametrize("path", [p for p in EXPERIMENT_FILES if p.stem in RELEASED_DIKI], ids=lambda p: p.stem)
def test_official_diki_config_is_valid_and_faithful(path):
    config = load(path)
    (name, exp), = config["experiments"].items()
    assert name == path.stem and exp["method"] == "diki"
    datasets = [config["datasets"][d] for d in exp["sequence"]]
    assert [d["name"] for d in datasets] == RELEASED_DIKI[name]
    assert all(d["type"] == "mtil" and d["template"] == TEMPLATES[d["name"]] for d in datasets)
    assert all(d.get("shots") == (16 if name == "mtil_fs_diki" else None) for d in datasets)
    assert exp["prefix"] == {"depth_vision": 8, "depth_text": 8, "length": 8, "attention": "residual"}
    assert exp["train"] == {"optimizer": "sgd", "lr": 5.0, "final_lr_ratio": 1e-3, "weight_decay": 0.0, "epochs": 10,
                            "batch_size": 128}
    assert exp["calibration"] == {"batchwise": True, "scale": None, "weight": "likelihood"}
    assert exp["eval_batch_size"] == 256
    backbone = config["backbones"][exp["backbone"]]
    assert (backbone["type"], backbone["name"], backbone["pretrained"], backbone["quick_gelu"], backbone["image_size"]) == \
        ("open_clip", "ViT-B-16", "openai", True, 224)
    assert backbone["mean"] == [0.48145466, 0.4578275, 0.40821073] and backbone["std"] == [0.26862954, 0.26130258, 0.27577711]


@pytest.mark.parametrize("name", sorted(ZSCL_FT))
def test_zscl_baseline_config_is_the_official_script_on_dikis_sequence(name):
    """The sequence, datasets and CLIP of the DIKI config of the same order; the scripts' optimisation (Aircraft and
    MNIST at 5e-5, every other dataset at 1e-5), seed 42 and the method's own settings."""
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (exp_name, exp), = config["experiments"].items()
    method, keys = ZSCL_FT[name]
    diki = load(REPO / "config" / "experiments" / f"{name.rsplit('_', 1)[0]}_diki.yaml")
    (diki_exp,) = diki["experiments"].values()
    assert exp_name == name and exp["method"] == method
    assert exp["sequence"] == diki_exp["sequence"] and exp["backbone"] == diki_exp["backbone"]
    assert {ds: config["datasets"][ds] for ds in exp["sequence"]} == {ds: diki["datasets"][ds] for ds in exp["sequence"]}
    assert exp["train"]["lr"] == [5e-5 if ds in ("mtil_aircraft", "mtil_mnist") else 1e-5 for ds in exp["sequence"]]
    assert {k: v for k, v in exp["train"].items() if k != "lr"} == {
        "iterations": 1000, "warmup": 100, "batch_size": 64, "weight_decay": 0.0, "beta2": 0.999, "label_smoothing": 0.2,
        "transform": "clip-train", "crop_scale": [0.9, 1.0]}
    assert exp["seeds"] == [42] and {k: exp[k] for k in keys} == keys
    assert not set(exp) - {"method", "sequence", "backbone", "seeds", "train", "eval_batch_size", "gpu_precision",
                           "loader_workers", "image_cache", *keys}


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_adapters_config_is_the_official_script_on_dikis_sequence(name):
    """The sequence, datasets and CLIP of the DIKI config of the same order; the full-shot script's settings (22
    experts, top-2, bottleneck 64, 11 routers, its learning rate per dataset, 1000 iterations of batch 64, warm-up
    100, smoothing 0.2, 2 experts frozen per block and task, no balance loss), DDAS's (AlexNet with ImageNet weights,
    code 100, TinyImageNet 1000 iterations then 300 per task, batch 64, lr 0.01, threshold 0.0655, per test batch of
    128, every slot scored) and seed 42."""
    config = load(REPO / "config" / "experiments" / f"{name}.yaml")
    (exp_name, exp), = config["experiments"].items()
    diki = load(REPO / "config" / "experiments" / f"{name.rsplit('_', 1)[0]}_diki.yaml")
    (diki_exp,) = diki["experiments"].values()
    assert exp_name == name and exp["method"] == "moe-adapters"
    assert exp["sequence"] == diki_exp["sequence"] and exp["backbone"] == diki_exp["backbone"]
    assert {ds: config["datasets"][ds] for ds in exp["sequence"]} == {ds: diki["datasets"][ds] for ds in exp["sequence"]}
    assert exp["experts"] == {"count": 22, "top_k": 2, "bottleneck": 64, "routers": 11}
    assert exp["train"]["lr"] == [MOE_LR[config["datasets"][ds]["name"]] for ds in exp["sequence"]]
    assert {k: v for k, v in exp["train"].items() if k != "lr"} == {
        "iterations": 1000, "warmup": 100, "batch_size": 64, "weight_decay": 0.0, "label_smoothing": 0.2,
        "transform": "clip-train", "crop_scale": [0.9, 1.0], "balance_loss": False, "freeze": 2}
    assert exp["ddas"] == {"extractor": "alexnet-imagenet", "image_size": None, "hidden": 100,
                           "reference": "tinyimagenet", "reference_iterations": 1000, "iterations": 300,
                           "batch_size": 64, "lr": 0.01, "lr_decay": 0.1, "lr_decay_epochs": 10,
                           "weight_decay": 1e-4, "threshold": 0.0655, "batchwise": True, "untrained_slots": "score"}
    reference = config["datasets"]["tinyimagenet"]
    assert (reference["type"], reference["name"], reference.get("shots")) == ("mtil", "tinyimagenet", None)
    assert exp["seeds"] == [42] and exp["eval_batch_size"] == 128
    assert not set(exp) - {"method", "sequence", "backbone", "seeds", "experts", "train", "ddas", "eval_batch_size",
                           "gpu_precision", "loader_workers", "image_cache"}


@pytest.mark.parametrize("path", [p for p in EXPERIMENT_FILES if p.stem in RELEASED], ids=lambda p: p.stem)
def test_official_config_is_valid_and_faithful(path):
    config = load(path)
    (name, exp), = config["experiments"].items()
    assert name == path.stem
    method, dataset, tasks, rank, lamb, memory, blocks, optimizer, lr, epochs = RELEASED[name]
    assert (exp["method"], exp["dataset"], exp["num_tasks"], exp["rank"], exp["lamb"], exp["memory"], exp["lora_blocks"]) == \
        (method, dataset, tasks, rank, lamb, memory, blocks)
    train = exp["train"]
    assert (train["optimizer"], train["lr"], train["epochs"], train["batch_size"]) == (optimizer, lr, epochs, 128)
    assert exp["seeds"] == [0, 1, 2, 3, 4] and exp["class_order"] == "native" and exp["lame"] == 1.0
    backbone = config["backbones"][exp["backbone"]]
    assert backbone["name"] == "vit_base_patch16_224.augreg_in21k"
    assert backbone["mean"] == [0.0, 0.0, 0.0] and backbone["std"] == [1.0, 1.0, 1.0]  # inputs in [0, 1], as the official code feeds them
    if optimizer == "adam":
        assert train["schedule"] == "inflora-cosine" and train["weight_decay"] == 0.0
    if method == "inflora-ca":
        assert exp["ca"]["samples_per_class"] == 256 and exp["ca"]["logit_norm"] == 0.1 and exp["ca"]["epochs"] == 5
    # the recipes that differ (CA and DomainNet)
    if name == "cifar100_infloraca":
        assert exp["final_norm"] == "reset"
        assert (train["head_lr"], train["weight_decay"], train["schedule"], train["milestones"]) == (0.01, 1e-3, "multistep", [18])
    if name == "mimg10_infloraca":
        assert train["schedule"] == "cosine" and "head_lr" not in train and train["weight_decay"] == 0.0
    if dataset == "domainnet":
        assert (train["head_lr"], train["schedule"], train["milestones"]) == (0.01, "multistep", [4])


def test_dry_run_builds_every_task_of_every_seed(tmp_path):
    """`snakemake -n` on config/config.yaml (all fifteen files): the full DAG, 5 seeds x T tasks per InfLoRA experiment
    and one seed x one task per dataset for DIKI, starting at the fetch rules, with nothing downloaded."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "--quiet", "rules",
           "--configfile", str(tmp_path / "config" / "config.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, re.M)}
    exps = [RELEASED[name] for name in RELEASED]
    runs = 5 * len(exps)
    tasks = sum(5 * e[2] for e in exps)
    ca_tasks = sum(5 * e[2] for e in exps if e[0] == "inflora-ca")
    diki_tasks = sum(len(seq) for seq in RELEASED_DIKI.values())
    mtil_datasets = len(ORDER_1) + len(RELEASED_DIKI["mtil_fs_diki"])  # MTIL-FS datasets are their own subsets
    expected = {
        # cifar100 (InfLoRA's and MTIL's CIFAR100), imagenet-r + CODA-Prompt lists, domainnet + CODA-Prompt lists,
        # and the ten other MTIL sources
        "fetch_source": 5 + 10,
        "fetch_weights": 2,  # the timm ViT-B/16 and open_clip's ViT-B-16 openai
        "decode_cifar100": 1, "list_benchmark": 2,
        "split_tasks": runs, "reduction": tasks, "train_task": tasks, "evaluate_task": tasks,
        "memory": tasks - runs, "class_stats": ca_tasks, "align": ca_tasks - 5 * 2,
        "prepare_mtil": mtil_datasets, "frozen_features": 2 * mtil_datasets,  # train and test, shared by both orders
        "gaussian": diki_tasks, "train_prefix": diki_tasks, "evaluate_diki": diki_tasks,
        "aggregate_run": runs + len(RELEASED_DIKI), "summarize": 1, "all": 1,
        # figures: the curves and the overview; a heatmap per run; forgetting per InfLoRA experiment; the memory
        # per InfLoRA run (every one of them keeps a memory); DIKI's λ per run
        "accuracy_curves": 1, "overview": 1, "accuracy_matrix": runs + len(RELEASED_DIKI), "forgetting": len(exps),
        "memory_sizes": runs, "lambda_histograms": len(RELEASED_DIKI),
        # the training curves: a figure per run, their data in one file
        "training_curves": runs + len(RELEASED_DIKI), "training_curves_data": 1,
    }
    # the README's count
    assert f"({sum(expected.values()):,} jobs" in (REPO / "README.md").read_text()
    assert counts == {**expected, "total": sum(expected.values())}
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("experiment", ["cifar100_inflora", "mtil_order1_diki"])
def test_offline_paper_config_stops_in_the_fetch_rule_with_instructions(tmp_path, experiment):
    """No network (a mirror where nothing listens): the run fails in a fetch rule, saying where to put the files;
    no preparation, training or evaluation job starts."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    cfg = tmp_path / "offline.yaml"
    cfg.write_text(yaml.safe_dump({"include": [f"config/experiments/{experiment}.yaml"],
                                   "downloads": {"mirror": "http://127.0.0.1:9"}}))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "2",
           "--configfile", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Error in rule fetch_" in out
    assert re.search(r"To install (it|the weights) by hand, (put these files where shown|download https://\S+)", out)
    if experiment == "cifar100_inflora":
        assert "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz" in out
    started = set(re.findall(r"^(?:local)?rule (\w+):", out, re.M))
    assert started <= {"fetch_source", "fetch_weights"}, started
    assert not (tmp_path / "data" / "prepared").exists() and not (tmp_path / "results").exists()
    assert not list((tmp_path / "data" / "raw").glob(f"*/{'ifcl-source.json'}"))
    assert not list((tmp_path / "data").rglob("*.safetensors"))


def test_the_diki_ablations_are_the_official_order_i_config_but_for_the_ablated_setting():
    from ifcl.config import load_config

    official = load_config(REPO / "config/experiments/mtil_order1_diki.yaml", REPO)["experiments"]["mtil_order1_diki"]
    ablations = load_config(REPO / "config/comparisons/mtil_order1_diki_ablations.yaml", REPO)["experiments"]
    assert official["calibration"]["weight"] == "likelihood" and official["prefix"]["attention"] == "residual"
    for name, key, value in (("mtil_order1_diki-no-calibration", "calibration", {"weight": "one"}),
                             ("mtil_order1_diki-softmax-prefix", "prefix", {"attention": "softmax"})):
        assert ablations[name] == {**official, key: {**official[key], **value}}, name


@pytest.mark.parametrize("path", [*sorted((REPO / "config" / "comparisons").glob("*.yaml")),
                                  REPO / "config" / "demo_comparison.yaml", REPO / "config" / "demo_mtil.yaml"],
                         ids=lambda p: p.stem)
def test_dry_run_of_each_comparison_config(path, tmp_path):
    """`snakemake -n` over each comparison config (inflora_tables, sdlora_tables, diki_tables: every baseline and
    upper-bound paper config) and the comparison demos: every task of every experiment in it is planned, by its family's rules."""
    from ifcl.config import load_config
    from ifcl.registry import method_of, num_tasks

    shutil.copytree(REPO / "config", tmp_path / "config")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "--quiet",
           "rules", "--configfile", str(tmp_path / path.relative_to(REPO))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, re.M)}
    experiments = load_config(path, REPO)["experiments"]
    tasks = sum(num_tasks(spec) * len(spec["seeds"]) for spec in experiments.values())
    evaluations = ("evaluate_diki", "evaluate_finetune", "evaluate_moe", "evaluate_task", "evaluate_state")
    assert sum(counts.get(rule, 0) for rule in evaluations) == tasks
    finetune_tasks = sum(num_tasks(spec) * len(spec["seeds"]) for spec in experiments.values()
                         if method_of(spec).chain == "finetune")
    assert counts.get("train_finetune", 0) == counts.get("evaluate_finetune", 0) == finetune_tasks
    memory_tasks = sum(num_tasks(spec) * len(spec["seeds"]) for spec in experiments.values()
                       if method_of(spec).chain == "finetune" and "memory.safetensors" in method_of(spec).task_files(spec, 0))
    assert counts.get("select_memory", 0) == memory_tasks
    config = load_config(path, REPO)
    captions = {ds for spec in experiments.values() for ds in method_of(spec).datasets_read(spec)
                if config["datasets"][ds]["type"] == "captions"}
    assert counts.get("prepare_captions", 0) == len(captions)  # ZSCL's reference texts, prepared once
    moe_tasks = sum(num_tasks(spec) * len(spec["seeds"]) for spec in experiments.values() if method_of(spec).chain == "moe")
    assert (counts.get("train_moe", 0) == counts.get("train_autoencoder", 0) == counts.get("evaluate_moe", 0)
            == moe_tasks)
    assert counts.get("train_reference_autoencoder", 0) == sum(len(spec["seeds"]) for spec in experiments.values()
                                                                if method_of(spec).chain == "moe")
    if moe_tasks and any(spec["ddas"]["extractor"] == "alexnet-imagenet" for spec in experiments.values()
                         if method_of(spec).chain == "moe"):  # AlexNet's weights are fetched once
        assert counts["fetch_torchvision_weights"] == 1
    baseline_tasks = sum(num_tasks(spec) * len(spec["seeds"]) for spec in experiments.values()
                         if method_of(spec).chain == "state")
    assert counts.get("train_state", 0) == counts.get("evaluate_state", 0) == baseline_tasks
    assert counts["aggregate_run"] == sum(len(spec["seeds"]) for spec in experiments.values())
