"""LAE (Gao et al., ICCV 2023, "A Unified Continual Learning Framework with General Parameter-Efficient Tuning";
``gqk/LAE``) with its adapters, the variant of its ViT-B/16 tables: online adapters beside the attention of blocks
0-4 learnt every task, an offline copy kept as their moving average, the ensemble of both at inference. Math:
:mod:`ifcl.methods.lae`; model: :class:`ifcl.models.vit_lae.ViTLAE`; the state chain's steps (:mod:`ifcl.steps.state`):
task t's file holds head t and both sets of adapters after task t.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, check_blocks
from ..registry import Method
from ..settings import setting


@dataclass(frozen=True, kw_only=True)
class Ensemble:
    """LAE's adapters, moving average and ensemble (gqk/LAE main.py MyModuleConf and its adapter config, vit_adapter.yaml)"""

    adapt_blocks: list[int] = setting([0, 1, 2, 3, 4], "the blocks with an adapter beside their attention (official "
                                                       "[0, 1, 2, 3, 4])", items_minimum=0, min_items=1,
                                      unique_items=True)
    bottleneck: int = setting(5, "the adapters' width (official down_sample: 5)", minimum=1)
    ema_decay: float = setting(0.9999, "the offline adapters' moving-average decay per optimiser step (official "
                                       "0.9999)", minimum=0, maximum=1)
    freeze_epochs: int = setting(3, "from task 1 on, the epochs at a task's start in which the online adapters stay "
                                    "frozen while the new head learns (official 3)", minimum=0)
    only_offline: bool = setting(False, "predict with the offline adapters alone once they exist, not the ensemble "
                                        "(official eval_only_emas: false)")


@dataclass(frozen=True, kw_only=True)
class LAE:
    lae: Ensemble = setting(Ensemble(), "LAE's adapters and ensemble")


def check(key: str, spec: dict, config: dict) -> None:
    check_blocks(key, spec, config, {"lae.adapt_blocks": spec["lae"].get("adapt_blocks")})
    if spec["train"].get("weight_decay", 0) != 0 and spec["train"]["optimizer"] == "adam":
        raise ConfigError(f"{key}.train.weight_decay: LAE trains head t alone, which matches the official Adam over "
                          f"every head only without weight decay (the old heads would decay); set it to 0")


METHODS = (Method(
    name="lae", protocol="cil", title="LAE",
    description="online adapters beside the attention of the first blocks learnt every task, offline adapters as "
                "their moving average, and the per-class maximum of both models' probabilities at inference (settings "
                "under lae; gqk/LAE)",
    model="ifcl.models.vit_lae:build", settings=LAE, model_keys=("lae",), check=check,
    drop_last=True),)  # gqk/LAE config/base/*.yaml: dataloader drop_last: true
