"""C-LoRA (Smith et al., "Continual Diffusion: Continual Customization of Text-to-Image Diffusion with C-LoRA",
TMLR 2024, arXiv 2304.06027) as functions on tensors, for class-incremental learning on a ViT.

No official code of C-LoRA exists, for diffusion or for classification (the authors' project page
``jamessealesmith/continual-diffusion`` holds only the page). What is implemented here is the paper's rule in the
form the InfLoRA authors wrote it into their own code base (liangyanshuo/InfLoRA): a commented-out block of the
training loops of ``methods/inflorab5.py`` and ``methods/inflora_ca1.py`` adds, from the second task on,

    reg = Σ_blocks ‖P_k ⊙ ΔW_k,t‖_F² + ‖P_v ⊙ ΔW_v,t‖_F²,      loss = cross-entropy + λ · reg

with ΔW_t = B_t A_t the current task's LoRA update of a projection (``Attention_LoRA.get_matrix``) and
P = Σ_{s<t} B_s A_s the sum of the finished tasks' updates, detached (``Attention_LoRA.get_pre_matrix``,
``models/vit_inflora.py``), on the key and value projections of every block; ⊙ is the element-wise product.
This is the paper's L_forget = ‖[Σ_{t'<t} A_{t'} B_{t'}] ⊙ A_t B_t‖² (its A, B are our B, A; the matrix product is the
same update), which penalises the new update where earlier tasks already changed the weight.

Paper-vs-code notes, and the choices this module makes:

* absolute values: some write the penalty with |Σ_{t'<t} ΔW_{t'}|; with the squared Frobenius norm
  ‖|P| ⊙ ΔW‖² = Σ_ij P_ij² ΔW_ij² = ‖P ⊙ ΔW‖², so the two are the same loss (tested);
* reduction: summed over blocks and projections, as the InfLoRA code above (not averaged over layers);
* weight λ: the InfLoRA code multiplies by ``self.lamb``, the variable that holds InfLoRA's own threshold in its
  configs (0.95 CIFAR-100 and DomainNet, 0.98 ImageNet-R); the paper's value for classification was not found.
  λ is a required setting (:func:`forgetting_loss`);
* where the LoRA sits: the paper adapts K and V of the cross-attention of Stable Diffusion; in the ViT the InfLoRA
  code adapts k and v of the self-attention of every block (default ``kv``; ``qv``, ``qkv`` are options);
* both factors are trained, with LoRA's initialisation (A Kaiming-uniform, a = √5, i.e. U(-1/√d, 1/√d), B = 0),
  as ``Attention_LoRA.init_param``; no α/r scaling (ΔW = B A, as the InfLoRA code);
* finished tasks: frozen, and their updates stay summed into the weight (the paper folds each task's LoRA into
  the model; the InfLoRA code re-adds the stacked sum in every forward: the same function).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

PROJECTIONS = {"kv": ("k", "v"), "qv": ("q", "v"), "qkv": ("q", "k", "v")}
SLOTS = ("q", "k", "v")  # the order of the three parts of timm's fused qkv projection


def lora_update(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """ΔW = B A of one projection (``up`` B: d_out × r, ``down`` A: r × d_in): d_out × d_in."""
    return up @ down


def overlap_penalty(past: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """‖P ⊙ (B A)‖_F² for one projection, P the (detached) sum of the finished tasks' updates, in float32 whatever
    the inputs' dtype (the entries are small: their squares underflow the precision of bf16 sums)."""
    return (past.detach().float() * lora_update(down.float(), up.float())).square().sum()


def forgetting_loss(terms: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], weight: float) -> torch.Tensor:
    """λ Σ ‖P ⊙ (B A)‖_F² over ``terms`` = (P, A, B) of every adapted projection of every block (a 0-dim tensor)."""
    terms = list(terms)
    if not terms:
        raise ValueError("no adapted projection")
    return weight * torch.stack([overlap_penalty(*t) for t in terms]).sum()


def kaiming_down(rank: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's down-projection init, ``kaiming_uniform_(a=√5)`` on a rank × dim weight: U(-1/√dim, 1/√dim)."""
    bound = 1.0 / math.sqrt(dim)
    return (torch.rand(rank, dim, generator=generator) * 2 - 1) * bound
