"""A timm ViT whose attention key and value projections carry one LoRA branch per task, plus per-task heads.

For an adapted block with attention input x (the ``norm1`` output) the key and value become
(liangyanshuo/InfLoRA)

    k = x W_kᵀ + b_k + Σ_{s≤t} x R_sᵀ E_sᵀ,    v = x W_vᵀ + b_v + Σ_{s≤t} x R_sᵀ E_sᵀ

with R_s (``down``, rank × d) the frozen down-projection and E_s (``up``, d × rank) the trained up-projection of
task s. The official code stacks and sums every branch in every forward; here the finished branches are merged
into W_k and W_v once (:meth:`ViTLoRA.end_task`), which is the same function at a cost independent of the number
of tasks. Only the current task's branch is kept separate, so that it can be trained; it is added to the qkv
output as one rank-2r product. The features are the CLS token, so the last block runs for that token alone
(:func:`cls_through_block`).

Sizes are arguments (:func:`build_vit`), so tests use tiny ViTs and the papers use ViT-B/16.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRAQKV(nn.Module):
    """Wraps a frozen ``qkv`` linear layer; adds the current task's LoRA branch to its key and value parts.

    Optionally accumulates the uncentred second moment C = XᵀX / n of its inputs over every token
    (``start_collecting``), which InfLoRA needs to design and to remember subspaces (liangyanshuo/InfLoRA).
    """

    def __init__(self, qkv: nn.Linear, rank: int):
        super().__init__()
        self.qkv = qkv
        self.dim = qkv.in_features
        self.attn_dim = qkv.out_features // 3
        self.rank = rank
        self.register_buffer("down_k", torch.zeros(rank, self.dim))
        self.register_buffer("down_v", torch.zeros(rank, self.dim))
        self.up_k = nn.Parameter(torch.zeros(self.attn_dim, rank))
        self.up_v = nn.Parameter(torch.zeros(self.attn_dim, rank))
        self.active = False
        self._moment: torch.Tensor | None = None
        self._count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._moment is not None:
            flat = x.detach().reshape(-1, self.dim).float()
            self._moment += flat.T @ flat
            self._count += flat.shape[0]
        out = self.qkv(x)
        if not self.active:
            return out
        # both branches as one rank-2r product added to the whole qkv output:
        # [x R_kᵀ, x R_vᵀ] [[0, E_k, 0], [0, 0, E_v]]ᵀ (no in-place slice additions, whose backward copies the gradient)
        low = F.linear(x, torch.cat([self.down_k, self.down_v])).flatten(0, -2)
        up = torch.cat([self.up_k.new_zeros(self.attn_dim, 2 * self.rank), F.pad(self.up_k, (0, self.rank)),
                        F.pad(self.up_v, (self.rank, 0))])
        return torch.addmm(out.flatten(0, -2), low, up.T).view(out.shape)

    def begin(self, down_k: torch.Tensor, down_v: torch.Tensor) -> None:
        """Install task t's frozen down-projections and a zero (trainable) up-projection."""
        with torch.no_grad():
            self.down_k.copy_(down_k)
            self.down_v.copy_(down_v)
            self.up_k.zero_()
            self.up_v.zero_()
        self.active = True

    @torch.no_grad()
    def merge(self) -> None:
        """Add the current branch to the frozen W_k, W_v and deactivate it (same function, no extra cost)."""
        if not self.active:
            return
        d = self.attn_dim
        self.qkv.weight[d : 2 * d] += self.up_k @ self.down_k
        self.qkv.weight[2 * d :] += self.up_v @ self.down_v
        self.active = False

    def start_collecting(self) -> None:
        self._moment = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=self.qkv.weight.device)
        self._count = 0

    def stop_collecting(self) -> torch.Tensor:
        """Return C = XᵀX / n over every token seen since :meth:`start_collecting`."""
        if self._moment is None or self._count == 0:
            raise RuntimeError("no inputs were collected")
        moment, self._moment = self._moment / self._count, None
        return moment.cpu()


