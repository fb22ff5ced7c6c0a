"""A frozen timm ViT with EASE's expandable subspaces: one adapter set per task beside the MLP of every block, the
features of every task's subspace concatenated, and a prototype classifier over them.

What the official code runs (sun-hailong/CVPR24-Ease ``backbone/vit_ease.py`` ``Block.forward`` with
``ffn_option="parallel"``, ``VisionTransformer.forward_train/forward_test/forward_proto``; ``models/ease.py``;
``utils/inc_net.py`` ``EaseNet``), for block b with input x and the adapters of task i:

    x ← x + attn(norm1(x));    x ← x + (MLP(norm2(x)) + A_{i,b}(x))

with A_{i,b} an :class:`ifcl.methods.ease.Adapter`. The feature φ_i(x) of subspace i is the CLS token after the
final norm with task i's adapters in every block; the backbone runs once per subspace, from the same patch and
position embedding (here the last block runs for the CLS token alone, as :func:`ifcl.models.vit_lora.cls_features`).

Task t (:class:`ViTEASE`): :meth:`~ViTEASE.begin_task` adds adapters A_t and a training head (a cosine classifier
with a learnt scale over task t's classes, the official ``proxy_fc``); training moves those alone
(:meth:`~ViTEASE.forward_current`, with the adapters' training dropout); :meth:`~ViTEASE.finish_task` measures task t's
prototypes in every subspace 0..t on its training images under the test transform, then freezes A_t. Inference
(:meth:`~ViTEASE.forward`) completes the old classes' prototypes in newer subspaces and takes EASE's reweighted
cosine logits (:mod:`ifcl.methods.ease`).

Task t's file holds A_t, the training head (not used by inference; kept for inspection) and the measured prototypes
of task t's classes in subspaces 0..t: the complemented ones are recomputed from those of all tasks, as the
official ``solve_sim_reset`` does after every task.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.ease import (ADAPTER_DROPOUT, ADAPTER_SCALE, ALPHA, BOTTLENECK, Adapter, class_means, class_sums,
                            complete_prototypes, concatenated_logits, cosine_logits, reweighted_logits,
                            subspace_weights)
from ..progress import track
from ..runtime import full_precision

ADAPTER_NAMES = ("down.weight", "down.bias", "up.weight", "up.bias")


class CosineHead(nn.Module):
    """The official ``CosineLinear`` of the training forward (``proxy_fc``): σ · cos(f, w_c)."""

    def __init__(self, weight: torch.Tensor, sigma: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.sigma = nn.Parameter(sigma.detach().clone().float().reshape(1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.weight, self.sigma)


def adapted_block(block: nn.Module, x: torch.Tensor, adapter: Adapter | None, train: bool = False) -> torch.Tensor:
    """timm's ``Block.forward`` with ``adapter`` beside its MLP, fed the stream after the attention residual (the
    official ``Block.forward``, ``ffn_option="parallel"``); ``adapter`` None: the plain block."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    mlp = block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x + (mlp if adapter is None else mlp + adapter(x, train))


def adapted_cls_block(block: nn.Module, x: torch.Tensor, adapter: Adapter | None, train: bool = False
                      ) -> torch.Tensor:
    """:func:`adapted_block` for the output of the first (CLS) token only: keys and values of every token, the query,
    attention, MLP and adapter of the CLS token. [B, 1, D], ``adapted_block(...)[:, :1]`` up to float rounding."""
    a = block.attn
    b, n, _ = x.shape
    h = block.norm1(x)
    q, k, v = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q[:, :, :1]), a.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v)
    o = a.norm(o.transpose(1, 2).reshape(b, 1, -1))
    y = x[:, :1] + block.drop_path1(block.ls1(a.proj_drop(a.proj(o))))
    mlp = block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
    return y + (mlp if adapter is None else mlp + adapter(y, train))


