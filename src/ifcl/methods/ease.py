"""EASE (Zhou et al., CVPR 2024, "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning") as functions on tensors, following what the official code runs: ``sun-hailong/CVPR24-Ease``
``models/ease.py`` (``Learner``), ``backbone/vit_ease.py`` (``Adapter``, ``Block``, ``VisionTransformer``),
``backbone/linears.py`` (``CosineLinear``), ``utils/inc_net.py`` (``EaseNet``, ``get_backbone``) and ``exps/*.json``;
``LAMDA-CL/LAMDA-PILOT`` ``models/ease.py`` and ``backbone/vit_ease.py`` are the same code.

* **Adapter** (:class:`Adapter`): one AdaptFormer adapter per block and per task, parallel to the block's MLP and fed
  the block's stream after the attention residual (not the ``norm2`` output):
  ``x ← x + (MLP(norm2(x)) + s · up(dropout(ReLU(down(x)))))`` with width 64 (``ffn_num``; 16 on VTAB), s = 0.1
  (``ffn_adapter_scalar``), no layer norm (``ffn_adapter_layernorm_option: none``), dropout 0.1 active while
  training only; ``down`` Kaiming-uniform (a = √5), ``up`` and both biases zero (``init_option="lora"``). Task t
  trains its own adapters; they are frozen afterwards.
* **Training** of task t: the features of the current adapters (CLS after the final norm) through a fresh cosine
  classifier over task t's classes only (``proxy_fc``: ``CosineLinear``, weight ~ U(-1/√d, 1/√d), a learnt scale σ
  from 1): logits σ · cos(f, w_c), cross-entropy against the local labels. SGD (momentum 0.9) over the current
  adapters, ``proxy_fc`` (weight and σ) and the prototype classifier ``fc``, which takes no part in the training
  forward, gets no gradient and so never moves.
* **Prototypes** (``replace_fc``, after training): the mean feature of each of task t's classes in every subspace
  0..t (the backbone run once with each task's adapters), on the task's training images under the test transform
  (:func:`class_means`).
* **Semantic-guided prototype complement** (:func:`complement`, :func:`complete_prototypes`): an old class's
  prototype in a newer subspace k is a softmax-weighted (temperature 1, over the donor classes) sum of the donor
  classes' prototypes in subspace k, the weights from the cosine similarity of the old class and the donors in the
  old class's own subspace. With ``recalc_sim: true`` (every official config) every such prototype is computed again
  after each task, the donors being every class of tasks k..t (``solve_sim_reset``); with ``false`` it is computed
  once, when subspace k is new, from task k's classes (``solve_similarity``).
* **Inference** (``CosineLinear.forward_reweight``, :func:`subspace_weights`, :func:`reweighted_logits`): the logit of
  a class of task i is cos(φ_i(x), P_{c,i}) + (α / t) Σ_{j≠i} cos(φ_j(x), P_{c,j}) after task t (α = 0.1 on
  CIFAR-100 and ImageNet-R), each subspace's feature and prototype L2-normalised separately; the classifier's σ is
  1 (copied from task to task, never trained). ``use_reweight: false`` (an ablation) takes the cosine of the whole
  concatenated feature and prototype instead (:func:`concatenated_logits`). With ``use_init_ptm`` (``ease_cub.json``,
  ``ease_omni*.json``) the frozen backbone's own feature is one more subspace, first, weighted β, never complemented.

Paper vs code: the paper's adapter carries no scale (the code's s = 0.1) and no dropout; its inference rule weighs
the other subspaces by α, the code by α / t (``out1 /= cur_task``; "forward_reweight is divide by _cur_task"); the
paper describes the complement with the new task's classes, while the configs' ``recalc_sim: true`` recomputes every
complemented prototype each task from the classes of all tasks that own both subspaces. Not implemented: the
``moni_adam`` variant (OmniBenchmark configs: one adapter trained on task 0 only, an APER/ADAM-like model),
``use_diagonal`` and ``use_old_data`` (false in every official config).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

BOTTLENECK = 64  # ffn_num of every official config but VTAB's (16)
ADAPTER_SCALE = 0.1  # ffn_adapter_scalar in utils/inc_net.py get_backbone
ADAPTER_DROPOUT = 0.1  # Adapter(..., dropout=0.1) in VisionTransformer.get_new_adapter
ALPHA = 0.1  # exps/ease_cifar*.json, ease_inr*.json


class Adapter(nn.Module):
    """EASE's adapter of one block (the official ``Adapter`` with ``init_option="lora"`` and no layer norm):
    ``scale · up(dropout(ReLU(down(x))))``, ``bottleneck`` wide; ``down`` ~ Kaiming-uniform (a = √5), ``up`` and the
    biases zero, so a new adapter adds nothing."""

    def __init__(self, width: int, bottleneck: int = BOTTLENECK, scale: float = ADAPTER_SCALE,
                 dropout: float = ADAPTER_DROPOUT):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        self.scale, self.dropout = scale, dropout
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """The adapter's term, added beside the block's MLP; ``train``: with the official training-mode dropout."""
        h = F.dropout(F.relu(self.down(x)), p=self.dropout, training=train)
        return self.up(h) * self.scale


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, sigma: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``CosineLinear.forward``: σ · cos(f, w_c) of features [B, D] and class weights [C, D] (F.normalize, eps
    1e-12): [B, C]."""
    return sigma * F.linear(F.normalize(features, dim=1), F.normalize(weight, dim=1))


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum (float64) of the features [N, ...] of each class 0..num_classes-1 (labels [N]) and the number of
    samples of each: [num_classes, ...] and [num_classes]."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    sums = torch.zeros((num_classes,) + features.shape[1:], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels.to(features.device), features.double())
    return sums, torch.bincount(labels, minlength=num_classes).to(features.device)


