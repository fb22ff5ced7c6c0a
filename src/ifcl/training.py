"""One task's optimisation and the class-incremental evaluation, readable in one sitting.

Training follows the official InfLoRA loop (liangyanshuo/InfLoRA): a fresh optimiser per task over the
trainable parameters, the learning-rate multiplier of the epoch set before the epoch, mean cross-entropy of the
current head against local labels (position of the class inside the task), batch order from a seeded generator.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from .checkpoint import loader_generators, resumable
from .progress import epoch_done, track
from .runtime import autocast


def lr_multipliers(epochs: int, schedule: str = "inflora-cosine", milestones: Sequence[int] = (), gamma: float = 0.1) -> list[float]:
    """Per-epoch learning-rate multipliers (the schedulers are stepped once per epoch in the official code).

    - ``inflora-cosine``: the official ``CosineSchedule`` as it actually behaves: its base class applies epoch 0,
      then resets, so the first two epochs both use the base lr; afterwards η_e = η cos(99π (e - 1) / (200 (K - 1)))
      for 0-based epoch e of K (liangyanshuo/InfLoRA);
    - ``cosine``: ``CosineAnnealingLR(T_max=K)``: (1 + cos(π e / K)) / 2 (the official SGD branches);
    - ``multistep``: ``MultiStepLR``: γ to the number of milestones ≤ e (InfLoRA_CA1, DomainNet);
    - ``timm-cosine``: timm's ``CosineLRScheduler`` stepped with ``step(epoch)`` after each epoch, as
      thu-ml/HiDe-Prompt does: epoch e runs at the value of epoch e - 1, (1 + cos(π max(e - 1, 0) / K)) / 2;
    - ``constant``: 1 throughout.

    With a ``min_lr`` (:func:`train_classifier`) a parameter group's rate is min_lr + (base - min_lr) × multiplier.
    """
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    if schedule == "constant":
        return [1.0] * epochs
    if schedule == "inflora-cosine":
        if epochs == 1:
            return [1.0]
        return [math.cos(99 * math.pi * max(e - 1, 0) / (200 * (epochs - 1))) for e in range(epochs)]
    if schedule == "cosine":
        return [(1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    if schedule == "timm-cosine":
        return [(1 + math.cos(math.pi * max(e - 1, 0) / epochs)) / 2 for e in range(epochs)]
    if schedule == "multistep":
        return [gamma ** sum(m <= e for m in milestones) for e in range(epochs)]
    raise ValueError(f"unknown schedule {schedule!r}")


def make_optimizer(params: list, cfg: dict, head_params: list | None = None) -> torch.optim.Optimizer:
    """Adam (betas 0.9, 0.999) or SGD (momentum, 0.9 by default). With ``cfg['head_lr']`` the heads form a second
    parameter group with that lr (the official ``fc_lrate`` of the SGD recipes, liangyanshuo/InfLoRA)."""
    head_params = head_params or []
    head_ids = {id(p) for p in head_params}
    if cfg.get("head_lr") is not None and head_params:
        groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": cfg["lr"]},
                  {"params": head_params, "lr": cfg["head_lr"]}]
    else:
        groups = [{"params": params, "lr": cfg["lr"]}]
    for g in groups:
        g["base_lr"] = g["lr"]
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(groups, betas=(0.9, 0.999), weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.get("momentum", 0.9), weight_decay=cfg["weight_decay"])
    raise ValueError(f"unknown optimizer {cfg['optimizer']!r}")


def train_classifier(
    params: list[nn.Parameter],
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader,
    cfg: dict,
    label_offset: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "train",
    head_params: list[nn.Parameter] | None = None,
    precision: str = "bf16",
    on_epoch: Callable[[int], None] | None = None,
    on_step: Callable[[], None] | None = None,
    state: nn.Module | None = None,
) -> list[dict]:
    """Minimise mean cross-entropy of ``logits_fn(x)`` against ``y - label_offset`` for ``cfg['epochs']`` epochs.
    A ``logits_fn`` that returns ``(logits, extra_loss)`` has ``extra_loss`` added (the prompt methods' key loss).
    ``on_epoch(epoch)`` runs before each epoch, ``on_step()`` after each optimiser step (LAE's frozen first epochs
    and its moving average).

    ``cfg``: optimizer, lr, weight_decay, (momentum, head_lr), epochs, schedule (milestones, gamma, min_lr: the
    floor every group's rate is scheduled towards), clip_grad_norm (the norm of the gradient of ``params`` clipped
    to it before each step, ``torch.nn.utils.clip_grad_norm_``); ``precision``: see :func:`autocast`. Returns one
    log row per epoch (epoch, lr, loss, train accuracy); the epoch's duration is printed, not returned, so that the
    rows are the same on every run.

    In a workflow job the loop keeps an epoch checkpoint (:mod:`ifcl.checkpoint`) of ``state`` (the module whose
    state_dict holds every tensor training changes: what hooks such as LAE's moving average change too; default:
    ``params``), the optimiser, the generators and the rows; stopped, it writes it, and the job's next attempt
    continues after the last finished epoch.
    """
    opt = make_optimizer(params, cfg, head_params)
    multipliers = lr_multipliers(cfg["epochs"], cfg["schedule"], cfg.get("milestones", ()), cfg.get("gamma", 0.1))
    floor, clip = cfg.get("min_lr", 0.0), cfg.get("clip_grad_norm")
    with resumable(desc, state if state is not None else params, opt, loader_generators(loader)) as checkpoint:
        first, saved = checkpoint.resume()
        rows = saved.get("rows", [])
        for epoch in range(first, len(multipliers)):
            for group in opt.param_groups:
                group["lr"] = floor + (group["base_lr"] - floor) * multipliers[epoch]
            if on_epoch is not None:
                on_epoch(epoch)
            start, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
            for x, y in track(loader, f"{desc} epoch {epoch + 1}/{cfg['epochs']}", epoch=epoch, epochs=cfg["epochs"]):
                x, y = x.to(device, non_blocking=True), (y - label_offset).to(device, non_blocking=True)
                with autocast(device, precision):
                    out = logits_fn(x)
                    logits, extra = out if isinstance(out, tuple) else (out, None)
                    loss = F.cross_entropy(logits, y)
                    if extra is not None:
                        loss = loss + extra
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                if on_step is not None:
                    on_step()
                total_loss += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
            rows.append({"epoch": epoch, "lr": floor + (cfg["lr"] - floor) * multipliers[epoch],
                         "loss": total_loss / seen, "train_acc": 100.0 * correct / seen})
            epoch_done(desc, epoch, cfg["epochs"], time.perf_counter() - start, seen, loss=rows[-1]["loss"],
                       accuracy=rows[-1]["train_acc"], lr=rows[-1]["lr"])
            checkpoint.epoch_done(epoch, rows=rows)
    return rows


@torch.no_grad()
def predict_logits(logits_fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device="cpu",
                   precision: str = "bf16") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets over a loader."""
    logits, targets = [], []
    for x, y in track(loader, "evaluate"):
        with autocast(device, precision):
            logits.append(logits_fn(x.to(device)).float().cpu())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def predict(logits_fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Arg-max predictions and targets over a loader."""
    logits, targets = predict_logits(logits_fn, loader, device)
    return logits.argmax(1), targets


def task_of(classes: torch.Tensor, classes_per_task: list[int]) -> torch.Tensor:
    """Task index of global class positions (tasks are consecutive blocks)."""
    bounds = torch.tensor(classes_per_task).cumsum(0)
    return torch.bucketize(classes, bounds, right=True)


def task_aware_predictions(logits: torch.Tensor, targets: torch.Tensor, classes_per_task: list[int]) -> torch.Tensor:
    """Arg-max inside the true task's head only (task-incremental accuracy, the official
    ``CNN top1 with task curve``, liangyanshuo/InfLoRA)."""
    starts = torch.tensor([0] + classes_per_task[:-1]).cumsum(0)
    sizes = torch.tensor(classes_per_task)
    task = task_of(targets, classes_per_task)
    cols = torch.arange(logits.shape[1])
    inside = (cols >= starts[task, None]) & (cols < (starts + sizes)[task, None])
    return logits.masked_fill(~inside, float("-inf")).argmax(1)


def per_task_accuracy(preds: torch.Tensor, targets: torch.Tensor, classes_per_task: list[int]) -> tuple[list[float], list[int]]:
    """Accuracy (%) on the test samples of each task (targets are global class positions, task blocks in order)
    under all-class prediction, and the number of samples of each task."""
    bounds = [0]
    for m in classes_per_task:
        bounds.append(bounds[-1] + m)
    accs, counts = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = (targets >= lo) & (targets < hi)
        counts.append(int(mask.sum()))
        accs.append(100.0 * float((preds[mask] == targets[mask]).float().mean()) if counts[-1] else float("nan"))
    return accs, counts


@dataclass(frozen=True)
class Pretrain:
    """Rules pretrain_backbone and pretrain_clip: the backbone's spec (its arch and pretraining settings), the
    pretraining dataset's spec (its transforms) and manifests."""

    spec: dict
    dataset: dict
    train: str
    test: str
    weights: str
    log_csv: str
    threads: int = 1
