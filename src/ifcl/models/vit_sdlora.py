"""A frozen timm ViT with SD-LoRA on the query and value projections of the chosen blocks, plus per-task heads.

What the official code runs (WuYichen-97/SD-Lora-CL ``backbone/lora.py`` ``LoRA_ViT_timm`` and
``_LoRA_qkv_timm_train``; ``models/sdlora.py``; ``utils/inc_net.py``), for an adapted block with attention input
x and tasks 0..t:

    q = x W_qᵀ + b_q + Σ_{i<t} α_i x (B_i A_i)ᵀ / (‖B_i‖_F ‖A_i‖_F) + α_t x (B_t A_t)ᵀ     (the same for v)

with A_i (rank × d) and B_i (d × rank) per block and per projection, and one scalar α_i per task shared by every
block and both projections (see :mod:`ifcl.methods.sdlora` for the rules and the paper-vs-code differences).
The keys are untouched. All components are added as one low-rank product: x [A_q; A_v]ᵀ scaled per component
column, then the stacked B's, so the cost grows with the total rank, never with d × d per task.

Classifier: the official ``IncrementalNet`` has one ``SimpleLinear`` that grows by the new classes each task (new
rows Kaiming-uniform with gain 1, bias 0; old rows copied). Task t's loss is the cross-entropy of the new classes'
logits alone and SGD has no weight decay, so the old rows get exactly zero gradient and never move: the same
function as one head per task, concatenated in task order, which is what :class:`ViTSDLoRA` keeps.

Per task t (:meth:`ViTSDLoRA.begin_task`): new A_t (Kaiming-uniform, a = √5), B_t = 0, a new head, and every
magnitude set to 0.8; training updates A_t, B_t, α_0..α_t and head t (:meth:`ViTSDLoRA.trainable_parameters`);
the accuracy after task t is that of this same forward (:meth:`ViTSDLoRA.forward`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.sdlora import INIT_MAGNITUDE, component_scales, next_magnitudes, orthogonality_loss, rr_rank
from .vit_lora import cls_features

FACTORS = ("a_q", "b_q", "a_v", "b_v")


class _MagnitudeRef:
    """A plain (not registered) reference from every adapted layer to the model's one magnitude vector."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value


