"""HiDe-Prompt (Wang et al., NeurIPS 2023) as tensor functions, as ``thu-ml/HiDe-Prompt`` computes it.

The official code runs two programs per benchmark (``training_scripts/train_*.sh``): ``main.py ...
--train_inference_task_only`` trains the task-identity inference (TII) model on every task in turn
(``trainers/tii_trainer.py``, ``engines/hide_tii_engine.py``), then a second run trains the prompts
(``trainers/hideprompt_trainer.py``, ``engines/hide_promtp_wtp_and_tap_engine.py``) and evaluates with the TII model of
the same task. Per task t:

* TII: the frozen ViT's CLS feature (no prompt: the "uninstructed" representation) through a residual MLP,
  LayerNorm(x + fc2(GELU(fc1(x)))) (``vits/hide_prompt_vision_transformer.py`` ``MlpMapping``, ``mlp_structure
  [2]``), and a linear head over every class, trained with Adam on task t's augmented images (cross-entropy of
  the task's classes, the others masked to -inf), gradient norm clipped to 1.
* WTP: one prefix prompt per task (``peft/prompt/hide_prompt.py`` ``EPrompt``: [2, length, heads, head_dim] at
  each of blocks 0-4, prefix keys and values in the attention, ``attention.py`` ``PreT_Attention``) and a linear
  head, trained with Adam on the cross-entropy of the task's classes plus ``reg`` times :func:`contrastive_loss`
  against the prototypes of earlier classes; prompt t starts as a copy of prompt t - 1 and is used as
  (1 - m) P_t + m mean(P_0..P_{t-1}) (:func:`momentum_prompt`), which is what it becomes after the task.
* Statistics: per class, :func:`kmeans` with 10 centroids on the uninstructed features and on the prompted ones
  (prompt t) of the task's training images under the test transform, each cluster kept as its mean and variance
  (:func:`centroid_statistics`, ``ca_storage_efficient_method multi-centroid``).
* Alignment (t >= 1, "task-adaptive prediction"): the TII MLP and head, and separately the WTP head, trained with
  SGD on features sampled from the centroids' diagonal Gaussians of every seen class (:func:`sample_centroids`,
  :func:`align`).
* Prediction: the TII model's arg-max over the seen classes gives the task, whose prompt gives the feature that
  the WTP head classifies.

Paper-vs-code (and code quirks reproduced by default):

* ``EPrompt.forward`` turns the selected prompts [layers, 2, batch, length, ...] into [layers, batch, 2, ...] with
  ``reshape``, not a transpose: within each GPU's batch of b images, image j gets as keys the half 2j // b and as
  values the half (2j + 1) // b (:func:`prefix_sides`): the first half of a batch uses the prompt's first half as
  keys and values, the second half its second half (only the middle image of an odd batch gets keys and values
  as the paper describes). ``layout: key_value`` gives every image keys from the first half and values from the
  second. (At evaluation the official reshape also mixes in the task ids predicted for images 2j and 2j + 1 of
  the batch, which in its per-task test loaders almost always share image j's task; here each image uses its own.)
* The contrastive loss of the paper is the official ``orth_loss``: the stacked prototypes (every centroid of every
  earlier class) and the batch's features M, cross-entropy of M Mᵀ / 0.8 against the identity, on unnormalised
  features, over the prototype rows too.
* The alignment of each epoch draws ``samples`` features per centroid of every seen class but takes only as many
  batches of ``samples`` as there are classes in the earlier tasks (``crct_num``), after a shuffle.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

TEMPERATURE = 0.8  # orth_loss's divisor
VARIANCE_FLOOR = 1e-4  # MultivariateNormal(mean, diag(var) + 1e-4 I)
LAYOUTS = ("official", "key_value")


# ---------------------------------------------------------------- prompts


def prefix_sides(sizes: Sequence[int], layout: str = "official", device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which half of its prompt ([2, length, D]: 0 or 1) each image uses as prefix keys and as prefix values, for
    consecutive per-GPU batches of ``sizes`` images (the official code runs its prompt layout on each GPU's batch).

    ``official``: image j of a batch of b uses half 2j // b for keys and (2j + 1) // b for values, what the
    ``reshape`` of ``EPrompt.forward`` gives when every image of the batch has the same prompt (training: the
    task's own). ``key_value``: half 0 for keys, half 1 for values, as prefix tuning means it."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if any(s < 1 for s in sizes):
        raise ValueError(f"batch sizes must be positive, got {list(sizes)}")
    n = int(sum(sizes))
    if layout == "key_value":
        return torch.zeros(n, dtype=torch.long, device=device), torch.ones(n, dtype=torch.long, device=device)
    pos = torch.cat([torch.arange(s, device=device) for s in sizes])
    size = torch.cat([torch.full((s,), s, device=device) for s in sizes])
    return torch.div(2 * pos, size, rounding_mode="floor"), torch.div(2 * pos + 1, size, rounding_mode="floor")


def official_reshape(prompts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The official ``EPrompt.forward`` (prefix, top-1) for one batch: ``prompts`` [layers, 2, pool, length, ...],
    ``idx`` [B] the pool entry of each image; ``prompts[:, :, idx]`` [layers, 2, B, length, ...] reshaped (not
    transposed) to [layers, B, 2, length, ...]. For tests against :func:`prefix_sides`."""
    raw = prompts[:, :, idx]
    return raw.reshape(raw.shape[0], raw.shape[2], 2, *raw.shape[3:])


