"""The losses, schedule and weight-space operations of the full fine-tuning methods of the MTIL benchmark, as
ZSCL's official code computes them (`Thunderbeee/ZSCL mtil/src/models/finetune.py`, `helpers.py`, `utils.py`,
and the per-method settings of `mtil/scripts/*.sh`), on tensors.

Every method fine-tunes the whole CLIP (both towers, all but ``logit_scale``) with AdamW on the cross-entropy of
the cosine logits ``exp(logit_scale) · f(x)ᵀ g(prompt)`` over the task's class prompts, label smoothing 0.2,
1,000 iterations of batch 64 (1,001 optimiser steps: the loop runs ``range(iterations + 1)``), the learning rate
of :func:`lr_at` set before each step. They differ in what is added:

- **Continual-FT**: nothing.
- **LwF**: :func:`zscl_distillation` on the task's own images and class prompts, the teacher the model after the
  previous task (`lwf.sh`: ``--method ZSCL --ref-dataset <current> --ref-model <previous>``).
- **LwF-VR**: the same with random token sequences as the "texts" (:func:`virtual_vocabulary`, `lwf_vr.sh`).
- **WiSE-FT**: after each task the weights are interpolated with the previous task's, :func:`interpolate` with
  α = 0.8 (`WiSE_finetune.sh`: ``--wise_merge --wise_ft_model n --wise_ft_alpha 0.8``).
- **ZSCL**: :func:`zscl_distillation` on reference images (ImageNet) and reference texts (Conceptual Captions),
  the teacher the zero-shot CLIP; plus :func:`l2_anchor` to the weights the task started from (weight 1), and the
  weight ensemble (:func:`running_average` every 100 iterations, the average being the task's result) (`ZSCL.sh`).
- **iCaRL** (`icarl.py`, `dynamic_dataset.py`): from task 1 on, :func:`zscl_distillation` on an exemplar memory of
  the earlier datasets' images against the task's class prompts, the teacher the zero-shot CLIP. The memory holds
  ``K`` images (10,000): after task 0 the dataset's first ``K`` training images; after task t ≥ 1 each earlier
  dataset keeps its first ``K // (t + 1)`` and dataset t adds ``K − K // (t + 1)`` chosen by :func:`herding` among
  its first 30,000 training images, on the image features of the model after task t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """The learning rate of step ``step`` (0 … ``total``): linear warm-up ``base_lr · (step + 1) / warmup`` for the
    first ``warmup`` steps, then a cosine from ``base_lr`` to 0 at step ``total`` (`utils.cosine_lr`; warm-up 100)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * base_lr


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) · x̂ ŷᵀ`` of L2-normalised image features [B, D] and text features [C, D]."""
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return logit_scale.exp() * image_features @ text_features.t()


def distillation(teacher: torch.Tensor, student: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """``T² · mean_i CE(student_i / T, softmax(teacher_i / T))`` over the rows (`helpers.distillation`)."""
    return F.cross_entropy(student / T, F.softmax(teacher / T, dim=1), reduction="mean") * T**2


def zscl_distillation(student_images: torch.Tensor, teacher_images: torch.Tensor, teacher_texts: torch.Tensor,
                      logit_scale: torch.Tensor, T: float = 2.0, image_loss: bool = True,
                      text_loss: bool = True) -> torch.Tensor:
    """ZSCL's (and LwF's) distillation on a batch of reference images: the student's and the teacher's image
    features against the teacher's text features of the reference texts, both with the student's
    ``logit_scale``. ``image_loss``: over the texts for each image; ``text_loss``: over the images for each text
    (the transposed logits). Both on, as every script of the family runs it."""
    student = clip_logits(student_images, teacher_texts, logit_scale)
    teacher = clip_logits(teacher_images, teacher_texts, logit_scale)
    loss = student.new_zeros(())
    if image_loss:
        loss = loss + distillation(teacher, student, T)
    if text_loss:
        loss = loss + distillation(teacher.t(), student.t(), T)
    return loss


def l2_anchor(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """``Σ ‖θ − θ_anchor‖²`` over every parameter (`helpers.l2_loss`), the anchor held fixed."""
    return sum(F.mse_loss(p, anchor[name].detach(), reduction="sum") for name, p in params.items())


@torch.no_grad()
def running_average(average: dict[str, torch.Tensor], current: dict[str, torch.Tensor], count: int) -> None:
    """The weight ensemble's update, in place: ``average ← (average · count + current) / (count + 1)``
    (`helpers.merge_we`). Called with count = 1, 2, … after steps 0, 100, 200, … from a copy of the weights the task
    started from, it keeps the uniform mean of those weights and of every snapshot."""
    for name, value in average.items():
        value.mul_(count).add_(current[name]).div_(count + 1)


@torch.no_grad()
def interpolate(finetuned: dict[str, torch.Tensor], other: dict[str, torch.Tensor], alpha: float
                ) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``α · θ_finetuned + (1 − α) · θ_other`` for every parameter."""
    return {name: finetuned[name] * alpha + other[name] * (1 - alpha) for name in finetuned}


