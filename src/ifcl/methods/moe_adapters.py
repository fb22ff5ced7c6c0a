"""MoE-Adapters (Yu et al., CVPR 2024, "Boosting Continual Learning of Vision-Language Models via Mixture-of-Experts
Adapters") on tensors, as the official code computes it (`JiazuoYu/MoE-Adapters4CL`, folder ``mtil``).

**Experts and routers** (`mtil/clip/model.py` ``ResidualAttentionBlock``, `mtil/clip/adapter.py` ``Adapter``). Every
residual block of both CLIP towers gets ``E = 22`` expert adapters shared by all tasks and one router per task
(``W_g^t``, ``W_n^t`` of shape [D, E], both zero at creation; 11 router slots). On the residual stream ``x`` after
the attention residual, the router reads the block's first token ``c = x[:, 0]`` (the image's class token; in the
text tower the start-of-text token):

    H = c W_g^t + ε ⊙ (softplus(c W_n^t) + 0.01),  ε ~ N(0, 1)     while training (evaluation: H = c W_g^t)
    G = softmax over the k = 2 largest entries of H, 0 elsewhere    (:func:`noisy_top_k_gating`)
    E_e(x) = 0.1 · (W_up,e · dropout_0.1(ReLU(W_down,e x + b_down,e)) + b_up,e)   (bottleneck 64)
    block:  x ← x + MLP(LN_2(x)) + Σ_e G_e · E_e(x)                 (the experts are parallel to the MLP and
                                                                    read x itself, not LN_2(x))

``W_down`` is Kaiming-uniform (a = √5), ``W_up`` and both biases 0, so a new model is the frozen CLIP.

**Load-balancing loss** (:func:`balance_loss`): ``0.01 · (cv²(Σ_b G_b) + cv²(load))``, cv² = unbiased variance /
(mean² + 1e-10), load = Σ_b P(expert in the top k under fresh noise) while training (:func:`prob_in_top_k`), the
number of samples routed to each expert otherwise. The official block computes it into a local variable and never
returns it: **it is not part of the official training loss** (cross-entropy only).

**Activate-freeze** (`mtil/src/models/finetune.py`, end of training): every block of each tower counts how many
samples (images, or class prompts in the text tower) were routed to each expert during the task (nonzero gates,
:func:`selection_counts`); the 2 most chosen experts of every block and tower (``torch.topk(counts, 2)``) are
appended to a file, and every later task trains with the experts listed in that file (the union over all earlier
tasks, :func:`update_frozen`) excluded from the optimiser. Routers are never frozen (each task trains its own).

**DDAS** (`mtil/src/models/AutoEncoder.py`, `few_shot_AutoEncoder.py`, `evaluation.py`). One autoencoder per task
plus a reference one (slot 0, trained on TinyImageNet), on the sigmoid of the flattened conv5 output (before its
ReLU) of an ImageNet AlexNet (256 × 13 × 13 at 224 px; :func:`alexnet_extractor`, :func:`autoencoder_input`):
``Linear(43264, 100) → ReLU → Linear(100, 43264) → Sigmoid``, MSE reconstruction, Adam (weight decay 1e-4) at a
learning rate of 0.01 (few-shot 0.003) × 0.1 every 10 epochs (:func:`ddas_lr`). At test time the mean squared
error of a whole test batch (128 images) is computed under every autoencoder; the smallest wins, and
(:func:`select_task`) the batch goes through task ``argmin − 1``'s router (image and text towers) unless the smallest
error exceeds the threshold (0.0655 full-shot) or the reference autoencoder wins: then the frozen CLIP (task −1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import zscl

# MTIL order I as the official full-shot training script (`train_full_shot_router11_experts22_1000iters.sh`) lists it, with its learning
# rates; the few-shot (5-shot) script's learning rates for the same order.
FULL_SHOT_LR: dict[str, float] = {
    "mtil_aircraft": 5e-3, "mtil_caltech101": 1e-3, "mtil_cifar100": 5e-3, "mtil_dtd": 1e-3, "mtil_eurosat": 1e-4,
    "mtil_flowers": 1e-3, "mtil_food": 1e-3, "mtil_mnist": 1e-4, "mtil_oxford_pet": 1e-3, "mtil_stanford_cars": 1e-3,
    "mtil_sun397": 1e-3}
FEW_SHOT_LR: dict[str, float] = {
    "mtil_aircraft": 8e-3, "mtil_caltech101": 5e-4, "mtil_cifar100": 2e-4, "mtil_dtd": 5e-3, "mtil_eurosat": 1e-3,
    "mtil_flowers": 1e-3, "mtil_food": 1e-2, "mtil_mnist": 1e-4, "mtil_oxford_pet": 1e-2, "mtil_stanford_cars": 1e-2,
    "mtil_sun397": 1e-2}
ORDER_I: tuple[str, ...] = tuple(FULL_SHOT_LR)


@dataclass(frozen=True)
class MoEAdaptersConfig:
    """The official settings (`mtil/src/args.py` defaults and the two official training scripts)."""

    # model (`mtil/clip/model.py`, `adapter.py`)
    num_experts: int = 22              # --experts_num 22
    top_k: int = 2                     # --topk default
    num_routers: int = 11              # router slots per block (``range(11)``), one per task
    bottleneck: int = 64               # --ffn_num 64 (down_proj's width is hard-coded to 64)
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1       # on the bottleneck activation, training only
    noise_epsilon: float = 1e-2
    towers: tuple[str, ...] = ("visual", "text")   # --ffn_adapt_where AdapterDoubleEncoder: all blocks of both
    balance_weight: float = 1e-2       # computed by the official block ...
    use_balance_loss: bool = False     # ... but never added to the loss
    freeze_per_task: int = 2           # experts per block and tower frozen after each task (torch.topk(map, 2))
    # training (`mtil/src/models/finetune.py`)
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup: int = 100
    iterations: int = 1000             # optimiser steps: iterations + 1 (``range(iterations + 1)``)
    batch_size: int = 64
    label_smoothing: float = 0.2
    full_shot_lr: Mapping[str, float] = field(default_factory=lambda: dict(FULL_SHOT_LR))
    few_shot_iterations: int = 500
    shots: int = 5
    few_shot_lr: Mapping[str, float] = field(default_factory=lambda: dict(FEW_SHOT_LR))
    # evaluation (`mtil/src/models/evaluation.py`)
    eval_batch_size: int = 128         # DDAS decides per test batch
    eval_logit_scale: float = 100.0
    # DDAS (`mtil/src/models/AutoEncoder.py`, `few_shot_AutoEncoder.py`)
    ddas_input_dim: int = 256 * 13 * 13
    ddas_code_dim: int = 100
    ddas_reference: str = "TinyImageNet"
    ddas_reference_iterations: int = 1000
    ddas_iterations: int = 300         # every task after the reference one
    ddas_batch_size: int = 64
    ddas_lr: float = 0.01              # exp_lr_scheduler(…, 0.01) overrides Adam's lr=0.003 every step
    ddas_lr_few_shot: float = 0.003
    ddas_lr_decay: float = 0.1
    ddas_lr_decay_epochs: int = 10
    ddas_weight_decay: float = 1e-4    # Adam's (L2, not decoupled)
    threshold: float = 0.0655          # the official test script `Full_Shot_order1.sh` and the full-shot training script
    threshold_few_shot: float = 0.06   # the official `Few_Shot_order1_test.sh` (the few-shot training script: 0.0585)


def lr_at(step: int, base_lr: float, warmup: int = 100, total: int = 1000) -> float:
    """The learning rate of step ``step`` (0 … ``total``), ZSCL's warm-up + cosine (`mtil/src/utils.py` cosine_lr,
    :func:`ifcl.methods.zscl.lr_at`) with the official warm-up of 100 steps and ``total`` = ``--iterations``."""
    return zscl.lr_at(step, base_lr, warmup, total)

# ---- router ----
def noisy_top_k_gating(x: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor, top_k: int, noisy: bool,
                       noise_epsilon: float = 1e-2, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shazeer et al.'s noisy top-k gating as `model.py` ``noisy_top_k_gating`` computes it.

    ``x`` [B, D] (the routed token), ``w_gate``/``w_noise`` [D, E]. With ``noisy`` (the official ``--is_train``)
    standard-normal ``noise`` [B, E] (drawn from ``generator`` when not given) is scaled by
    ``softplus(x W_n) + noise_epsilon`` and added to the clean logits ``x W_g``. The ``top_k`` largest logits of
    each row get a softmax over themselves, the others 0. Returns ``gates`` [B, E] and ``load`` [E]: with noise (and
    ``top_k`` < E) the differentiable Σ_b P(e in the top k) (:func:`prob_in_top_k`), otherwise the number of samples
    with a nonzero gate (an integer tensor)."""
    clean = x @ w_gate.to(x)
    num_experts = clean.shape[1]
    if noisy:
        noise_std = F.softplus(x @ w_noise.to(x)) + noise_epsilon
        if noise is None:
            noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        logits = clean + noise.to(clean) * noise_std
    else:
        logits = clean
    top_values, top_indices = logits.topk(min(top_k + 1, num_experts), dim=1)
    gates = torch.zeros_like(logits).scatter(1, top_indices[:, :top_k], torch.softmax(top_values[:, :top_k], dim=1))
    if noisy and top_k < num_experts:
        load = prob_in_top_k(clean, logits, noise_std, top_values, top_k).sum(0)
    else:
        load = (gates > 0).sum(0)
    return gates, load