def momentum_prompt(prompt: torch.Tensor, previous: torch.Tensor | None, momentum: float) -> torch.Tensor:
    """(1 - m) P_t + m mean(P_0..P_{t-1}) with the mean detached (``EPrompt.forward`` with ``prompt_momentum``;
    ``engines/hide_promtp_wtp_and_tap_engine.py`` stores the same after the task). ``previous`` [t, ...] the earlier
    prompts; none (task 0) or m = 0: P_t itself."""
    if previous is None or len(previous) == 0 or momentum == 0:
        return prompt
    return (1 - momentum) * prompt + momentum * previous.detach().mean(0)


# ---------------------------------------------------------------- contrastive regularisation


def contrastive_loss(features: torch.Tensor, prototypes: torch.Tensor | None,
                     temperature: float = TEMPERATURE) -> torch.Tensor:
    """The official ``orth_loss`` without its weight: M = [prototypes; features] ([P + B, D], float64 as the
    official float64 prototypes make it), cross-entropy of M Mᵀ / temperature with row i's target i, averaged over
    the P + B rows (prototype rows included; they carry gradient through the feature columns). Without
    prototypes (task 0): the features alone. Float64, autocast off."""
    with torch.autocast(features.device.type, enabled=False):
        m = features.double()
        if prototypes is not None and len(prototypes):
            m = torch.cat([prototypes.to(m), m])
        sim = m @ m.T / temperature
        return F.cross_entropy(sim, torch.arange(len(m), device=m.device))


def split_parts(n: int, parts: int) -> list[slice]:
    """The non-empty slices of ``torch.tensor_split`` of n items into ``parts`` near-equal parts: a batch as the
    official run's GPUs (``DistributedSampler``) held it."""
    bounds = torch.tensor_split(torch.arange(n), parts)
    return [slice(int(b[0]), int(b[-1]) + 1) for b in bounds if len(b)]


def parted_contrastive_loss(features: torch.Tensor, prototypes: torch.Tensor | None, parts: int,
                            temperature: float = TEMPERATURE) -> torch.Tensor:
    """:func:`contrastive_loss` of each part of the batch (:func:`split_parts`), averaged: the official loss on each
    GPU's batch, whose gradients DistributedDataParallel averages."""
    losses = [contrastive_loss(features[s], prototypes, temperature) for s in split_parts(len(features), parts)]
    return torch.stack(losses).mean()


# ---------------------------------------------------------------- class statistics


def _kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ as scikit-learn's ``_kmeans_plusplus``: the first centre uniformly, then per centre
    2 + ⌊ln k⌋ candidates drawn ∝ D², keeping the one that leaves the smallest potential."""
    n = len(x)
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = ((x - x[first]) ** 2).sum(1)
    potential = closest.sum()
    for _ in range(1, k):
        draws = torch.rand(trials, generator=generator, dtype=x.dtype).to(x.device) * potential
        candidates = torch.searchsorted(torch.cumsum(closest, 0), draws).clamp(max=n - 1)
        dist = torch.minimum(closest, torch.cdist(x[candidates], x) ** 2)
        pots = dist.sum(1)
        best = int(pots.argmin())
        potential, closest = pots[best], dist[best]
        centers.append(x[candidates[best]])
    return torch.stack(centers)


def _assign(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(x, centers) ** 2
    dist, labels = d.min(1)
    return labels, dist


def _lloyd(x: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """scikit-learn's ``_kmeans_single_lloyd`` (the same iterates as its default Elkan variant): assign, move every
    centre to its members' mean (an empty cluster takes the point farthest from its centre), stop when the labels
    do not change or the centres moved by ≤ tol in total squared distance; then labels consistent with the final
    centres. Returns (centres, labels, inertia)."""
    k = len(centers)
    labels_old = None
    for _ in range(max_iter):
        labels, dist = _assign(x, centers)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = dist.argsort(descending=True)[: len(empty)]
            for cluster, point in zip(empty.tolist(), far.tolist()):
                old = int(labels[point])
                sums[old] -= x[point]
                counts[old] -= 1
                sums[cluster] = x[point]
                counts[cluster] = 1
        new = sums / counts[:, None]
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if labels_old is not None and torch.equal(labels, labels_old):
            break  # strict convergence: the new centres are the means of the same members
        if shift <= tol:
            break
        labels_old = labels
    labels, dist = _assign(x, centers)
    return centers, labels, float(dist.sum())


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, n_init: int = 10, max_iter: int = 300,
           tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means as scikit-learn 1.0's ``KMeans(n_clusters=k)`` defaults (the official ``_compute_mean``): the data
    centred, ``n_init`` k-means++ starts, Lloyd iterations up to ``max_iter`` with tolerance tol · mean feature
    variance, the run of least inertia kept. Float64 on x's device; draws from ``generator`` (CPU). Returns
    (centres [k, D], labels [n])."""
    if len(x) < k:
        raise ValueError(f"k-means with {k} centroids needs at least {k} samples, got {len(x)} (scikit-learn, as "
                         f"the official code calls it, raises too)")
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    tol_abs = tol * float(xc.var(0, unbiased=False).mean())
    best = None
    for _ in range(n_init):
        centers, labels, inertia = _lloyd(xc, _kmeans_plusplus(xc, k, generator), max_iter, tol_abs)
        if best is None or inertia < best[2]:
            best = (centers, labels, inertia)
    return best[0] + mean, best[1]