def cls_through_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Block.forward`` on the sequence x [B, N, D], for the output of its first (CLS) token only:
    keys and values of every token, the query, attention output, projection and MLP of the CLS token. Returns
    [B, 1, D], which equals ``block(x)[:, :1]`` up to float rounding."""
    a = block.attn
    b, n, _ = x.shape
    h = block.norm1(x)
    q, k, v = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q[:, :, :1]), a.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if a.training else 0.0)
    o = a.norm(o.transpose(1, 2).reshape(b, 1, -1))
    if getattr(a, "gate", None) is not None:
        o = o * a.gate(h[:, :1]).sigmoid()
    y = x[:, :1] + block.drop_path1(block.ls1(a.proj_drop(a.proj(o))))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def cls_features(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``forward_head(forward_features(x), pre_logits=True)`` for a CLS-pooled ViT, with the last block run
    for the CLS token alone (:func:`cls_through_block`)."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for block in vit.blocks[:-1]:
        x = block(x)
    return vit.forward_head(vit.norm(cls_through_block(vit.blocks[-1], x)), pre_logits=True)


class ViTLoRA(nn.Module):
    """Frozen timm ViT + per-task LoRA on k/v of the chosen blocks + one linear head per task.

    Usage for task t: :meth:`begin_task` (designed or random down-projections, new head), train
    :meth:`trainable_parameters` on :meth:`forward_current`, then :meth:`end_task` (merge). Prediction over all
    seen classes is :meth:`forward` (heads concatenated in task order: InfLoRA's ``SiNet.interface``).
    """

    def __init__(self, vit: nn.Module, rank: int, lora_blocks: Sequence[int] | str = "all"):
        super().__init__()
        if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError("ViTLoRA expects a timm ViT pooled by its CLS token (global_pool='token')")
        self.vit = vit
        for p in self.vit.parameters():
            p.requires_grad_(False)
        depth = len(vit.blocks)
        self.lora_blocks = list(range(depth)) if lora_blocks == "all" else sorted(lora_blocks)
        if not self.lora_blocks or self.lora_blocks[-1] >= depth:
            raise ValueError(f"lora_blocks {lora_blocks} must be indices below the depth {depth}")
        for i in self.lora_blocks:
            attn = vit.blocks[i].attn
            attn.qkv = LoRAQKV(attn.qkv, rank)
        self.rank = rank
        self.embed_dim = vit.embed_dim
        self.heads = nn.ModuleList()

    @property
    def lora_layers(self) -> list[LoRAQKV]:
        return [self.vit.blocks[i].attn.qkv for i in self.lora_blocks]

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def begin_task(self, down_k: Sequence[torch.Tensor], down_v: Sequence[torch.Tensor], num_classes: int) -> None:
        """Start task t: one (rank × d) down-projection per adapted block for k and for v, and a new head with
        PyTorch's default Linear init (drawn from the global torch RNG)."""
        layers = self.lora_layers
        if len(down_k) != len(layers) or len(down_v) != len(layers):
            raise ValueError(f"expected {len(layers)} down-projections per projection, got {len(down_k)}/{len(down_v)}")
        for layer, rk, rv in zip(layers, down_k, down_v):
            layer.begin(rk, rv)
        device = self.vit.cls_token.device if hasattr(self.vit, "cls_token") else None
        self.heads.append(nn.Linear(self.embed_dim, num_classes).to(device))

    def end_task(self) -> None:
        for layer in self.lora_layers:
            layer.merge()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """E_t (k and v) of every adapted block and head t: what InfLoRA trains (liangyanshuo/InfLoRA)."""
        params = [p for layer in self.lora_layers for p in (layer.up_k, layer.up_v)]
        return params + list(self.heads[-1].parameters())

    def set_trainable(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final norm (liangyanshuo/InfLoRA), i.e. timm's
        ``forward_head(forward_features(x), pre_logits=True)``. Only the CLS token of the last block's output is
        read, so that block runs its attention output, MLP and the final norm for that token alone
        (:func:`cls_through_block`); the official code computes them for all 197 tokens and keeps one."""
        return cls_features(self.vit, x)

    def forward_current(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the current task's head only (training, local labels)."""
        return self.heads[-1](self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over every seen class, heads concatenated in task order."""
        f = self.features(x)
        return torch.cat([h(f) for h in self.heads], dim=1)

    # ---- per-task state (what a task adds; the frozen backbone is stored elsewhere) ----
    def current_adapter_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for i, layer in zip(self.lora_blocks, self.lora_layers):
            state[f"blocks.{i}.up_k"] = layer.up_k.detach().clone()
            state[f"blocks.{i}.up_v"] = layer.up_v.detach().clone()
        head = self.heads[-1]
        state["head.weight"] = head.weight.detach().clone()
        state["head.bias"] = head.bias.detach().clone()
        return state

    def load_current_adapter(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, layer in zip(self.lora_blocks, self.lora_layers):
                layer.up_k.copy_(state[f"blocks.{i}.up_k"])
                layer.up_v.copy_(state[f"blocks.{i}.up_v"])
            self.heads[-1].weight.copy_(state["head.weight"])
            self.heads[-1].bias.copy_(state["head.bias"])


def heads_state(heads: nn.ModuleList) -> dict[str, torch.Tensor]:
    """Every head's weight and bias (``heads.<s>.weight``), e.g. after classifier alignment."""
    return {f"heads.{s}.{k}": v.detach().clone() for s, h in enumerate(heads) for k, v in h.state_dict().items()}


def load_heads(heads: nn.ModuleList, state: dict[str, torch.Tensor]) -> None:
    if len({k.split(".")[1] for k in state}) != len(heads):
        raise ValueError(f"the heads state holds {len({k.split('.')[1] for k in state})} heads, the model {len(heads)}")
    with torch.no_grad():
        for s, h in enumerate(heads):
            h.weight.copy_(state[f"heads.{s}.weight"])
            h.bias.copy_(state[f"heads.{s}.bias"])


def reduction_state(lora_blocks: Iterable[int], down_k: Sequence[torch.Tensor], down_v: Sequence[torch.Tensor]) -> dict:
    return {**{f"blocks.{i}.down_k": r for i, r in zip(lora_blocks, down_k)},
            **{f"blocks.{i}.down_v": r for i, r in zip(lora_blocks, down_v)}}


def split_reduction_state(lora_blocks: Iterable[int], state: dict) -> tuple[list, list]:
    blocks = list(lora_blocks)
    return [state[f"blocks.{i}.down_k"] for i in blocks], [state[f"blocks.{i}.down_v"] for i in blocks]


def random_reduction(dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's default down-projection init (and the official one before design, liangyanshuo/InfLoRA):
    Kaiming-uniform with a = √5 on a (rank × dim) weight, i.e. U(-1/√dim, 1/√dim)."""
    bound = 1.0 / math.sqrt(dim)
    return (torch.rand(rank, dim, generator=generator) * 2 - 1) * bound


def build_vit(image_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0):
    """A timm VisionTransformer of the given sizes with the official InfLoRA settings: qkv bias, LayerNorm eps 1e-6,
    CLS-token pooling, no dropout, no classifier head (liangyanshuo/InfLoRA)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=image_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
                             global_pool="token", class_token=True)


def load_backbone(spec: dict, weights: str | Path) -> nn.Module:
    """The frozen ViT of a backbone spec, its weights read from a local file only (never from the network).

    ``pretrain`` backbones: the sizes in ``spec['arch']`` and a safetensors state written by the pretraining rule.
    ``timm`` backbones: ``timm.create_model(spec['name'])`` with weights from the file (safetensors, timm/Google
    ``.npz`` or a PyTorch state dict loaded with ``weights_only=True``); any classifier head is dropped.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"backbone weights {weights} do not exist")
    if spec["type"] == "pretrain":
        from ..state import load_state

        a = spec["arch"]
        vit = build_vit(spec["image_size"], a["patch_size"], a["embed_dim"], a["depth"], a["num_heads"], a["mlp_ratio"])
        tensors, _ = load_state(weights)
        vit.load_state_dict(tensors)
    else:
        from .weights import check_weights

        check_weights(weights)
        import timm

        vit = timm.create_model(spec["name"], pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(file=str(weights)))
    vit.eval()
    return vit
