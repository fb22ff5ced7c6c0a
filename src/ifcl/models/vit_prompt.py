"""A frozen timm ViT with prefix prompts (L2P++, DualPrompt, CODA-Prompt) and one linear head per task.

As in GT-RIPL/CODA-Prompt (models/zoo.py ``ViTZoo.forward``, models/vit.py): a first pass of the frozen ViT
without prompts, under ``no_grad``, gives the query q (CLS token after the final norm); the prompted pass asks
the pool (:mod:`ifcl.methods.prompts`) for a key/value prefix at each prompted block and puts it in front of
the tokens' keys and values after the qkv projection (:func:`prefixed_block`); its CLS token after the final
norm is the feature for the heads. Only the CLS token of the last block's output is read, so that block runs
for the CLS token alone (:func:`ifcl.models.vit_lora.cls_through_block`, or ``cls_only=True`` here).

The official classifier is one ``Linear(768, all classes)`` whose old-class logits are masked to -inf and whose
future ones are cut off in training (learners/prompt.py); one head per task trained on local labels is the
same function, and evaluation concatenates the heads in task order.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init

from ..methods.prompts import build_pool
from .vit_lora import cls_features, cls_through_block


def prefixed_block(block: nn.Module, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None,
                   cls_only: bool = False) -> torch.Tensor:
    """timm's ``Block.forward`` on x [B, N, D] with prefix tuning: the prefix (Pk, Pv), each [B, Lp, D], is
    split into heads and concatenated in front of the tokens' keys and values after the qkv projection (and
    after ``k_norm``; the prompts are not projected; cast to the keys' dtype under autocast), then ordinary
    softmax attention
    (GT-RIPL/CODA-Prompt models/vit.py ``Attention.forward``). ``prefix=None`` (or Lp = 0) is ``block(x)``.
    ``cls_only``: only the first (CLS) token's output, [B, 1, D] (the keys and values still cover every token).
    """
    a = block.attn
    b, n, _ = x.shape
    h = block.norm1(x)
    q, k, v = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    if cls_only:
        q = q[:, :, :1]
    if prefix is not None:
        pk, pv = (p.to(k.dtype).reshape(b, -1, a.num_heads, a.head_dim).transpose(1, 2) for p in prefix)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if a.training else 0.0)
    m = q.shape[2]
    o = a.norm(o.transpose(1, 2).reshape(b, m, -1))
    if getattr(a, "gate", None) is not None:
        o = o * a.gate(h[:, :m]).sigmoid()
    y = x[:, :m] + block.drop_path1(block.ls1(a.proj_drop(a.proj(o))))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def _linear(dim: int, num_classes: int, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear(dim, n)`` with PyTorch's default init (Kaiming-uniform a = √5 on the weight, U(±1/√dim) on
    the bias), drawn from ``generator``."""
    head = skip_init(nn.Linear, dim, num_classes)  # no draw from the global RNG
    with torch.no_grad():
        nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=generator)
        bound = 1.0 / math.sqrt(dim)
        nn.init.uniform_(head.bias, -bound, bound, generator=generator)
    return head


