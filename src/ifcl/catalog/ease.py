"""EASE (Zhou et al., CVPR 2024; ``sun-hailong/CVPR24-Ease``): a new adapter set per task beside every block's MLP,
frozen afterwards; the features of every task's subspace side by side; class prototypes measured in every subspace,
old classes' prototypes in newer subspaces complemented from their semantic similarity to newer classes; a
reweighted cosine classifier over the prototypes. Math: :mod:`ifcl.methods.ease`; model:
:class:`ifcl.models.vit_ease.ViTEASE`; the state chain's steps (:mod:`ifcl.steps.state`), the prototypes measured by
the model's ``finish_task`` on the task's training images under the test transform; task t's file holds its adapters,
its training head and its classes' prototypes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Method
from ..settings import setting


@dataclass(frozen=True, kw_only=True)
class Subspaces:
    """EASE's adapters, prototypes and subspace ensemble (sun-hailong/CVPR24-Ease exps/*.json, utils/inc_net.py,
    backbone/vit_ease.py, backbone/linears.py)"""

    bottleneck: int = setting(64, "each adapter's width (official ffn_num: 64; 16 on VTAB)", minimum=1)
    adapter_scale: float = setting(0.1, "the factor of each adapter's output (official ffn_adapter_scalar: 0.1)")
    adapter_dropout: float = setting(0.1, "dropout after the adapter's ReLU in the training forward (official 0.1)",
                                     minimum=0, exclusive_maximum=1)
    alpha: float = setting(0.1, "inference weight of the other tasks' subspaces, divided by the index of the last "
                                "task (official alpha: 0.1 on CIFAR-100 and ImageNet-R)", minimum=0)
    use_init_ptm: bool = setting(False, "the frozen backbone's feature as one more subspace, weighted beta (official "
                                        "use_init_ptm: false on CIFAR-100 and ImageNet-R)")
    beta: float = setting(0.0, "inference weight of the frozen backbone's subspace with use_init_ptm (official "
                               "beta: 0 where use_init_ptm is false, 1 where it is true)", minimum=0)
    recalc_sim: bool = setting(True, "complement every old prototype again after each task from the classes of all "
                                     "tasks that own both subspaces (official recalc_sim: true); false: once, from "
                                     "the classes of the task whose subspace it is")
    reweight: bool = setting(True, "EASE's subspace reweighting at inference (official use_reweight: true); false: "
                                   "the cosine of the concatenated features and prototypes")


@dataclass(frozen=True, kw_only=True)
class EASE:
    ease: Subspaces = setting(Subspaces(), "EASE's adapters and subspace ensemble")


METHODS = (Method(
    name="ease", protocol="cil", title="EASE",
    description="a new adapter set per task beside every block's MLP, frozen afterwards; prototypes of every class in "
                "every task's subspace, old classes complemented in newer subspaces from their similarity to newer "
                "classes; a reweighted cosine classifier over the concatenated subspaces (settings under ease; "
                "sun-hailong/CVPR24-Ease)",
    model="ifcl.models.vit_ease:build", settings=EASE, model_keys=("ease",),
    statistics_images="test_transform"),)  # replace_fc: the task's training images under the test transform
