"""SD-LoRA (Wu et al., ICLR 2025, "Scalable Decoupled Low-Rank Adaptation for Class Incremental Learning") as
functions on tensors, following what the official code runs (WuYichen-97/SD-Lora-CL).

Per adapted projection (the query and the value of every block's ``qkv``, WuYichen-97/SD-Lora-CL
``backbone/lora.py``, ``LoRA_ViT_timm``), with task t being trained and tasks i < t finished, the official
training forward ``_LoRA_qkv_timm_train.forward`` adds to the frozen W x

    ΔW x = Σ_{i<t} α_i · B_i A_i x / (‖B_i‖_F ‖A_i‖_F)  +  α_t · B_t A_t x

* A_i (rank × d) and B_i (d × rank) are task i's LoRA factors; finished ones are frozen (no gradient, also not
  through the norms);
* previous components are divided by the product of the Frobenius norms of the factors, ``torch.norm(B) *
  torch.norm(A)``, not by ‖B_i A_i‖_F (the paper's Fig. 1 writes A_iB_i / ‖A_iB_i‖). The two agree for rank 1
  only; in general ‖BA‖_F ≤ ‖B‖_F ‖A‖_F, so the code's "direction" is not of unit norm (:func:`direction`);
* the current component is *not* normalised: α_t multiplies B_t A_t itself (B_t starts at zero, so a normalised
  one would be 0/0 at the first step);
* the magnitudes α are scalars shared by every block and by q and v (one ``ParameterWrapper`` per task in the
  whole network), all trainable during task t. The official code builds them anew for every task, every one at
  0.8 (``nn.Parameter(torch.Tensor([0.8]))``, at most 20 previous ones), and never loads the values trained in
  the previous task (``save_wrap_param`` is never called), so at the start of task t every α_i is 0.8 again
  (:func:`next_magnitudes`). When task t+1 begins, task t's component thereby changes from α_t B_t A_t to
  0.8 · B_t A_t / (‖B_t‖_F ‖A_t‖_F).

Evaluation: the accuracy the official run logs is computed with the *training* forward above in ``eval()`` mode,
right after task t (``models/base.py`` ``_eval_cnn`` calls ``self._network.forward(inputs)``; the
``forward(inputs, eval=True)`` call is commented out). The separate evaluation branch ``_LoRA_qkv_timm_eval`` is
never run; had it been, it would add only 0.8 · B_{T-1} A_{T-1} x: its loop accumulates the normalised previous
components into ``new_q``/``new_v`` and the next statement overwrites them with ``scaling_factor[0]`` applied to
the factors the loop left behind, the last task's, unnormalised (:func:`unused_eval_branch_delta`); it would
also fail to load ``scaling_factor{t}.pt``, which nothing writes.

Orthogonality: ``LoRA_ViT_timm.compute_ortho_loss`` = Σ_{i<t} Σ_layers ‖A_i A_tᵀ‖_F² is computed at every step
of tasks t > 0 but its weight is 0: the loss is ``loss_clf`` alone (``loss_clf + 10 * mean(ortho)`` is commented
out, WuYichen-97/SD-Lora-CL ``models/sdlora.py``) (:func:`orthogonality_loss`, :data:`ORTHO_WEIGHT`).

Variants: SD-LoRA-RR (rank reduction) exists only as a commented-out block of ``Learner.update_network``
(:func:`rr_rank`); the run uses rank 10 for every task. SD-LoRA-KD is not in the official code.
"""
from __future__ import annotations

from typing import Sequence

import torch

RANK = 10  # ``rank=10`` in update_network and ``r=10`` in utils/inc_net.py get_backbone
INIT_MAGNITUDE = 0.8  # every magnitude, current and previous, at the start of every task
MAX_PREVIOUS = 20  # ``wrapped_param_prev`` holds 20 previous magnitudes: at most 21 tasks
ORTHO_WEIGHT = 0.0  # the orthogonality loss is computed, then not added (``loss = loss_clf``)
NORMS = ("factors", "product")


def component_norm(b: torch.Tensor, a: torch.Tensor, norm: str = "factors") -> torch.Tensor:
    """The divisor of a LoRA component B A: ‖B‖_F ‖A‖_F (``"factors"``, the official code) or ‖B A‖_F
    (``"product"``, the paper's notation). A scalar tensor."""
    if norm == "factors":
        return torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(a)
    if norm == "product":
        return torch.linalg.matrix_norm(b @ a)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def direction(b: torch.Tensor, a: torch.Tensor, norm: str = "factors") -> torch.Tensor:
    """The normalised direction B A / norm of a component with B (d_out × r) and A (r × d_in): d_out × d_in.
    A zero factor gives 0/0 (NaN), as in the official code."""
    return (b @ a) / component_norm(b, a, norm)