class PromptedViT(nn.Module):
    """Frozen timm ViT (CLS pooling) + a prompt pool + one linear head per task.

    Usage for task t: :meth:`begin_task` (new head, the pool's preparation), train :meth:`trainable_parameters`
    on :meth:`forward_current` (CE on local labels + the prompt loss), predict with :meth:`forward`.
    """

    def __init__(self, vit: nn.Module, pool: nn.Module):
        super().__init__()
        if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError("PromptedViT expects a timm ViT pooled by its CLS token (global_pool='token')")
        depth = len(vit.blocks)
        if pool.layers and pool.layers[-1] >= depth:
            raise ValueError(f"prompt layers {pool.layers} must be block indices below the depth {depth}")
        self.vit = vit
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.pool = pool
        self.embed_dim = vit.embed_dim
        self.heads = nn.ModuleList()

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def _device(self) -> torch.device:
        return self.vit.cls_token.device

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    def _pool_cls(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.norm(x), pre_logits=True)

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's CLS token after the final norm, without prompts and without gradients [B, D]."""
        return cls_features(self.vit, x)

    def features(self, x: torch.Tensor, train: bool = False, task: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS feature of the prompted pass after the final norm [B, D], prompt loss summed over blocks).

        ``task`` defaults to the newest task (``num_tasks - 1``); ``train`` selects the pool's training rule."""
        if task is None:
            task = self.num_tasks - 1
        q = self.query(x)
        h = self._tokens(x)
        loss = q.new_zeros(())
        layers = set(self.pool.layers)
        last = len(self.vit.blocks) - 1
        for i, block in enumerate(self.vit.blocks):
            if i in layers:
                prefix, block_loss = self.pool(q, i, train=train, task=task)
                loss = loss + block_loss
                h = prefixed_block(block, h, prefix, cls_only=i == last)
            else:
                h = cls_through_block(block, h) if i == last else block(h)
        return self._pool_cls(h), loss

    def begin_task(self, num_classes: int, task: int, generator: torch.Generator | None = None) -> None:
        """Start task ``task``: a new head (default Linear init from ``generator``), earlier heads frozen, then
        ``pool.begin_task(task, generator)``. ``task`` is the task's index; ``heads`` may hold fewer heads
        (training needs only the newest), but never more (``task >= len(heads)``)."""
        if task < self.num_tasks:
            raise ValueError(f"task {task} comes before the {self.num_tasks} heads the model holds")
        for h in self.heads:
            h.requires_grad_(False)
        self.heads.append(_linear(self.embed_dim, num_classes, generator).to(self._device()))
        self.pool.begin_task(task, generator)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every pool parameter and the newest head, as the official optimiser (learners/prompt.py)."""
        return list(self.pool.parameters()) + list(self.heads[-1].parameters())

    def forward_current(self, x: torch.Tensor, task: int | None = None, train: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the newest head, prompt loss): the training forward on local labels."""
        f, loss = self.features(x, train=train, task=task)
        return self.heads[-1](f), loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation: logits over every seen class, heads concatenated in task order."""
        f, _ = self.features(x, train=False)
        return torch.cat([h(f) for h in self.heads], dim=1)

    # ---- per-task state (what a task's file holds; the frozen backbone is stored elsewhere)
    def task_state(self) -> dict[str, torch.Tensor]:
        """The newest task's file: ``pool.<name>`` for every pool parameter (the pool after the task: it is
        shared by the tasks) and ``head.weight``, ``head.bias`` of the newest head."""
        head = self.heads[-1]
        return {**{f"pool.{k}": v.detach().clone() for k, v in self.pool.state().items()},
                "head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()}

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Append a finished task from its :meth:`task_state`: its head (frozen) and its pool, which replaces the
        model's. Loading the states of tasks 0..t in order gives the model after task t."""
        unexpected = sorted(k for k in state if not k.startswith("pool.") and k not in ("head.weight", "head.bias"))
        if unexpected:
            raise ValueError(f"unexpected names in a prompt-method task state: {unexpected}")
        self.pool.load({k[len("pool."):]: v for k, v in state.items() if k.startswith("pool.")})
        w, b = state["head.weight"], state["head.bias"]
        head = skip_init(nn.Linear, w.shape[1], w.shape[0], device=self._device())
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        self.heads.append(head.requires_grad_(False))


def build(settings: dict, vit: nn.Module, seed: int) -> PromptedViT:
    """The model of an L2P, DualPrompt or CODA-Prompt experiment before task 0 (the ``state`` chain's factory,
    :mod:`ifcl.catalog.prompts`): ``settings`` its method, ``num_tasks`` and ``prompt``; the pool's initial values
    drawn from ``seed``."""
    pool = build_pool(settings["method"], settings["prompt"], vit.embed_dim, settings["num_tasks"],
                      torch.Generator().manual_seed(seed))
    return PromptedViT(vit, pool)
