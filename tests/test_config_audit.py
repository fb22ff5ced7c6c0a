"""Every setting that can change a result re-runs what it affects: an audit over every key the schema lets an
experiment, a dataset or a backbone have.

For each key, the tiny config with that key changed is dry-run in the session's finished tiny run: the rules it
schedules must include every step that reads the key (``READERS``: the steps whose rule parameters or inputs hold
it), and must not be empty. The keys only the compared methods have (prompt.*, sdlora.*) are audited the same way
in their own tiny run (tests/test_state_pipeline.py). A key that cannot change a result, or that the tiny run cannot exercise, is on one of
the commented lists below, with the reason. A key the schema gains later that is on no list fails the test.

No step reads the config itself (the second test): each is built from its rule's output, input, params and
wildcards (ifcl.runtime.from_rule), so the rule's parameters are all a step can depend on.
"""
import ast

import pytest
import yaml

from conftest import REPO, TINY_CONFIG, changed, scheduled_rules
from test_state_pipeline import READERS as BASELINE_READERS
from ifcl.config import schema_keys as config_schema_keys

pytestmark = pytest.mark.pipeline



def schema_keys() -> set[str]:
    """Every key of the schema's experiments, datasets and backbones, as ``group[type].key.subkey``
    (:func:`ifcl.config.schema_keys`, which also writes config/README.md)."""
    return {row["key"] for row in config_schema_keys()}


TRAINING = {"reduction", "train_task", "evaluate_task"}  # what a new model shape re-runs first
INFLORA = TRAINING | {"memory"}
COLLECTING = {"reduction", "memory"}
DIKI = {"train_prefix", "evaluate_diki"}
FINETUNE = {"train_finetune", "evaluate_finetune"}  # a task's weights, then its evaluation
CA, VIT, CLIP, SEQ = "experiments.tiny_inflora-ca", "backbones.tiny_vit", "backbones.tiny_clip", "experiments.tiny_seq-lora"
IL, DK, SH, TS = "experiments.tiny_inflora", "experiments.tiny_diki", "datasets.tiny_shapes", "datasets.tc_shapes"
WF, VR = "experiments.tiny_wise-ft", "experiments.tiny_lwf-vr"
ZS, IC = "experiments.tiny_zscl", "experiments.tiny_icarl"
ME = "experiments.tiny_moe-adapters"
MOE = {"train_moe", "evaluate_moe"}  # MoE-Adapters: a task's experts and routers, then its evaluation
AUTOENCODERS = {"train_autoencoder", "train_reference_autoencoder", "evaluate_moe"}  # DDAS's autoencoders
SECOND_VIT = {"backbones.tiny_vit2": TINY_CONFIG["backbones"]["tiny_vit"]}
SECOND_CLIP = {"backbones.tiny_clip2": TINY_CONFIG["backbones"]["tiny_clip"]}

