"""RanPAC (McDonnell et al., NeurIPS 2023) as tensor functions: random projections and class prototypes on frozen
features, with a ridge-regression head in closed form (``RanPAC/RanPAC RanPAC.py``: ``setup_RP``, ``replace_fc``,
``optimise_ridge_parameter``; the head in ``inc_net.py`` ``CosineLinear`` with ``use_RP``).

Per task t, with the frozen features f [n, D] of the task's training images (under the test transform) and their
one-hot labels Y [n, C] over the classes seen so far:

    H = ReLU(f W)            W [D, M] ~ N(0, 1), drawn once before task 0 (M = 0: H = f, no projection)
    G += Hᵀ H,  Q += Hᵀ Y    the Gram matrix and class prototypes of every task so far
    λ = argmin over λ ∈ {10⁻⁸, ..., 10⁸} of the MSE on the task's last 20 % of samples of the ridge regression fitted
        on its first 80 % (this task's samples only, in the order the shuffled loader gave them)
    Wo = ((G + λ I)⁻¹ Q)ᵀ    [C, M]: logits = H Woᵀ

Everything in float32, as the official code. Every random draw takes a ``torch.Generator``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# the ridge values the official code tries: 10.0 ** np.arange(-8, 9)
RIDGES = tuple(10.0 ** k for k in range(-8, 9))
FIT_FRACTION = 0.8  # the official split of a task's samples: the first 80 % fit, the rest validate


def random_projection(embed_dim: int, width: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """W [embed_dim, width] with N(0, 1) entries (``torch.randn(in_features, M)`` in ``setup_RP``); None for
    ``width`` 0 (the ablation without projection)."""
    if width == 0:
        return None
    return torch.randn(embed_dim, width, generator=generator)


def project(features: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """H = ReLU(f W), or f itself without a projection."""
    return features if projection is None else F.relu(features @ projection)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot rows (``target2onehot``)."""
    return F.one_hot(labels.long(), num_classes).float()


def ridge_solution(gram: torch.Tensor, prototypes: torch.Tensor, ridge: float) -> torch.Tensor:
    """Wo = ((G + λ I)⁻¹ Q)ᵀ [C, M] (``torch.linalg.solve``, as the official code: more stable than an inverse)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, prototypes).T


def select_ridge(h: torch.Tensor, y: torch.Tensor, ridges=RIDGES, fit_fraction: float = FIT_FRACTION
                 ) -> tuple[float, list[float]]:
    """(the λ of ``ridges`` with the least mean squared error, the error of each): the ridge regression of ``y`` on
    ``h`` fitted on the first ``int(n * fit_fraction)`` rows, tested on the others (``optimise_ridge_parameter``;
    the first of equal errors wins, as ``np.argmin``)."""
    n_fit = int(h.shape[0] * fit_fraction)
    gram, prototypes = h[:n_fit].T @ h[:n_fit], h[:n_fit].T @ y[:n_fit]
    losses = [float(F.mse_loss(h[n_fit:] @ ridge_solution(gram, prototypes, r).T, y[n_fit:])) for r in ridges]
    return float(ridges[min(range(len(losses)), key=losses.__getitem__)]), losses
