"""open_clip's CLIP with MoE-Adapters (JiazuoYu/MoE-Adapters4CL `mtil/clip/model.py`, `mtil/clip/adapter.py`).

Every residual block of the towers named (officially both: ``--ffn_adapt_where AdapterDoubleEncoder``) is wrapped
in a :class:`MoEBlock`: the frozen block's attention residual, then its MLP residual plus a mixture of expert
adapters reading the same residual stream ``x`` (not ``LN_2(x)``), routed per sample by the current task's router
on the block's first token:

    x ← x + Attn(LN_1(x));   x ← x + MLP(LN_2(x)) + Σ_e G_e(x[:, 0]) · E_e(x)

(:mod:`ifcl.methods.moe_adapters` has the gating, the experts' formula and the rest of the method). Experts are
shared by all tasks, routers are per task (``num_tasks`` slots, 11 officially). An expert's up-projection and both
biases start at 0, so with any router the model computes the frozen CLIP's function: exactly, since the mixture
then adds exact zeros.

The task is chosen per call: ``encode_image(images, task)`` / ``encode_text(tokens, task)``; ``task=None`` (or −1)
runs the frozen CLIP, the blocks skipping the adapters entirely (DDAS's zero-shot path; the official code returns
from each block before routing when the selected task is −1). ``encode_image`` also takes one task per image
(a [B] tensor, −1 = frozen CLIP), for a per-sample DDAS; the official one decides per test batch.

The method's tensors are a flat dict (:meth:`CLIPMoE.expert_state`, :meth:`CLIPMoE.router_state`):
``<tower>.<block>.expert.<e>.{down,up}.{weight,bias}`` and ``<tower>.<block>.router.<task>.{gate,noise}``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.moe_adapters import (balance_loss, combine_experts, extractor_inputs, noisy_top_k_gating,
                                     reconstruction_errors, select_task, selection_counts)
from .clip_prefix import encode_text_to_end, fold_quick_gelu


class Expert(nn.Module):
    """One adapter (`adapter.py` ``Adapter`` with ``init_option='lora'``, ``adapter_scalar=0.1``, no layer norm):
    ``scale · up(dropout(ReLU(down(x))))``, ``down`` Kaiming-uniform (a = √5), ``up`` and both biases 0."""

    def __init__(self, width: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.scale = scale
        self.dropout = dropout
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down(x)), p=self.dropout, training=self.training)
        return self.up(h) * self.scale


class MoELayer(nn.Module):
    """One block's experts and per-task routers (``gate``/``noise`` [D, E], zero at creation).

    ``task`` (set by :class:`CLIPMoE` around a forward): None = no adapters, an int = that task's router for every
    sample, a [B] long tensor = one task per sample (−1: none). Routing noise, expert dropout and the selection
    counts (``counts`` [E], reset by :meth:`CLIPMoE.reset_counts`) follow the training mode. ``last_balance_loss``:
    the load-balancing loss of the last forward (not used by the official training)."""

    def __init__(self, width: int, num_experts: int = 22, num_tasks: int = 11, top_k: int = 2, bottleneck: int = 64,
                 scale: float = 0.1, dropout: float = 0.1, noise_epsilon: float = 1e-2, balance_weight: float = 1e-2):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        self.experts = nn.ModuleList(Expert(width, bottleneck, scale, dropout) for _ in range(num_experts))
        self.gate = nn.ParameterList(nn.Parameter(torch.zeros(width, num_experts)) for _ in range(num_tasks))
        self.noise = nn.ParameterList(nn.Parameter(torch.zeros(width, num_experts)) for _ in range(num_tasks))
        self.top_k = top_k
        self.noise_epsilon = noise_epsilon
        self.balance_weight = balance_weight
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.task: int | torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self.last_balance_loss: torch.Tensor | None = None

    def route(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Σ_e G_e · E_e(x) for x [B, N, D], routed by ``task``'s router on x[:, 0]."""
        gates, load = noisy_top_k_gating(x[:, 0], self.gate[task], self.noise[task], self.top_k, noisy=self.training,
                                         noise_epsilon=self.noise_epsilon, generator=self.generator)
        self.last_balance_loss = balance_loss(gates, load, self.balance_weight)
        if self.training:
            self.counts += selection_counts(gates).to(self.counts.device)
        return combine_experts(x, gates, self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        task = self.task
        if task is None:
            return None
        if not isinstance(task, torch.Tensor):
            return None if task < 0 else self.route(x, int(task))
        out = torch.zeros_like(x)
        for t in torch.unique(task).tolist():
            if t < 0:
                continue
            rows = torch.nonzero(task == t).flatten().to(x.device)
            out = out.index_add(0, rows, self.route(x[rows], t))
        return out


class MoEBlock(nn.Module):
    """An open_clip ``ResidualAttentionBlock`` (kept as ``block``) with a :class:`MoELayer` beside its MLP. With
    no task set it is the block itself."""

    def __init__(self, block: nn.Module, moe: MoELayer):
        super().__init__()
        self.block = block
        self.moe = moe

    def get_weight_dtype(self) -> torch.dtype:
        """open_clip's ``Transformer.get_cast_dtype`` asks the first block."""
        return self.block.get_weight_dtype()

    def _attend(self, q_x: torch.Tensor, k_x: torch.Tensor | None, v_x: torch.Tensor | None,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        b = self.block
        k_x = b.ln_1_kv(k_x) if hasattr(b, "ln_1_kv") and k_x is not None else None
        v_x = b.ln_1_kv(v_x) if hasattr(b, "ln_1_kv") and v_x is not None else None
        return q_x + b.ls_1(b.attention(q_x=b.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask))

    def _mlp_and_experts(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        out = x + b.ls_2(b.mlp(b.ln_2(x)))
        y = self.moe(x)
        return out if y is None else out + y.to(out.dtype)

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.moe.task is None:
            return self.block(q_x, k_x, v_x, attn_mask=attn_mask)
        return self._mlp_and_experts(self._attend(q_x, k_x, v_x, attn_mask))

    def forward_first_token(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output [B, 1, D] at the first token only (its query against every key and value; the
        router reads that token too, and the experts act per token)."""
        b = self.block
        h = b.ln_1(x)
        y = x[:, :1] + b.ls_1(b.attn(h[:, :1], h, h, need_weights=False)[0])
        return self._mlp_and_experts(y)


class CLIPMoE(nn.Module):
    """A frozen open_clip ``CLIP`` whose blocks (every block of every tower in ``towers``) carry MoE-Adapters. The
    CLIP is rewritten in place (its blocks wrapped) and owned from then on. Defaults: the official model (22
    experts, top-2, 11 router slots, bottleneck 64, scale 0.1, dropout 0.1, both towers). ``fold_gelu``: fold the
    MLPs' QuickGELU into their projections (:func:`~ifcl.models.clip_prefix.fold_quick_gelu`, same function up to
    rounding; off by default)."""

    TOWERS = ("visual", "text")

    def __init__(self, clip: nn.Module, num_experts: int = 22, top_k: int = 2, num_tasks: int = 11,
                 bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1, noise_epsilon: float = 1e-2,
                 towers: Iterable[str] = ("visual", "text"), fold_gelu: bool = False, balance_weight: float = 1e-2):
        super().__init__()
        towers = tuple(towers)
        if set(towers) - set(self.TOWERS):
            raise ValueError(f"towers must be among {self.TOWERS}, got {towers}")
        self.clip = clip.eval().requires_grad_(False)
        self.num_experts, self.num_tasks = num_experts, num_tasks
        self.layers: dict[str, list[MoELayer]] = {}
        for tower, resblocks in (("visual", clip.visual.transformer.resblocks), ("text", clip.transformer.resblocks)):
            if fold_gelu:
                for block in resblocks:
                    fold_quick_gelu(block.mlp)
            if tower not in towers:
                continue
            self.layers[tower] = []
            for i, block in enumerate(resblocks):
                width = block.ln_2.normalized_shape[0]
                moe = MoELayer(width, num_experts, num_tasks, top_k, bottleneck, scale, dropout, noise_epsilon,
                               balance_weight)
                resblocks[i] = MoEBlock(block, moe)
                self.layers[tower].append(moe)
        self.clip.train(False)

    # ---- modes ----
    def train(self, mode: bool = True) -> "CLIPMoE":
        """Training mode for the adapters only (routing noise, dropout, counts); the CLIP stays in eval mode (it
        has no dropout, so this is the function the official ``model.train()`` computes)."""
        self.training = mode
        self.clip.train(False)
        for layer in self._all_layers():
            layer.train(mode)
        return self

    def _all_layers(self) -> list[MoELayer]:
        return [layer for layers in self.layers.values() for layer in layers]

    def _named_layers(self) -> list[tuple[str, MoELayer]]:
        return [(f"{tower}.{i}", layer) for tower, layers in self.layers.items() for i, layer in enumerate(layers)]

    def _install(self, tower: str, task: int | torch.Tensor | None) -> None:
        if isinstance(task, torch.Tensor) and task.dim() == 0:
            task = int(task)
        if isinstance(task, int) and task < 0:
            task = None
        if isinstance(task, int) and task >= self.num_tasks:
            raise ValueError(f"task {task} has no router (the model has {self.num_tasks} router slots)")
        for layer in self.layers.get(tower, ()):
            layer.task = task

    def set_generator(self, generator: torch.Generator | None) -> None:
        """Draw the routing noise from ``generator`` (the global RNG when None)."""
        for layer in self._all_layers():
            layer.generator = generator

    # ---- towers ----
    def encode_image(self, images: torch.Tensor, task: int | torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised image features through ``task``'s router (None or −1: the frozen CLIP; a [B] tensor:
        one task per image). The last block runs for the class token only, as in ``encode_image_cls``."""
        self._install("visual", task)
        try:
            return F.normalize(_encode_image(self.clip.visual, images), dim=-1)
        finally:
            self._install("visual", None)

    def encode_text(self, tokens: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """L2-normalised text features of tokenised prompts through ``task``'s router (None or −1: the frozen
        CLIP). Positions after the longest prompt's end token are not computed (``encode_text_to_end``; the router
        reads position 0, so this is exact)."""
        if isinstance(task, torch.Tensor) and task.dim() > 0:
            raise ValueError("encode_text takes one task for all prompts")
        self._install("text", task)
        try:
            return F.normalize(encode_text_to_end(self.clip, tokens), dim=-1)
        finally:
            self._install("text", None)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def balance_loss(self) -> torch.Tensor:
        """Σ over blocks of the load-balancing loss of each block's last forward (computed, never used, by the
        official code)."""
        losses = [layer.last_balance_loss for layer in self._all_layers() if layer.last_balance_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    # ---- activate-freeze ----
    def selection_counts(self) -> dict[str, torch.Tensor]:
        """Per block (``visual.<i>``, ``text.<i>``): how many samples chose each expert in training-mode forwards
        since the last :meth:`reset_counts`."""
        return {name: layer.counts.detach().cpu().clone() for name, layer in self._named_layers()}

    def reset_counts(self) -> None:
        for layer in self._all_layers():
            layer.counts.zero_()

    def set_trainable(self, task: int, frozen: Mapping[str, Iterable[int]] | None = None) -> list[nn.Parameter]:
        """Make ``task``'s routers and every expert not in ``frozen`` (layer name → expert indices) trainable,
        everything else not; returns those parameters, for the optimiser. (The official optimiser also holds the
        other tasks' routers, which get no gradient: the same updates with weight decay 0.)"""
        frozen = {name: set(experts) for name, experts in (frozen or {}).items()}
        params = []
        for name, layer in self._named_layers():
            layer.requires_grad_(False)
            for e, expert in enumerate(layer.experts):
                if e not in frozen.get(name, ()):
                    expert.requires_grad_(True)
                    params.extend(expert.parameters())
            for p in (layer.gate[task], layer.noise[task]):
                p.requires_grad_(True)
                params.append(p)
        return params

    # ---- state ----
    def expert_state(self) -> dict[str, torch.Tensor]:
        """Every expert's tensors (shared by all tasks): ``<tower>.<i>.expert.<e>.<down|up>.<weight|bias>``."""
        return {f"{name}.expert.{e}.{key}": value.detach().clone()
                for name, layer in self._named_layers() for e, expert in enumerate(layer.experts)
                for key, value in expert.state_dict().items()}

    def router_state(self, task: int) -> dict[str, torch.Tensor]:
        """Task ``task``'s routers: ``<tower>.<i>.router.<task>.<gate|noise>``."""
        return {f"{name}.router.{task}.{kind}": getattr(layer, kind)[task].detach().clone()
                for name, layer in self._named_layers() for kind in ("gate", "noise")}

    def trainable_state(self, task: int) -> dict[str, torch.Tensor]:
        """The state a task's training changes: all experts and that task's routers."""
        return {**self.expert_state(), **self.router_state(task)}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors named as in :meth:`expert_state` / :meth:`router_state` into the model (any subset)."""
        layers = dict(self._named_layers())
        with torch.no_grad():
            for key, value in state.items():
                tower, block, kind, index, *rest = key.split(".")
                layer = layers.get(f"{tower}.{block}")
                if layer is None:
                    raise KeyError(f"no MoE layer {tower}.{block} for {key!r}")
                if kind == "expert":
                    target = layer.experts[int(index)].state_dict(keep_vars=True)[".".join(rest)]
                elif kind == "router" and len(rest) == 1 and rest[0] in ("gate", "noise"):
                    target = getattr(layer, rest[0])[int(index)]
                else:
                    raise KeyError(f"not an MoE-Adapters tensor: {key!r}")
                target.copy_(value)

    def parameter_count(self, task_routers: int = 1, frozen: Mapping[str, Iterable[int]] | None = None) -> int:
        """Experts not in ``frozen`` plus ``task_routers`` tasks' routers (gate and noise)."""
        frozen = {name: set(experts) for name, experts in (frozen or {}).items()}
        n = 0
        for name, layer in self._named_layers():
            n += sum(p.numel() for e, ex in enumerate(layer.experts) if e not in frozen.get(name, ())
                     for p in ex.parameters())
            n += task_routers * (layer.gate[0].numel() + layer.noise[0].numel())
        return n


def _encode_image(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip's ``VisionTransformer.forward`` with the last block for the class token only (towers pooled by
    their class token; others run ``visual(images)``)."""
    blocks = visual.transformer.resblocks
    if (visual.pool_type != "tok" or visual.attn_pool is not None or visual.output_tokens
            or not visual.transformer.batch_first or not isinstance(blocks[-1], MoEBlock)):
        return visual(images)
    x = visual._embeds(images)
    for block in blocks[:-1]:
        x = block(x)
    pooled, _ = visual._pool(blocks[-1].forward_first_token(x))
    return pooled @ visual.proj if visual.proj is not None else pooled


class DDASModel(nn.Module):
    """The model after a task: the adapted CLIP (:class:`CLIPMoE`, routers of the tasks so far) and DDAS, which
    picks the router of the images' task or the frozen CLIP (`evaluation.py` ``zeroshot_eval``).

    ``autoencoders``: slot 0 the reference one, slot s + 1 task s's (trained, or the initial weights of a task not
    yet trained when those are scored). ``select(images)``: the task of a batch (a 0-dim tensor) under
    ``batchwise``, else one per image ([B]); −1 is the frozen CLIP (:func:`select_task` with ``threshold``).
    ``image_size``: the extractor's input size (None: the images as they are)."""

    def __init__(self, moe: CLIPMoE, extractor: nn.Module, autoencoders: Iterable[nn.Module], threshold: float,
                 batchwise: bool = True, image_size: int | None = None):
        super().__init__()
        self.moe = moe
        self.extractor = extractor.eval().requires_grad_(False)
        self.autoencoders = nn.ModuleList(autoencoders).eval().requires_grad_(False)
        self.threshold, self.batchwise, self.image_size = threshold, batchwise, image_size

    def train(self, mode: bool = True) -> "DDASModel":
        self.training = mode
        self.moe.train(mode)
        return self

    @torch.no_grad()
    def errors(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction errors under every slot: [A] for the batch (its mean squared error, official), or
        [B, A] per image."""
        inputs = extractor_inputs(self.extractor, images, self.image_size)
        return reconstruction_errors(list(self.autoencoders), inputs, per_sample=not self.batchwise)

    def select(self, images: torch.Tensor) -> torch.Tensor:
        return select_task(self.errors(images), self.threshold)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, text: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosine logits [B, C], the task of each image [B]): each image through the router DDAS picks for it (or
        the frozen CLIP) against ``text(task)``, the L2-normalised class-prompt features through the same router
        ([C, D]; −1: the frozen CLIP's). The official logits are 100 times these (the arg-max is the same)."""
        tasks = self.select(images)
        if tasks.dim() == 0:
            features = self.moe.encode_image(images, int(tasks))
            return features @ text(int(tasks)).t(), tasks.expand(len(images)).clone()
        features = self.moe.encode_image(images, tasks.to(images.device))
        out = None
        for task in tasks.unique().tolist():
            rows = torch.nonzero(tasks == task).flatten().to(images.device)
            part = features[rows] @ text(task).t()
            out = part.new_zeros(len(images), part.shape[1]) if out is None else out
            out[rows] = part
        return out, tasks