# schema key -> (the changes made to the tiny config, the rules that read the key: each must be scheduled)
READERS = {
    "cil_experiment.method": ({f"{IL}.method": "inflora-ca", f"{IL}.ca": TINY_CONFIG["experiments"]["tiny_inflora-ca"]["ca"]},
                              INFLORA),
    "cil_experiment.dataset": ({f"{SEQ}.dataset": "tc_pretrain", f"{SEQ}.num_tasks": 2}, {"split_tasks"} | TRAINING),
    "cil_experiment.backbone": ({**SECOND_VIT, f"{IL}.backbone": "tiny_vit2"}, {"pretrain_backbone"} | INFLORA),
    "cil_experiment.seeds": ({f"{IL}.seeds": [0, 3]}, {"split_tasks"} | INFLORA),
    "cil_experiment.num_tasks": ({f"{SEQ}.num_tasks": 2}, {"split_tasks"}),
    "cil_experiment.class_order": ({f"{IL}.class_order": "shuffled"}, {"split_tasks"}),
    "inflora.rank": ({f"{IL}.rank": 1}, INFLORA),
    "inflora.lora_blocks": ({f"{IL}.lora_blocks": [0]}, INFLORA),
    "cil_experiment.task_overrides": ({f"{IL}.task_overrides": {1: {"epochs": 2}}}, {"train_task"}),
    "cil_experiment.eval_batch_size": ({f"{IL}.eval_batch_size": 5}, {"evaluate_task"}),
    "cil_experiment.gpu_precision": ({f"{IL}.gpu_precision": "fp32"}, {"train_task", "evaluate_task"}),
    "cil_experiment.image_cache": ({f"{IL}.image_cache": "all"}, {"decode_images"} | INFLORA),
    "cil_experiment.loader_workers": ({f"{CA}.loader_workers": 1}, INFLORA | {"class_stats"}),
    "inflora.lamb": ({f"{IL}.lamb": 0.8}, {"memory"}),
    "inflora.lame": ({f"{IL}.lame": 0.95}, {"memory"}),
    "inflora.memory": ({f"{IL}.memory": "gpm"}, {"memory"}),
    "inflora.final_norm": ({f"{IL}.final_norm": "reset"}, INFLORA),
    "inflora.ca.samples_per_class": ({f"{CA}.ca.samples_per_class": 8}, {"align"}),
    "inflora.ca.epochs": ({f"{CA}.ca.epochs": 1}, {"align"}),
    "inflora.ca.lr": ({f"{CA}.ca.lr": 0.02}, {"align"}),
    "inflora.ca.momentum": ({f"{CA}.ca.momentum": 0.5}, {"align"}),
    "inflora.ca.weight_decay": ({f"{CA}.ca.weight_decay": 0.0}, {"align"}),
    "inflora.ca.logit_norm": ({f"{CA}.ca.logit_norm": None}, {"align"}),
    "inflora.ca.covariance_eps": ({f"{CA}.ca.covariance_eps": 1e-3}, {"class_stats"}),
    "train.optimizer": ({f"{CA}.train.optimizer": "adam"}, {"train_task"}),
    "train.lr": ({f"{CA}.train.lr": 0.02}, {"train_task"}),
    "train.weight_decay": ({f"{CA}.train.weight_decay": 1e-4}, {"train_task"}),
    "train.momentum": ({f"{CA}.train.momentum": 0.5}, {"train_task"}),
    "train.epochs": ({f"{CA}.train.epochs": 2}, {"train_task"}),
    "train.batch_size": ({f"{CA}.train.batch_size": 4}, {"train_task"} | COLLECTING),
    "train.schedule": ({f"{CA}.train.schedule": "constant"}, {"train_task"}),
    "train.milestones": ({f"{CA}.train.schedule": "multistep", f"{CA}.train.milestones": [1]}, {"train_task"}),
    "train.gamma": ({f"{CA}.train.gamma": 0.5}, {"train_task"}),
    "train.head_lr": ({f"{CA}.train.head_lr": 0.05}, {"train_task"}),
    "train.min_lr": ({f"{CA}.train.min_lr": 1e-4}, {"train_task"}),
    "train.clip_grad_norm": ({f"{CA}.train.clip_grad_norm": 1.0}, {"train_task"}),
    "mtil_experiment.sequence": ({f"{DK}.sequence": ["tc_textures", "tc_shapes"]}, {"gaussian"} | DIKI),
    "mtil_experiment.backbone": ({**SECOND_CLIP, f"{DK}.backbone": "tiny_clip2"},
                                 {"pretrain_clip", "frozen_features", "gaussian"} | DIKI),
    "mtil_experiment.seeds": ({f"{DK}.seeds": [0, 3]}, {"gaussian"} | DIKI),
    "diki.prefix.depth_vision": ({f"{DK}.prefix.depth_vision": 2}, DIKI),
    "diki.prefix.depth_text": ({f"{DK}.prefix.depth_text": 2}, DIKI),
    "diki.prefix.length": ({f"{DK}.prefix.length": 2}, DIKI),
    "diki.prefix.attention": ({f"{DK}.prefix.attention": "softmax"}, DIKI),
    "diki.train.lr": ({f"{DK}.train.lr": 2.0}, {"train_prefix"}),
    "diki.train.final_lr_ratio": ({f"{DK}.train.final_lr_ratio": 0.01}, {"train_prefix"}),
    "diki.train.weight_decay": ({f"{DK}.train.weight_decay": 1e-4}, {"train_prefix"}),
    "diki.train.epochs": ({f"{DK}.train.epochs": 1}, {"train_prefix"}),
    "diki.train.batch_size": ({f"{DK}.train.batch_size": 4}, {"train_prefix"}),
    "diki.rng": ({f"{DK}.rng": "sequential"}, {"train_prefix"}),
    "diki.calibration.batchwise": ({f"{DK}.calibration.batchwise": False}, {"evaluate_diki"}),
    "diki.calibration.scale": ({f"{DK}.calibration.scale": 64.0}, {"evaluate_diki"}),
    "diki.calibration.weight": ({f"{DK}.calibration.weight": "one"}, {"evaluate_diki"}),
    "zscl.train.lr": ({f"{WF}.train.lr": [2e-4, 1e-4]}, FINETUNE),
    "zscl.train.iterations": ({f"{WF}.train.iterations": 4}, FINETUNE),
    "zscl.train.warmup": ({f"{WF}.train.warmup": 1}, FINETUNE),
    "zscl.train.batch_size": ({f"{WF}.train.batch_size": 4}, FINETUNE),
    "zscl.train.weight_decay": ({f"{WF}.train.weight_decay": 0.1}, FINETUNE),
    "zscl.train.beta2": ({f"{WF}.train.beta2": 0.98}, FINETUNE),
    "zscl.train.label_smoothing": ({f"{WF}.train.label_smoothing": 0.0}, FINETUNE),
    "zscl.train.transform": ({f"{WF}.train.transform": "clip"}, FINETUNE),
    "zscl.train.crop_scale": ({f"{WF}.train.crop_scale": [0.5, 1.0]}, FINETUNE),
    "zscl.wise_alpha": ({f"{WF}.wise_alpha": 0.5}, FINETUNE),
    "zscl.temperature": ({f"{VR}.temperature": 1.0}, FINETUNE),
    "zscl.vocabulary_size": ({f"{VR}.vocabulary_size": 10}, FINETUNE),
    "zscl.vocabulary_length": ({f"{VR}.vocabulary_length": 3}, FINETUNE),
    "zscl.l2": ({f"{ZS}.l2": 0.5}, FINETUNE),
    "zscl.average_every": ({f"{ZS}.average_every": 3}, FINETUNE),
    "zscl.reference.images": ({f"{ZS}.reference.images": "tc_textures"}, FINETUNE),
    "zscl.reference.texts": ({f"{ZS}.reference.texts": "tc_shapes"}, FINETUNE),
    "zscl.memory_size": ({f"{IC}.memory_size": 4}, {"select_memory", "train_finetune", "evaluate_finetune"}),
    "zscl.candidates": ({f"{IC}.candidates": 10}, {"select_memory", "train_finetune", "evaluate_finetune"}),
    "zscl.herding_indices": ({f"{IC}.herding_indices": "picked"},
                             {"select_memory", "train_finetune", "evaluate_finetune"}),
    "moe-adapters.experts.count": ({f"{ME}.experts.count": 3}, MOE),
    "moe-adapters.experts.top_k": ({f"{ME}.experts.top_k": 1}, MOE),
    "moe-adapters.experts.bottleneck": ({f"{ME}.experts.bottleneck": 8}, MOE),
    "moe-adapters.experts.routers": ({f"{ME}.experts.routers": 3}, MOE),
    "moe-adapters.train.lr": ({f"{ME}.train.lr": [2e-2, 1e-2]}, MOE),
    "moe-adapters.train.iterations": ({f"{ME}.train.iterations": 4}, MOE),
    "moe-adapters.train.warmup": ({f"{ME}.train.warmup": 1}, MOE),
    "moe-adapters.train.batch_size": ({f"{ME}.train.batch_size": 4}, MOE),
    "moe-adapters.train.weight_decay": ({f"{ME}.train.weight_decay": 0.1}, MOE),
    "moe-adapters.train.label_smoothing": ({f"{ME}.train.label_smoothing": 0.0}, MOE),
    "moe-adapters.train.transform": ({f"{ME}.train.transform": "clip"}, MOE | AUTOENCODERS),
    "moe-adapters.train.crop_scale": ({f"{ME}.train.crop_scale": [0.5, 1.0]}, MOE | AUTOENCODERS),
    "moe-adapters.train.balance_loss": ({f"{ME}.train.balance_loss": True}, MOE),
    "moe-adapters.train.freeze": ({f"{ME}.train.freeze": 1}, MOE),
    "moe-adapters.ddas.extractor": ({f"{ME}.ddas.extractor": "alexnet-imagenet"},
                                    {"fetch_torchvision_weights"} | AUTOENCODERS),
    "moe-adapters.ddas.image_size": ({f"{ME}.ddas.image_size": 70}, AUTOENCODERS),
    "moe-adapters.ddas.hidden": ({f"{ME}.ddas.hidden": 3}, AUTOENCODERS),
    "moe-adapters.ddas.reference": ({f"{ME}.ddas.reference": "tc_shapes"},
                                    {"train_reference_autoencoder", "evaluate_moe"}),
    "moe-adapters.ddas.reference_iterations": ({f"{ME}.ddas.reference_iterations": 3},
                                               {"train_reference_autoencoder", "evaluate_moe"}),
    "moe-adapters.ddas.iterations": ({f"{ME}.ddas.iterations": 5}, {"train_autoencoder", "evaluate_moe"}),
    "moe-adapters.ddas.batch_size": ({f"{ME}.ddas.batch_size": 4}, AUTOENCODERS),
    "moe-adapters.ddas.lr": ({f"{ME}.ddas.lr": 0.02}, AUTOENCODERS),
    "moe-adapters.ddas.lr_decay": ({f"{ME}.ddas.lr_decay": 0.5}, AUTOENCODERS),
    "moe-adapters.ddas.lr_decay_epochs": ({f"{ME}.ddas.lr_decay_epochs": 1}, AUTOENCODERS),
    "moe-adapters.ddas.weight_decay": ({f"{ME}.ddas.weight_decay": 0.0}, AUTOENCODERS),
    "moe-adapters.ddas.threshold": ({f"{ME}.ddas.threshold": 0.001}, {"evaluate_moe"}),
    "moe-adapters.ddas.batchwise": ({f"{ME}.ddas.batchwise": False}, {"evaluate_moe"}),
    "moe-adapters.ddas.untrained_slots": ({f"{ME}.ddas.untrained_slots": "skip"}, {"evaluate_moe"}),
    "mtil_experiment.eval_batch_size": ({f"{DK}.eval_batch_size": 5}, DIKI),
    "mtil_experiment.gpu_precision": ({f"{DK}.gpu_precision": "fp32"}, DIKI),
    "mtil_experiment.image_cache": ({f"{DK}.image_cache": "deterministic"}, {"decode_images"} | DIKI),
    "mtil_experiment.loader_workers": ({f"{DK}.loader_workers": 1}, DIKI),
    "dataset.train_transform": ({f"{SH}.train_transform": "resize"}, {"train_task"} | COLLECTING),
    "dataset.test_transform": ({f"{SH}.test_transform": "resize-center-crop"}, {"evaluate_task", "class_stats"}),
    "dataset.crop_scale": ({f"{SH}.crop_scale": [0.5, 1.0]}, {"train_task"} | COLLECTING),
    "dataset.template": ({f"{TS}.template": "an image of a {}."}, {"frozen_features"} | DIKI),
    "dataset[generated].classes.start": ({f"{SH}.classes.start": 1}, {"generate_dataset", "split_tasks"}),
    "dataset[generated].classes.count": ({f"{SH}.classes.count": 3}, {"generate_dataset", "split_tasks"}),
    "dataset[generated].domain": ({f"{SH}.domain": "textures"}, {"generate_dataset", "split_tasks"}),
    "dataset[generated].parts[].domain": ({"datasets.tc_pretrain.parts.1.domain": "shapes",
                                           "datasets.tc_pretrain.parts.1.start": 50},
                                          {"generate_dataset", "pretrain_backbone", "pretrain_clip"}),
    "dataset[generated].parts[].start": ({"datasets.tc_pretrain.parts.0.start": 44},
                                         {"generate_dataset", "pretrain_backbone", "pretrain_clip"}),
    "dataset[generated].parts[].count": ({"datasets.tc_pretrain.parts.0.count": 3},
                                         {"generate_dataset", "pretrain_backbone", "pretrain_clip"}),
    "dataset[generated].train_per_class": ({f"{SH}.train_per_class": 5}, {"generate_dataset"}),
    "dataset[generated].test_per_class": ({f"{SH}.test_per_class": 2}, {"generate_dataset"}),
    "dataset[generated].val_per_class": ({f"{TS}.val_per_class": 1}, {"generate_dataset"}),
    "dataset[generated].image_size": ({f"{SH}.image_size": 20}, {"generate_dataset"}),
    "dataset[generated].seed": ({f"{SH}.seed": 1}, {"generate_dataset"}),
    "backbone.image_size": ({f"{VIT}.image_size": 24}, {"pretrain_backbone"}),
    "backbone.mean": ({f"{VIT}.mean": [0.1, 0.1, 0.1]}, {"pretrain_backbone"} | INFLORA),
    "backbone.std": ({f"{CLIP}.std": [0.5, 0.5, 0.5]}, {"pretrain_clip", "frozen_features"} | DIKI),
    "vit_arch.patch_size": ({f"{VIT}.arch.patch_size": 4}, {"pretrain_backbone"}),
    "vit_arch.embed_dim": ({f"{VIT}.arch.embed_dim": 32}, {"pretrain_backbone"}),
    "vit_arch.depth": ({f"{VIT}.arch.depth": 3}, {"pretrain_backbone"}),
    "vit_arch.num_heads": ({f"{VIT}.arch.num_heads": 4}, {"pretrain_backbone"}),
    "vit_arch.mlp_ratio": ({f"{VIT}.arch.mlp_ratio": 2.0}, {"pretrain_backbone"}),
    "backbone[pretrain].pretrain.dataset": ({f"{VIT}.pretrain.dataset": "tiny_shapes"}, {"pretrain_backbone"}),
    "backbone[pretrain].pretrain.epochs": ({f"{VIT}.pretrain.epochs": 2}, {"pretrain_backbone"}),
    "backbone[pretrain].pretrain.batch_size": ({f"{VIT}.pretrain.batch_size": 4}, {"pretrain_backbone"}),
    "backbone[pretrain].pretrain.lr": ({f"{VIT}.pretrain.lr": 2e-3}, {"pretrain_backbone"}),
    "backbone[pretrain].pretrain.weight_decay": ({f"{VIT}.pretrain.weight_decay": 1e-4}, {"pretrain_backbone"}),
    "backbone[pretrain].pretrain.seed": ({f"{VIT}.pretrain.seed": 1}, {"pretrain_backbone"}),
    "backbone[pretrain_clip].arch.embed_dim": ({f"{CLIP}.arch.embed_dim": 8}, {"pretrain_clip"}),
    "backbone[pretrain_clip].arch.vision.width": ({f"{CLIP}.arch.vision.width": 16}, {"pretrain_clip"}),
    "backbone[pretrain_clip].arch.vision.layers": ({f"{CLIP}.arch.vision.layers": 1}, {"pretrain_clip"}),
    "backbone[pretrain_clip].arch.vision.patch_size": ({f"{CLIP}.arch.vision.patch_size": 4}, {"pretrain_clip"}),
    "backbone[pretrain_clip].arch.vision.head_width": ({f"{CLIP}.arch.vision.head_width": 8}, {"pretrain_clip"}),
    "backbone[pretrain_clip].arch.text.width": ({f"{CLIP}.arch.text.width": 16}, {"pretrain_clip"}),
    "backbone[pretrain_clip].arch.text.heads": ({f"{CLIP}.arch.text.heads": 4}, {"pretrain_clip"}),
    "backbone[pretrain_clip].arch.text.layers": ({f"{CLIP}.arch.text.layers": 1}, {"pretrain_clip"}),
    "backbone[pretrain_clip].arch.text.context_length": ({f"{CLIP}.arch.text.context_length": 16},
                                                         {"pretrain_clip"}),
    "backbone[pretrain_clip].pretrain.dataset": ({f"{CLIP}.pretrain.dataset": "tiny_shapes"}, {"pretrain_clip"}),
    "backbone[pretrain_clip].pretrain.epochs": ({f"{CLIP}.pretrain.epochs": 2}, {"pretrain_clip"}),
    "backbone[pretrain_clip].pretrain.batch_size": ({f"{CLIP}.pretrain.batch_size": 8}, {"pretrain_clip"}),
    "backbone[pretrain_clip].pretrain.lr": ({f"{CLIP}.pretrain.lr": 2e-3}, {"pretrain_clip"}),
    "backbone[pretrain_clip].pretrain.weight_decay": ({f"{CLIP}.pretrain.weight_decay": 1e-4}, {"pretrain_clip"}),
    "backbone[pretrain_clip].pretrain.seed": ({f"{CLIP}.pretrain.seed": 1}, {"pretrain_clip"}),
    "backbone[pretrain_clip].pretrain.template": ({f"{CLIP}.pretrain.template": "an image of a {}."},
                                                  {"pretrain_clip"}),
}

