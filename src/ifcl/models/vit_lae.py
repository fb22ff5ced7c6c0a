"""A frozen timm ViT with LAE's adapters beside the attention of the first blocks, an offline copy of them kept as a
moving average, and one linear head per task.

What the official code runs (gqk/LAE ``main.py`` ``MyModule``, ``libml/model/pet/adapter.py``,
``libml/model/head/dynamic_simple.py``, and the adapter config ``vit_adapter.yaml`` of gqk/LAE), for an adapted block with input x:

    x ← x + attn(norm1(x)) + s · up(GELU(down(norm1(x))))         (the adapter "parallel" to the attention)

with one :class:`ifcl.methods.lae.Adapter` per adapted block (blocks 0-4, width 5). The online adapters learn every
task; the offline ones are created at the start of task 1 as a copy of the online ones and follow them as an
exponential moving average after every optimiser step (:func:`ifcl.methods.lae.ema_update`). The features are the
CLS token after the final norm (``AvgToken(0, 1)``); the classifier grows by one ``nn.Linear`` per task.

Training of task t (:meth:`ViTLAE.forward_current`): the online model's logits of task t's classes alone (the
official loss slices away the old classes' logits, so the old classifiers get zero gradients and, under Adam without
weight decay, never move: the same as training head t alone). From task 1 on the online adapters are frozen in the
first ``freeze_epochs`` epochs (:meth:`ViTLAE.begin_epoch`: their gradients are ``None``, so Adam skips them, as the
official ``freeze`` sets ``param.grad = None``).

Inference (:meth:`ViTLAE.forward`): per class, the larger of the online and offline models' softmax probabilities
over every seen class (:func:`ifcl.methods.lae.ensemble`); the backbone runs once with each set of adapters.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn as nn

from ..methods.lae import Adapter, ema_update, ensemble, online_trainable
from .vit_lora import cls_features


class _Active:
    """A plain (not registered) reference from every adapted block to the set of adapters in use."""

    __slots__ = ("adapters",)

    def __init__(self, adapters: nn.ModuleList):
        self.adapters = adapters


class AttentionWithAdapter(nn.Module):
    """A block's attention with adapter ``index`` of the active set beside it: ``attn(x) + adapter(x)``."""

    def __init__(self, attn: nn.Module, index: int, active: _Active):
        super().__init__()
        self.attn, self.index, self._active = attn, index, active

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.attn(x, **kwargs) + self._active.adapters[self.index](x)


