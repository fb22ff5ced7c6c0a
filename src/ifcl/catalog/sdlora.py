"""SD-LoRA (``WuYichen-97/SD-Lora-CL``): a LoRA branch per task on q and v whose finished directions are kept
normalised and rescaled by trainable magnitudes. Math: :mod:`ifcl.methods.sdlora`; model:
:class:`ifcl.models.vit_sdlora.ViTSDLoRA`; the ``state`` chain's steps (:mod:`ifcl.steps.state`): task t's
file holds task t's factors, head t and the magnitudes after task t.
"""
from __future__ import annotations

import yaml

from ..config import ConfigError, check_blocks
from ..registry import Method

SETTINGS = yaml.safe_load("""
rank: {type: integer, minimum: 1, description: "rank of each task's LoRA branch (official 10)"}
lora_blocks:
  description: "all, or the list of block indices that carry LoRA branches (official: all)"
  oneOf:
    - const: all
    - type: array
      items: {type: integer, minimum: 0}
      minItems: 1
      uniqueItems: true
sdlora:
  description: "SD-LoRA's magnitudes and rank schedule (WuYichen-97/SD-Lora-CL backbone/lora.py, models/sdlora.py)"
  type: object
  required: [init_magnitude, reset_magnitudes]
  properties:
    init_magnitude: {type: number, description: "every magnitude at the start of a task (official 0.8)"}
    reset_magnitudes:
      description: >-
        true: every magnitude, old tasks' included, starts each task at init_magnitude, as the official code
        rebuilds them and never reloads the trained values; false: the trained magnitudes carry over
      type: boolean
    ranks:
      description: "SD-LoRA-RR: the rank of the tasks from each of rank_starts on (the official, commented-out schedule: [10, 8, 6])"
      type: array
      items: {type: integer, minimum: 1}
      minItems: 1
    rank_starts:
      description: "SD-LoRA-RR: the first task of each rank in ranks, increasing from 0 ([0, 4, 8])"
      type: array
      items: {type: integer, minimum: 0}
      minItems: 1
  dependentRequired: {ranks: [rank_starts], rank_starts: [ranks]}
  additionalProperties: false
""")


def check(key: str, spec: dict, config: dict) -> None:
    check_blocks(key, spec, config, {"lora_blocks": spec.get("lora_blocks")})
    if spec["num_tasks"] > 21:
        raise ConfigError(f"{key}.num_tasks: the official SD-LoRA keeps 20 previous magnitudes, so at most 21 "
                          f"tasks, not {spec['num_tasks']}")
    starts = spec["sdlora"].get("rank_starts")
    if starts is not None and (starts[0] != 0 or starts != sorted(set(starts))
                               or len(starts) != len(spec["sdlora"]["ranks"])):
        raise ConfigError(f"{key}.sdlora.rank_starts: {starts} must increase from 0, one per entry of "
                          f"sdlora.ranks ({spec['sdlora']['ranks']})")


METHODS = (Method(
    name="sd-lora", protocol="cil", title="SD-LoRA",
    description="a LoRA branch per task on q and v whose finished directions are kept normalised and rescaled by "
                "trainable magnitudes (rank, lora_blocks and settings under sdlora; WuYichen-97/SD-Lora-CL)",
    model="ifcl.models.vit_sdlora:build", settings=SETTINGS,
    required=("rank", "lora_blocks", "sdlora"), model_keys=("num_tasks", "rank", "lora_blocks", "sdlora"),
    check=check, group="sdlora"),)
