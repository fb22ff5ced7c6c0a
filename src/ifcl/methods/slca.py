"""SLCA (Zhang et al., ICCV 2023): Slow Learner with Classifier Alignment, as the official code runs it
(``GengDavid/SLCA``: ``models/slca.py``, ``models/base.py`` ``_compute_class_mean``, ``utils/inc_net.py``
``FinetuneIncrementalNet``, ``convs/linears.py`` ``SimpleContinualLinear``, ``convs/vits.py``, ``exps/slca/*.json``).

What a task t does in the official code (``SLCA.incremental_train``):

1. Slow learner (``_stage1_training``): every parameter of the ViT and the new head t (a Linear, weight
   ~ trunc-normal(std 0.02), bias 0; the old heads frozen) trained with one SGD (momentum 0.9, weight decay 5e-4
   on both groups) whose backbone group has lr ``lr * bcb_lrscale`` (0.01 × 1/100 = 1e-4) and head group ``lr``
   (0.01); MultiStepLR(γ 0.1) stepped once per epoch (CIFAR-100: 20 epochs, milestone 18; ImageNet-R, CUB-200,
   Cars-196: 50 epochs, milestone 40); batch 128, shuffled, last partial batch kept. The loss is the
   cross-entropy of the new classes' logits alone (``logits[:, known:]``): the old heads' logits are masked.
   ``bcb_lrscale: 0`` (``fix_bcb``, no released config) freezes the backbone for every task, task 0 included.
2. Statistics (``_compute_class_mean``): for each new class, the features (CLS token after the final norm) of its
   training images under the test transform, their mean and covariance + 1e-4 I. The old classes' statistics
   are never recomputed, though the backbone has moved since.
3. Classifier alignment (``_stage2_compact_classifier``, task t ≥ 1): a copy of every head (``fc.backup``) is
   trained for 5 epochs on 256 features per seen class sampled from N(s_c μ_c, Σ_c), s_c = 0.9 + 0.1 (τ_c + 1) /
   (t + 1), with logit normalisation (temperature 0.1; Cars-196: 0.05): SGD lr 0.01, momentum 0.9, weight decay
   5e-4, cosine over the 5 epochs. The accuracy after task t is that of the aligned heads; then ``after_task``
   restores the heads as trained (``fc.recall``): the next task trains on, and the next alignment starts from,
   the unaligned heads.

The alignment's pieces are those of InfLoRA+CA, which took them from this code
(:mod:`ifcl.methods.classifier_alignment`: :func:`class_statistics`, :func:`align_heads`). Where they differ:

* the starting heads: SLCA aligns the heads as trained (``fc.recall`` after each evaluation); the InfLoRA code
  (``methods/inflora_ca.py``, ``classifier_backup`` commented out) keeps the aligned heads and aligns them again
  after the next task (what :mod:`ifcl.steps.inflora` does). :class:`ifcl.models.vit_slca.SLCAViT` passes
  :func:`align_heads` a copy of the trained heads, so the shared function needs no change;
* a class's task τ_c: the official code takes ``c // task_size`` with the current task's size, the shared function
  the class's own task: the same whenever the tasks have equal sizes (CIFAR-100, ImageNet-R, CUB-200, DomainNet),
  not after the last task of Cars-196 (9 tasks of 20 classes, then 16), where the official c // 16 gives classes
  of the older tasks later task indices (up to 12 > t = 9, scales up to 1.03);
* the mean scale: the official code scales μ_c in float64 and casts to float32, the shared function scales the
  float32 mean (at most one float32 rounding apart); the samples are the same distribution drawn from another
  generator (a seeded CPU generator instead of CUDA's global one);
* InfLoRA's code retries the Cholesky factorisation with a larger ε on ImageNet-A only; SLCA's never does (nor does
  the shared function).

Paper vs code (the code is what is reproduced): the final LayerNorm of the ImageNet-21k and MoCo v3 backbones is
deleted and replaced by a fresh ``nn.LayerNorm(768)`` (weight 1, bias 0, eps 1e-5 instead of the pretrained 1e-6),
trained with the backbone (``convs/vits.py``); the shrinking of the old tasks' means (s_c) and the restoring of
the unaligned heads are details of the code only.
"""
from __future__ import annotations

import torch

from .classifier_alignment import class_statistics

HEAD_INIT_STD = 0.02  # SimpleContinualLinear: trunc_normal_(weight, std=.02), bias 0
BACKBONE_LR_SCALE = 0.01  # the official bcb_lrscale default (1/100): backbone lr = 0.01 × lr of the heads


def init_head(num_classes: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A new head's weight [num_classes, dim] ~ N(0, 0.02²) truncated to [-2, 2] (timm's ``trunc_normal_`` with its
    absolute bounds: in effect untruncated) and a zero bias, drawn from ``generator`` on the CPU."""
    weight = torch.empty(num_classes, dim)
    torch.nn.init.trunc_normal_(weight, std=HEAD_INIT_STD, a=-2.0, b=2.0, generator=generator)
    return weight, torch.zeros(num_classes)


def task_statistics(features: torch.Tensor, targets: torch.Tensor, known: int, num_classes: int,
                    eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [n, D] (float64) and covariances [n, D, D] (float32, + eps·I) of the task's classes known..known+n-1
    (:func:`ifcl.methods.classifier_alignment.class_statistics`, the official ``_compute_class_mean``)."""
    stats = [class_statistics(features[targets == known + i], eps) for i in range(num_classes)]
    return torch.stack([m for m, _ in stats]), torch.stack([c for _, c in stats])


def class_tasks(sizes: list[int]) -> list[int]:
    """The task of every seen class, in class order, from the tasks' sizes."""
    return [s for s, n in enumerate(sizes) for _ in range(n)]
