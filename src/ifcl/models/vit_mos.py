"""MOS's model (``sun-hailong/AAAI25-MOS``): a frozen timm ViT with an AdaptFormer adapter beside the MLP of every
block, one adapter set per task merged toward the earlier ones, a linear head over every seen class aligned on
class Gaussians after each task, prototype logits of the first adapter and the self-refined adapter retrieval at
inference. The rules are :mod:`ifcl.methods.mos` (which also lists every official detail followed); this module is
the task-state interface of ifcl's state chain (:mod:`ifcl.steps.state`).

Per task t: :meth:`ViTMOS.begin_task` (the adapter to train: the official initialisation for t = 0, afterwards
where the previous task left it; the head grown by the task's classes), the training of
:meth:`ViTMOS.trainable_parameters` on :meth:`ViTMOS.forward_current` (logits of the task's classes and the
weighted orthogonality loss) with :meth:`ViTMOS.end_step` after each step (the adapter merge), then
:meth:`ViTMOS.finish_task` on the task's training images under the test transform (class statistics, for t ≥ 1 the
classifier alignment, the prototypes). Task t's file holds its trained adapter, the head after task t (every seen
row: the alignment moves the old rows), its classes' prototypes, means and covariances, and the number of pulls of
its statistics pass.

Classifier: the official head is one ``nn.Linear`` over every class of the dataset trained as a whole (old rows get
zero gradient and the weight decay, at the head's learning rate); here it is one ``nn.Linear`` over the classes
seen so far, grown at each :meth:`ViTMOS.begin_task`, and it is the model's only entry of ``heads``, so that the
state chain gives all of it the head's learning rate as the official optimiser does. The rows of classes not yet
seen are not kept: in the official run they decay by the weight decay until their task starts.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.classifier_alignment import align_heads, class_statistics
from ..methods.mos import (ADAPTER_DROPOUT, ADAPTER_KEYS, ADAPTER_SCALE, BOTTLENECK, HEAD_INIT_STD, MERGES, MOMENTUM,
                           ORTHO_WEIGHT, REFINE_STEPS, Adapter, adapter_mean, adapter_term, cosine_logits, drifted,
                           ensemble_scores, functional_adapter, init_adapter, merged, next_start,
                           official_inference_adapter, orthogonality_loss, self_refined_logits, statistics_pulls,
                           straight_through)
from ..progress import track
from ..runtime import full_precision

ALIGNMENT = {"epochs": 30, "lr": 0.005, "momentum": 0.9}  # crct_epochs, ca_lr; weight decay and samples: per config


def cls_attention(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """timm ``Attention.forward(h)`` for the first (CLS) query only: [B, 1, D] (keys and values of every token)."""
    b, n, _ = h.shape
    q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q[:, :, :1]), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(b, 1, -1))))


def adapted_block(block: nn.Module, x: torch.Tensor, adapter: tuple, scale: float, dropout: float = 0.0,
                  cls_only: bool = False) -> torch.Tensor:
    """A timm ``Block`` with MOS's parallel adapter (``vit_mos.Block.forward``): y = x + attn(norm1(x)), then
    y + (mlp(norm2(y)) + adapter(y)); ``cls_only``: the output of the CLS token alone, [B, 1, D]."""
    attention = cls_attention(block.attn, block.norm1(x)) if cls_only else block.attn(block.norm1(x))
    y = (x[:, :1] if cls_only else x) + block.drop_path1(block.ls1(attention))
    mlp = block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
    return y + (mlp + adapter_term(y, *adapter, scale=scale, dropout=dropout))


class ViTMOS(nn.Module):
    """Frozen timm ViT (CLS pooling) + MOS: a trained adapter set per task, a growing linear head, prototypes and
    class Gaussians. ``merge``: ``official`` (the in-place pulls of the official code) or ``functional``
    (:mod:`ifcl.methods.mos`); ``statistics_batch_size``: the official ``3 × batch_size`` of the statistics loaders
    (it fixes how far the adapter drifts in that pass); ``alignment``: epochs, lr, momentum, weight_decay,
    samples_per_class of the classifier alignment."""

    def __init__(self, vit: nn.Module, bottleneck: int = BOTTLENECK, scale: float = ADAPTER_SCALE,
                 dropout: float = ADAPTER_DROPOUT, momentum: float = MOMENTUM, merge: str = "official",
                 ortho_weight: float = ORTHO_WEIGHT, statistics_batch_size: int = 48, prototype_dropout: bool = True,
                 refine_steps: int = REFINE_STEPS, ensemble: bool = True, alignment: dict | None = None):
        super().__init__()
        if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError("ViTMOS expects a timm ViT pooled by its CLS token (global_pool='token')")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if not 0 <= momentum <= 1 or bottleneck < 1 or statistics_batch_size < 1 or refine_steps < 1:
            raise ValueError("momentum in [0, 1]; bottleneck, statistics_batch_size and refine_steps positive")
        self.vit = vit.requires_grad_(False)
        self.depth, self.embed_dim = len(vit.blocks), vit.embed_dim
        self.bottleneck, self.scale, self.dropout, self.momentum, self.merge = bottleneck, scale, dropout, momentum, merge
        self.ortho_weight, self.statistics_batch_size = ortho_weight, statistics_batch_size
        self.prototype_dropout, self.refine_steps, self.ensemble = prototype_dropout, refine_steps, ensemble
        self.alignment = {**ALIGNMENT, "weight_decay": 0.0, "samples_per_class": 80, **(alignment or {})}
        device = vit.cls_token.device
        self.current = nn.ParameterDict()  # the adapter being trained, [depth, ...] per key
        self.stored = nn.ModuleList()  # the trained adapter of each finished task (buffers)
        self.heads = nn.ModuleList()  # one Linear over every seen class (see the module docstring)
        d = self.embed_dim
        self.register_buffer("prototypes", torch.zeros(0, d, device=device))
        self.register_buffer("means", torch.zeros(0, d, device=device))
        self.register_buffer("covs", torch.zeros(0, d, d, device=device))
        self.task_sizes: list[int] = []
        self.statistics_pulls: list[int] = []
        self.in_task = False
        self._alignment_seed = 0

    # ---- bookkeeping ----
    def _device(self) -> torch.device:
        return self.vit.cls_token.device

    @property
    def num_tasks(self) -> int:
        """Finished tasks."""
        return len(self.stored)

    @property
    def classifier(self) -> nn.Linear:
        return self.heads[0]

    def adapters(self) -> list[Adapter]:
        """The trained adapter of every finished task."""
        return [{k: getattr(s, k) for k in ADAPTER_KEYS} for s in self.stored]

    def _store(self, adapter: Adapter) -> None:
        s = nn.Module()
        for k in ADAPTER_KEYS:
            s.register_buffer(k, adapter[k].detach().clone().float().to(self._device()))
        self.stored.append(s)

    def class_task(self) -> torch.Tensor:
        """The task of every seen class."""
        return torch.repeat_interleave(torch.arange(len(self.task_sizes)), torch.tensor(self.task_sizes))

    def _grow_head(self, num_classes: int, generator: torch.Generator) -> None:
        """Append the task's rows: weight ~ N(0, 0.02²) truncated at ±2 (timm's head init), bias 0."""
        old = self.heads[0] if len(self.heads) else None
        known = old.out_features if old is not None else 0
        head = nn.Linear(self.embed_dim, known + num_classes).to(self._device())
        new = torch.empty(num_classes, self.embed_dim)
        nn.init.trunc_normal_(new, std=HEAD_INIT_STD, a=-2.0, b=2.0, generator=generator)
        with torch.no_grad():
            head.weight.copy_(torch.cat([old.weight.detach().cpu(), new]) if old is not None else new)
            head.bias.copy_(torch.cat([old.bias.detach().cpu(), torch.zeros(num_classes)]) if old is not None
                            else torch.zeros(num_classes))
        if old is None:
            self.heads.append(head)
        else:
            self.heads[0] = head

    # ---- the task's training ----
    def begin_task(self, num_classes: int, task: int, generator: torch.Generator) -> None:
        """Start task t: the adapter to train (t = 0: :func:`ifcl.methods.mos.init_adapter`; later: where the
        previous task left it, :func:`ifcl.methods.mos.next_start`), the head grown by ``num_classes`` rows, and a
        seed for the alignment's sampling. Draws, from ``generator`` on the CPU, the adapter (task 0), the head's
        new rows and the seed."""
        if self.in_task:
            raise RuntimeError("finish_task() the current task before beginning another")
        if task != self.num_tasks:
            raise ValueError(f"task {task} needs the states of tasks 0..{task - 1}; the model holds {self.num_tasks}")
        if task == 0:
            start = init_adapter(self.depth, self.embed_dim, self.bottleneck, generator)
        else:
            start = next_start(self.adapters(), self.statistics_pulls[-1], self.momentum, self.merge)
        self.current = nn.ParameterDict({k: nn.Parameter(v.detach().clone().float().to(self._device()))
                                         for k, v in start.items()})
        self._grow_head(num_classes, generator)
        self._alignment_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        self.task_sizes.append(num_classes)
        self.in_task = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The current adapter of every block and the whole head (the official optimiser's two groups)."""
        return list(self.current.values()) + list(self.classifier.parameters())

    def set_trainable(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    def _merge_target(self) -> Adapter | None:
        """μ_t, the mean of the finished tasks' adapters, or None when nothing is merged (task 0, m = 0)."""
        if not self.in_task or self.num_tasks == 0 or self.momentum == 0:
            return None
        return adapter_mean(self.adapters())

    def forward_current(self, x: torch.Tensor, task: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The official training forward: logits of the current task's classes and ``ortho_weight`` ×
        :func:`ifcl.methods.mos.orthogonality_loss` of the features against the earlier classes' means. Adapter
        dropout is on (the official ``train()`` mode). ``official`` merge from task 1 on: block i runs with the
        adapter pulled i + 1 times toward μ_t (straight-through gradient) and the adapter is left pulled ``depth``
        times, as ``forward_features(train=True)`` leaves it; ``functional``: every block with (1 − m) w + m μ_t."""
        w, mean = dict(self.current), self._merge_target()
        if mean is None:
            adapter = w
        elif self.merge == "official":
            value = drifted({k: v.detach() for k, v in w.items()}, mean, self.momentum)
            adapter = {k: straight_through(value[k], w[k]) for k in ADAPTER_KEYS}
        else:
            adapter = {k: merged(w[k], mean[k], self.momentum) for k in ADAPTER_KEYS}
        f = self.features(x, adapter, self.dropout)
        logits = self.classifier(f)[:, self.classifier.out_features - self.task_sizes[-1]:]
        with full_precision():
            extra = self.ortho_weight * orthogonality_loss(f, self.means)
        if mean is not None and self.merge == "official":
            with torch.no_grad():
                for k in ADAPTER_KEYS:
                    w[k].copy_(merged(w[k], mean[k], self.momentum, self.depth))
        return logits, extra

    @torch.no_grad()
    def end_step(self) -> None:
        """``adapter_merge`` after each optimiser step: one pull of the current adapter toward μ_t (task ≥ 1)."""
        mean = self._merge_target()
        if mean is not None:
            for k in ADAPTER_KEYS:
                self.current[k].copy_(merged(self.current[k], mean[k], self.momentum))

    # ---- features ----
    def features(self, x: torch.Tensor, adapter: Adapter, dropout: float = 0.0) -> torch.Tensor:
        """The CLS token after the final norm with ``adapter`` ([depth, ...] per key) in every block; the last block
        runs for the CLS token alone. ``dropout``: the adapter's dropout, applied."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for i, block in enumerate(vit.blocks):
            a = tuple(adapter[k][i] for k in ADAPTER_KEYS)
            x = adapted_block(block, x, a, self.scale, dropout, cls_only=i == self.depth - 1)
        return vit.forward_head(vit.norm(x), pre_logits=True)

    def inference_adapter(self, t: int) -> Adapter:
        """The adapter of task t at inference (t = 0: also for the prototypes): ``official``: w_0, or for t ≥ 1 the
        mean of the trained adapters 0..t-1 (the limit of the official drift); ``functional``: (1 − m) w_t + m μ_t."""
        rule = official_inference_adapter if self.merge == "official" else functional_adapter
        return rule(self.adapters(), t, self.momentum)

    # ---- after the task's training ----
    @torch.no_grad()
    def _statistics_features(self, batches, labels: torch.Tensor, w: Adapter, t: int) -> tuple[torch.Tensor, int]:
        """The features of the official ``_compute_mean`` (task t ≥ 1) and the pulls it leaves on the adapter."""
        adapters = self.adapters()
        if self.merge == "functional" or self.momentum == 0:
            adapter = self.inference_adapter(t)
            return torch.cat([self.features(x, adapter).float() for x, _ in track(batches, "statistics")]), 0
        mean = adapter_mean(adapters[:t])
        pulls, total = statistics_pulls(labels, self.statistics_batch_size, self.depth)
        # beyond this many pulls every block's share of w − μ is below 1e-12: the same adapter, μ to float precision
        cap = math.ceil(math.log(1e-12) / math.log(1.0 - self.momentum)) if self.momentum < 1 else 0
        pulls = pulls.clamp(max=cap)
        out, offset = [], 0
        for x, _ in track(batches, "statistics"):
            n = pulls[offset: offset + len(x)]
            f = torch.empty(len(x), self.embed_dim, device=x.device)
            for start in n.unique().tolist():
                rows = (n == start).nonzero().flatten().to(x.device)
                f[rows] = self.features(x[rows], drifted(w, mean, self.momentum, start)).float()
            out.append(f)
            offset += len(x)
        return torch.cat(out), total

    @torch.no_grad()
    def finish_task(self, batches, known: int, train_batches=None) -> list[dict]:
        """After task t's training, on its training images under the test transform (``batches``, manifest order):
        store the trained adapter; the Gaussians of the task's classes (:func:`ifcl.methods.classifier_alignment
        .class_statistics`) from the official statistics features (:meth:`_statistics_features`; for t = 0 those
        of the first pass); for t ≥ 1 the classifier alignment of the whole head
        (:func:`ifcl.methods.classifier_alignment.align_heads`, no mean shrink, no logit normalisation, run on the
        CPU); the prototypes: mean adapter-0 features (with the adapter dropout for t ≥ 1 if
        ``prototype_dropout``). Returns a statistics row and one row per alignment epoch."""
        if not self.in_task:
            raise RuntimeError("finish_task() without begin_task()")
        t = self.num_tasks
        w = {k: v.detach().clone() for k, v in self.current.items()}
        self._store(w)
        self.current = nn.ParameterDict()
        self.in_task = False
        first = self.inference_adapter(0)
        dropout = self.dropout if self.prototype_dropout and t > 0 else 0.0
        labels, first_features = [], []
        for x, y in track(batches, "prototypes"):
            labels.append(y.cpu())
            first_features.append(self.features(x, first, dropout).float())
        labels, first_features = torch.cat(labels), torch.cat(first_features)
        classes = labels.unique(sorted=True).tolist()
        if classes != list(range(known, known + self.task_sizes[-1])):
            raise ValueError(f"task {t}: expected the labels {known}..{known + self.task_sizes[-1] - 1}, got {classes}")
        pulls = 0
        if t == 0:
            features = first_features
        else:
            features, pulls = self._statistics_features(batches, labels, w, t)
        self.statistics_pulls.append(pulls)
        means, covs, prototypes = [], [], []
        for c in classes:
            rows = (labels == c).nonzero().flatten().to(features.device)
            mean, cov = class_statistics(features[rows].cpu())
            means.append(mean.float())
            covs.append(cov)
            prototypes.append(first_features[rows].mean(0).cpu())
        device = self._device()
        self.means = torch.cat([self.means, torch.stack(means).to(device)])
        self.covs = torch.cat([self.covs, torch.stack(covs).to(device)])
        self.prototypes = torch.cat([self.prototypes, torch.stack(prototypes).to(device)])
        rows = [{"stage": "statistics", "epoch": 0, "images": len(labels), "statistics_pulls": pulls}]
        if t > 0:
            rows += self.align(torch.Generator().manual_seed(self._alignment_seed))
        return rows

    def align(self, generator: torch.Generator) -> list[dict]:
        """``classifer_align`` (:func:`ifcl.methods.classifier_alignment.align_heads` on a CPU copy of the head,
        every seen class's mean used as it is, plain cross-entropy); rows tagged ``stage: alignment``."""
        cfg = {**self.alignment, "logit_norm": None}
        head = copy.deepcopy(self.classifier).cpu().float()
        class_tasks = [len(self.task_sizes) - 1] * len(self.means)  # all "current": mean scale 1
        with torch.enable_grad(), full_precision():
            rows = align_heads(nn.ModuleList([head]), self.means.cpu(), self.covs.cpu(), class_tasks, cfg, generator)
        with torch.no_grad():
            self.classifier.weight.copy_(head.weight)
            self.classifier.bias.copy_(head.bias)
        return [{"stage": "alignment", **row} for row in rows]

    # ---- inference ----
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The official prediction scores over every seen class: the prototype logits of the adapter-0 features
        choose a task, the self-refined retrieval (:func:`ifcl.methods.mos.self_refined_logits`) gives the head's
        logits, and with ``ensemble`` :func:`ifcl.methods.mos.ensemble_scores`. Features are computed only for the
        adapters the retrieval visits (the official code computes every task's for every image: the same
        scores)."""
        tasks = len(self.task_sizes)
        first = self.features(x, self.inference_adapter(0))
        prototype_logits = cosine_logits(first, self.prototypes)
        class_task = self.class_task().to(x.device)
        cache = {0: (first, torch.ones(len(x), dtype=torch.bool, device=x.device))}

        def logits_of(rows: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
            out = None
            for a in task.unique().tolist():
                if a not in cache:
                    cache[a] = (first.new_zeros(first.shape), torch.zeros(len(x), dtype=torch.bool, device=x.device))
                feats, have = cache[a]
                want = rows[task == a]
                missing = want[~have[want]]
                if len(missing):
                    feats[missing] = self.features(x[missing], self.inference_adapter(a)).to(feats.dtype)
                    have[missing] = True
                logits = self.classifier(feats[want])
                if out is None:
                    out = logits.new_zeros(len(rows), logits.shape[1])
                out[task == a] = logits
            return out

        final = self_refined_logits(class_task[prototype_logits.argmax(1)], logits_of, class_task, self.refine_steps)
        return ensemble_scores(final, prototype_logits, tasks) if self.ensemble else final

    # ---- per-task state ----
    def task_state(self) -> dict[str, torch.Tensor]:
        """The last finished task's trained adapter (``adapter.<key>``, [depth, ...]), the head after it
        (``head.weight``, ``head.bias``: every seen class), its classes' ``prototypes``, ``means`` and ``covs``, and
        ``statistics_pulls`` (the pulls its statistics pass left on the adapter)."""
        if self.in_task or not self.num_tasks:
            raise RuntimeError("task_state() is the state of a finished task: call finish_task() first")
        n = self.task_sizes[-1]
        state = {f"adapter.{k}": v.detach().clone() for k, v in self.adapters()[-1].items()}
        state.update({"head.weight": self.classifier.weight.detach().clone(),
                      "head.bias": self.classifier.bias.detach().clone(),
                      "prototypes": self.prototypes[-n:].clone(), "means": self.means[-n:].clone(),
                      "covs": self.covs[-n:].clone(),
                      "statistics_pulls": torch.tensor([self.statistics_pulls[-1]], dtype=torch.int64)})
        return state

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Append the finished task ``num_tasks`` from its :meth:`task_state`."""
        if self.in_task:
            raise RuntimeError("finish_task() the current task before loading another")
        n = state["prototypes"].shape[0]
        total = sum(self.task_sizes) + n
        if state["head.weight"].shape != (total, self.embed_dim):
            raise ValueError(f"task {self.num_tasks}: the head must have {total} rows, got "
                             f"{tuple(state['head.weight'].shape)}")
        expected = {f"adapter.{k}" for k in ADAPTER_KEYS} | {"head.weight", "head.bias", "prototypes", "means", "covs",
                                                              "statistics_pulls"}
        if set(state) != expected:
            raise ValueError(f"a MOS task state has {sorted(expected)}, got {sorted(state)}")
        device = self._device()
        self._store({k: state[f"adapter.{k}"] for k in ADAPTER_KEYS})
        head = nn.Linear(self.embed_dim, total).to(device)
        with torch.no_grad():
            head.weight.copy_(state["head.weight"])
            head.bias.copy_(state["head.bias"])
        if len(self.heads):
            self.heads[0] = head
        else:
            self.heads.append(head)
        self.prototypes = torch.cat([self.prototypes, state["prototypes"].float().to(device)])
        self.means = torch.cat([self.means, state["means"].float().to(device)])
        self.covs = torch.cat([self.covs, state["covs"].float().to(device)])
        self.task_sizes.append(n)
        self.statistics_pulls.append(int(state["statistics_pulls"][0]))


def build(settings: dict, vit: nn.Module, seed: int) -> ViTMOS:
    """The model of a MOS experiment before task 0 (the state chain's factory, :mod:`ifcl.catalog.mos`):
    ``settings['mos']``; nothing is drawn before task 0 (``seed`` unused)."""
    s = settings["mos"]
    return ViTMOS(vit, bottleneck=s["bottleneck"], scale=s["adapter_scale"], dropout=s["adapter_dropout"],
                  momentum=s["adapter_momentum"], merge=s["merge"], ortho_weight=s["ortho_weight"],
                  statistics_batch_size=s["statistics_batch_size"], prototype_dropout=s["prototype_dropout"],
                  refine_steps=s["refine_steps"], ensemble=s["ensemble"], alignment=s["alignment"])