def component_scales(magnitudes: torch.Tensor, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *,
                     normalize_last: bool = False, norm: str = "factors") -> torch.Tensor:
    """The factor c_i of every component in ΔW = Σ_i c_i B_i A_i: c_i = α_i / norm(B_i, A_i), except for the last
    (current) component, c_{T-1} = α_{T-1}, unless ``normalize_last`` (official: not normalised). [T], with the
    gradient of ``magnitudes`` (the norms of finished factors are constants when they do not require grad)."""
    if not (len(magnitudes) == len(a) == len(b)):
        raise ValueError(f"{len(magnitudes)} magnitudes for {len(a)} A and {len(b)} B factors")
    normalised = len(a) if normalize_last else len(a) - 1
    divisors = [component_norm(bi, ai, norm).to(magnitudes.dtype) for ai, bi in zip(a[:normalised], b[:normalised])]
    divisors += [torch.ones((), dtype=magnitudes.dtype, device=magnitudes.device)] * (len(a) - normalised)
    return magnitudes / torch.stack(divisors)


def decoupled_delta(magnitudes: torch.Tensor, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], *,
                    normalize_last: bool = False, norm: str = "factors") -> torch.Tensor:
    """The dense weight update Σ_{i<T-1} α_i dir_i + α_{T-1} B_{T-1} A_{T-1} (d_out × d_in) of one projection:
    what ``_LoRA_qkv_timm_train`` adds to W (see the module docstring)."""
    scales = component_scales(magnitudes, a, b, normalize_last=normalize_last, norm=norm)
    return sum(c * (bi @ ai) for c, ai, bi in zip(scales, a, b))


def unused_eval_branch_delta(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
                             magnitude: float = INIT_MAGNITUDE) -> torch.Tensor:
    """What the never-run ``_LoRA_qkv_timm_eval.forward`` would add for tasks 0..T-1: magnitude · B_{T-1} A_{T-1}
    (its accumulated sum is overwritten by the line after the loop; the magnitude is a freshly built 0.8).
    Documentation of the official code only; the logged accuracies do not use it."""
    if not a or len(a) != len(b):
        raise ValueError("need one B per A and at least one component")
    return magnitude * (b[-1] @ a[-1])


def orthogonality_loss(old_a: Sequence[torch.Tensor], new_a: torch.Tensor) -> torch.Tensor:
    """Σ_i ‖A_i A_newᵀ‖_F² over the previous down-projections of one projection (``compute_ortho_loss``; sum it
    over projections and layers). Its official weight is :data:`ORTHO_WEIGHT` = 0."""
    loss = new_a.new_zeros(())
    for a in old_a:
        loss = loss + (a.to(new_a) @ new_a.T).square().sum()
    return loss


def next_magnitudes(previous: torch.Tensor, init: float = INIT_MAGNITUDE, reset: bool = True) -> torch.Tensor:
    """The magnitudes α_0..α_t at the start of task t from those after task t-1 ([t], detached). Official
    (``reset=True``): all t+1 of them at ``init``, since ``LoRA_ViT_timm`` is rebuilt with fresh parameters and the
    trained values are never reloaded. ``reset=False`` keeps the trained α_0..α_{t-1} and appends ``init``."""
    previous = previous.detach()
    if previous.numel() >= MAX_PREVIOUS + 1:
        raise ValueError(f"the official code has {MAX_PREVIOUS} previous magnitudes: at most {MAX_PREVIOUS + 1} tasks")
    fresh = torch.full((previous.numel() + 1,), init, dtype=previous.dtype, device=previous.device)
    if not reset:
        fresh[:-1] = previous
    return fresh


def rr_rank(task: int, ranks: Sequence[int] = (10, 8, 6), starts: Sequence[int] = (0, 4, 8)) -> int:
    """SD-LoRA-RR's rank of task ``task`` (0-based) in the commented-out block of ``Learner.update_network``
    (WuYichen-97/SD-Lora-CL ``models/sdlora.py``): 10 for tasks 0-3, 8 for tasks 4-7, 6 from task 8 on (a further
    step to 4 is commented out there too). Not what the official configs run (rank 10 throughout)."""
    if task < 0:
        raise ValueError(f"task must be >= 0, got {task}")
    if len(ranks) != len(starts) or list(starts) != sorted(starts) or starts[0] != 0:
        raise ValueError("starts must be increasing from 0, one per rank")
    return [r for r, s in zip(ranks, starts) if task >= s][-1]