def prob_in_top_k(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, top_values: torch.Tensor,
                  top_k: int) -> torch.Tensor:
    """[B, E]: the probability, under fresh noise, that each expert is among a row's ``top_k``, given the other
    experts' noisy logits. ``top_values`` [B, ≥ k+1] are each row's largest noisy logits, in decreasing order. An
    expert now in the top k stays there while its logit beats the (k+1)-th value; one outside enters when it beats
    the k-th: Φ((clean − threshold) / noise_std)."""
    threshold_in = top_values[:, top_k:top_k + 1]
    threshold_out = top_values[:, top_k - 1:top_k]
    normal = torch.distributions.Normal(torch.zeros((), dtype=clean.dtype, device=clean.device),
                                        torch.ones((), dtype=clean.dtype, device=clean.device))
    prob_if_in = normal.cdf((clean - threshold_in) / noise_std)
    prob_if_out = normal.cdf((clean - threshold_out) / noise_std)
    return torch.where(noisy > threshold_in, prob_if_in, prob_if_out)


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation of a vector: unbiased variance / (mean² + eps), in float32; 0 for a single
    element (`model.py` ``cv_squared``)."""
    if x.shape[0] == 1:
        return torch.zeros((), device=x.device, dtype=torch.float32)
    x = x.float()
    return x.var() / (x.mean() ** 2 + eps)


def balance_loss(gates: torch.Tensor, load: torch.Tensor, weight: float = 1e-2) -> torch.Tensor:
    """``weight · (cv²(importance) + cv²(load))`` with importance = Σ_b gates (`model.py`, ``loss *= 1e-2``).
    The official block computes this and drops it: its training loss is the cross-entropy alone."""
    return weight * (cv_squared(gates.sum(0)) + cv_squared(load))


def combine_experts(x: torch.Tensor, gates: torch.Tensor, experts: Sequence[nn.Module]) -> torch.Tensor:
    """``Σ_e gates[b, e] · experts[e](x[b])`` for x [B, …], computing each expert on its routed samples only (what
    `model.py` ``SparseDispatcher`` does: dispatch, run, weight, ``index_add``)."""
    out = torch.zeros_like(x)
    for e in torch.nonzero(gates.sum(0) > 0).flatten().tolist():  # experts with a routed sample
        rows = torch.nonzero(gates[:, e] > 0).flatten()
        weight = gates[rows, e].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        out = out.index_add(0, rows, weight * experts[e](x[rows]))
    return out


# ---- activate-freeze ----
def selection_counts(gates: torch.Tensor) -> torch.Tensor:
    """[E] (long): how many rows of ``gates`` [B, E] chose each expert (nonzero gate), the increment of the
    official ``choose_map_image`` / ``choose_map_text`` per forward."""
    return (gates != 0).sum(0)


def experts_to_freeze(counts: torch.Tensor, k: int = 2) -> list[int]:
    """The ``k`` most chosen experts of one block in one task, as ``torch.topk(choose_map, 2)`` picks them (most
    chosen first). Ties: torch.topk's choice (not specified by torch; with top-2 routing every sample picks two
    different experts, so at least two counts are positive)."""
    return torch.topk(counts.float(), k).indices.tolist()


def update_frozen(frozen: Mapping[str, Iterable[int]], counts: Mapping[str, torch.Tensor], k: int = 2
                  ) -> dict[str, list[int]]:
    """The frozen experts after a task: per layer name (``visual.<i>``, ``text.<i>``), the union of the experts
    frozen before and the task's ``k`` most chosen ones (`finetune.py` appends to the frozen-list file, every later
    task reads ``set(lines)``). Sorted lists."""
    out = {name: set(experts) for name, experts in frozen.items()}
    for name, c in counts.items():
        out.setdefault(name, set()).update(experts_to_freeze(c, k))
    return {name: sorted(experts) for name, experts in out.items()}


# ---- DDAS ----
class DDASAutoencoder(nn.Module):
    """One task's autoencoder (`AutoEncoder.py` ``Autoencoder``, `few_shot_AutoEncoder.py` the same):
    ``Linear(input_dim, code_dim) → ReLU → Linear(code_dim, input_dim) → Sigmoid`` with PyTorch's default
    ``nn.Linear`` initialisation; 8,696,164 parameters at the official 43,264 → 100."""

    def __init__(self, input_dim: int = 256 * 13 * 13, code_dim: int = 100):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(input_dim, code_dim), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(code_dim, input_dim), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def alexnet_extractor(alexnet: nn.Module) -> nn.Module:
    """DDAS's frozen feature extractor (`AutoEncoder.py` ``Alexnet_FE``) from a torchvision AlexNet (the official
    code: ImageNet weights, ``models.alexnet(pretrained=True)``): its ``features`` without the last ReLU and
    max-pool, i.e. the conv5 output [B, 256, 13, 13] for 224-px inputs. The official code feeds it the images as
    CLIP preprocesses them (CLIP's mean/std, not AlexNet's)."""
    return nn.Sequential(*list(alexnet.features)[:-2]).eval().requires_grad_(False)


def alexnet_features() -> nn.Sequential:
    """torchvision's ``AlexNet().features`` (the same layers, indices and initialisation order, so the same
    weights under the same seed and the same state-dict keys), without building AlexNet's 58M-parameter
    classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2))


