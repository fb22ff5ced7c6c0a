"""InfLoRA and its relatives (``liangyanshuo/InfLoRA``): a frozen ViT with one LoRA branch per task on the key and
value projections, merged into the weights when its task ends. Implementation: :mod:`ifcl.steps.inflora` (its
rule chain ``lora``: reduction -> train_task (-> memory) (-> class_stats -> align) -> evaluate_task).

* seq-lora: the down-projection R_t drawn at random (LoRA's init) and frozen, no memory;
* joint: seq-lora's one branch trained on every class at once (``num_tasks: 1``), the upper bound;
* inflora: R_t designed orthogonal to the old tasks' input space, kept by a (Dual)GPM memory (InfLoRA-b5 is
  inflora with ``lora_blocks: [0, 1, 2, 3, 4]`` and ``memory: gpm``);
* inflora-ca: inflora plus classifier alignment from per-class feature Gaussians (``ca``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import layout
from ..config import ConfigError, check_blocks
from ..registry import Method
from ..settings import setting


@dataclass(frozen=True, kw_only=True)
class SeqLoRA:
    """seq-lora's and joint's keys: one LoRA branch per task on k and v."""

    rank: int = setting(doc="rank of each task's LoRA branch (official 10)", minimum=1)
    lora_blocks: Literal["all"] | list[int] = setting(
        doc="all, or the list of block indices that carry LoRA branches (InfLoRA-b5: [0, 1, 2, 3, 4])",
        items_minimum=0, min_items=1, unique_items=True)
    final_norm: Literal["pretrained", "reset"] = setting(
        "pretrained", "pretrained: the backbone's final LayerNorm; reset: replaced by a fresh identity-affine "
        "LayerNorm (eps 1e-5), as the official CIFAR-100 InfLoRA+CA recipe (InfLoRA_CA1) does (liangyanshuo/InfLoRA)")


@dataclass(frozen=True, kw_only=True)
class InfLoRA(SeqLoRA):
    """inflora's keys: seq-lora's and the memory's."""

    lamb: float = setting(doc="λ_b of the memory threshold ε_t = λ_b + (λ_e - λ_b)·t/T (liangyanshuo/InfLoRA)",
                          exclusive_minimum=0, maximum=1)
    lame: float = setting(doc="λ_e (1.0 in every official config)", exclusive_minimum=0, maximum=1)
    memory: Literal["dualgpm", "gpm"] = setting(
        doc="dualgpm (InfLoRA's update_DualGPM) or gpm (update_GPM: b5, CA and DomainNet recipes)")


@dataclass(frozen=True, kw_only=True)
class Alignment:
    """InfLoRA+CA classifier alignment (liangyanshuo/InfLoRA)"""

    samples_per_class: int = setting(doc="official: 256", minimum=1)
    epochs: int = setting(doc="official: 5", minimum=1)
    lr: float = setting(doc="SGD, official: 0.01 with CosineAnnealingLR", exclusive_minimum=0)
    momentum: float = setting(minimum=0, maximum=1)
    weight_decay: float = setting(minimum=0)
    logit_norm: float | None = setting(
        doc="temperature of the logit normalisation (official 0.1), null for plain cross-entropy", exclusive_minimum=0)
    covariance_eps: float = setting(doc="added to each class covariance (official 1e-4)", minimum=0)


@dataclass(frozen=True, kw_only=True)
class InfLoRACA(InfLoRA):
    """inflora-ca's keys: inflora's and the alignment's."""

    ca: Alignment = setting()


def task_files(spec: dict, t: int) -> tuple[str, ...]:
    """Task t's files: R_t, E_t and head t, the training log and the evaluation; the memory for InfLoRA (not after
    the last task: nothing would read it); the class statistics and, from task 1 on, the aligned heads (CA)."""
    names = (layout.REDUCTION, layout.ADAPTER, layout.TRAIN_LOG, layout.EVAL)
    if uses_memory(spec) and t < spec["num_tasks"] - 1:
        names += (layout.MEMORY,)
    if uses_alignment(spec):
        names += (layout.CLASS_STATS,) + ((layout.ALIGNED_HEADS, layout.ALIGN_LOG) if t >= 1 else ())
    return names


def uses_memory(spec: dict) -> bool:
    """InfLoRA and InfLoRA+CA design R_t and keep a (Dual)GPM memory; seq-lora and joint do neither."""
    return spec["method"] in ("inflora", "inflora-ca")


def uses_alignment(spec: dict) -> bool:
    return spec["method"] == "inflora-ca"


def aligned_heads_task(spec: dict, t: int) -> bool:
    """Whether the heads after task t are the aligned ones (InfLoRA+CA, t >= 1; the steps' side of the same fact is
    :func:`ifcl.steps.inflora.aligned_heads_task`)."""
    return uses_alignment(spec) and t >= 1


def memory_figures(spec: dict) -> tuple[str, ...]:
    """The memory-size figure, for runs that write a memory (after every task but the last)."""
    return ("memory",) if uses_memory(spec) and spec["num_tasks"] > 1 else ()


def check(key: str, spec: dict, config: dict) -> None:
    check_blocks(key, spec, config, {"lora_blocks": spec.get("lora_blocks")})
    if spec["method"] == "joint" and spec["num_tasks"] != 1:
        raise ConfigError(f"{key}.num_tasks: joint trains every class at once, so num_tasks must be 1, not "
                          f"{spec['num_tasks']}")


def _method(name: str, title: str, description: str, settings: type) -> Method:
    return Method(name=name, protocol="cil", chain="lora", title=title, description=description,
                  steps="ifcl.steps.inflora", settings=settings, model_keys=("rank", "lora_blocks", "final_norm"),
                  task_files=task_files, check=check, run_figures=memory_figures, group="inflora")


METHODS = (
    _method("seq-lora", "seq-LoRA", "one LoRA branch per task on k and v, random frozen down-projection, no memory",
            SeqLoRA),
    _method("joint", "joint", "seq-lora's one branch trained on every class at once (num_tasks 1), the "
                              "class-incremental upper bound", SeqLoRA),
    _method("inflora", "InfLoRA", "down-projection designed orthogonal to the old tasks' input space, (Dual)GPM "
                                  "memory (InfLoRA-b5: inflora with lora_blocks [0, 1, 2, 3, 4] and memory gpm; "
                                  "liangyanshuo/InfLoRA)", InfLoRA),
    _method("inflora-ca", "InfLoRA+CA", "inflora + classifier alignment from per-class feature Gaussians "
                                        "(settings under ca)", InfLoRACA),
)
