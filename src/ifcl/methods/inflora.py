"""InfLoRA (Liang & Li, CVPR 2024) as functions on tensors: subspace design and (Dual)GPM memory.

Everything follows the official code (liangyanshuo/InfLoRA, ``methods/inflora.py``) as described in
the official code, `liangyanshuo/InfLoRA` (`methods/inflora.py`). All matrices are float32, as in the official code.

Per adapted layer and task t:

1. design: C = XᵀX / n over every input token of task t (old branches active); Ĉ = Π⊥C with the memory of
   tasks < t; R_t = top-r left singular vectors of Ĉ, transposed, divided by √3 (the same R_t for k and v);
2. train E_t (see :mod:`ifcl.training`);
3. memory: C again, now with E_t trained; the DualGPM update with threshold ε_t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..training import lr_multipliers  # noqa: F401  (public: the official per-epoch schedule)

Kind = str  # "remove" | "retain"


@dataclass
class LayerMemory:
    """The old tasks' input space of one layer, as DualGPM keeps it.

    ``kind == "remove"``: the columns of ``basis`` (d × k, orthonormal) span the old space;
    ``kind == "retain"``: they span its orthogonal complement (used once the old space exceeds d/2 dimensions).
    """

    basis: torch.Tensor
    kind: Kind

    def __post_init__(self):
        if self.kind not in ("remove", "retain"):
            raise ValueError(f"kind must be 'remove' or 'retain', got {self.kind!r}")

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    def projector(self) -> torch.Tensor:
        """F Fᵀ for the stored basis F (the official ``feature_mat``)."""
        return self.basis @ self.basis.T

    def complement_projector(self) -> torch.Tensor:
        """The projector onto the space orthogonal to the old tasks (Π⊥)."""
        p = self.projector()
        if self.kind == "retain":
            return p
        return torch.eye(self.dim, dtype=p.dtype, device=p.device) - p

    def old_space_dim(self) -> int:
        k = self.basis.shape[1]
        return k if self.kind == "remove" else self.dim - k


def threshold(task: int, num_tasks: int, lamb: float, lame: float = 1.0) -> float:
    """ε_t = λ_b + (λ_e − λ_b)·t/T for 0-based task t of T (never reaches λ_e)."""
    return (lame - lamb) * task / num_tasks + lamb


def design_reduction(cov: torch.Tensor, memory: LayerMemory | None, rank: int) -> torch.Tensor:
    """R_t (rank × d): top-``rank`` left singular vectors of Π⊥C, transposed, scaled by 1/√3.

    As the official code: ``remove`` memories give Ĉ = C − FFᵀC, ``retain`` memories Ĉ = FFᵀC (not the paper's
    Π⊥H: the code projects the second-moment matrix). The 1/√3 keeps LoRA's default row norm."""
    cov = cov.float()
    if memory is not None:
        p = memory.projector().to(cov)
        cov = cov - p @ cov if memory.kind == "remove" else p @ cov
    u, _, _ = torch.linalg.svd(cov, full_matrices=False)
    return u[:, :rank].T.contiguous() / math.sqrt(3)


def _svd(a: torch.Tensor, full: bool = False):
    return torch.linalg.svd(a, full_matrices=full)


def update_memory(memory: LayerMemory | None, cov: torch.Tensor, threshold: float, dual: bool = True) -> LayerMemory:
    """The memory after a task from C = XᵀX / n collected with the task's branch trained.

    ``dual=True`` is InfLoRA's ``update_DualGPM``; ``dual=False`` is ``update_GPM`` (remove-only, at most d
    columns), used by InfLoRA-b5, InfLoRA+CA and the DomainNet recipe. Energy is σ(C)². One deliberate fix: when the
    first task's space already fills half of the dimensions, the official code labels the *space* ``retain`` and
    then fails its own assertion; here the complement is stored, as ``retain`` means everywhere else.
    """
    cov = cov.float()
    d = cov.shape[0]
    u, s, _ = _svd(cov)
    total = (s**2).sum()
    if memory is None:
        r = int((torch.cumsum(s**2 / total, 0) < threshold).sum())  # prefixes strictly below ε
        if dual and r >= d / 2:
            memory = LayerMemory(u[:, r:].contiguous(), "retain")
        else:
            memory = LayerMemory(u[:, : max(r, 1)].contiguous(), "remove")
    elif memory.kind == "remove":  # add directions until the explained energy reaches ε
        f = memory.basis
        u, s, _ = _svd(cov - (f @ f.T) @ cov)
        explained = ((total - (s**2).sum()) / total).numpy()  # float32 sums, as the official NumPy code
        r = 0
        for e in (s**2 / total).numpy():
            if explained >= threshold:
                break
            explained += e
            r += 1
        if r:
            memory = LayerMemory(torch.cat([f, u[:, :r]], dim=1)[:, :d].contiguous(), "remove")
    else:  # shrink the complement until the unexplained energy drops below 1 - ε
        f = memory.basis
        u, s, _ = _svd((f @ f.T) @ cov)
        unexplained = ((s**2).sum() / total).numpy()
        r = 0
        for e in (s**2 / total).numpy():
            if unexplained < 1 - threshold:
                break
            unexplained -= e
            r += 1
        if r:
            ur = u[:, :r]
            uf, _, _ = _svd(f - (ur @ ur.T) @ f, full=True)
            memory = LayerMemory(uf[:, : f.shape[1] - r].contiguous(), "retain")
    if dual and memory.kind == "remove" and memory.basis.shape[1] > d / 2:  # switch to the complement
        m = memory.basis.shape[1]
        uf, _, _ = _svd(memory.basis, full=True)
        memory = LayerMemory(uf[:, m:].contiguous(), "retain")
    if memory.kind == "retain" and memory.basis.shape[1] > d / 2:
        raise AssertionError("a retain memory must hold at most d/2 columns")  # the official invariant
    return memory