RANDOM_EXTRACTOR_SEED = 0  # the seed of the random AlexNet of ``extractor: alexnet-random``


def ddas_extractor(features: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """DDAS's frozen conv5 extractor (:func:`alexnet_extractor`): AlexNet's ``features`` with the given weights
    (keys ``features.<i>.weight|bias``, or ``<i>.…``; the official ImageNet weights), or, when None, with the
    random weights that seed :data:`RANDOM_EXTRACTOR_SEED` draws (``alexnet-random``; the global RNG is left as it
    was)."""
    if features is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_EXTRACTOR_SEED)
            layers = alexnet_features()
    else:
        layers = alexnet_features()
        layers.load_state_dict({k.removeprefix("features."): v for k, v in features.items()})
    return nn.Sequential(*list(layers)[:-2]).eval().requires_grad_(False)


def extractor_inputs(extractor: nn.Module, images: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
    """What the autoencoders reconstruct for a batch of CLIP-preprocessed images [B, 3, H, W]:
    :func:`autoencoder_input` of the extractor's conv5 output; ``image_size``: the images resized (bilinear) to
    that size first (None: as they are, the official input)."""
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        return autoencoder_input(extractor(images.float()))


def autoencoder_input(conv_features: torch.Tensor) -> torch.Tensor:
    """What the autoencoders reconstruct: ``sigmoid(flatten(conv5))`` [B, 43264]."""
    return torch.sigmoid(conv_features.flatten(1))


def initial_autoencoder(input_dim: int, code_dim: int, seed: int) -> DDASAutoencoder:
    """A slot's autoencoder before training: PyTorch's default initialisation drawn from ``seed`` (on the CPU; the
    global RNG is left as it was). The official chooser file holds every slot's initial weights from the first
    chooser process on; a slot is trained from them, and until then takes part in the choice with them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DDASAutoencoder(input_dim, code_dim)


def train_autoencoder(autoencoder: nn.Module, inputs: Callable[[], Iterable[torch.Tensor]], iterations: int,
                      num_batches: int, lr: float, decay: float = 0.1, every: int = 10, weight_decay: float = 1e-4,
                      log: Callable[[int, float, float], None] | None = None) -> None:
    """One slot's training (`AutoEncoder.py` with ``--train_chooser``): ``iterations + 1`` Adam steps (weight decay
    ``weight_decay``, the learning rate :func:`ddas_lr` of the step, with ``num_batches`` the batches of a pass) on
    :func:`reconstruction_loss`; ``inputs()`` a fresh pass over the autoencoder inputs (passes follow one another).
    ``log(step, loss, lr)`` after every step."""
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr, weight_decay=weight_decay)
    data = _cycle(inputs)
    autoencoder.train()
    for step in range(iterations + 1):
        rate = ddas_lr(step, num_batches, lr, decay, every)
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = reconstruction_loss(autoencoder, next(data))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None:
            log(step, float(loss.detach()), rate)
    autoencoder.eval()


def _cycle(passes: Callable[[], Iterable]):
    """The items of ``passes()``, pass after pass (the official loaders restart their iterator at the end)."""
    while True:
        empty = True
        for item in passes():
            empty = False
            yield item
        if empty:
            raise ValueError("an empty pass: no training images")


def reconstruction_errors(autoencoders: Sequence[nn.Module], inputs: torch.Tensor, per_sample: bool = False
                          ) -> torch.Tensor:
    """Mean squared reconstruction error of ``inputs`` [B, F] under every autoencoder: [A] over the whole batch
    (``nn.MSELoss()`` on the batch, the official test-time score) or, with ``per_sample``, [B, A]. The batch error
    is the mean of the per-sample errors."""
    errors = [((ae(inputs) - inputs) ** 2).mean(dim=1) for ae in autoencoders]
    per = torch.stack(errors, dim=1)
    return per if per_sample else per.mean(0)


def select_task(errors: torch.Tensor, threshold: float) -> torch.Tensor:
    """The task whose router serves a batch (``errors`` [A]) or each sample ([B, A]), −1 for the frozen CLIP
    (`evaluation.py` ``zeroshot_eval``).

    Slot 0 of ``errors`` is the reference autoencoder (TinyImageNet), slot t + 1 task t's. The smallest error wins
    (the first one on ties: the official loop replaces the best only on ``<``); if it exceeds ``threshold`` the
    official loop resets the choice to slot 0. Slot s becomes task s − 1, so both the reference slot and a
    rejected batch give −1."""
    best, slot = errors.min(dim=-1)
    slot = torch.where(best > threshold, torch.zeros_like(slot), slot)
    return slot - 1


def ddas_lr(iteration: int, num_batches: int, init_lr: float = 0.01, decay: float = 0.1, every: int = 10
            ) -> float:
    """The autoencoders' learning rate at ``iteration`` (`AutoEncoder.py` ``exp_lr_scheduler``):
    ``init_lr · decay^(epoch // every)``, epoch = ⌊iteration / num_batches⌋ with ``num_batches`` the length of the
    task's full training loader (also in the few-shot code, whose loader is smaller)."""
    return init_lr * decay ** ((iteration // num_batches) // every)


def reconstruction_loss(autoencoder: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The autoencoders' training loss: ``MSE(ae(x), x)`` averaged over batch and features."""
    return F.mse_loss(autoencoder(inputs), inputs)


# ---- the classification loss ----
def classification_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
                        logit_scale: torch.Tensor, label_smoothing: float = 0.2) -> torch.Tensor:
    """`finetune.py`: cross-entropy (label smoothing 0.2) of ``exp(logit_scale) · x̂ ŷᵀ`` between the batch's
    image features and the class prompts' text features, both through the current task's router."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.t()
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)



# ---- one task's training ----
@dataclass(frozen=True)
class Recipe:
    """One task's training settings (``train`` of the experiment, the task's learning rate picked)."""

    lr: float
    iterations: int = 1000
    warmup: int = 100
    weight_decay: float = 0.0
    label_smoothing: float = 0.2
    balance_loss: bool = False


def train_task(model: nn.Module, task: int, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
               tokens: torch.Tensor, recipe: Recipe, frozen: Mapping[str, Iterable[int]] | None = None,
               log: Callable[[int, float, float, float], None] | None = None) -> None:
    """Train task ``task`` of a :class:`~ifcl.models.clip_moe.CLIPMoE` in place, as `finetune.py` does: AdamW
    (β 0.9, 0.999) over the task's routers and every expert not in ``frozen`` (``CLIPMoE.set_trainable``), for
    ``recipe.iterations + 1`` steps, each at :func:`lr_at` of its index; the loss of a step is
    :func:`classification_loss` of the batch's images against every class prompt (``tokens``), both through the
    task's router in training mode (routing noise, dropout, selection counts), plus the blocks' load-balancing
    loss with ``recipe.balance_loss``. ``batches()``: a fresh pass over the task's training images (x, label).
    The selection counts are reset first, so afterwards ``model.selection_counts()`` are the task's.
    ``log(step, loss, lr, batch accuracy in %)`` after every step."""
    params = model.set_trainable(task, frozen)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.999))
    data = _cycle(batches)
    model.reset_counts()
    model.train()
    scale = model.clip.logit_scale
    for step in range(recipe.iterations + 1):
        lr = lr_at(step, recipe.lr, recipe.warmup, recipe.iterations)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(data)
        y = y.to(x.device)
        text = model.encode_text(tokens, task)
        image = model.encode_image(x, task)
        loss = classification_loss(image, text, y, scale, recipe.label_smoothing)
        if recipe.balance_loss:
            loss = loss + model.balance_loss().to(loss.device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None:
            accuracy = 100.0 * float(((image @ text.t()).argmax(1) == y).float().mean())
            log(step, float(loss.detach()), lr, accuracy)
    model.eval()
