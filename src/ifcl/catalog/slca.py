"""SLCA (Zhang et al., ICCV 2023; ``GengDavid/SLCA``): the whole ViT fine-tuned with a small learning rate (the
slow learner: train.lr for the backbone, train.head_lr for the new head), then classifier alignment of every head
on features sampled from per-class Gaussians. Math: :mod:`ifcl.methods.slca`; model:
:class:`ifcl.models.vit_slca.SLCAViT`; the state chain's steps (:mod:`ifcl.steps.state`), the class statistics
and the alignment in the model's ``finish_task`` on the task's training images under the test transform. Task t's
file holds the whole backbone after task t, head t, its classes' Gaussians and the aligned heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..registry import Method
from ..settings import setting


@dataclass(frozen=True, kw_only=True)
class Alignment:
    """SLCA's classifier alignment (GengDavid/SLCA models/slca.py _stage2_compact_classifier, models/base.py
    _compute_class_mean)"""

    samples_per_class: int = setting(256, "features sampled per seen class and epoch, one SGD step per class "
                                          "(official 256)", minimum=1)
    epochs: int = setting(5, "epochs of the alignment after each task from task 1 on; 0: none (official ca_epochs "
                             "5)", minimum=0)
    lr: float = setting(0.01, "SGD lr, cosine over the epochs (official: the heads' lr, 0.01)", exclusive_minimum=0)
    momentum: float = setting(0.9, "SGD momentum (official 0.9)", minimum=0, maximum=1)
    weight_decay: float = setting(0.0005, "SGD weight decay (official 5e-4)", minimum=0)
    logit_norm: float | None = setting(
        0.1, "temperature of the logit normalisation (official ca_with_logit_norm: 0.1; Cars-196 0.05), null for "
             "plain cross-entropy", exclusive_minimum=0)
    covariance_eps: float = setting(1e-4, "added to the diagonal of each class covariance (official 1e-4)", minimum=0)


@dataclass(frozen=True, kw_only=True)
class SLCA:
    final_norm: Literal["reset", "pretrained"] = setting(
        "reset", "reset: the ViT's final LayerNorm replaced by a fresh one (weight 1, bias 0, eps 1e-5) and trained, "
                 "as the official convs/vits.py does; pretrained: the backbone's own")
    freeze_backbone: bool = setting(
        False, "true: only the heads are trained (the official bcb_lrscale 0, fix_bcb) and task files hold no "
               "backbone; false: every backbone parameter is trained at train.lr")
    ca: Alignment = setting(Alignment(), "the classifier alignment")


METHODS = (Method(
    name="slca", protocol="cil", title="SLCA",
    description="the whole ViT fine-tuned slowly (train.lr for the backbone, train.head_lr for the new head), then "
                "every head re-aligned on features sampled from per-class Gaussians (settings final_norm, "
                "freeze_backbone, ca; GengDavid/SLCA)",
    model="ifcl.models.vit_slca:build", settings=SLCA, model_keys=("final_norm", "freeze_backbone", "ca"),
    statistics_images="test_transform"),)