def centroid_statistics(features: torch.Tensor, k: int, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One class's multi-centroid statistics (``_compute_mean``, ``multi-centroid``): :func:`kmeans` with k
    centroids, then each cluster's mean and (biased, ``np.var``) variance of its members, float64 [k, D] each. A
    cluster left empty by the final assignment (which would be NaN, and stop the official run) keeps its centre as
    mean and a zero variance."""
    centers, labels = kmeans(features, k, generator)
    f = features.double()
    means, variances = [], []
    for i in range(k):
        members = f[labels == i]
        if len(members):
            means.append(members.mean(0))
            variances.append(members.var(0, unbiased=False))
        else:
            means.append(centers[i])
            variances.append(torch.zeros_like(centers[i]))
    return torch.stack(means), torch.stack(variances)


def sample_centroids(means: torch.Tensor, variances: torch.Tensor, n: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every class c (means/variances [C, k, D]) drawn as the official alignment draws them: for each
    class in order, each of its centroids whose variance is not all zero, n samples of N(μ, diag(σ²) + 1e-4 I) in
    float32 (``MultivariateNormal(...).sample``: μ + sqrt(σ² + 1e-4) ⊙ ε). Returns (features [N, D] float32,
    class indices [N])."""
    feats, labels = [], []
    device = means.device
    for c in range(means.shape[0]):
        for mu, var in zip(means[c], variances[c]):
            if float(var.mean()) == 0:
                continue
            std = (var + VARIANCE_FLOOR).float().sqrt()
            z = torch.randn(n, means.shape[-1], generator=generator, device=generator.device).to(device)
            feats.append(mu.float() + z * std)
            labels.append(torch.full((n,), c, dtype=torch.long, device=device))
    return torch.cat(feats), torch.cat(labels)


# ---------------------------------------------------------------- alignment


def align(params: Sequence[nn.Parameter], logits_fn: Callable[[torch.Tensor], torch.Tensor],
          draw: Callable[[], tuple[torch.Tensor, torch.Tensor]], iterations: int, batch: int, cfg: dict,
          generator: torch.Generator, desc: str = "alignment") -> list[dict]:
    """``train_task_adaptive_prediction``: SGD (lr, momentum, weight decay) over ``params`` for ``cfg['epochs']``
    epochs with ``CosineAnnealingLR(T_max=epochs)`` stepped per epoch; each epoch :func:`sample_centroids` anew
    (``draw``), a shuffle, and ``iterations`` steps on consecutive batches of ``batch`` samples, the loss the
    cross-entropy of ``logits_fn`` (every seen class). Returns one log row per epoch."""
    opt = torch.optim.SGD(list(params), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    rows = []
    for epoch in range(cfg["epochs"]):
        lr = cfg["lr"] * (1 + math.cos(math.pi * epoch / cfg["epochs"])) / 2
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = draw()
        order = torch.randperm(len(y), generator=generator, device=generator.device).to(y.device)
        x, y = x[order], y[order]
        total, correct, seen = 0.0, 0, 0
        for i in range(iterations):
            xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
            if not len(yb):
                break
            logits = logits_fn(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
        rows.append({"stage": desc, "stage_epoch": epoch, "stage_lr": lr, "stage_loss": total / max(seen, 1),
                     "stage_accuracy": 100.0 * correct / max(seen, 1)})
    return rows


def trunc_normal_linear(dim: int, out: int, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear(dim, out)`` as timm's ``init_weights_vit_timm`` leaves it (the official models'
    ``weight_init=''``): weight ~ N(0, 0.02²) truncated at ±2 (absolute: a plain normal in effect), bias 0."""
    layer = torch.nn.utils.skip_init(nn.Linear, dim, out)
    with torch.no_grad():
        nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0, generator=generator)
        layer.bias.zero_()
    return layer


def batches_of(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator
               ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) in a random order (from ``generator``) as batches of ``size`` (the last one shorter)."""
    order = torch.randperm(len(y), generator=generator, device=generator.device).to(y.device)
    for i in range(0, len(y), size):
        yield x[order[i : i + size]], y[order[i : i + size]]
