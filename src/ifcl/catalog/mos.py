"""MOS (Sun et al., AAAI 2025; ``sun-hailong/AAAI25-MOS``, also ``LAMDA-CL/LAMDA-PILOT models/mos.py``): an
adapter per task merged toward the earlier ones, class Gaussians and a classifier alignment after each task, and
the self-refined adapter retrieval at inference. Math: :mod:`ifcl.methods.mos`; model:
:class:`ifcl.models.vit_mos.ViTMOS`; the state chain's steps (:mod:`ifcl.steps.state`), with a pass over the task's
training images under the test transform after training (``finish_task``: statistics, alignment, prototypes).

The official optimisation is the state chain's: SGD with momentum 0.9, the adapters at ``lr`` and the head at
``head_lr`` = lr / 10, ``weight_decay`` on both, ``schedule: cosine``, the loader keeping its last batch
(``exps/mos_cifar.json``: lr 0.03, weight decay 5e-4, batch 48, 20 epochs; ``exps/mos_inr.json``: lr 0.05, weight
decay 5e-3, batch 16, 10 epochs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..registry import Method
from ..settings import setting


@dataclass(frozen=True, kw_only=True)
class Alignment:
    """MOS's classifier alignment (sun-hailong/AAAI25-MOS models/mos.py, classifer_align)"""

    epochs: int = setting(30, "epochs of the alignment (official crct_epochs 30)", minimum=1)
    lr: float = setting(0.005, "SGD learning rate, cosine-annealed per epoch to 0 (official ca_lr 0.005)",
                        exclusive_minimum=0)
    momentum: float = setting(0.9, "SGD momentum (official 0.9)", minimum=0)
    weight_decay: float = setting(doc="SGD weight decay: the official code uses the training weight_decay (5e-4 "
                                      "CIFAR-100, 5e-3 ImageNet-R)", minimum=0)
    samples_per_class: int = setting(doc="features drawn per seen class and epoch, also the batch: the official "
                                         "5 x batch_size (240 CIFAR-100, 80 ImageNet-R)", minimum=1)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """MOS's adapters, merging, statistics and retrieval (sun-hailong/AAAI25-MOS backbone/vit_mos.py, models/mos.py)"""

    bottleneck: int = setting(16, "width of each block's adapter (official ffn_num 16)", minimum=1)
    adapter_scale: float = setting(0.1, "the adapter's output scale (official 0.1)")
    adapter_dropout: float = setting(0.1, "dropout after the adapter's ReLU while training (official 0.1)",
                                     minimum=0, exclusive_maximum=1)
    adapter_momentum: float = setting(0.1, "m of the adapter merge w <- (1 - m) w + m mean(earlier adapters) "
                                           "(official 0.1; 0: no merging)", minimum=0, maximum=1)
    merge: Literal["official", "functional"] = setting(
        "official", "official: the code's in-place merge (depth pulls inside every training forward and one after "
                    "each step, the drift during the class statistics, adapter t >= 1 evaluated as the mean of the "
                    "adapters before it); functional: one merged copy used everywhere, one pull after each step")
    ortho_weight: float = setting(0.1, "weight of the orthogonality loss of the features against the earlier "
                                       "classes' means (official reg 0.1)", minimum=0)
    statistics_batch_size: int = setting(
        doc="batch of the official per-class statistics loaders, 3 x batch_size (144 CIFAR-100, 48 ImageNet-R): it "
            "sets how far the adapter drifts during the statistics (merge: official)", minimum=1)
    prototype_dropout: bool = setting(
        True, "the prototypes of tasks >= 1 computed with the adapter dropout on, as the official code leaves the "
              "backbone in train mode after the alignment")
    refine_steps: int = setting(4, "most logits evaluations of the self-refined retrieval (official MAX_ITER 4)",
                                minimum=1)
    ensemble: bool = setting(True, "add the softmax of the prototype logits times the number of tasks to that of "
                                   "the refined logits (official ensemble: true)")
    alignment: Alignment = setting(doc="the classifier alignment after each task from task 1 on")


@dataclass(frozen=True, kw_only=True)
class MOS:
    mos: Settings = setting()


METHODS = (Method(
    name="mos", protocol="cil", title="MOS",
    description="an adapter per task merged toward the earlier ones, class Gaussians and a classifier alignment after "
                "each task, and the self-refined adapter retrieval ensembled with first-adapter prototypes (settings "
                "under mos; sun-hailong/AAAI25-MOS)",
    model="ifcl.models.vit_mos:build", settings=MOS, model_keys=("mos",), statistics_images="test_transform",
    group="mos"),)
