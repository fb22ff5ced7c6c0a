"""Classifier alignment (CA) of InfLoRA+CA: per-class Gaussians of features, and re-training every seen head on
features sampled from them (liangyanshuo/InfLoRA, official ``_compute_class_mean`` and
``_stage2_compact_classifier``).

After task t: the statistics of the task's new classes are computed once (old ones are kept); for t ≥ 1 all heads
0..t are trained for a few epochs on 256 samples per seen class drawn from N(s_c μ_c, Σ_c), where older tasks'
means are shrunk by s_c = 0.9 + 0.1 (τ + 1) / (t + 1) (τ = the class's task), with logit normalisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def class_statistics(features: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (float64, of the float32 features) and unbiased covariance computed in float64 + eps·I, stored as
    float32 — as the official code keeps them."""
    if features.shape[0] < 2:
        raise ValueError("a class needs at least 2 feature vectors for a covariance")
    f64 = features.double()
    mean = features.float().mean(0).double()
    cov = torch.cov(f64.T) + eps * torch.eye(features.shape[1], dtype=torch.float64)
    return mean, cov.float()


def mean_scale(class_task: int, current_task: int) -> float:
    """s_c = 0.9 + 0.1 (τ + 1) / (t + 1): the current task's means are used as they are, older ones shrunk."""
    return 0.9 + 0.1 * (class_task + 1) / (current_task + 1)


def logit_normalized_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, head_sizes: list[int],
                                   temperature: float | None) -> torch.Tensor:
    """CE(z / (ν τ), c) with ν = mean over heads of (‖z_s‖₂ + 1e-7) per sample (the official logit normalisation);
    plain CE over all seen logits when ``temperature`` is None."""
    if temperature is None:
        return F.cross_entropy(logits, targets)
    norms = torch.stack([z.norm(p=2, dim=1) + 1e-7 for z in logits.split(head_sizes, dim=1)], dim=1)
    nu = norms.mean(dim=1, keepdim=True)
    return F.cross_entropy(logits / nu / temperature, targets)


def sample_features(means: torch.Tensor, covs: torch.Tensor, scales: list[float], n_per_class: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n_per_class samples of N(s_c μ_c, Σ_c) for every class c (float32, Cholesky of each Σ_c), with labels."""
    feats, labels = [], []
    for c in range(means.shape[0]):
        chol = torch.linalg.cholesky(covs[c].float())
        z = torch.randn(n_per_class, means.shape[1], generator=generator)
        feats.append(scales[c] * means[c].float() + z @ chol.T)
        labels.append(torch.full((n_per_class,), c, dtype=torch.long))
    return torch.cat(feats), torch.cat(labels)


def align_heads(heads: nn.ModuleList, means: torch.Tensor, covs: torch.Tensor, class_tasks: list[int], cfg: dict,
                generator: torch.Generator) -> list[dict]:
    """Train every head on sampled features (classes in head order) for ``cfg['epochs']`` epochs: SGD (lr,
    momentum, weight decay), CosineAnnealingLR(T_max=epochs) stepped per epoch, one mini-batch of
    ``cfg['samples_per_class']`` per class and epoch after a shuffle; logit normalisation with
    ``cfg['logit_norm']`` (None: off). Returns a log row per epoch."""
    current = max(class_tasks)
    scales = [mean_scale(tau, current) for tau in class_tasks]
    sizes = [h.out_features for h in heads]
    params = [p for h in heads for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    n = cfg["samples_per_class"]
    rows = []
    for epoch in range(cfg["epochs"]):
        for g in opt.param_groups:
            g["lr"] = cfg["lr"] * (1 + math.cos(math.pi * epoch / cfg["epochs"])) / 2
        x, y = sample_features(means, covs, scales, n, generator)
        order = torch.randperm(len(y), generator=generator)
        x, y = x[order], y[order]
        total = 0.0
        for i in range(means.shape[0]):
            xb, yb = x[i * n : (i + 1) * n], y[i * n : (i + 1) * n]
            logits = torch.cat([h(xb) for h in heads], dim=1)
            loss = logit_normalized_cross_entropy(logits, yb, sizes, cfg["logit_norm"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        rows.append({"epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": total / means.shape[0]})
        print(f"alignment epoch {epoch + 1}/{cfg['epochs']}: loss {rows[-1]['loss']:.4f}", flush=True)
    for p in params:
        p.requires_grad_(False)
    return rows
