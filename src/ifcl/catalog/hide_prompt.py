"""HiDe-Prompt (Wang et al., NeurIPS 2023; ``thu-ml/HiDe-Prompt``): one prefix prompt per task chosen by a
task-identity model on the prompt-free features, contrastive regularisation against earlier classes' prototypes,
and the alignment of both classifiers on features sampled from class statistics. Math:
:mod:`ifcl.methods.hide_prompt`; model: :class:`ifcl.models.vit_hide_prompt.HiDePromptViT`; the state chain's steps
(:mod:`ifcl.steps.state`): the chain's optimiser pass trains the prompt and head of the task, the model's
``finish_task`` (on the task's images under the test transform) trains the task-identity model and aligns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import check_blocks
from ..registry import Method
from ..settings import setting

SCALE = 24 / 256  # the official lr scaling: lr · batch_size / 256 with the per-GPU batch of 24 (unscale_lr)


@dataclass(frozen=True, kw_only=True)
class Prompts:
    """The task prompts and their training (peft/prompt/hide_prompt.py, engines/hide_promtp_wtp_and_tap_engine.py)"""

    length: int = setting(doc="prefix tokens per key and per value of each prompted block (official CIFAR-100 5, "
                              "ImageNet-R 20)", minimum=1)
    layers: list[int] = setting([0, 1, 2, 3, 4], "the prompted blocks (official e_prompt_layer_idx 0-4)",
                                items_minimum=0, min_items=1, unique_items=True)
    momentum: float = setting(0.01, "m: task t >= 1 trains and keeps (1 - m) P_t + m mean(P_0..P_{t-1}) "
                                    "(official prompt_momentum 0.01)", minimum=0, maximum=1)
    contrastive: float = setting(doc="weight of the contrastive regularisation against the earlier classes' "
                                     "prototypes (official reg: CIFAR-100 0.1, ImageNet-R 0.5)", minimum=0)
    temperature: float = setting(0.8, "the divisor of the similarities in the contrastive loss (official 0.8)",
                                 exclusive_minimum=0)
    layout: Literal["official", "key_value"] = setting(
        "official", "official: the official reshape of the selected prompts (image j of a GPU's batch of b takes "
                    "prompt half 2j // b as prefix keys and (2j + 1) // b as values); key_value: the first half keys, "
                    "the second values, for every image")
    devices: int = setting(8, "GPUs of the official runs (torch.distributed, 24 images each): each training batch is "
                              "split into this many parts, the contrastive loss and the prompt layout computed per "
                              "part and averaged as DistributedDataParallel averages the gradients; the training "
                              "batch_size is theirs together (8 x 24 = 192)", minimum=1)
    device_batch: int = setting(24, "the official per-GPU batch: the prompt layout's batches in the evaluation and "
                                    "in the statistics pass", minimum=1)


@dataclass(frozen=True, kw_only=True)
class TaskIdentity:
    """The task-identity model's training (trainers/tii_trainer.py, engines/hide_tii_engine.py)"""

    ratio: int = setting(2, "hidden width of its residual MLP in multiples of the feature width (official "
                            "original_model_mlp_structure [2])", minimum=1)
    epochs: int = setting(20, "epochs of Adam on the task's images (official 20)", minimum=1)
    lr: float = setting(0.0005 * SCALE, "Adam's constant learning rate (official --lr 0.0005 scaled by 24/256)",
                        exclusive_minimum=0)
    clip_grad: float = setting(1.0, "gradient-norm clipping (official clip_grad 1.0)", exclusive_minimum=0)
    images: Literal["train_transform", "test_transform"] = setting(
        "train_transform", "train_transform: each epoch a pass over the task's augmented, shuffled training images "
                           "(official); test_transform: the features of the statistics pass, shuffled")


@dataclass(frozen=True, kw_only=True)
class Alignment:
    """An alignment on features sampled from the class statistics (train_task_adaptive_prediction)"""

    epochs: int = setting(30, "epochs (official crct_epochs 30), CosineAnnealingLR over them", minimum=1)
    lr: float = setting(doc="SGD's learning rate", exclusive_minimum=0)
    samples: int = setting(doc="features drawn per centroid of every seen class each epoch, and the batch size",
                           minimum=1)
    momentum: float = setting(0.9, "SGD momentum (official 0.9)", minimum=0)
    weight_decay: float = setting(0.0, "SGD weight decay (official 0: the parameter group's weight_decay, "
                                       "args.weight_decay = 0.0 of --weight-decay, overrides the 5e-4 the "
                                       "optimiser is built with)", minimum=0)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """HiDe-Prompt's settings (thu-ml/HiDe-Prompt configs/*_hideprompt_5e.py, training_scripts/train_*_vit.sh)"""

    prompt: Prompts = setting(doc="the task prompts")
    tii: TaskIdentity = setting(TaskIdentity(), "the task-identity (TII) model")
    tii_alignment: Alignment = setting(
        Alignment(lr=0.005 * SCALE, samples=24),
        "the TII model's alignment, its MLP and heads on the prompt-free statistics (official ca_lr 0.005 scaled by "
        "24/256, 24 samples)")
    alignment: Alignment = setting(
        Alignment(lr=0.005, samples=120),
        "the heads' alignment on the prompted statistics (official ca_lr 0.005, not scaled in this program, 5 x 24 "
        "samples)")
    centroids: int = setting(10, "k-means centroids per class of the class statistics (official n_centroids 10)",
                             minimum=1)


@dataclass(frozen=True, kw_only=True)
class HiDePrompt:
    hide: Settings = setting(doc="HiDe-Prompt's settings")


def check(key: str, spec: dict, config: dict) -> None:
    check_blocks(key, spec, config, {"hide.prompt.layers": spec["hide"]["prompt"]["layers"]})


METHODS = (Method(
    name="hide-prompt", protocol="cil", title="HiDe-Prompt",
    description="one prefix prompt per task chosen by a task-identity model on the prompt-free features, contrastive "
                "regularisation against earlier classes' prototypes, both classifiers aligned on features sampled "
                "from class statistics (settings under hide; thu-ml/HiDe-Prompt)",
    model="ifcl.models.vit_hide_prompt:build", settings=HiDePrompt, model_keys=("hide",), check=check,
    statistics_images="test_transform",  # engines/*: the per-class loaders use the test transform
    drop_last=False),)  # datasets.py: DataLoader without drop_last
