"""DIKI's distribution-aware calibration (lloongx/DIKI) and its training schedule, on tensors.

After task t the run keeps one Gaussian of the frozen, L2-normalised image features of task t's training images.
At test time every sample is scored under every learnt Gaussian; the best task's prefixes are used, scaled by
λ = σ(s / D − 1) with s the best log-likelihood and D the feature width (the official code writes 512, the width of
CLIP ViT-B/16). Far from every learnt task λ → 0 and the model falls back to the frozen CLIP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COVARIANCE_JITTER = 1e-7  # added to the diagonal of every task covariance


@dataclass
class TaskGaussian:
    """Mean [D] and covariance [D, D] of one task's frozen features; the Cholesky factor is computed once."""

    mean: torch.Tensor
    covariance: torch.Tensor

    def __post_init__(self):
        self.mean = self.mean.float()
        self.covariance = self.covariance.float()
        scale_tril, info = torch.linalg.cholesky_ex(self.covariance.double())
        if info.item() != 0:
            raise ValueError("task covariance is not positive definite (too few training images for its width?)")
        self._scale_tril = scale_tril
        self._half_log_det = scale_tril.diagonal().log().sum()

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        """log N(f; μ, Σ) of every row of ``features`` [B, D] -> [B] (float32), from the stored factor."""
        diff = (features.double() - self.mean.double()).T  # [D, B]
        z = torch.linalg.solve_triangular(self._scale_tril, diff, upper=False)
        d = features.shape[1]
        log_prob = -0.5 * (d * math.log(2 * math.pi) + (z * z).sum(0)) - self._half_log_det
        return log_prob.float()


def fit_gaussian(features: torch.Tensor, jitter: float = COVARIANCE_JITTER) -> TaskGaussian:
    """Mean and unbiased covariance (+ jitter·I) of ``features`` [n, D] (computed in float64)."""
    f = features.double()
    mean = f.mean(0)
    centred = f - mean
    cov = centred.T @ centred / (f.shape[0] - 1) + jitter * torch.eye(f.shape[1], dtype=torch.float64)
    return TaskGaussian(mean.float(), cov.float())


def log_likelihoods(features: torch.Tensor, gaussians: list[TaskGaussian]) -> torch.Tensor:
    """[B, T]: log-likelihood of every sample under every learnt task."""
    return torch.stack([g.log_likelihood(features) for g in gaussians], dim=1)


def majority_task(task_ids: torch.Tensor) -> int:
    """The most frequent task of a batch (ties: the smallest task id)."""
    counts = torch.bincount(task_ids)
    return int(counts.argmax())


def calibrate(features: torch.Tensor, gaussians: list[TaskGaussian], batchwise: bool = True,
              scale: float | None = None, weight: str = "likelihood") -> tuple[torch.Tensor, torch.Tensor]:
    """Task and weight of every sample.

    ``features`` [B, D] are the frozen, L2-normalised image features. Returns ``task_ids`` [B] (long) and
    ``weights`` λ [B] = σ(max_t ℓ_t / scale − 1), ``scale`` = D unless given (512 in the official code). With
    ``batchwise`` (the official setting) every sample gets the batch's majority task and keeps its own λ.
    ``weight="one"`` is the ablation without calibration: λ = 1 for every sample (the task is chosen as above)."""
    scores = log_likelihoods(features, gaussians)
    best, task_ids = scores.max(dim=1)
    if weight == "one":
        weights = torch.ones_like(best)
    elif weight == "likelihood":
        weights = torch.sigmoid(best / (scale or features.shape[1]) - 1.0)
    else:
        raise ValueError(f"calibration weight must be 'likelihood' or 'one', got {weight!r}")
    if batchwise:
        task_ids = torch.full_like(task_ids, majority_task(task_ids))
    return task_ids, weights


def iteration_lrs(lr: float, total_steps: int, final_ratio: float = 1e-3) -> list[float]:
    """The official per-iteration cosine: from ``lr`` to ``lr·final_ratio`` over ``total_steps`` steps,
    η_k = η_f + ½(η_0 − η_f)(1 + cos(π k / K)), k = 0..K−1, no warm-up."""
    final = lr * final_ratio
    return [final + 0.5 * (lr - final) * (1 + math.cos(math.pi * k / total_steps)) for k in range(total_steps)]