class ViTLAE(nn.Module):
    """Frozen timm ViT + LAE's online adapters (and, from task 1, their offline moving average) + a head per task.

    Usage for task t: :meth:`begin_task`, train :meth:`trainable_parameters` on :meth:`forward_current` with
    :meth:`begin_epoch` before each epoch and :meth:`end_step` after each optimiser step. Prediction over all seen
    classes is :meth:`forward` (the ensemble's scores). ``only_offline``: the offline model's probabilities alone once
    it exists (the official ``eval_only_emas``)."""

    def __init__(self, vit: nn.Module, adapt_blocks: Sequence[int] = (0, 1, 2, 3, 4), bottleneck: int = 5,
                 ema_decay: float = 0.9999, freeze_epochs: int = 3, only_offline: bool = False):
        super().__init__()
        if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError("ViTLAE expects a timm ViT pooled by its CLS token (global_pool='token')")
        self.vit = vit
        for p in self.vit.parameters():
            p.requires_grad_(False)
        depth = len(vit.blocks)
        self.adapt_blocks = sorted(adapt_blocks)
        if not self.adapt_blocks or self.adapt_blocks[0] < 0 or self.adapt_blocks[-1] >= depth:
            raise ValueError(f"adapt_blocks {list(adapt_blocks)} must be indices below the depth {depth}")
        self.embed_dim = vit.embed_dim
        self.ema_decay, self.freeze_epochs, self.only_offline = ema_decay, freeze_epochs, only_offline
        device = vit.cls_token.device
        self.online = nn.ModuleList([Adapter(self.embed_dim, bottleneck) for _ in self.adapt_blocks]).to(device)
        self.online.requires_grad_(False)
        self.offline: nn.ModuleList | None = None
        self._active = _Active(self.online)
        for index, b in enumerate(self.adapt_blocks):
            self.vit.blocks[b].attn = AttentionWithAdapter(self.vit.blocks[b].attn, index, self._active)
        self.heads = nn.ModuleList()
        self.task = -1  # the task being learnt or last loaded

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def _device(self) -> torch.device:
        return self.vit.cls_token.device

    def _new_head(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        head = nn.Linear(self.embed_dim, weight.shape[0]).to(self._device())
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        self.heads.append(head.requires_grad_(False))

    def begin_task(self, num_classes: int, task: int, generator: torch.Generator) -> None:
        """Start task t: at task 0, the online adapters' down-projections ~ U(-1/√d, 1/√d) (``kaiming_uniform_(a=√5)``;
        up-projections, biases zero, scales 1); at task 1, the offline adapters as a copy of the online ones (the
        official ``ModelEmaV2(self.pets)`` in ``setup_model``); a head ``num_classes × d`` with ``nn.Linear``'s
        initialisation (weight and bias ~ U(-1/√d, 1/√d)). Draws from ``generator`` on the CPU: the down-projections
        in block order (task 0), then the head's weight and bias."""
        if task != self.num_tasks:
            raise ValueError(f"task {task} needs the files of tasks 0..{task - 1}; the model holds {self.num_tasks}")
        bound = 1.0 / math.sqrt(self.embed_dim)
        if task == 0:
            with torch.no_grad():
                for adapter in self.online:
                    w = adapter.down.weight
                    w.copy_((torch.rand(w.shape, generator=generator) * 2 - 1) / math.sqrt(w.shape[1]))
        elif self.offline is None:
            self.offline = copy.deepcopy(self.online).requires_grad_(False)
        weight = (torch.rand(num_classes, self.embed_dim, generator=generator) * 2 - 1) * bound
        bias = (torch.rand(num_classes, generator=generator) * 2 - 1) * bound
        self._new_head(weight, bias)
        self.heads[-1].requires_grad_(True)
        self.online.requires_grad_(True)
        self.task = task

    def begin_epoch(self, epoch: int) -> None:
        """Freeze (gradient ``None``) or unfreeze the online adapters for ``epoch`` of the current task
        (:func:`ifcl.methods.lae.online_trainable`)."""
        trainable = online_trainable(self.task, epoch, self.freeze_epochs)
        for p in self.online.parameters():
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None

    def end_step(self) -> None:
        """After an optimiser step: the offline adapters move towards the online ones (official ``post_train_step``)."""
        if self.offline is not None:
            ema_update(dict(self.offline.state_dict(keep_vars=True)), dict(self.online.state_dict(keep_vars=True)),
                       self.ema_decay)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The online adapters and head t (the official Adam holds the whole model; every other parameter is frozen
        or gets zero gradients)."""
        return list(self.online.parameters()) + list(self.heads[-1].parameters())

    def features(self, x: torch.Tensor, adapters: nn.ModuleList | None = None) -> torch.Tensor:
        """The CLS token after the final norm with ``adapters`` (default: the online ones) beside the attention."""
        self._active.adapters = self.online if adapters is None else adapters
        try:
            if self.adapt_blocks[-1] == len(self.vit.blocks) - 1:  # the last block's adapter needs every token
                return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
            return cls_features(self.vit, x)
        finally:
            self._active.adapters = self.online

    def forward_current(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """The online model's logits of the current task's classes (the official loss's slice)."""
        return self.heads[-1](self.features(x))

    def logits(self, x: torch.Tensor, adapters: nn.ModuleList | None = None) -> torch.Tensor:
        """Logits over every seen class, heads concatenated in task order."""
        f = self.features(x, adapters)
        return torch.cat([h(f) for h in self.heads], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble's scores over every seen class: per class the larger of the online and offline softmax
        probabilities (the online ones alone before task 1)."""
        offline = [] if self.offline is None else [self.logits(x, self.offline)]
        return ensemble(self.logits(x), offline, self.only_offline)

    # ---- per-task state (what task t leaves; the frozen backbone is stored elsewhere) ----
    def task_state(self) -> dict[str, torch.Tensor]:
        """Head t (``head.weight``, ``head.bias``) and the adapters after task t: ``online.<i>.*`` and, from task 1,
        ``offline.<i>.*`` (i: the adapter's position among the adapted blocks)."""
        state = {"head.weight": self.heads[-1].weight.detach().clone(),
                 "head.bias": self.heads[-1].bias.detach().clone()}
        state |= {f"online.{k}": v.detach().clone() for k, v in self.online.state_dict().items()}
        if self.offline is not None:
            state |= {f"offline.{k}": v.detach().clone() for k, v in self.offline.state_dict().items()}
        return state

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Append a finished task from its :meth:`task_state`: its head, and its adapters in place of the model's.
        Loading the states of tasks 0..t in order gives the model after task t."""
        self._new_head(state["head.weight"], state["head.bias"])
        self.online.load_state_dict({k[len("online."):]: v for k, v in state.items() if k.startswith("online.")})
        offline = {k[len("offline."):]: v for k, v in state.items() if k.startswith("offline.")}
        if offline:
            if self.offline is None:
                self.offline = copy.deepcopy(self.online)
            self.offline.load_state_dict(offline)
            self.offline.requires_grad_(False)
        self.online.requires_grad_(False)
        self.task = self.num_tasks - 1


def build(settings: dict, vit: nn.Module, seed: int) -> ViTLAE:
    """The model of an LAE experiment before task 0 (the ``state`` chain's factory, :mod:`ifcl.catalog.lae`):
    ``settings["lae"]`` its adapters, moving average and ensemble; nothing is drawn before task 0 (``seed``
    unused)."""
    s = settings["lae"]
    return ViTLAE(vit, adapt_blocks=s["adapt_blocks"], bottleneck=s["bottleneck"], ema_decay=s["ema_decay"],
                  freeze_epochs=s["freeze_epochs"], only_offline=s["only_offline"])
