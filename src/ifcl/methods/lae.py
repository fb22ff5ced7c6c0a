"""LAE's (Gao et al., ICCV 2023) learning and ensemble rules on tensors, as its official code computes them
(`gqk/LAE main.py`, `libml/model/pet/adapter.py`, `libml/model/misc/scaler.py`, `libml/optim/scheduler.py`,
its base configs). The model around these rules: :mod:`ifcl.models.vit_lae`.

- The online module (a parameter-efficient module per adapted block: here the adapter) learns every task; its
  parallel adapter adds ``s · up(GELU(down(x)))`` to the attention's output, ``down`` Kaiming-uniform, ``up`` and
  the biases zero, ``s`` a learnt scalar starting at 1 (:class:`Adapter`).
- The offline module is an exponential moving average of the online one, created at the start of task 1 as its
  copy and updated after every training step (timm's ``ModelEmaV2``, decay 0.9999, over parameters and buffers):
  :func:`ema_update`.
- From task 1 on, the online module is frozen for the first 3 epochs of a task, while the new head learns
  (:func:`online_trainable`).
- The loss of a step is the cross-entropy over the current task's classes only (:func:`new_task_loss`).
- Inference takes, per class, the larger of the online and offline softmax probabilities (:func:`ensemble`).
- The learning rate follows ``create_scheduler(mode=linear)`` (:func:`linear_lr`) over a length that the official
  configs make infinite (``schedule_unit: none``), so it stays at its base: Adam at 0.03 · 24 / 256 = 0.0028125 on
  CIFAR-100 (5 epochs), 0.005 · 24 / 256 = 0.00046875 on ImageNet-R (50 epochs), batch 24 with ``drop_last``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Module):
    """LAE's parallel adapter of one block: ``block_part(x) + s · up(GELU(down(x)))``, ``bottleneck`` wide (the
    official ``down_sample: 5`` is a width of 5), ``s`` learnt from 1 (``scale: null``)."""

    def __init__(self, width: int, bottleneck: int = 5):
        super().__init__()
        self.down, self.up = nn.Linear(width, bottleneck), nn.Linear(bottleneck, width)
        self.scale = nn.Parameter(torch.tensor(1.0))
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term, added to the output of the module it runs beside."""
        return self.up(F.gelu(self.down(x))) * self.scale


@torch.no_grad()
def ema_update(offline: dict[str, torch.Tensor], online: dict[str, torch.Tensor], decay: float = 0.9999) -> None:
    """``offline ← decay · offline + (1 − decay) · online`` for every entry of the state, in place, as timm's
    ``ModelEmaV2.update`` does (parameters and buffers alike; an integer buffer takes the average cast back)."""
    for name, value in offline.items():
        value.copy_(decay * value + (1 - decay) * online[name].detach())


def ensemble(online_logits: torch.Tensor, offline_logits: list[torch.Tensor], only_offline: bool = False
             ) -> torch.Tensor:
    """LAE's prediction scores: the element-wise maximum of the online and offline softmax probabilities (with no
    offline module yet, the online softmax; ``only_offline``: the offline ones alone, the official
    ``eval_only_emas``)."""
    probs = [online_logits.softmax(dim=1)] + [o.softmax(dim=1) for o in offline_logits]
    if only_offline and len(probs) > 1:
        probs = probs[1:]
    return torch.stack(probs, dim=-1).max(dim=-1).values


def new_task_loss(logits: torch.Tensor, targets: torch.Tensor, num_old: int) -> torch.Tensor:
    """Cross-entropy over the current task's classes: the logits of the ``num_old`` classes of earlier tasks are
    dropped and the targets shifted down by ``num_old`` (``MyModule.train_step``)."""
    return F.cross_entropy(logits[:, num_old:], targets - num_old)


def online_trainable(task: int, epoch: int, freeze_epochs: int = 3) -> bool:
    """Whether the online module learns in ``epoch`` (0-based) of ``task``: always in task 0; from task 1 on, not in
    its first ``freeze_epochs`` epochs (``MyModule.pre_train_epoch``)."""
    return task == 0 or freeze_epochs < 1 or epoch >= freeze_epochs


def linear_lr(step: int, total: int, base_lr: float, floor: float = 0.0) -> float:
    """``create_scheduler(mode=linear)``: ``base_lr · ((1 − step / total) · (1 − floor) + floor)``; ``total`` is
    ``math.inf`` under the official configs' ``schedule_unit: none`` (a constant rate)."""
    return base_lr * ((1 - step / total) * (1 - floor) + floor)