def class_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The class prototypes (``replace_fc``: ``embedding.mean(0)`` of each class) from :func:`class_sums`, float32.
    A class without a sample is an error (the official mean would be NaN)."""
    if bool((counts == 0).any()):
        raise ValueError(f"every class needs samples; counts {counts.tolist()}")
    shape = (len(counts),) + (1,) * (sums.dim() - 1)
    return (sums / counts.view(shape).double()).float()


def complement(old_own: torch.Tensor, donors_own: torch.Tensor, donors_new: torch.Tensor) -> torch.Tensor:
    """The semantic-guided prototype complement of ``solve_similarity`` / ``solve_sim_reset``: old classes'
    prototypes in a new subspace, softmax_j(cos(p_i, q_j)) · r_j summed over the donors j, where ``old_own`` [n, D]
    are the old classes' prototypes in their own subspace, ``donors_own`` [m, D] and ``donors_new`` [m, D] the donor
    classes' prototypes in that subspace and in the new one. Cosine with ``torch.cosine_similarity`` (eps 1e-8), the
    softmax over the donors (dim 1) at temperature 1: [n, D]."""
    similarity = F.cosine_similarity(old_own[:, None, :], donors_own[None, :, :], dim=-1)
    return similarity.softmax(dim=1) @ donors_new


def task_bounds(task_sizes: Sequence[int]) -> list[int]:
    """[0, n_0, n_0 + n_1, ...]: class s of task i is in [bounds[i], bounds[i+1])."""
    bounds = [0]
    for n in task_sizes:
        bounds.append(bounds[-1] + n)
    return bounds


def complete_prototypes(prototypes: torch.Tensor, task_sizes: Sequence[int], recalc: bool = True) -> torch.Tensor:
    """The prototype classifier after task t = len(task_sizes) - 1 over the adapter subspaces: ``prototypes``
    [C, t+1, D] holds the measured prototypes (class c of task s in subspaces k ≤ s; other entries are ignored), the
    result has every entry of class c of task s in subspace k > s complemented (:func:`complement`) in its own
    subspace s from the donors: the classes of tasks k..t (``recalc``, ``solve_sim_reset``) or of task k only
    (``solve_similarity``, run once when subspace k was the newest)."""
    bounds = task_bounds(task_sizes)
    tasks = len(task_sizes)
    if prototypes.shape[:2] != (bounds[-1], tasks):
        raise ValueError(f"prototypes {tuple(prototypes.shape)} for {bounds[-1]} classes in {tasks} subspaces")
    out = prototypes.clone()
    for s in range(tasks - 1):
        old = slice(bounds[s], bounds[s + 1])
        for k in range(s + 1, tasks):
            donors = slice(bounds[k], bounds[-1] if recalc else bounds[k + 1])
            out[old, k] = complement(prototypes[old, s], prototypes[donors, s], prototypes[donors, k])
    return out


def subspace_weights(task_sizes: Sequence[int], alpha: float = ALPHA, beta: float | None = None) -> torch.Tensor:
    """The weight of each (class, subspace) cosine in ``forward_reweight`` after task t = len(task_sizes) - 1:
    [C, t+1] (adapter subspaces), 1 for a class's own task's subspace and α / t for the others; with ``beta`` (the
    ``use_init_ptm`` configs) a first column of β for the frozen backbone's subspace: [C, t+2]."""
    tasks = len(task_sizes)
    own = torch.repeat_interleave(torch.arange(tasks), torch.tensor(list(task_sizes)))
    weights = torch.full((len(own), tasks), alpha / (tasks - 1) if tasks > 1 else 0.0, dtype=torch.float64)
    weights[torch.arange(len(own)), own] = 1.0
    if beta is not None:
        weights = torch.cat([torch.full((len(own), 1), float(beta), dtype=torch.float64), weights], dim=1)
    return weights.float()


def reweighted_logits(features: torch.Tensor, prototypes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """EASE's logits: Σ_k w[c, k] cos(φ_k(x), P[c, k]) for features [B, S, D] (one per subspace), prototypes
    [C, S, D] and weights [C, S] (:func:`subspace_weights`): [B, C]."""
    cosines = torch.einsum("bsd,csd->bcs", F.normalize(features, dim=-1), F.normalize(prototypes, dim=-1))
    return (cosines * weights.to(cosines)).sum(dim=-1)


def concatenated_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The logits without the reweighting (``use_reweight: false``, ``CosineLinear.forward``): the cosine of the
    concatenated features [B, S·D] and prototypes [C, S·D]: [B, C]."""
    return cosine_logits(features.flatten(1), prototypes.flatten(1))