class ViTEASE(nn.Module):
    """Frozen timm ViT (CLS pooling) + EASE's per-task adapters, training heads and prototypes.

    Usage for task t: :meth:`begin_task`, train :meth:`trainable_parameters` on :meth:`forward_current`, then
    :meth:`finish_task` on the task's training images under the test transform, then :meth:`task_state`. The model
    after task t is the backbone with the states of tasks 0..t loaded in order (:meth:`load_task_state`).
    """

    def __init__(self, vit: nn.Module, bottleneck: int = BOTTLENECK, adapter_scale: float = ADAPTER_SCALE,
                 adapter_dropout: float = ADAPTER_DROPOUT, alpha: float = ALPHA, use_init_ptm: bool = False,
                 beta: float = 0.0, recalc_sim: bool = True, reweight: bool = True):
        super().__init__()
        if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError("ViTEASE expects a timm ViT pooled by its CLS token (global_pool='token')")
        self.vit = vit.requires_grad_(False)
        self.embed_dim = vit.embed_dim
        self.bottleneck, self.adapter_scale, self.adapter_dropout = bottleneck, adapter_scale, adapter_dropout
        self.alpha, self.use_init_ptm, self.beta = alpha, use_init_ptm, beta
        self.recalc_sim, self.reweight = recalc_sim, reweight
        self.adapters = nn.ModuleList()  # per task: one Adapter per block
        self.heads = nn.ModuleList()  # per task: its training head (CosineHead)
        self.prototypes = nn.ParameterList()  # per task: [n_t, subspaces after task t, D], frozen
        self.in_task = False
        self._classifier: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.adapters)

    @property
    def task_sizes(self) -> list[int]:
        return [p.shape[0] for p in self.prototypes]

    def num_subspaces(self, tasks: int | None = None) -> int:
        """The subspaces after ``tasks`` tasks (default: those held): one per task, plus the frozen backbone's with
        ``use_init_ptm``."""
        return (self.num_tasks if tasks is None else tasks) + int(self.use_init_ptm)

    def _device(self) -> torch.device:
        return self.vit.cls_token.device

    def _append_task(self, adapters: list[dict[str, torch.Tensor]], head_weight: torch.Tensor,
                     head_sigma: torch.Tensor, trainable: bool) -> None:
        device = self._device()
        task = nn.ModuleList()
        for values in adapters:
            adapter = Adapter(self.embed_dim, self.bottleneck, self.adapter_scale, self.adapter_dropout)
            with torch.no_grad():
                for name, p in adapter.named_parameters():
                    if tuple(values[name].shape) != tuple(p.shape):
                        raise ValueError(f"adapter {name} has shape {tuple(values[name].shape)}, expected "
                                         f"{tuple(p.shape)}")
                    p.copy_(values[name])
            task.append(adapter)
        self.adapters.append(task.to(device).requires_grad_(trainable))
        self.heads.append(CosineHead(head_weight, head_sigma).to(device).requires_grad_(trainable))

    # ---- features ----
    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    def _subspace(self, tokens: torch.Tensor, adapters: nn.ModuleList | None, train: bool = False) -> torch.Tensor:
        """φ(x) with one task's adapters (None: the frozen backbone): [B, D]."""
        blocks = self.vit.blocks
        x = tokens
        for b, block in enumerate(blocks[:-1]):
            x = adapted_block(block, x, None if adapters is None else adapters[b], train)
        x = adapted_cls_block(blocks[-1], x, None if adapters is None else adapters[-1], train)
        return self.vit.forward_head(self.vit.norm(x), pre_logits=True)

    def subspace_features(self, x: torch.Tensor, tasks: int | None = None) -> torch.Tensor:
        """The features of every subspace after ``tasks`` tasks (default: all held): the frozen backbone's first
        with ``use_init_ptm``, then those of tasks 0..tasks-1 (the official ``forward_test``): [B, S, D]."""
        tokens = self._tokens(x)
        tasks = self.num_tasks if tasks is None else tasks
        features = [self._subspace(tokens, None)] if self.use_init_ptm else []
        features += [self._subspace(tokens, self.adapters[i]) for i in range(tasks)]
        return torch.stack(features, dim=1)

    # ---- one task ----
    def begin_task(self, num_classes: int, task: int, generator: torch.Generator | None = None) -> None:
        """Start task t: adapters in every block with ``down`` ~ U(-1/√d, 1/√d) (``kaiming_uniform_(a=√5)`` on a
        bottleneck × d weight), ``up`` and the biases zero; a training head ``num_classes × d`` ~ U(-1/√d, 1/√d) with
        σ = 1 (``CosineLinear.reset_parameters``). Draws from ``generator`` on the CPU: the down-projections in
        block order, then the head."""
        if self.in_task:
            raise RuntimeError("finish_task() the current task before beginning another")
        if task != self.num_tasks:
            raise ValueError(f"task {task} needs the files of tasks 0..{task - 1}; the model holds {self.num_tasks}")
        d, r = self.embed_dim, self.bottleneck
        bound = 1.0 / math.sqrt(d)
        adapters = [{"down.weight": (torch.rand(r, d, generator=generator) * 2 - 1) * bound,
                     "down.bias": torch.zeros(r), "up.weight": torch.zeros(d, r), "up.bias": torch.zeros(d)}
                    for _ in self.vit.blocks]
        head = (torch.rand(num_classes, d, generator=generator) * 2 - 1) * bound
        self._append_task(adapters, head, torch.ones(1), trainable=True)
        self.in_task = True
        self._classifier = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the official SGD moves in task t: the current adapters of every block and the training head's weight
        and σ (the prototype classifier ``fc`` it also holds gets no gradient)."""
        return list(self.adapters[-1].parameters()) + list(self.heads[-1].parameters())

    def forward_current(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """The training forward (``EaseNet.forward(test=False)``): σ · cos of the current adapters' feature and the
        training head over task t's classes (local labels). The official loop runs in train mode, so the adapters'
        dropout is on; the backbone has no other dropout."""
        return self.heads[-1](self._subspace(self._tokens(x), self.adapters[-1], train=True))

    @torch.no_grad()
    def finish_task(self, batches, known: int, train_batches=None) -> list[dict]:
        """After training task t (``replace_fc``): the mean feature of each of task t's classes in every subspace
        0..t (and the frozen backbone's, with ``use_init_ptm``), over ``batches`` (the task's training images under
        the test transform, labels ``known``..), in float32; then task t's adapters and head are frozen. One log
        row (stage "prototypes")."""
        if not self.in_task:
            raise RuntimeError("begin_task() before finish_task()")
        num_classes = self.heads[-1].weight.shape[0]
        sums = torch.zeros(num_classes, self.num_subspaces(), self.embed_dim, dtype=torch.float64)
        counts = torch.zeros(num_classes, dtype=torch.long)
        with full_precision():
            for x, y in track(batches, f"task {self.num_tasks - 1} prototypes"):
                batch_sums, batch_counts = class_sums(self.subspace_features(x.float()), y.to(x.device) - known,
                                                      num_classes)
                sums += batch_sums.cpu()
                counts += batch_counts.cpu()
        means = class_means(sums, counts)
        self.prototypes.append(nn.Parameter(means.to(self._device()), requires_grad=False))
        self.adapters[-1].requires_grad_(False)
        self.heads[-1].requires_grad_(False)
        self.in_task = False
        self._classifier = None
        return [{"stage": "prototypes", "images": int(counts.sum()), "classes": means.shape[0],
                 "subspaces": means.shape[1]}]

    # ---- inference ----
    def classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prototype classifier after the last finished task: the prototypes of every seen class in every
        subspace [C, S, D], old classes complemented in newer subspaces (``replace_fc`` then ``solve_sim_reset``
        or ``solve_similarity``), and the weights of :func:`ifcl.methods.ease.subspace_weights` [C, S]."""
        if self.in_task:
            raise RuntimeError("the current task has no prototypes yet: finish_task() first")
        if not self.num_tasks:
            raise RuntimeError("no task learnt yet")
        if self._classifier is None or self._classifier[0].device != self._device():
            sizes, first = self.task_sizes, int(self.use_init_ptm)
            table = torch.zeros(sum(sizes), self.num_subspaces(), self.embed_dim, device=self._device())
            start = 0
            for p in self.prototypes:
                table[start: start + p.shape[0], : p.shape[1]] = p
                start += p.shape[0]
            with full_precision():
                table[:, first:] = complete_prototypes(table[:, first:], sizes, self.recalc_sim)
            weights = subspace_weights(sizes, self.alpha, self.beta if self.use_init_ptm else None)
            self._classifier = (table, weights.to(table.device))
        return self._classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over every seen class (the official ``EaseNet.forward(test=True)``): the reweighted cosines of
        :func:`ifcl.methods.ease.reweighted_logits` (``reweight: false``: the cosine of the concatenations), the
        classifier in float32."""
        prototypes, weights = self.classifier()
        features = self.subspace_features(x)
        with full_precision():
            features = features.float()
            if self.reweight:
                return reweighted_logits(features, prototypes, weights)
            return concatenated_logits(features, prototypes)

    # ---- per-task state (what a task adds; the frozen backbone is stored elsewhere) ----
    def task_state(self, t: int | None = None) -> dict[str, torch.Tensor]:
        """Task t's adapters (``blocks.<b>.down.weight`` …), its training head (``head.weight``, ``head.sigma``) and
        the prototypes of its classes in subspaces 0..t (``prototypes``, [n_t, S_t, D])."""
        if self.in_task:
            raise RuntimeError("finish_task() the current task before saving it")
        last = self.num_tasks - 1
        t = last if t is None else t
        if not 0 <= t <= last:
            raise IndexError(f"task {t} is not among the {self.num_tasks} tasks")
        state = {f"blocks.{b}.{name}": p.detach().clone()
                 for b, adapter in enumerate(self.adapters[t]) for name, p in adapter.named_parameters()}
        state["head.weight"] = self.heads[t].weight.detach().clone()
        state["head.sigma"] = self.heads[t].sigma.detach().clone()
        state["prototypes"] = self.prototypes[t].detach().clone()
        return state

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Append task ``num_tasks`` from its :meth:`task_state` as a finished task."""
        if self.in_task:
            raise RuntimeError("finish_task() the current task before loading another")
        expected = {f"blocks.{b}.{n}" for b in range(len(self.vit.blocks)) for n in ADAPTER_NAMES}
        expected |= {"head.weight", "head.sigma", "prototypes"}
        if set(state) != expected:
            raise ValueError(f"an EASE task state holds {sorted(expected)}; got {sorted(state)}")
        prototypes = state["prototypes"]
        subspaces = self.num_subspaces(self.num_tasks + 1)
        if prototypes.shape != (state["head.weight"].shape[0], subspaces, self.embed_dim):
            raise ValueError(f"task {self.num_tasks}'s prototypes have shape {tuple(prototypes.shape)}, expected "
                             f"({state['head.weight'].shape[0]}, {subspaces}, {self.embed_dim})")
        adapters = [{n: state[f"blocks.{b}.{n}"] for n in ADAPTER_NAMES} for b in range(len(self.vit.blocks))]
        self._append_task(adapters, state["head.weight"], state["head.sigma"], trainable=False)
        self.prototypes.append(nn.Parameter(prototypes.float().to(self._device()), requires_grad=False))
        self._classifier = None


def build(settings: dict, vit: nn.Module, seed: int) -> ViTEASE:
    """The model of an EASE experiment before task 0 (the state chain's factory, :mod:`ifcl.catalog.ease`):
    ``settings['ease']`` its adapters and classifier; nothing is drawn before task 0 (``seed`` unused)."""
    s = settings["ease"]
    return ViTEASE(vit, bottleneck=s["bottleneck"], adapter_scale=s["adapter_scale"],
                   adapter_dropout=s["adapter_dropout"], alpha=s["alpha"], use_init_ptm=s["use_init_ptm"],
                   beta=s["beta"], recalc_sim=s["recalc_sim"], reweight=s["reweight"])