def virtual_vocabulary(generator: torch.Generator, vocab_size: int, start: int, end: int, length: int = 10,
                       count: int = 1000, context: int = 77) -> torch.Tensor:
    """LwF-VR's reference "texts": ``count`` token sequences of ``length`` tokens drawn uniformly from the
    vocabulary, between the start and end tokens, zero-padded to ``context`` (`helpers.virtual_vocab`)."""
    tokens = torch.randint(0, vocab_size, (count, length), generator=generator)
    return torch.cat([torch.full((count, 1), start), tokens, torch.full((count, 1), end),
                      torch.zeros((count, context - length - 2), dtype=torch.long)], dim=1)


@torch.no_grad()
def herding(features: torch.Tensor, m: int, official_indexing: bool = True) -> list[int]:
    """iCaRL's exemplar choice (`dynamic_dataset.constructExampleSet`) among N candidates whose image features
    ``features`` [N, D] are L2-normalised: the k-th pick (k = 0 … min(m, N) − 1) is the remaining candidate φ that
    brings the mean of the picks closest to the mean μ of all N, ``argmin ‖μ − (φ + Σ picks) / (k + 1)‖²``.

    The official code deletes each pick from the feature array but not from the image list, and takes the image at
    the pick's position in the shortened array: ``official_indexing`` returns those images' indices (from the second
    pick on, usually not the image whose feature was picked), as the official memory holds; False returns the
    picked candidates themselves."""
    n = features.shape[0]
    mean = features.mean(0)
    remaining = torch.ones(n, dtype=torch.bool, device=features.device)
    total = torch.zeros_like(mean)
    picks = []
    for k in range(min(m, n)):
        distance = ((mean - (features + total) / (k + 1)) ** 2).sum(1)
        distance[~remaining] = float("inf")
        i = int(distance.argmin())
        picks.append(int(remaining[:i].sum()) if official_indexing else i)
        total += features[i]
        remaining[i] = False
    return picks


