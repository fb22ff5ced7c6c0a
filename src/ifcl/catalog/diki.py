"""DIKI (``lloongx/DIKI``): a frozen CLIP with per-task key/value prefixes in a residual attention branch of the
first blocks of both towers; at test time a per-task Gaussian of frozen image features decides how much of the
learnt knowledge to inject. Implementation: :mod:`ifcl.steps.diki` (its rule chain ``prefix``: gaussian,
train_prefix -> evaluate_diki, beside the MTIL protocol's frozen features).
"""
from __future__ import annotations

import yaml

from .. import layout
from ..config import ConfigError
from ..registry import Method

SETTINGS = yaml.safe_load("""
prefix:
  description: "residual prefixes of the first depth_* blocks of each tower, `length` tokens (official 8, 8, 8)"
  type: object
  required: [depth_vision, depth_text, length]
  properties:
    depth_vision: {type: integer, minimum: 1}
    depth_text: {type: integer, minimum: 1}
    length: {type: integer, minimum: 1}
    attention:
      description: >-
        residual: the prefixes' own softmax added to the frozen attention, scaled by λ (official); softmax:
        the ablation of prefix tuning, the prefixes joining the frozen keys and values in one softmax, λ
        scaling their attention weights before it normalises
      enum: [residual, softmax]
      default: residual
  additionalProperties: false
train:
  description: "SGD (momentum 0), per-iteration cosine from lr to lr * final_lr_ratio (official 5.0, 1e-3, 10 epochs, batch 128)"
  type: object
  required: [optimizer, lr, final_lr_ratio, weight_decay, epochs, batch_size]
  properties:
    optimizer: {const: sgd}
    lr: {type: number, exclusiveMinimum: 0}
    final_lr_ratio: {type: number, exclusiveMinimum: 0, maximum: 1}
    weight_decay: {type: number, minimum: 0}
    epochs: {type: integer, minimum: 1}
    batch_size: {type: integer, minimum: 1}
  additionalProperties: false
rng:
  description: >-
    per-task: every task's prefixes and data order from its own seed (the tasks train in parallel);
    sequential: one random stream through the tasks in order, as the official single process (each task waits for the previous one)
  enum: [per-task, sequential]
calibration:
  type: object
  required: [batchwise, scale]
  properties:
    batchwise: {type: boolean, description: "majority vote of the task over each test batch (official); false: per sample"}
    scale:
      description: "λ = σ(s / scale − 1); null: the feature width (the official code writes 512, ViT-B/16's width)"
      type: [number, "null"]
      exclusiveMinimum: 0
    weight:
      description: >-
        likelihood: λ from the likeliest task's log-likelihood, as `scale` says (official); one: the ablation
        without calibration, λ = 1 for every image (the task is still the likeliest)
      enum: [likelihood, one]
      default: likelihood
  additionalProperties: false
""")


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
    steps="ifcl.steps.diki", settings=SETTINGS, required=("prefix", "train", "rng", "calibration"),
    model_keys=("prefix",), task_files=task_files, check=check, run_figures=lambda spec: ("lambda",),
    log_fields={"accuracy": "train_accuracy"}, group="diki"),)
