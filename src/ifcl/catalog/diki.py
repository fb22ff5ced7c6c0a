"""DIKI (``lloongx/DIKI``): a frozen CLIP with per-task key/value prefixes in a residual attention branch of the
first blocks of both towers; at test time a per-task Gaussian of frozen image features decides how much of the
learnt knowledge to inject. Implementation: :mod:`ifcl.steps.diki` (its rule chain ``prefix``: gaussian,
train_prefix -> evaluate_diki, beside the MTIL protocol's frozen features).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import layout
from ..config import ConfigError
from ..registry import Method
from ..settings import setting


@dataclass(frozen=True, kw_only=True)
class Prefix:
    """residual prefixes of the first depth_* blocks of each tower, `length` tokens (official 8, 8, 8)"""

    depth_vision: int = setting(minimum=1)
    depth_text: int = setting(minimum=1)
    length: int = setting(minimum=1)
    attention: Literal["residual", "softmax"] = setting(
        "residual", "residual: the prefixes' own softmax added to the frozen attention, scaled by λ (official); "
        "softmax: the ablation of prefix tuning, the prefixes joining the frozen keys and values in one softmax, λ "
        "scaling their attention weights before it normalises")


@dataclass(frozen=True, kw_only=True)
class Train:
    """SGD (momentum 0), per-iteration cosine from lr to lr * final_lr_ratio (official 5.0, 1e-3, 10 epochs, batch 128)"""

    optimizer: Literal["sgd"] = setting()
    lr: float = setting(exclusive_minimum=0)
    final_lr_ratio: float = setting(exclusive_minimum=0, maximum=1)
    weight_decay: float = setting(minimum=0)
    epochs: int = setting(minimum=1)
    batch_size: int = setting(minimum=1)


@dataclass(frozen=True, kw_only=True)
class Calibration:
    batchwise: bool = setting(doc="majority vote of the task over each test batch (official); false: per sample")
    scale: float | None = setting(
        doc="λ = σ(s / scale − 1); null: the feature width (the official code writes 512, ViT-B/16's width)",
        exclusive_minimum=0)
    weight: Literal["likelihood", "one"] = setting(
        "likelihood", "likelihood: λ from the likeliest task's log-likelihood, as `scale` says (official); one: the "
        "ablation without calibration, λ = 1 for every image (the task is still the likeliest)")


@dataclass(frozen=True, kw_only=True)
class DIKI:
    prefix: Prefix = setting()
    train: Train = setting()
    rng: Literal["per-task", "sequential"] = setting(
        doc="per-task: every task's prefixes and data order from its own seed (the tasks train in parallel); "
            "sequential: one random stream through the tasks in order, as the official single process (each task "
            "waits for the previous one)")
    calibration: Calibration = setting()


def check(key: str, spec: dict, config: dict) -> None:
    backbone = config["backbones"][spec["backbone"]]
    if backbone["type"] == "pretrain_clip":
        arch = backbone["arch"]
        for tower, layers in (("vision", arch["vision"]["layers"]), ("text", arch["text"]["layers"])):
            if spec["prefix"][f"depth_{tower}"] > layers:
                raise ConfigError(f"{key}.prefix.depth_{tower}: {spec['prefix'][f'depth_{tower}']} blocks, but "
                                  f"the {tower} tower of '{spec['backbone']}' has {layers}")


def task_files(spec: dict, t: int) -> tuple[str, ...]:
    return layout.GAUSSIAN, layout.PREFIX, layout.TRAIN_LOG, layout.EVAL


METHODS = (Method(
    name="diki", protocol="mtil", chain="prefix", title="DIKI",
    description="one task per dataset of `sequence`, on a frozen CLIP: residual key/value prefixes per task and a "
                "per-task Gaussian of frozen features that calibrates how much of them each image gets "
                "(lloongx/DIKI)",
    steps="ifcl.steps.diki", settings=DIKI,
    model_keys=("prefix",), task_files=task_files, check=check, run_figures=lambda spec: ("lambda",),
    log_fields={"accuracy": "train_accuracy"}, group="diki"),)
