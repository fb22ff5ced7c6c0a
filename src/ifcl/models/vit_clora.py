"""A frozen timm ViT with C-LoRA on the chosen projections (default: key and value) of the chosen blocks, plus one
linear head per task.

For an adapted block with attention input x, during task t (see :mod:`ifcl.methods.clora` for the rule and its
sources; C-LoRA has no official code):

    k = x (W_k + Σ_{s<t} B_s A_s)ᵀ + b_k + x (B_t A_t)ᵀ          (the same for v; q untouched by default)

with A_s (rank × d) and B_s (d × rank) task s's factors. The finished tasks' updates are summed into W once
(:meth:`CLoRAQKV.merge`), which is the function the InfLoRA code base computes by re-adding the stacked sum in every
forward, at a cost independent of the number of tasks; their sum P = Σ_{s<t} B_s A_s is also kept, for the loss

    λ Σ_blocks Σ_projections ‖P ⊙ (B_t A_t)‖_F²

that :meth:`ViTCLoRA.forward_current` returns beside the logits (zero at task 0, where P = 0).

Classifier: one linear head per task, trained on the task's classes alone; the logits over every seen class are the
heads concatenated in task order (InfLoRA's ``SiNet.interface``; the single classifier with masked old logits of
the CODA-Prompt code base, where the C-LoRA paper ran its classification experiments, is the same function, its old
rows get no gradient). No task identity is needed at inference: every task's update is in the one backbone.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.clora import PROJECTIONS, SLOTS, forgetting_loss, kaiming_down, lora_update
from ..runtime import full_precision
from .vit_lora import cls_features


class CLoRAQKV(nn.Module):
    """Wraps a frozen ``qkv`` linear layer; adds the current task's LoRA update to the chosen parts (q, k, v) of
    its output, and keeps the finished tasks' updates merged into its weight and summed in ``past[p]``."""

    def __init__(self, qkv: nn.Linear, rank: int, projections: Sequence[str] = ("k", "v")):
        super().__init__()
        if not projections or any(p not in SLOTS for p in projections):
            raise ValueError(f"projections must be among {SLOTS}, got {projections}")
        self.qkv = qkv
        self.dim = qkv.in_features
        self.attn_dim = qkv.out_features // 3
        self.rank = rank
        self.projections = tuple(p for p in SLOTS if p in projections)
        device = qkv.weight.device
        self.down = nn.ParameterDict({p: nn.Parameter(torch.zeros(rank, self.dim, device=device))
                                      for p in self.projections})
        self.up = nn.ParameterDict({p: nn.Parameter(torch.zeros(self.attn_dim, rank, device=device))
                                    for p in self.projections})
        for p in self.projections:  # P: the sum of the finished tasks' updates (not part of any state file)
            self.register_buffer(f"past_{p}", torch.zeros(self.attn_dim, self.dim, device=device), persistent=False)
        self.active = False

    def past(self, p: str) -> torch.Tensor:
        return getattr(self, f"past_{p}")

    def rows(self, p: str) -> slice:
        """The rows of W_qkv (and columns of its output) of projection ``p``."""
        i = SLOTS.index(p)
        return slice(i * self.attn_dim, (i + 1) * self.attn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        if not self.active:
            return out
        # [x A_1ᵀ, x A_2ᵀ, ...] times the up-projections placed at their parts' rows (zeros elsewhere), added as one
        # low-rank product (no in-place slice additions, whose backward copies the gradient)
        r, cols = self.rank, len(self.projections) * self.rank
        low = F.linear(x, torch.cat([self.down[p] for p in self.projections])).flatten(0, -2)
        blocks = []
        for p in SLOTS:
            if p in self.projections:
                j = self.projections.index(p)
                blocks.append(F.pad(self.up[p], (j * r, cols - (j + 1) * r)))
            else:
                blocks.append(self.up[self.projections[0]].new_zeros(self.attn_dim, cols))
        return torch.addmm(out.flatten(0, -2), low, torch.cat(blocks).T).view(out.shape)

    def begin(self, down: dict[str, torch.Tensor], up: dict[str, torch.Tensor]) -> None:
        """Install a task's factors (A: rank × dim, B: attn_dim × rank per projection) as the current update."""
        if self.active:
            raise RuntimeError("merge() the current update before beginning another")
        with torch.no_grad():
            for p in self.projections:
                if tuple(down[p].shape) != (self.rank, self.dim) or tuple(up[p].shape) != (self.attn_dim, self.rank):
                    raise ValueError(f"{p}: factors of shape {tuple(down[p].shape)}, {tuple(up[p].shape)}, expected "
                                     f"{(self.rank, self.dim)}, {(self.attn_dim, self.rank)}")
                self.down[p].copy_(down[p])
                self.up[p].copy_(up[p])
        self.active = True

    @torch.no_grad()
    def merge(self) -> None:
        """Add the current update B A to W and to P, and deactivate it (the same function, frozen)."""
        if not self.active:
            return
        for p in self.projections:
            delta = lora_update(self.down[p].float(), self.up[p].float())
            self.qkv.weight[self.rows(p)] += delta.to(self.qkv.weight.dtype)
            self.past(p).add_(delta)
        self.active = False

    def loss_terms(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(P, A, B) of every adapted projection, for :func:`ifcl.methods.clora.forgetting_loss`."""
        return [(self.past(p), self.down[p], self.up[p]) for p in self.projections]


class ViTCLoRA(nn.Module):
    """Frozen timm ViT + C-LoRA on the chosen projections of the chosen blocks + one linear head per task.

    Task t: :meth:`begin_task` (new factors and head), train :meth:`trainable_parameters` on the cross-entropy of
    :meth:`forward_current`'s logits plus the loss it returns, then :meth:`end_task` (merge, freeze). Prediction
    over every seen class is :meth:`forward`.
    """

    def __init__(self, vit: nn.Module, rank: int = 10, lora_blocks: Sequence[int] | str = "all",
                 weight: float = 1.0, projections: str = "kv"):
        super().__init__()
        if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError("ViTCLoRA expects a timm ViT pooled by its CLS token (global_pool='token')")
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        if weight < 0:
            raise ValueError(f"the loss weight must be >= 0, got {weight}")
        if projections not in PROJECTIONS:
            raise ValueError(f"projections must be one of {sorted(PROJECTIONS)}, got {projections!r}")
        self.vit = vit
        for p in self.vit.parameters():
            p.requires_grad_(False)
        depth = len(vit.blocks)
        self.lora_blocks = list(range(depth)) if lora_blocks == "all" else sorted(lora_blocks)
        if not self.lora_blocks or self.lora_blocks[0] < 0 or self.lora_blocks[-1] >= depth:
            raise ValueError(f"lora_blocks {lora_blocks} must be indices below the depth {depth}")
        self.rank = rank
        self.weight = weight
        self.projections = PROJECTIONS[projections]
        for i in self.lora_blocks:
            attn = vit.blocks[i].attn
            attn.qkv = CLoRAQKV(attn.qkv, rank, self.projections)
        self.embed_dim = vit.embed_dim
        self.heads = nn.ModuleList()
        self._factors: list[dict[str, torch.Tensor]] = []  # each finished task's factors (for task_state)
        self.in_task = False

    def _device(self) -> torch.device:
        return self.vit.cls_token.device

    @property
    def lora_layers(self) -> list[CLoRAQKV]:
        return [self.vit.blocks[i].attn.qkv for i in self.lora_blocks]

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def _names(self):
        """(state key, layer, factor kind, projection) of every factor, in a fixed order."""
        for i, layer in zip(self.lora_blocks, self.lora_layers):
            for p in self.projections:
                for kind in ("down", "up"):
                    yield f"blocks.{i}.{kind}_{p}", layer, kind, p

    def _append_task(self, factors: dict[str, torch.Tensor], head_weight: torch.Tensor,
                     head_bias: torch.Tensor) -> None:
        """Install ``factors`` (state keys -> tensors) as the current update and a head; task ``num_tasks``."""
        if self.in_task:
            raise RuntimeError("end_task() the current task before beginning another")
        for i, layer in zip(self.lora_blocks, self.lora_layers):
            layer.begin({p: factors[f"blocks.{i}.down_{p}"] for p in self.projections},
                        {p: factors[f"blocks.{i}.up_{p}"] for p in self.projections})
        head = nn.Linear(self.embed_dim, head_weight.shape[0]).to(self._device())
        with torch.no_grad():
            head.weight.copy_(head_weight)
            head.bias.copy_(head_bias)
        self.heads.append(head)
        self.in_task = True
        self.set_trainable()

    def begin_task(self, num_classes: int, task: int, generator: torch.Generator) -> None:
        """Start task t: per adapted block and projection A ~ U(-1/√d, 1/√d) (``kaiming_uniform_(a=√5)``) and
        B = 0; a head ``num_classes × d`` with PyTorch's Linear init (weight and bias U(-1/√d, 1/√d)), as InfLoRA's
        ``classifier_pool``. Draws, from ``generator`` on the CPU, A of each adapted block's projections in order,
        then the head's weight and bias. A task still in progress is ended first; ``task`` must be the number of
        tasks the model holds."""
        if self.in_task:
            self.end_task()
        if task != self.num_tasks:
            raise ValueError(f"task {task} needs the updates of tasks 0..{task - 1}; the model holds {self.num_tasks}")
        factors = {}
        for name, layer, kind, p in self._names():
            factors[name] = (kaiming_down(self.rank, layer.dim, generator) if kind == "down"
                             else torch.zeros(layer.attn_dim, self.rank))
        bound = 1.0 / math.sqrt(self.embed_dim)
        head_weight = (torch.rand(num_classes, self.embed_dim, generator=generator) * 2 - 1) * bound
        head_bias = (torch.rand(num_classes, generator=generator) * 2 - 1) * bound
        self._append_task(factors, head_weight, head_bias)

    def end_task(self) -> None:
        """Finish the current task: keep its factors, add its update to W and P, freeze its head. The function is
        unchanged."""
        if not self.in_task:
            return
        self._factors.append({name: getattr(layer, kind)[p].detach().cpu().clone()
                              for name, layer, kind, p in self._names()})
        for layer in self.lora_layers:
            layer.merge()
        self.heads[-1].requires_grad_(False)
        self.in_task = False
        self.set_trainable()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Task t's A and B of every adapted projection and head t (none between tasks)."""
        if not self.in_task:
            return []
        params = [getattr(layer, kind)[p] for _, layer, kind, p in self._names()]
        return params + list(self.heads[-1].parameters())

    def set_trainable(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final norm; the last block runs for the CLS token alone
        (:func:`ifcl.models.vit_lora.cls_features`)."""
        return cls_features(self.vit, x)

    def forgetting_loss(self) -> torch.Tensor:
        """λ Σ_blocks Σ_projections ‖P ⊙ (B_t A_t)‖_F² in float32 (:func:`ifcl.methods.clora.forgetting_loss`);
        exactly 0 at task 0 (P = 0), where it is not computed."""
        if self.num_tasks <= 1 or not self.in_task:
            return torch.zeros((), device=self._device())
        with full_precision():
            return forgetting_loss([t for layer in self.lora_layers for t in layer.loss_terms()], self.weight)

    def forward_current(self, x: torch.Tensor, task: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the current task's head, the forgetting loss): the training loss is their cross-entropy on
        the task's local labels plus this loss."""
        return self.heads[-1](self.features(x)), self.forgetting_loss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over every seen class, heads concatenated in task order."""
        f = self.features(x)
        return torch.cat([h(f) for h in self.heads], dim=1)

    # ---- per-task state (what a task adds; the frozen backbone is stored elsewhere) ----
    def task_state(self, t: int | None = None) -> dict[str, torch.Tensor]:
        """Task t's factors per adapted block and projection (``blocks.<i>.down_k``, ``blocks.<i>.up_k`` …) and
        its head (``head.weight``, ``head.bias``); the last task's are read live while it is in progress."""
        last = self.num_tasks - 1
        t = last if t is None else t
        if not 0 <= t <= last:
            raise IndexError(f"task {t} is not among the {self.num_tasks} tasks")
        if t == last and self.in_task:
            state = {name: getattr(layer, kind)[p].detach().cpu().clone() for name, layer, kind, p in self._names()}
        else:
            state = {k: v.clone() for k, v in self._factors[t].items()}
        state["head.weight"] = self.heads[t].weight.detach().cpu().clone()
        state["head.bias"] = self.heads[t].bias.detach().cpu().clone()
        return state

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Append task ``num_tasks`` from its :meth:`task_state` as a finished task. Loading the states of tasks
        0..t in order gives the model after task t."""
        if self.in_task:
            raise RuntimeError("end_task() the current task before loading another")
        missing = [name for name, *_ in self._names() if name not in state]
        if missing:
            raise KeyError(f"the task state lacks {missing[:3]}{' …' if len(missing) > 3 else ''}")
        self._append_task({name: state[name] for name, *_ in self._names()}, state["head.weight"], state["head.bias"])
        self.end_task()


def build(settings: dict, vit: nn.Module, seed: int) -> ViTCLoRA:
    """The model of a C-LoRA experiment before task 0 (the ``state`` chain's factory, :mod:`ifcl.catalog.clora`):
    ``settings`` its ``rank``, ``lora_blocks`` and ``clora``; nothing is drawn before task 0 (``seed`` unused)."""
    c = settings["clora"]
    return ViTCLoRA(vit, rank=settings["rank"], lora_blocks=settings["lora_blocks"], weight=c["weight"],
                    projections=c.get("projections", "kv"))
