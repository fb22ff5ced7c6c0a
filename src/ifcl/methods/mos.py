"""MOS (Sun et al., AAAI 2025, "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental Learning") as
functions on tensors, following what the official code runs: ``sun-hailong/AAAI25-MOS`` ``models/mos.py``,
``backbone/vit_mos.py``, ``utils/inc_net.py`` (``MOSNet``), ``backbone/linears.py`` (``CosineLinear``) and
``exps/mos_*.json``; the copy in ``LAMDA-CL/LAMDA-PILOT`` (same paths, ``exps/mos.json``, ``exps/mos_inr.json``) is
identical.

Adapter (``vit_mos.Adapter`` with ``utils/inc_net.py``'s AdaptFormer settings): in every block, beside the MLP,
``0.1 · up(dropout(ReLU(down(x))))`` with x the residual stream after the attention (no LayerNorm), bottleneck 16
(``ffn_num``), dropout 0.1 in training only; ``down`` Kaiming-uniform (a = √5), ``up`` and both biases zero
(:func:`init_adapter`, :func:`adapter_term`). The block returns ``x + (mlp(norm2(x)) + adapter(x))``. One adapter
set ``cur_adapter`` is trained through all tasks (never re-initialised); after task t a copy is stored.

Adapter merging as the code runs it (``reweight_adapter``): a pull ``w ← (1 − m) w + m μ_t`` of every adapter
parameter toward μ_t, the mean of the adapters stored after tasks 0..t-1 (prefix sums / t), m = 0.1
(``adapter_momentum``); nothing happens in task 0. The pull assigns ``.data`` in place and returns the same module,
so every call has a lasting effect:

* training (task t ≥ 1): ``forward_features(train=True)`` pulls *every* block's adapter once per block it passes
  through, so block i runs with the current adapter pulled i + 1 times, and after a forward the adapter has been
  pulled ``depth`` (12) times; ``adapter_merge`` pulls once more after every optimiser step. The gradient is the
  one of each block's pulled value, given to the parameter unchanged (the pull is not differentiated): a
  straight-through rule (:func:`drifted`, :func:`merged`);
* class statistics (task t ≥ 1): ``_compute_mean`` runs the same training forward (``train=True``, eval mode),
  one loader per class (classes in order, ``3 × batch_size`` images a batch), so the current adapter keeps drifting
  toward μ_t, ``depth`` pulls a batch (:func:`statistics_pulls`); the next task trains from that drifted adapter
  (:func:`next_start`);
* inference: ``forward_features(train=False)`` pulls the *stored* adapter t ≥ 1 toward μ_t, ``depth`` times a
  batch, for every test batch of every evaluation; after a few batches (0.9¹² ≈ 0.28 a batch) adapter t is μ_t to
  float precision, so the adapters evaluated are w_0 and, for t ≥ 1, the mean of the trained adapters 0..t-1
  (:func:`official_inference_adapter`; only the first few test batches of the evaluation after a task see a
  partly drifted new adapter, not reproduced). The trained adapter of the last task enters no inference.

``merge: functional`` is the reading without the in-place side effects (``reweight_adapter`` returning a merged
copy): blocks use (1 − m) w + m μ_t (differentiated), one pull after each step, statistics and inference with the
merged stored adapter (:func:`functional_adapter`), the next task from the trained adapter.

Loss (``_init_train``): the cross-entropy of the current task's classes (older logits set to −inf, later ones cut)
plus ``reg`` (0.1) × :func:`orthogonality_loss` of the batch's features (pre-logits: the CLS token after the final
norm) and the class means of the earlier tasks. Optimiser: SGD momentum 0.9, adapters at ``init_lr``, the whole
linear head (every row, old rows included: they get zero gradient and the weight decay) at ``0.1 × init_lr``, weight
decay on both; ``CosineAnnealingLR(T_max=tuned_epoch, eta_min=min_lr = 0)`` stepped per epoch; a fresh optimiser
per task; the training loader shuffles and keeps its last batch.

After training (task t): class Gaussians of the task's classes from their training images under the test transform
(mean and ``torch.cov + 1e-4 I``, ``ca_storage_efficient_method: covariance``); for t ≥ 1 the classifier alignment
``classifer_align``: SGD (``ca_lr`` 0.005, momentum 0.9, weight decay = the training ``weight_decay``),
``CosineAnnealingLR(T_max=crct_epochs = 30)``, each epoch ``5 × batch_size`` samples per seen class from
N(μ_c, Σ_c) (no mean shrink), shuffled, one batch per class, plain cross-entropy over the seen classes (no logit
normalisation) on the whole head; then the prototypes of the task's classes (``replace_fc``): the mean feature with
adapter 0 of their training images under the test transform, the weights of a ``CosineLinear`` with σ = 1. For
t ≥ 1 the alignment leaves the backbone in train mode, so these prototypes are computed with the adapter's
dropout active (``prototype_dropout``).

Inference (``_eval_cnn``): the prototype logits cos(f_0, p_c) of the adapter-0 feature give a task; then up to
``MAX_ITER = 4`` times: the head's logits on the feature of the chosen task's adapter, whose arg-max gives a task;
stop when it is the same task (or at the 4th logits); with ``ensemble`` the score is
``softmax(final logits) + softmax((T + 1) · prototype logits)`` after task T (:func:`self_refined_logits`,
:func:`ensemble_scores`).

Paper vs code: the paper describes adapter merging as one exponential-moving-average step of the current adapter
toward the mean of the earlier ones per iteration; the code's in-place pulls also act inside every forward, during
the class statistics and at inference, as listed above (the default, ``merge: official``, follows the code). The
orthogonality term, the prototype dropout and the ensemble weights (the prototype logits scaled by the number of
tasks) are code details.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

ADAPTER_KEYS = ("down_weight", "down_bias", "up_weight", "up_bias")
BOTTLENECK = 16  # ``ffn_num``
ADAPTER_SCALE = 0.1  # ``ffn_adapter_scalar="0.1"``
ADAPTER_DROPOUT = 0.1  # ``Adapter(..., dropout=0.1)`` in ``init_adapters``
MOMENTUM = 0.1  # ``adapter_momentum``
ORTHO_WEIGHT = 0.1  # ``reg``
ORTHO_TEMPERATURE = 0.8  # ``sim = M Mᵀ / 0.8`` in ``orth_loss``
REFINE_STEPS = 4  # ``MAX_ITER``
HEAD_INIT_STD = 0.02  # timm's ``trunc_normal_(std=.02)`` of the reset 'head' the official model loads
COVARIANCE_EPS = 1e-4  # ``torch.eye(d) * 1e-4``
MERGES = ("official", "functional")

Adapter = dict[str, torch.Tensor]  # ADAPTER_KEYS -> [depth, ...] (every block's adapter stacked)


def init_adapter(depth: int, dim: int, bottleneck: int, generator: torch.Generator) -> Adapter:
    """Every block's adapter at the official ``init_option='lora'``: ``down_weight`` [depth, bottleneck, dim] ~
    U(−1/√dim, 1/√dim) (``kaiming_uniform_(a=√5)``), ``up_weight`` [depth, dim, bottleneck] and both biases zero.
    Drawn from ``generator`` on the CPU, block by block."""
    bound = 1.0 / math.sqrt(dim)
    down = torch.stack([(torch.rand(bottleneck, dim, generator=generator) * 2 - 1) * bound for _ in range(depth)])
    return {"down_weight": down, "down_bias": torch.zeros(depth, bottleneck),
            "up_weight": torch.zeros(depth, dim, bottleneck), "up_bias": torch.zeros(depth, dim)}


def adapter_term(x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor, up_weight: torch.Tensor,
                 up_bias: torch.Tensor, scale: float = ADAPTER_SCALE, dropout: float = 0.0) -> torch.Tensor:
    """``scale · up(dropout(ReLU(down(x))))`` (``Adapter.forward(add_residual=False)``, layer norm option
    "none"); ``dropout`` > 0 applies it (the official training forward)."""
    h = F.relu(F.linear(x, down_weight, down_bias))
    if dropout > 0:
        h = F.dropout(h, dropout, training=True)
    return F.linear(h, up_weight, up_bias) * scale


def adapter_mean(adapters: Sequence[Adapter]) -> Adapter:
    """The mean of the stored adapters (``*_sum[idx - 1] / idx``)."""
    if not adapters:
        raise ValueError("no stored adapters to average")
    return {k: torch.stack([a[k] for a in adapters]).mean(0) for k in ADAPTER_KEYS}


def merged(w: torch.Tensor, mean: torch.Tensor, momentum: float, times: int = 1) -> torch.Tensor:
    """``times`` pulls w ← (1 − m) w + m μ in closed form: μ + (1 − m)^times (w − μ) (the official float32
    iteration agrees up to rounding)."""
    if times < 0:
        raise ValueError(f"times must be >= 0, got {times}")
    return mean + (1.0 - momentum) ** times * (w - mean)


def pull_factors(momentum: float, start: int, depth: int) -> torch.Tensor:
    """(1 − m)^(start + i + 1) for blocks i = 0..depth-1, float64: the share of w − μ that block i sees in a forward
    whose adapter had already been pulled ``start`` times."""
    return torch.tensor([(1.0 - momentum) ** (start + i + 1) for i in range(depth)], dtype=torch.float64)


def drifted(w: Adapter, mean: Adapter, momentum: float, start: int = 0) -> Adapter:
    """Every block's adapter as a ``train=True`` forward of the official code uses it: block i sees w pulled
    ``start + i + 1`` times toward μ (:func:`pull_factors`). [depth, ...] per key, in w's dtype."""
    out = {}
    for k in ADAPTER_KEYS:
        c = pull_factors(momentum, start, w[k].shape[0]).to(w[k].device, w[k].dtype)
        out[k] = mean[k] + c.view(-1, *([1] * (w[k].dim() - 1))) * (w[k] - mean[k])
    return out