# Keys that no change of a tiny config can exercise, and why each still reaches every step that reads it.
NOT_EXERCISED = {
    # no two MTIL methods of the tiny run take the same keys (the method key is audited on the class-incremental
    # side; it is in the `model` parameter of every MTIL training step); DIKI's optimiser has one value
    "mtil_experiment.method": "no two MTIL methods with the same keys",
    "diki.train.optimizer": "always sgd",
    # the type chooses the rule that makes a dataset's manifests, or a backbone's weights: another type is another
    # rule, whose outputs are missing, so everything built on the dataset or backbone is made anew
    "dataset.type": "chooses the manifest rule",
    "backbone.type": "chooses the weights rule",
    # keys of dataset types the tiny run has none of: every key of a dataset but its transforms and template
    # (exercised above) is in the manifest rules' `spec` parameter (common.smk, dataset_content)
    "dataset[folder].path": "manifest rule parameter",
    "dataset[folder].split.rule": "manifest rule parameter",
    "dataset[folder].split.seed": "manifest rule parameter",
    "dataset[folder].split.test_fraction": "manifest rule parameter",
    "dataset[folder].skip_unreadable": "manifest rule parameter",
    "dataset[imagenet-r].split.rule": "manifest rule parameter",
    "dataset[imagenet-r].split.seed": "manifest rule parameter",
    "dataset[imagenet-r].split.train_fraction": "manifest rule parameter",
    "dataset[mtil].name": "manifest rule parameter",
    "dataset[mtil].shots": "manifest rule parameter",
    "dataset[mtil].split_seed": "manifest rule parameter",
    "dataset[captions].name": "manifest rule parameter",
    # keys of hub backbones (the tiny run pretrains its own): the whole backbone spec is the `backbone` parameter
    # of every step that loads it (exercised above with image_size, mean and std), and `weights` is its input file,
    # compared by content
    "backbone[timm].name": "every step's backbone parameter",
    "backbone[timm].weights": "every step's backbone parameter and weights input",
    "backbone[open_clip].name": "every step's backbone parameter",
    "backbone[open_clip].pretrained": "every step's backbone parameter",
    "backbone[open_clip].quick_gelu": "every step's backbone parameter",
    "backbone[open_clip].weights": "every step's backbone parameter and weights input",
}


