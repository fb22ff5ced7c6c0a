"""SD-LoRA (``WuYichen-97/SD-Lora-CL``): a LoRA branch per task on q and v whose finished directions are kept
normalised and rescaled by trainable magnitudes. Math: :mod:`ifcl.methods.sdlora`; model:
:class:`ifcl.models.vit_sdlora.ViTSDLoRA`; the ``state`` chain's steps (:mod:`ifcl.steps.state`): task t's
file holds task t's factors, head t and the magnitudes after task t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, check_blocks
from ..registry import Method
from ..settings import OPTIONAL, setting


@dataclass(frozen=True, kw_only=True)
class Magnitudes:
    """SD-LoRA's magnitudes and rank schedule (WuYichen-97/SD-Lora-CL backbone/lora.py, models/sdlora.py)"""

    SCHEMA = {"dependentRequired": {"ranks": ["rank_starts"], "rank_starts": ["ranks"]}}

    init_magnitude: float = setting(doc="every magnitude at the start of a task (official 0.8)")
    reset_magnitudes: bool = setting(
        doc="true: every magnitude, old tasks' included, starts each task at init_magnitude, as the official code "
            "rebuilds them and never reloads the trained values; false: the trained magnitudes carry over")
    ranks: list[int] = setting(
        OPTIONAL, "SD-LoRA-RR: the rank of the tasks from each of rank_starts on (the official, commented-out "
                  "schedule: [10, 8, 6])", items_minimum=1, min_items=1)
    rank_starts: list[int] = setting(
        OPTIONAL, "SD-LoRA-RR: the first task of each rank in ranks, increasing from 0 ([0, 4, 8])",
        items_minimum=0, min_items=1)


@dataclass(frozen=True, kw_only=True)
class SDLoRA:
    rank: int = setting(doc="rank of each task's LoRA branch (official 10)", minimum=1)
    lora_blocks: Literal["all"] | list[int] = setting(
        doc="all, or the list of block indices that carry LoRA branches (official: all)",
        items_minimum=0, min_items=1, unique_items=True)
    sdlora: Magnitudes = setting()


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
    model="ifcl.models.vit_sdlora:build", settings=SDLoRA, model_keys=("num_tasks", "rank", "lora_blocks", "sdlora"),
    check=check, group="sdlora"),)