def straight_through(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward, the identity toward ``param`` in the backward: the official ``.data`` assignment
    (the parameter receives the gradient of the value the block used)."""
    return param + (value - param).detach()


def official_inference_adapter(adapters: Sequence[Adapter], t: int, momentum: float) -> Adapter:
    """The adapter the official evaluation uses for task t: w_0 for t = 0 (or m = 0), otherwise the limit of its
    in-place drift, the mean of the trained adapters 0..t-1."""
    if t == 0 or momentum == 0:
        return adapters[t]
    return adapter_mean(adapters[:t])


def functional_adapter(adapters: Sequence[Adapter], t: int, momentum: float) -> Adapter:
    """``merge: functional``: the merged copy (1 − m) w_t + m μ_t (w_0 for t = 0)."""
    if t == 0 or momentum == 0:
        return adapters[t]
    mean = adapter_mean(adapters[:t])
    return {k: merged(adapters[t][k], mean[k], momentum) for k in ADAPTER_KEYS}


def next_start(adapters: Sequence[Adapter], pulls: int, momentum: float, merge: str = "official") -> Adapter:
    """The adapter task T = len(adapters) trains from: ``cur_adapter`` as task T-1 left it. ``official``: w_{T-1}
    after the ``pulls`` of its class statistics toward μ_{T-1} (none for T-1 = 0); ``functional``: w_{T-1}."""
    last = len(adapters) - 1
    if merge == "functional" or last == 0 or momentum == 0 or pulls == 0:
        return {k: v.clone() for k, v in adapters[last].items()}
    mean = adapter_mean(adapters[:last])
    return {k: merged(adapters[last][k], mean[k], momentum, pulls) for k in ADAPTER_KEYS}


def statistics_pulls(labels: torch.Tensor, batch_size: int, depth: int) -> tuple[torch.Tensor, int]:
    """How many times the current adapter has been pulled before each image's batch of the official
    ``_compute_mean``: the task's classes in increasing label order, each its own loader of ``batch_size``
    (``3 × batch_size``) images in dataset order, ``depth`` pulls a batch. ``labels`` are the task's images in the
    order of the pass (an image's rank among its class's images is its order there). Returns the count per image
    and the total after the last batch."""
    labels = labels.cpu()
    pulls = torch.zeros(len(labels), dtype=torch.long)
    done = 0  # batches of the classes before
    for c in labels.unique(sorted=True).tolist():
        rows = (labels == c).nonzero().flatten()
        pulls[rows] = depth * (done + torch.arange(len(rows)) // batch_size)
        done += math.ceil(len(rows) / batch_size)
    return pulls, depth * done


def orthogonality_loss(features: torch.Tensor, means: torch.Tensor,
                       temperature: float = ORTHO_TEMPERATURE) -> torch.Tensor:
    """``orth_loss``: M = [class means of earlier tasks; the batch's features], cross-entropy of the rows of
    M Mᵀ / temperature against their own index (mean over rows). Unweighted; float32."""
    m = torch.cat([means.to(features.device, torch.float32), features.float()])
    sim = m @ m.T / temperature
    return F.cross_entropy(sim, torch.arange(len(m), device=m.device))


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """``CosineLinear``: σ cos(f, p_c) (σ = 1, never trained)."""
    return sigma * F.linear(F.normalize(features.float(), dim=1), F.normalize(prototypes.float(), dim=1))


def self_refined_logits(start: torch.Tensor, logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        class_task: torch.Tensor, steps: int = REFINE_STEPS) -> torch.Tensor:
    """The official self-refined retrieval, for a batch: from task ``start`` [B], up to ``steps`` times the logits
    ``logits_of(rows, tasks)`` of the rows with the adapter of their current task, whose arg-max's task
    (``class_task``) becomes the next one; a row stops when that task is the one it used, or at the ``steps``-th
    logits. Returns every row's last logits (those of the last adapter used, as the official loop)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    task = start.clone()
    active = torch.arange(len(start), device=start.device)
    final = None
    for step in range(1, steps + 1):
        logits = logits_of(active, task[active])
        if final is None:
            final = logits.new_zeros(len(start), logits.shape[1])
        final[active] = logits
        chosen = class_task.to(logits.device)[logits.argmax(1)].to(task.device)
        moving = chosen != task[active]
        if step == steps or not moving.any():
            break
        rows = active[moving]
        task[rows] = chosen[moving]
        active = rows
    return final


def ensemble_scores(final_logits: torch.Tensor, prototype_logits: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """``softmax(final logits) + softmax(prototype logits / (1 / num_tasks))`` (``ensemble: true``)."""
    return F.softmax(final_logits.float(), dim=1) + F.softmax(prototype_logits.float() * num_tasks, dim=1)