def test_every_schema_key_is_audited_or_listed_with_its_reason():
    keys = schema_keys()
    audited = set(READERS) | set(BASELINE_READERS)  # the compared methods' keys: in their own tiny run
    assert not set(READERS) & set(BASELINE_READERS) and not audited & set(NOT_EXERCISED)
    missing = keys - audited - set(NOT_EXERCISED)
    assert not missing, f"schema keys on no list (add them to READERS or NOT_EXERCISED): {sorted(missing)}"
    assert not (audited | set(NOT_EXERCISED)) - keys, "listed keys the schema no longer has"


def test_changing_any_setting_schedules_every_step_that_reads_it(tiny_run, tmp_path):
    assert scheduled_rules(tiny_run, tiny_run / "config.yaml") == set(), "the tiny run is not complete"
    failures = []
    for key, (changes, readers) in READERS.items():
        configfile = tmp_path / "config.yaml"
        configfile.write_text(yaml.safe_dump(changed(TINY_CONFIG, changes), sort_keys=False))
        rules = scheduled_rules(tiny_run, configfile)
        if not rules or not readers <= rules:
            failures.append(f"{key}: scheduled {sorted(rules)}, missing {sorted(readers - rules)}")
    assert not failures, "\n".join(failures)


def test_no_step_reads_the_config():
    """Scripts never touch snakemake.config, and the step modules never import the config module."""
    for script in sorted((REPO / "scripts").glob("*.py")):
        assert "snakemake.config" not in script.read_text(), script.name
    for module in sorted((REPO / "src/ifcl/steps").glob("*.py")) + [REPO / "src/ifcl/runtime.py"]:
        imported = {n.module for n in ast.walk(ast.parse(module.read_text())) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(ast.parse(module.read_text())) if isinstance(n, ast.Import)
                     for a in n.names}
        assert not {m for m in imported if m and m.split(".")[-1] == "config"}, module.name
