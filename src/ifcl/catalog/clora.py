"""C-LoRA (Smith et al., TMLR 2024, arXiv 2304.06027): a LoRA per task on the key and value projections whose
update is penalised where the earlier tasks' updates changed the weight, λ ‖(Σ_{s<t} B_s A_s) ⊙ B_t A_t‖². No
official code exists; the rule is the one the InfLoRA authors wrote (commented out) into liangyanshuo/InfLoRA
``methods/inflorab5.py``. Math: :mod:`ifcl.methods.clora`; model: :class:`ifcl.models.vit_clora.ViTCLoRA`; the
``state`` chain's steps (:mod:`ifcl.steps.state`): task t's file holds task t's factors and head t.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import check_blocks
from ..registry import Method
from ..settings import setting


@dataclass(frozen=True, kw_only=True)
class Regulariser:
    """C-LoRA's self-regularisation (no official code; liangyanshuo/InfLoRA methods/inflorab5.py, commented out)"""

    weight: float = setting(
        doc="λ, the weight of Σ_blocks Σ_projections ‖(Σ_{s<t} B_s A_s) ⊙ B_t A_t‖_F² in the loss (the InfLoRA "
            "code multiplies it by its `lamb`, 0.95 CIFAR-100 and DomainNet, 0.98 ImageNet-R; the C-LoRA paper's "
            "value for classification was not found)", minimum=0)
    projections: Literal["kv", "qv", "qkv"] = setting(
        "kv", "the attention projections that carry the LoRA: kv (the paper's K and V; the InfLoRA code's k and v "
              "of every block), qv or qkv")


@dataclass(frozen=True, kw_only=True)
class CLoRA:
    rank: int = setting(doc="rank of each task's LoRA (the InfLoRA configs: 10; 30 on DomainNet)", minimum=1)
    lora_blocks: Literal["all"] | list[int] = setting(
        doc="all, or the list of block indices that carry the LoRA (InfLoRA code: all)",
        items_minimum=0, min_items=1, unique_items=True)
    clora: Regulariser = setting()


def check(key: str, spec: dict, config: dict) -> None:
    check_blocks(key, spec, config, {"lora_blocks": spec.get("lora_blocks")})


METHODS = (Method(
    name="c-lora", protocol="cil", title="C-LoRA",
    description="a LoRA per task on k and v of every block, finished tasks merged and frozen, the new update "
                "penalised by λ ‖(Σ past updates) ⊙ new update‖² (rank, lora_blocks and settings under clora; no "
                "official code: the rule of a commented-out block of liangyanshuo/InfLoRA)",
    model="ifcl.models.vit_clora:build", settings=CLoRA, model_keys=("rank", "lora_blocks", "clora"),
    check=check, group="clora"),)