def memory_after_task(memory: list[list[int]], t: int, size: int, candidates: int, chosen: list[int]
                      ) -> list[list[int]]:
    """iCaRL's memory after task t as the candidate indices kept per dataset 0 … t (`dynamic_dataset.update`):
    after task 0 the first ``size`` of dataset 0's ``candidates`` (``chosen`` ignored); after task t ≥ 1 each earlier
    dataset's first ``size // (t + 1)`` and dataset t's ``chosen`` (:func:`herding` of ``size − size // (t + 1)``)."""
    if t == 0:
        return [list(range(min(size, candidates)))]
    return [kept[:size // (t + 1)] for kept in memory] + [list(chosen)]


@dataclass(frozen=True)
class Recipe:
    """One task's fine-tuning, as the official scripts set it (defaults: `mtil/src/args.py`, `mtil/scripts/*.sh`)."""

    lr: float  # 1e-5; 5e-5 for Aircraft and MNIST
    iterations: int = 1000
    warmup: int = 100
    weight_decay: float = 0.0
    beta2: float = 0.999
    label_smoothing: float = 0.2
    l2: float = 0.0  # ZSCL: 1
    average_every: int | None = None  # ZSCL's weight ensemble: 100; None: the last weights are the task's result
    distill_T: float = 2.0


@dataclass
class Reference:
    """What LwF, LwF-VR and ZSCL distil on: an endless supply of reference image batches, the reference texts'
    tokens, and the teacher (the previous task's model, or the zero-shot CLIP), frozen."""

    images: Callable[[], Iterator[torch.Tensor]]  # a fresh pass over the reference images, in batches
    tokens: torch.Tensor
    teacher: torch.nn.Module


def _cycle(passes: Callable[[], Iterable]) -> Iterator:
    while True:
        yield from passes()


def step_loss(clip: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor, recipe: Recipe,
              start: dict[str, torch.Tensor] | None = None,
              distill: tuple[torch.nn.Module, torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one step (and its logits): the label-smoothed cross-entropy of :func:`clip_logits` of the batch
    over the class prompts ``tokens``; plus ``recipe.l2`` times :func:`l2_anchor` to ``start``; plus, with
    ``distill`` = (teacher, the teacher's features of the reference texts, a batch of reference images),
    :func:`zscl_distillation` on those images."""
    logits = clip_logits(clip.encode_image(x), clip.encode_text(tokens), clip.logit_scale)
    loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
    if start is not None:
        loss = loss + recipe.l2 * l2_anchor({n: p for n, p in clip.named_parameters() if n in start}, start)
    if distill is not None:
        teacher, teacher_texts, images = distill
        with torch.no_grad():
            teacher_images = teacher.encode_image(images)
        loss = loss + zscl_distillation(clip.encode_image(images), teacher_images, teacher_texts, clip.logit_scale,
                                        recipe.distill_T)
    return loss, logits


def finetune(clip: torch.nn.Module, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
             tokens: torch.Tensor, recipe: Recipe, reference: Reference | None = None,
             log: Callable[[int, float, float, float], None] | None = None) -> dict[str, torch.Tensor]:
    """Fine-tune every parameter of an open_clip ``clip`` but ``logit_scale`` on one task, as `finetune.py` does,
    and return the task's weights (a state dict): the last ones, or the weight ensemble's average.

    ``batches()``: a fresh pass over the task's training images (x, label); passes follow one another for
    ``recipe.iterations + 1`` AdamW steps, each at :func:`lr_at` of its index. The loss of a step: the
    label-smoothed cross-entropy of :func:`clip_logits` over the task's class prompts (``tokens``), plus
    :func:`zscl_distillation` on the next reference batch when ``reference`` is given, plus ``recipe.l2`` times
    :func:`l2_anchor` to the starting weights. ``log(step, loss, lr, batch accuracy in %)`` after every step."""
    params = {name: p for name, p in clip.named_parameters() if name != "logit_scale"}
    optimizer = torch.optim.AdamW(params.values(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                                  betas=(0.9, recipe.beta2))
    start = {name: p.detach().clone() for name, p in params.items()} if recipe.l2 > 0 else None
    # the ensemble averages the parameters (logit_scale included, as merge_we), not the buffers
    average = {name: p.detach().clone() for name, p in clip.named_parameters()} if recipe.average_every else None
    data = _cycle(batches)
    ref_images = _cycle(reference.images) if reference is not None else None
    if reference is not None:
        reference.teacher.eval()
        with torch.no_grad():
            teacher_texts = reference.teacher.encode_text(reference.tokens)
    clip.train()
    for step in range(recipe.iterations + 1):
        lr = lr_at(step, recipe.lr, recipe.warmup, recipe.iterations)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = next(data)
        loss, logits = step_loss(clip, x, y.to(x.device), tokens, recipe, start,
                                 None if reference is None else (reference.teacher, teacher_texts, next(ref_images)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average is not None and step % recipe.average_every == 0:
            running_average(average, dict(clip.named_parameters()), step // recipe.average_every + 1)
        if log is not None:
            log(step, float(loss.detach()), lr, 100.0 * float((logits.argmax(1) == y.to(logits.device)).float().mean()))
    return {name: (average or {}).get(name, value).detach().clone() for name, value in clip.state_dict().items()}
