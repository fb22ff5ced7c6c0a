"""Prompt pools of L2P (the "L2P++" prefix variant), DualPrompt and CODA-Prompt as tensor functions and modules.

All three follow the implementations in GT-RIPL/CODA-Prompt (``models/zoo.py``; the prefix attention is in
``models/vit.py``, the objective in ``learners/prompt.py``). A pool maps the query q [B, D] (the CLS feature
of the frozen ViT without prompts) and a block index l to a key/value prefix (Pk, Pv), each [B, Lp, D], that
:func:`ifcl.models.vit_prompt.prefixed_block` puts in front of the keys and values of the tokens, plus a
0-dim loss tensor (zero unless training):

* :class:`L2P`: pool of N prompts with keys; the top-k keys by cosine similarity to q choose k prompts, both in
  training and evaluation; key loss Σ (1 - cos) over the chosen keys (see :func:`key_loss`).
* :class:`DualPrompt`: e-prompts with keys (one per task) and task-shared g-prompts; in training the task's
  own e-prompt and key are used (task-id bootstrap), in evaluation the top-1 key over the whole pool.
* :class:`CodaPrompt`: a weighted sum of prompt components, the weights being cosine similarities between
  the attended query q ⊙ A_k and the keys K_k; each task adds its own components, orthogonalised to the
  earlier ones by :func:`gram_schmidt`, and freezes the earlier ones.

Every random draw comes from the ``generator`` a caller passes (``None``: torch's default generator).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Prefix = tuple[torch.Tensor, torch.Tensor]

KEY_LOSSES = ("official", "per_image")
METHODS = ("l2p", "dualprompt", "coda-prompt")


# ---------------------------------------------------------------- tensor functions


def _float32(t: torch.Tensor) -> torch.autocast:
    """A context with autocast off on t's device (the key matching runs in float32, as the official code)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def cosine(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query q [B, D] with every key [K, D] -> [B, K] (both normalised over D,
    ``F.normalize``'s ε), as in GT-RIPL/CODA-Prompt models/zoo.py ``DualPrompt.forward``. Always float32
    with autocast off (the official code runs float32; under bf16 the near-equal similarities of the U(0, 1)
    keys would tie and change the top-k choice)."""
    with _float32(q):
        return F.normalize(q.float(), dim=1) @ F.normalize(keys.float(), dim=1).T


def key_loss(cos: torch.Tensor, idx: torch.Tensor, mode: str = "official") -> torch.Tensor:
    """The key-matching loss for the keys chosen by ``idx`` [B, k] from the similarities ``cos`` [B, K].

    ``"official"``: ``(1 - cos[:, idx]).sum()`` exactly as GT-RIPL/CODA-Prompt models/zoo.py writes it for L2P;
    advanced indexing makes that a [B, B, k] tensor, i.e. every image is pulled towards the keys chosen by
    every image of the batch: Σ_b Σ_b' Σ_j (1 - cos[b, idx[b', j]]).
    ``"per_image"``: each image against its own chosen keys only, Σ_b Σ_j (1 - cos[b, idx[b, j]]).
    """
    if idx.dim() != 2 or idx.shape[0] != cos.shape[0]:
        raise ValueError(f"idx must be [B, k] with B = {cos.shape[0]}, got {tuple(idx.shape)}")
    if mode == "official":
        return (1.0 - cos[:, idx]).sum()
    if mode == "per_image":
        return (1.0 - cos.gather(1, idx)).sum()
    raise ValueError(f"key_loss mode must be one of {KEY_LOSSES}, got {mode!r}")


def coda_weights(q: torch.Tensor, attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """CODA-Prompt's component weights w [B, K] (GT-RIPL/CODA-Prompt models/zoo.py ``CodaPrompt.forward``):
    a_bk = q_b ⊙ A_k (``einsum('bd,kd->bkd')``), w_bk = cos(a_bk, K_k), each normalised over d.

    Computed without the [B, K, D] tensor: w_bk = Σ_d q_bd A_kd K̂_kd / max(‖q_b ⊙ A_k‖, ε), with K̂ = K / max(‖K‖, ε)
    and ε = 1e-12 as in ``F.normalize``; the same function up to float rounding. Float32, autocast off.
    """
    eps = 1e-12
    with _float32(q):
        q, attention, keys = q.float(), attention.float(), keys.float()
        k_hat = F.normalize(keys, dim=1)
        numerator = q @ (attention * k_hat).T
        norm = (q.square() @ attention.square().T).clamp_min(eps * eps).sqrt()
        return numerator / norm


def coda_prompt(weights: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """The weighted sum of prompt components P_b = Σ_k w_bk p_k: weights [B, K], prompts [K, L, D] -> [B, L, D]
    (``einsum('bk,kld->bld')`` in GT-RIPL/CODA-Prompt models/zoo.py)."""
    k, length, dim = prompts.shape
    return (weights @ prompts.reshape(k, length * dim)).view(-1, length, dim)


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    """((t tᵀ - I)²).mean() for rows t [n, m] (GT-RIPL/CODA-Prompt models/zoo.py ``ortho_penalty``, which puts
    the identity on the GPU; here it lives on t's device). Float32, autocast off."""
    with _float32(t):
        t = t.float()
        eye = torch.eye(t.shape[0], device=t.device, dtype=t.dtype)
        return (t @ t.T - eye).square().mean()


def gram_schmidt(rows: torch.Tensor, start: int, stop: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """CODA-Prompt's re-initialisation of the components [start, stop) (GT-RIPL/CODA-Prompt models/zoo.py
    ``CodaPrompt.gram_schmidt``). Returns a new tensor of the shape of ``rows`` ([K, m], or [K, L, D], which is
    flattened to [K, L·D] first):

    * rows [0, start) are kept as they are;
    * for k = start, …, stop - 1 in turn: v_k ~ N(0, I) (one ``randn`` draw of m values per row, in that order)
      and u_k = v_k - Σ_{j<k} (v_k·u_j / u_j·u_j) u_j over every earlier row, old ones included (classical
      Gram–Schmidt: the projections are of v_k itself, so the result is orthogonal to the earlier rows when
      those are mutually orthogonal, as they are right after initialisation but not after training);
    * then each new row is divided by its norm;
    * every other row (>= stop) is zero.

    The official code redraws v_k when an earlier row has u_j·u_j < 1e-8, which can never succeed (the earlier
    rows do not change) and loops forever; this raises ``ValueError`` instead.
    """
    if not 0 <= start <= stop <= rows.shape[0]:
        raise ValueError(f"need 0 <= start <= stop <= {rows.shape[0]}, got start={start}, stop={stop}")
    flat = rows.detach().reshape(rows.shape[0], -1)
    out = torch.zeros_like(flat)
    out[:start] = flat[:start]
    sizes = out[:start].square().sum(1)
    if start > 0 and stop > start and bool((sizes < 1e-8).any()):
        raise ValueError("gram_schmidt: an earlier row has (near) zero norm; the official code would loop forever")
    device = generator.device if generator is not None else flat.device
    for k in range(start, stop):
        v = torch.randn(flat.shape[1], generator=generator, device=device, dtype=flat.dtype).to(flat.device)
        earlier = out[:k]
        coefficients = (earlier @ v) / earlier.square().sum(1)
        out[k] = v - coefficients @ earlier
    out[start:stop] = out[start:stop] / out[start:stop].norm(dim=1, keepdim=True)
    return out.view(rows.shape)


# ---------------------------------------------------------------- modules


def _uniform(shape: Sequence[int], generator: torch.Generator | None) -> nn.Parameter:
    """A parameter initialised with ``nn.init.uniform_`` (U(0, 1)), as ``tensor_prompt`` in
    GT-RIPL/CODA-Prompt models/zoo.py."""
    return nn.Parameter(nn.init.uniform_(torch.empty(*shape), 0.0, 1.0, generator=generator))


def _split(prompts: torch.Tensor) -> Prefix:
    """Split prompts [B, (k,) L, D] along the token axis into the first L/2 (keys) and the rest (values), each
    reshaped to [B, k·L/2, D] (prompt-major order, as the official ``reshape((B, -1, D))``)."""
    half = prompts.shape[-2] // 2
    b, d = prompts.shape[0], prompts.shape[-1]
    return prompts[..., :half, :].reshape(b, -1, d), prompts[..., half:, :].reshape(b, -1, d)


def _even(name: str, length: int) -> int:
    if length <= 0 or length % 2:
        raise ValueError(f"{name} must be a positive even number (half keys, half values), got {length}")
    return int(length)


def _block_list(layers: Iterable[int]) -> list[int]:
    out = sorted({int(l) for l in layers})
    if any(l < 0 for l in out):
        raise ValueError(f"layers must be block indices >= 0, got {list(layers)}")
    return out


class PromptPool(nn.Module):
    """Base class: per-layer parameters live in ``self.e`` (``nn.ModuleDict`` keyed by the block index; exported
    as ``layers.<l>.<name>``) and, for DualPrompt, ``self.g`` (exported as ``g.<l>.prompts``)."""

    layers: list[int]

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.e = nn.ModuleDict()
        self.g = nn.ModuleDict()

    def forward(self, query: torch.Tensor, layer: int, train: bool = False, task: int = 0
                ) -> tuple[Prefix | None, torch.Tensor]:
        """(Pk, Pv) [B, Lp, D] for block ``layer`` (None where it has no prompt) and the 0-dim prompt loss."""
        raise NotImplementedError

    def begin_task(self, task: int, generator: torch.Generator | None = None) -> None:
        """Prepare the parameters of task ``task`` (nothing, except for CODA-Prompt)."""

    def extra_tokens(self, layer: int) -> int:
        """How many prefix keys (= values) block ``layer`` gets."""
        raise NotImplementedError

    @staticmethod
    def _zero(query: torch.Tensor) -> torch.Tensor:
        return query.new_zeros(())

    # ---- state with flat names
    def state(self) -> dict[str, torch.Tensor]:
        """Every parameter, detached and cloned, as ``layers.<l>.prompts|keys|attention`` and ``g.<l>.prompts``."""
        out = {}
        for name, p in self.named_parameters():
            group, rest = name.split(".", 1)
            out[("layers." if group == "e" else "g.") + rest] = p.detach().clone()
        return out

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a :meth:`state` into the parameters (names and shapes must match exactly)."""
        own = {("layers." if n.startswith("e.") else "g.") + n.split(".", 1)[1]: p for n, p in self.named_parameters()}
        if set(own) != set(state):
            raise ValueError(f"prompt state names differ: missing {sorted(set(own) - set(state))}, "
                             f"unexpected {sorted(set(state) - set(own))}")
        with torch.no_grad():
            for name, p in own.items():
                if tuple(state[name].shape) != tuple(p.shape):
                    raise ValueError(f"{name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}")
                p.copy_(state[name])


class _Slot(nn.Module):
    """The parameters of one prompted block (``prompts``, and ``keys`` / ``attention`` where the method has them)."""

    def __init__(self, **params: nn.Parameter):
        super().__init__()
        for name, p in params.items():
            setattr(self, name, p)


class L2P(PromptPool):
    """L2P++ (GT-RIPL/CODA-Prompt models/zoo.py class ``L2P``: prefix tuning, ``prompt_param 30 20 -1``).

    Per prompted block: prompts [pool_size, length, D] and keys [pool_size, D], both U(0, 1). The top-k keys
    by cosine similarity with the detached query choose k prompts (training and evaluation alike); the first
    length/2 tokens of each are keys, the rest values, so the prefix is [B, top_k·length/2, D]. Training loss:
    :func:`key_loss` over the chosen keys (``"official"``: the [B, B, k] form, or ``"per_image"``).
    """

    def __init__(self, embed_dim: int, pool_size: int = 30, length: int = 20, layers: Sequence[int] = (0,),
                 top_k: int = 5, key_loss: str = "official", generator: torch.Generator | None = None):
        super().__init__(embed_dim)
        if key_loss not in KEY_LOSSES:
            raise ValueError(f"key_loss must be one of {KEY_LOSSES}, got {key_loss!r}")
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"need 1 <= top_k <= pool_size, got top_k={top_k}, pool_size={pool_size}")
        self.pool_size, self.length, self.top_k = int(pool_size), _even("length", length), int(top_k)
        self.key_loss = key_loss
        self.layers = _block_list(layers)
        for l in self.layers:  # official order of draws: per layer, prompts then keys
            prompts = _uniform((self.pool_size, self.length, self.embed_dim), generator)
            keys = _uniform((self.pool_size, self.embed_dim), generator)
            self.e[str(l)] = _Slot(prompts=prompts, keys=keys)

    def extra_tokens(self, layer: int) -> int:
        return self.top_k * self.length // 2 if layer in self.layers else 0

    def forward(self, query, layer, train=False, task=0):
        if layer not in self.layers:
            return None, self._zero(query)
        slot = self.e[str(layer)]
        cos = cosine(query.detach(), slot.keys)
        idx = cos.topk(self.top_k, dim=1).indices
        prefix = _split(slot.prompts[idx])
        loss = key_loss(cos, idx, self.key_loss) if train else self._zero(query)
        return prefix, loss


class DualPrompt(PromptPool):
    """DualPrompt (GT-RIPL/CODA-Prompt models/zoo.py class ``DualPrompt``, ``prompt_param 10 20 6``).

    e-prompts [pool_size, length, D] with keys [pool_size, D] at ``layers``; g-prompts [g_length, D] at
    ``g_layers``; all U(0, 1). Training uses the task id: prompt p[task] for every image and the loss
    Σ_b (1 - cos(q_b, K[task])); evaluation: the top-1 key over the whole pool. Where a block has both,
    Pk = cat(Ek, Gk) and Pv = cat(Ev, Gv).
    """

    def __init__(self, embed_dim: int, pool_size: int = 10, length: int = 20, layers: Sequence[int] = (2, 3, 4),
                 g_length: int = 6, g_layers: Sequence[int] = (0, 1), generator: torch.Generator | None = None):
        super().__init__(embed_dim)
        self.pool_size, self.length = int(pool_size), _even("length", length)
        self.e_layers, self.g_layers = _block_list(layers), _block_list(g_layers)
        self.g_length = _even("g_length", g_length) if self.g_layers else int(g_length)
        self.layers = sorted(set(self.e_layers) | set(self.g_layers))
        for l in self.g_layers:  # official order of draws: all g-prompts, then per e-layer prompts and keys
            self.g[str(l)] = _Slot(prompts=_uniform((self.g_length, self.embed_dim), generator))
        for l in self.e_layers:
            prompts = _uniform((self.pool_size, self.length, self.embed_dim), generator)
            keys = _uniform((self.pool_size, self.embed_dim), generator)
            self.e[str(l)] = _Slot(prompts=prompts, keys=keys)

    def extra_tokens(self, layer: int) -> int:
        return (self.length // 2 if layer in self.e_layers else 0) + (self.g_length // 2 if layer in self.g_layers else 0)

    def forward(self, query, layer, train=False, task=0):
        loss = self._zero(query)
        parts: list[Prefix] = []
        if layer in self.e_layers:
            slot = self.e[str(layer)]
            cos = cosine(query.detach(), slot.keys)
            b = query.shape[0]
            if train:
                if not 0 <= task < self.pool_size:
                    raise ValueError(f"task {task} outside the e-prompt pool of {self.pool_size}")
                idx = torch.full((b, 1), task, dtype=torch.long, device=cos.device)
                loss = key_loss(cos, idx, "per_image")  # = (1 - cos[:, task]).sum()
                parts.append(_split(slot.prompts[task].expand(b, -1, -1)))
            else:
                parts.append(_split(slot.prompts[cos.topk(1, dim=1).indices]))
        if layer in self.g_layers:
            g = self.g[str(layer)].prompts
            parts.append(_split(g.expand(query.shape[0], -1, -1)))
        if not parts:
            return None, loss
        return (torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)), loss


class CodaPrompt(PromptPool):
    """CODA-Prompt (GT-RIPL/CODA-Prompt models/zoo.py class ``CodaPrompt``, ``prompt_param 100 8 0.0``).

    Per prompted block: components p [pool_size, length, D], keys K and attention A [pool_size, D]. Task t owns
    rows [s, f) = [t·pt, (t+1)·pt), pt = pool_size // num_tasks. Training uses rows [0, f) with [0, s) detached;
    evaluation rows [0, f). Prefix: P = Σ_k w_k p_k with w = :func:`coda_weights`, Ek = P[:, :L/2], Ev = P[:, L/2:].
    Loss when training and ortho_mu > 0: ortho_mu · (pen(K) + pen(A) + pen(p flattened)) over those rows.

    Construction draws U(0, 1) values for p, K, A of every layer (as the official ``tensor_prompt``), then
    applies :func:`gram_schmidt` for task 0 to p, K, A of every layer; :meth:`begin_task` for t >= 1 applies it
    for task t to K, A, p (the official ``process_task_count`` order); ``begin_task(0)`` does nothing.
    """

    def __init__(self, embed_dim: int, num_tasks: int, pool_size: int = 100, length: int = 8,
                 layers: Sequence[int] = (0, 1, 2, 3, 4), ortho_mu: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__(embed_dim)
        if num_tasks < 1 or pool_size // num_tasks < 1:
            raise ValueError(f"need at least one component per task: pool_size={pool_size}, num_tasks={num_tasks}")
        self.num_tasks, self.pool_size, self.length = int(num_tasks), int(pool_size), _even("length", length)
        self.per_task = self.pool_size // self.num_tasks
        self.ortho_mu = float(ortho_mu)
        self.layers = _block_list(layers)
        for l in self.layers:
            prompts = _uniform((self.pool_size, self.length, self.embed_dim), generator)
            keys = _uniform((self.pool_size, self.embed_dim), generator)
            attention = _uniform((self.pool_size, self.embed_dim), generator)
            self.e[str(l)] = _Slot(prompts=prompts, keys=keys, attention=attention)
            self._reinit(self.e[str(l)], 0, ("prompts", "keys", "attention"), generator)

    def rows(self, task: int) -> tuple[int, int]:
        """[s, f): the components of task ``task``."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} outside 0..{self.num_tasks - 1}")
        return task * self.per_task, (task + 1) * self.per_task

    def _reinit(self, slot: _Slot, task: int, names: Sequence[str], generator: torch.Generator | None) -> None:
        s, f = self.rows(task)
        with torch.no_grad():
            for name in names:
                p = getattr(slot, name)
                p.copy_(gram_schmidt(p, s, f, generator))

    def begin_task(self, task: int, generator: torch.Generator | None = None) -> None:
        """Gram–Schmidt re-initialisation of task ``task``'s components of K, A and p in every layer (t >= 1)."""
        self.rows(task)
        if task == 0:
            return
        for l in self.layers:
            self._reinit(self.e[str(l)], task, ("keys", "attention", "prompts"), generator)

    def extra_tokens(self, layer: int) -> int:
        return self.length // 2 if layer in self.layers else 0

    def forward(self, query, layer, train=False, task=0):
        if layer not in self.layers:
            return None, self._zero(query)
        slot = self.e[str(layer)]
        s, f = self.rows(task)
        if train:
            keys, attention, prompts = (torch.cat([t[:s].detach(), t[s:f]]) for t in (slot.keys, slot.attention, slot.prompts))
        else:
            keys, attention, prompts = slot.keys[:f], slot.attention[:f], slot.prompts[:f]
        combined = coda_prompt(coda_weights(query, attention, keys), prompts)
        half = self.length // 2
        loss = self._zero(query)
        if train and self.ortho_mu > 0:
            loss = self.ortho_mu * (ortho_penalty(keys) + ortho_penalty(attention)
                                    + ortho_penalty(prompts.reshape(prompts.shape[0], -1)))
        return (combined[:, :half], combined[:, half:]), loss


def build_pool(method: str, settings: dict, embed_dim: int, num_tasks: int,
               generator: torch.Generator | None = None) -> PromptPool:
    """The pool of ``method`` ("l2p", "dualprompt", "coda-prompt") from ``settings`` (pool_size, length, layers,
    top_k, key_loss, g_length, g_layers, ortho_mu; each method reads its own keys, missing ones take the
    official defaults, other keys are ignored)."""
    def pick(*names: str) -> dict:
        out = {n: settings[n] for n in names if n in settings and settings[n] is not None}
        for n in ("layers", "g_layers"):
            if n in out:
                out[n] = tuple(out[n])
        return out

    if method == "l2p":
        return L2P(embed_dim, generator=generator, **pick("pool_size", "length", "layers", "top_k", "key_loss"))
    if method == "dualprompt":
        return DualPrompt(embed_dim, generator=generator, **pick("pool_size", "length", "layers", "g_length", "g_layers"))
    if method == "coda-prompt":
        return CodaPrompt(embed_dim, num_tasks, generator=generator, **pick("pool_size", "length", "layers", "ortho_mu"))
    raise ValueError(f"unknown prompt method {method!r}; expected one of {METHODS}")