class SDLoRAQKV(nn.Module):
    """Wraps a frozen ``qkv`` linear layer; adds every task's SD-LoRA component to its query and value parts.

    ``a_q[i]``, ``b_q[i]``, ``a_v[i]``, ``b_v[i]`` are task i's factors; the last one is the current component
    (scaled by its magnitude alone), the others are divided by ‖B‖_F ‖A‖_F (:func:`component_scales`).
    """

    def __init__(self, qkv: nn.Linear, magnitudes: _MagnitudeRef):
        super().__init__()
        self.qkv = qkv
        self.dim = qkv.in_features
        self.attn_dim = qkv.out_features // 3
        self.a_q = nn.ParameterList()
        self.b_q = nn.ParameterList()
        self.a_v = nn.ParameterList()
        self.b_v = nn.ParameterList()
        self._magnitudes = magnitudes

    @property
    def num_components(self) -> int:
        return len(self.a_q)

    def add_component(self, a_q: torch.Tensor, b_q: torch.Tensor, a_v: torch.Tensor, b_v: torch.Tensor,
                      trainable: bool) -> None:
        """Append one task's factors (A: rank × dim, B: attn_dim × rank) as parameters."""
        rank = a_q.shape[0]
        for name, t, shape in (("a_q", a_q, (rank, self.dim)), ("b_q", b_q, (self.attn_dim, rank)),
                               ("a_v", a_v, (rank, self.dim)), ("b_v", b_v, (self.attn_dim, rank))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            device = self.qkv.weight.device
            getattr(self, name).append(nn.Parameter(t.detach().clone().float().to(device), requires_grad=trainable))

    def freeze_last(self) -> None:
        for name in FACTORS:
            getattr(self, name)[-1].requires_grad_(False)

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-component factors c_i of q and of v ([T] each)."""
        alpha = self._magnitudes.value
        return (component_scales(alpha, list(self.a_q), list(self.b_q)),
                component_scales(alpha, list(self.a_v), list(self.b_v)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        if not self.num_components:
            return out
        scale_q, scale_v = self.scales()
        ranks = torch.tensor([a.shape[0] for a in self.a_q], device=x.device)
        column_scale = torch.cat([scale_q.repeat_interleave(ranks), scale_v.repeat_interleave(ranks)])
        low = F.linear(x, torch.cat([*self.a_q, *self.a_v])).flatten(0, -2) * column_scale
        total = int(ranks.sum())
        up_q, up_v = torch.cat(list(self.b_q), dim=1), torch.cat(list(self.b_v), dim=1)
        # [x A_qᵀ, x A_vᵀ] (scaled) times [[B_q, 0], [0, 0], [0, B_v]]ᵀ: the key rows stay zero
        up = torch.cat([F.pad(up_q, (0, total)), up_q.new_zeros(self.attn_dim, 2 * total), F.pad(up_v, (total, 0))])
        return torch.addmm(out.flatten(0, -2), low, up.T).view(out.shape)


class ViTSDLoRA(nn.Module):
    """Frozen timm ViT + SD-LoRA on q/v of the chosen blocks (official: all) + one linear head per task.

    Usage for task t: :meth:`begin_task`, train :meth:`trainable_parameters` on :meth:`forward_current`
    (cross-entropy on the task's local labels, the whole official loss), then :meth:`end_task`. Prediction over
    all seen classes is :meth:`forward`. ``reset_magnitudes=False`` keeps the trained magnitudes across tasks
    instead of the official reset of every α to ``init_magnitude`` at each :meth:`begin_task`;
    ``ranks`` with ``rank_starts`` gives task t the rank ``rr_rank(t, ranks, rank_starts)`` instead of ``rank``
    (SD-LoRA-RR, :func:`ifcl.methods.sdlora.rr_rank`).
    """

    def __init__(self, vit: nn.Module, rank: int = 10, lora_blocks: Sequence[int] | str = "all",
                 init_magnitude: float = INIT_MAGNITUDE, reset_magnitudes: bool = True,
                 ranks: Sequence[int] | None = None, rank_starts: Sequence[int] = (0,)):
        super().__init__()
        if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError("ViTSDLoRA expects a timm ViT pooled by its CLS token (global_pool='token')")
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.vit = vit
        for p in self.vit.parameters():
            p.requires_grad_(False)
        depth = len(vit.blocks)
        self.lora_blocks = list(range(depth)) if lora_blocks == "all" else sorted(lora_blocks)
        if not self.lora_blocks or self.lora_blocks[0] < 0 or self.lora_blocks[-1] >= depth:
            raise ValueError(f"lora_blocks {lora_blocks} must be indices below the depth {depth}")
        self.rank = rank
        self.init_magnitude = init_magnitude
        self.reset_magnitudes = reset_magnitudes
        self.ranks = None if ranks is None else tuple(ranks)
        self.rank_starts = tuple(rank_starts)
        if self.ranks is not None:
            rr_rank(0, self.ranks, self.rank_starts)  # checks the schedule
        self.embed_dim = vit.embed_dim
        self.magnitudes = nn.Parameter(torch.zeros(0, device=self._device()))
        self._magnitude_ref = _MagnitudeRef(self.magnitudes)
        for i in self.lora_blocks:
            attn = vit.blocks[i].attn
            attn.qkv = SDLoRAQKV(attn.qkv, self._magnitude_ref)
        self.heads = nn.ModuleList()
        self._history: list[torch.Tensor] = []  # the magnitudes after each finished task
        self.in_task = False

    def _device(self) -> torch.device:
        return self.vit.cls_token.device

    @property
    def lora_layers(self) -> list[SDLoRAQKV]:
        return [self.vit.blocks[i].attn.qkv for i in self.lora_blocks]

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def _set_magnitudes(self, values: torch.Tensor) -> None:
        self.magnitudes = nn.Parameter(values.detach().clone().float().to(self._device()))
        self._magnitude_ref.value = self.magnitudes

    def _append_task(self, factors: Sequence[Sequence[torch.Tensor]], head_weight: torch.Tensor,
                     head_bias: torch.Tensor, trainable: bool) -> None:
        layers = self.lora_layers
        if len(factors) != len(layers):
            raise ValueError(f"expected factors for {len(layers)} adapted blocks, got {len(factors)}")
        for layer, f in zip(layers, factors):
            layer.add_component(*f, trainable=trainable)
        head = nn.Linear(self.embed_dim, head_weight.shape[0]).to(self._device())
        with torch.no_grad():
            head.weight.copy_(head_weight)
            head.bias.copy_(head_bias)
        self.heads.append(head.requires_grad_(trainable))

    def begin_task(self, num_classes: int, task: int, generator: torch.Generator) -> None:
        """Start task t: per adapted block A_q, A_v ~ U(-1/√d, 1/√d) (``kaiming_uniform_(a=√5)`` on a rank × d
        weight) and B_q = B_v = 0; a head ``num_classes × d`` ~ U(-√(3/d), √(3/d)) with zero bias (SimpleLinear's
        ``kaiming_uniform_(nonlinearity='linear')``); magnitudes by :func:`next_magnitudes` (official: all 0.8).
        Draws, from ``generator`` on the CPU, A_q then A_v of each adapted block in order, then the head.
        ``task`` must be the number of tasks the model holds (every earlier component is needed)."""
        if self.in_task:
            raise RuntimeError("end_task() the current task before beginning another")
        if task != self.num_tasks:
            raise ValueError(f"task {task} needs the components of tasks 0..{task - 1}; the model holds {self.num_tasks}")
        r = self.rank if self.ranks is None else rr_rank(task, self.ranks, self.rank_starts)
        d = self.embed_dim
        bound = 1.0 / math.sqrt(d)
        factors = []
        for layer in self.lora_layers:
            a_q = (torch.rand(r, layer.dim, generator=generator) * 2 - 1) * bound
            a_v = (torch.rand(r, layer.dim, generator=generator) * 2 - 1) * bound
            zeros = torch.zeros(layer.attn_dim, r)
            factors.append((a_q, zeros, a_v, zeros))
        head_bound = math.sqrt(3.0 / d)
        head_weight = (torch.rand(num_classes, d, generator=generator) * 2 - 1) * head_bound
        self._append_task(factors, head_weight, torch.zeros(num_classes), trainable=True)
        self._set_magnitudes(next_magnitudes(self.magnitudes, self.init_magnitude, self.reset_magnitudes))
        self.in_task = True

    def end_task(self) -> None:
        """Freeze the finished task's factors and record the magnitudes as they are after it. The function is
        unchanged: the task's component stays unnormalised until the next :meth:`begin_task` (as evaluated)."""
        if not self.in_task:
            return
        for layer in self.lora_layers:
            layer.freeze_last()
        self._history.append(self.magnitudes.detach().clone())
        self.in_task = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the official SGD moves during task t: A_t, B_t (q and v) of every adapted block, every magnitude
        α_0..α_t (one vector), and head t (the old heads' rows get zero gradient in the official run)."""
        params = [getattr(layer, name)[-1] for layer in self.lora_layers for name in FACTORS]
        return params + [self.magnitudes] + list(self.heads[-1].parameters())

    def set_trainable(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final norm (timm ``forward_head(..., pre_logits=True)``, the official backbone
        output with ``head = Identity``); the last block runs for the CLS token alone (:func:`ifcl.models.vit_lora.cls_features`)."""
        return cls_features(self.vit, x)

    def forward_current(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits of the current task's head only (training, local labels). The official loss is their
        cross-entropy alone; see :meth:`orthogonality_loss` for the term it computes and does not add."""
        return self.heads[-1](self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over every seen class, heads concatenated in task order (the official evaluation)."""
        f = self.features(x)
        return torch.cat([h(f) for h in self.heads], dim=1)

    def orthogonality_loss(self) -> torch.Tensor:
        """Σ_{i<t} Σ_blocks (‖A_{q,i} A_{q,t}ᵀ‖_F² + ‖A_{v,i} A_{v,t}ᵀ‖_F²) (``compute_ortho_loss``); official
        weight 0."""
        loss = self.magnitudes.new_zeros(())
        for layer in self.lora_layers:
            for a in (layer.a_q, layer.a_v):
                loss = loss + orthogonality_loss(list(a)[:-1], a[-1])
        return loss

    # ---- per-task state (what a task adds; the frozen backbone is stored elsewhere) ----
    def task_state(self, t: int | None = None) -> dict[str, torch.Tensor]:
        """Task t's factors per adapted block (``blocks.<i>.a_q`` …), its head (``head.weight``, ``head.bias``)
        and ``magnitudes`` α_0..α_t as they are after task t (live for the last task, recorded otherwise)."""
        last = self.num_tasks - 1
        t = last if t is None else t
        if not 0 <= t <= last:
            raise IndexError(f"task {t} is not among the {self.num_tasks} tasks")
        state = {f"blocks.{i}.{name}": getattr(layer, name)[t].detach().clone()
                 for i, layer in zip(self.lora_blocks, self.lora_layers) for name in FACTORS}
        state["head.weight"] = self.heads[t].weight.detach().clone()
        state["head.bias"] = self.heads[t].bias.detach().clone()
        state["magnitudes"] = (self.magnitudes if t == last else self._history[t]).detach().clone()
        return state

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Append task ``num_tasks`` from its :meth:`task_state` as a finished task; its magnitudes replace the
        model's. Loading the states of tasks 0..t in order gives the model after task t."""
        if self.in_task:
            raise RuntimeError("end_task() the current task before loading another")
        magnitudes = state["magnitudes"]
        if magnitudes.shape != (self.num_tasks + 1,):
            raise ValueError(f"task {self.num_tasks} needs {self.num_tasks + 1} magnitudes, got {tuple(magnitudes.shape)}")
        factors = [tuple(state[f"blocks.{i}.{name}"] for name in FACTORS) for i in self.lora_blocks]
        self._append_task(factors, state["head.weight"], state["head.bias"], trainable=False)
        self._set_magnitudes(magnitudes)
        self.in_task = True
        self.end_task()


def build(settings: dict, vit: nn.Module, seed: int) -> ViTSDLoRA:
    """The model of an SD-LoRA experiment before task 0 (the ``state`` chain's factory, :mod:`ifcl.catalog.sdlora`):
    ``settings`` its ``rank``, ``lora_blocks`` and ``sdlora``; nothing is drawn before task 0 (``seed`` unused)."""
    s = settings["sdlora"]
    return ViTSDLoRA(vit, rank=settings["rank"], lora_blocks=settings["lora_blocks"],
                     init_magnitude=s["init_magnitude"], reset_magnitudes=s["reset_magnitudes"],
                     ranks=s.get("ranks"), rank_starts=s.get("rank_starts", (0,)))
