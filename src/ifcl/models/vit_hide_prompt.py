"""HiDe-Prompt's model (``thu-ml/HiDe-Prompt``): a frozen timm ViT with one prefix prompt per task, a task-identity
(TII) MLP and head on the prompt-free CLS feature, and one linear head per task on the prompted CLS feature.
Math: :mod:`ifcl.methods.hide_prompt` (which also lists the paper-vs-code differences).

In the state chain (:mod:`ifcl.steps.state`), per task t:

* :meth:`HiDePromptViT.begin_task`: prompt t (task 0: U(-1, 1), ``EPrompt``'s init; later a copy of prompt t - 1,
  the official ``shared_prompt_pool``), a new head and a new TII head (timm's N(0, 0.02²) init, bias 0);
* the chain's optimiser pass trains prompt t and head t on :meth:`HiDePromptViT.forward_current`: the head's
  logits (the official loss masks every other class: the same cross-entropy) and, as extra loss, ``contrastive``
  times the contrastive regularisation against the prototypes of the earlier classes;
* :meth:`HiDePromptViT.finish_task`: prompt t becomes its momentum mixture, the TII MLP and head t are trained on the
  task's augmented images (the official first program), the per-class multi-centroid statistics of the
  prompt-free and of the prompted features are computed, and (t >= 1) the TII model and the heads are aligned on
  features sampled from them.

Task t's file holds prompt t, every head and TII head as they are after task t (the alignment moves the old ones),
the TII MLP after task t and the statistics of task t's classes. Prediction (:meth:`HiDePromptViT.forward`): the
TII arg-max over the seen classes picks each image's task, whose prompt gives the feature the heads classify.

The blocks with a prompt use :func:`ifcl.models.vit_prompt.prefixed_block` (prefix keys and values after the qkv
projection, the official ``PreT_Attention``); prompt t is [layers, 2, length, D], the official
[layers, 2, length, heads, head_dim] with each token's heads side by side.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init

from ..methods.hide_prompt import (align, batches_of, centroid_statistics, momentum_prompt, parted_contrastive_loss,
                                   prefix_sides, sample_centroids, split_parts, trunc_normal_linear)
from ..runtime import full_precision
from .vit_lora import cls_features, cls_through_block
from .vit_prompt import prefixed_block

TII_IMAGES = ("train_transform", "test_transform")


class TIIMlp(nn.Module):
    """The TII model's ``MlpMapping`` with ``mlp_structure [2]``: LayerNorm(x + fc2(GELU(fc1(x)))), fc1 D -> ratio·D,
    LayerNorm with PyTorch's default ε (1e-5)."""

    def __init__(self, dim: int, ratio: int = 2):
        super().__init__()
        self.fc1 = skip_init(nn.Linear, dim, dim * ratio)
        self.fc2 = skip_init(nn.Linear, dim * ratio, dim)
        self.norm = nn.LayerNorm(dim)

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None) -> None:
        """timm's ``init_weights_vit_timm``: weights N(0, 0.02²) truncated at ±2, biases 0, LayerNorm 1 and 0; draws
        fc1 then fc2."""
        for layer in (self.fc1, self.fc2):
            nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0, generator=generator)
            layer.bias.zero_()
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class _Statistics(nn.Module):
    """One task's class statistics: per class k centroids' means and variances (float64 [classes, k, D]) of the
    prompt-free (``tii_*``) and of the prompted (``wtp_*``) features."""

    NAMES = ("tii_means", "tii_vars", "wtp_means", "wtp_vars")

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for name in self.NAMES:
            self.register_buffer(name, tensors[name].double())


class HiDePromptViT(nn.Module):
    """Frozen timm ViT (CLS pooling) + per-task prefix prompts + per-task heads + the TII MLP and heads.

    ``prompt``: length, layers, momentum, contrastive, temperature, layout, devices, device_batch; ``tii``: ratio,
    epochs, lr, clip_grad, images; ``tii_alignment``, ``alignment``: epochs, lr, samples, momentum, weight_decay;
    ``centroids``: k of the class statistics (keys as :mod:`ifcl.catalog.hide_prompt` declares them)."""

    def __init__(self, vit: nn.Module, prompt: dict, tii: dict, tii_alignment: dict, alignment: dict,
                 centroids: int = 10):
        super().__init__()
        if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError("HiDePromptViT expects a timm ViT pooled by its CLS token (global_pool='token')")
        self.vit = vit.requires_grad_(False)
        self.layers = sorted({int(l) for l in prompt["layers"]})
        if not self.layers or self.layers[0] < 0 or self.layers[-1] >= len(vit.blocks):
            raise ValueError(f"prompt layers {prompt['layers']} must be block indices below {len(vit.blocks)}")
        if tii["images"] not in TII_IMAGES:
            raise ValueError(f"tii images must be one of {TII_IMAGES}, got {tii['images']!r}")
        self.cfg = {"prompt": dict(prompt), "tii": dict(tii), "tii_alignment": dict(tii_alignment),
                    "alignment": dict(alignment)}
        self.length = int(prompt["length"])
        self.centroids = int(centroids)
        self.embed_dim = vit.embed_dim
        self.prompts = nn.ParameterList()
        self.heads = nn.ModuleList()
        self.tii_heads = nn.ModuleList()
        self.tii_mlp = TIIMlp(self.embed_dim, int(tii["ratio"])).requires_grad_(False)
        self.stats = nn.ModuleList()
        self._seed: int | None = None  # the current task's draws in finish_task
        self._pending = False  # the current task's prompt is not yet its momentum mixture

    # ---- helpers
    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def _device(self) -> torch.device:
        return self.vit.cls_token.device

    def _layout(self) -> str:
        return self.cfg["prompt"]["layout"]

    def current_prompt(self) -> torch.Tensor:
        """The newest prompt as the task uses it: (1 - m) P_t + m mean(P_<t) until :meth:`finish_task` stores that."""
        if not self._pending:
            return self.prompts[-1]
        earlier = torch.stack(list(self.prompts[:-1])) if len(self.prompts) > 1 else None
        return momentum_prompt(self.prompts[-1], earlier, self.cfg["prompt"]["momentum"])

    def _bank(self) -> torch.Tensor:
        """Every task's prompt [tasks, layers, 2, length, D] (the newest as :meth:`current_prompt`)."""
        return torch.stack([*self.prompts[:-1], self.current_prompt()])

    def prompted_features(self, x: torch.Tensor, bank: torch.Tensor, tasks: torch.Tensor,
                          sizes: Sequence[int]) -> torch.Tensor:
        """CLS feature after the final norm of the prompted pass [B, D]: image b's prefix at the l-th prompted
        block is task ``tasks[b]``'s prompt, its keys and values the halves :func:`prefix_sides` gives for the
        per-GPU batches of ``sizes`` images."""
        key, value = prefix_sides(sizes, self._layout(), device=x.device)
        tasks = tasks.to(x.device)
        pk, pv = bank[tasks, :, key], bank[tasks, :, value]  # [B, layers, length, D]
        vit = self.vit
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        where = {block: i for i, block in enumerate(self.layers)}
        last = len(vit.blocks) - 1
        for i, block in enumerate(vit.blocks):
            if i in where:
                h = prefixed_block(block, h, (pk[:, where[i]], pv[:, where[i]]), cls_only=i == last)
            else:
                h = cls_through_block(block, h) if i == last else block(h)
        return vit.forward_head(vit.norm(h), pre_logits=True)

    @torch.no_grad()
    def uninstructed(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's CLS feature after the final norm, without prompts (the TII model's ``pre_logits``)."""
        return cls_features(self.vit, x)

    def tii_logits(self, f: torch.Tensor) -> torch.Tensor:
        """The TII model's logits over every seen class of prompt-free features f, in float32."""
        with full_precision():
            z = self.tii_mlp(f.float())
            return torch.cat([h(z) for h in self.tii_heads], dim=1)

    @torch.no_grad()
    def predict_tasks(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's task: the task of the TII arg-max over the seen classes."""
        sizes = torch.tensor([h.out_features for h in self.tii_heads], device=x.device)
        cls = self.tii_logits(self.uninstructed(x)).argmax(1)
        return torch.bucketize(cls, sizes.cumsum(0), right=True)

    def _chunks(self, n: int) -> list[int]:
        c = int(self.cfg["prompt"]["device_batch"])
        return [min(c, n - s) for s in range(0, n, c)]

    def _parts(self, n: int) -> list[int]:
        return [s.stop - s.start for s in split_parts(n, int(self.cfg["prompt"]["devices"]))]

    def prototypes(self) -> torch.Tensor | None:
        """Every centroid mean of the prompted features of the finished tasks' classes [classes · k, D], float64."""
        if not len(self.stats):
            return None
        return torch.cat([s.wtp_means.flatten(0, 1) for s in self.stats])

    # ---- the state chain's interface
    def begin_task(self, num_classes: int, task: int, generator: torch.Generator | None = None) -> None:
        """Start task ``task`` (= the number of tasks held). Draws from ``generator``: (task 0) the TII MLP's fc1 and
        fc2 and prompt 0 ~ U(-1, 1); then head t, TII head t and the seed of :meth:`finish_task`'s draws."""
        if task != self.num_tasks:
            raise ValueError(f"task {task} needs the prompts of tasks 0..{task - 1}; the model holds {self.num_tasks}")
        if self._pending:
            raise RuntimeError("finish_task() the current task before beginning another")
        device = self._device()
        if task == 0:
            self.tii_mlp.reset(generator)
            shape = (len(self.layers), 2, self.length, self.embed_dim)
            prompt = nn.init.uniform_(torch.empty(shape), -1.0, 1.0, generator=generator)
        else:
            prompt = self.prompts[-1].detach().clone()
        for p in self.prompts:
            p.requires_grad_(False)
        self.heads.requires_grad_(False)
        self.prompts.append(nn.Parameter(prompt.to(device)))
        self.heads.append(trunc_normal_linear(self.embed_dim, num_classes, generator).to(device))
        self.tii_heads.append(trunc_normal_linear(self.embed_dim, num_classes, generator).to(device).requires_grad_(False))
        self._seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._pending = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Prompt t and head t: what the official Adam moves (the pool's other prompts and the other classes' rows
        get zero gradient)."""
        return [self.prompts[-1], *self.heads[-1].parameters()]

    def forward_current(self, x: torch.Tensor, task: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of head t, ``contrastive`` × the contrastive regularisation): every image with the current
        prompt, the batch split into ``devices`` parts as the official GPUs held it."""
        sizes = self._parts(len(x))
        f = self.prompted_features(x, self.current_prompt()[None], torch.zeros(len(x), dtype=torch.long), sizes)
        cfg = self.cfg["prompt"]
        extra = f.new_zeros(())
        if cfg["contrastive"] > 0:
            loss = parted_contrastive_loss(f, self.prototypes(), int(cfg["devices"]), cfg["temperature"])
            extra = (cfg["contrastive"] * loss).float()
        return self.heads[-1](f), extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over every seen class: each image's task from the TII model, its prompt, the heads in task
        order."""
        tasks = self.predict_tasks(x)
        f = self.prompted_features(x, self._bank(), tasks, self._chunks(len(x)))
        return torch.cat([h(f) for h in self.heads], dim=1)

    def finish_task(self, batches: Iterable, known: int, train_batches: Iterable | None = None) -> list[dict]:
        """Finish task t. ``batches``: the task's training images under the test transform (global labels),
        ``known``: the classes of tasks 0..t-1; ``train_batches``: the task's training loader (augmented,
        shuffled), which the TII training reads when ``tii.images`` is ``train_transform`` (the official).

        In order: prompt t becomes (1 - m) P_t + m mean(P_<t); one pass over ``batches`` gives the prompt-free and
        the prompted (prompt t) features; the TII MLP and TII head t are trained (:meth:`train_tii`); the class
        statistics of the task's classes; for t >= 1 the alignment of the TII MLP and heads, then of the heads.
        Returns the log rows of these stages."""
        if not self._pending:
            raise RuntimeError("finish_task() without a task begun")
        t = self.num_tasks - 1
        with torch.no_grad():
            self.prompts[-1].copy_(self.current_prompt())
        self._pending = False
        self.prompts[-1].requires_grad_(False)
        self.heads.requires_grad_(False)
        device = self._device()
        cpu = torch.Generator().manual_seed(self._seed)
        draws = torch.Generator(device=device).manual_seed(self._seed)
        plain, prompted, labels, batch = [], [], [], None
        with torch.no_grad():
            for x, y in batches:
                x = x.to(device)
                batch = batch or len(x)
                plain.append(self.uninstructed(x).float())
                prompted.append(self.prompted_features(x, self.prompts[-1][None], torch.zeros(len(x), dtype=torch.long),
                                                       self._chunks(len(x))).float())
                labels.append(y.to(device))
        plain, prompted, labels = torch.cat(plain), torch.cat(prompted), torch.cat(labels)
        rows = self.train_tii(train_batches, known, plain, labels, batch, draws)
        n = self.heads[-1].out_features
        stats = {name: [] for name in _Statistics.NAMES}
        for c in range(known, known + n):
            for kind, feats in (("tii", plain), ("wtp", prompted)):
                means, variances = centroid_statistics(feats[labels == c], self.centroids, cpu)
                stats[f"{kind}_means"].append(means)
                stats[f"{kind}_vars"].append(variances)
        self.stats.append(_Statistics(**{k: torch.stack(v) for k, v in stats.items()}).to(device))
        if t > 0:
            rows += self.align_tii(known, draws)
            rows += self.align_heads(known, draws)
        return rows

    def train_tii(self, train_batches: Iterable | None, known: int, plain: torch.Tensor, labels: torch.Tensor,
                  batch: int | None, generator: torch.Generator) -> list[dict]:
        """The TII training of the task (``engines/hide_tii_engine.py`` ``train_one_epoch``): Adam (β 0.9, 0.999,
        ε 1e-8, no weight decay) on the TII MLP and TII head t for ``tii.epochs`` epochs at a constant ``tii.lr``,
        the cross-entropy of the task's classes, the gradient norm clipped to ``tii.clip_grad``. ``images:
        train_transform``: each epoch a pass of the frozen ViT over ``train_batches``; ``test_transform``: the
        features ``plain`` of the test-transform pass, shuffled into batches of the pass's batch size."""
        cfg = self.cfg["tii"]
        if cfg["images"] == "train_transform" and train_batches is None:
            raise ValueError("tii.images is train_transform (the official TII training on augmented images), but "
                             "finish_task got no train_batches")
        head = self.tii_heads[-1]
        params = [*self.tii_mlp.parameters(), *head.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        device = self._device()
        rows = []
        for epoch in range(cfg["epochs"]):
            if cfg["images"] == "train_transform":
                source = ((self.uninstructed(x.to(device)), y.to(device)) for x, y in train_batches)
            else:
                source = batches_of(plain, labels, batch or len(labels), generator)
            total, correct, seen = 0.0, 0, 0
            for f, y in source:
                with full_precision():
                    logits = head(self.tii_mlp(f.float()))
                    loss = F.cross_entropy(logits, y - known)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg["clip_grad"])
                opt.step()
                total += loss.item() * len(y)
                correct += int((logits.argmax(1) == y - known).sum())
                seen += len(y)
            rows.append({"stage": "tii", "stage_epoch": epoch, "stage_lr": cfg["lr"], "stage_loss": total / seen,
                         "stage_accuracy": 100.0 * correct / seen})
        for p in params:
            p.requires_grad_(False)
        return rows

    def _statistics(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([getattr(s, f"{kind}_means") for s in self.stats]),
                torch.cat([getattr(s, f"{kind}_vars") for s in self.stats]))

    def align_tii(self, known: int, generator: torch.Generator) -> list[dict]:
        """The TII model's alignment (``hide_tii_engine.train_task_adaptive_prediction``): the TII MLP and every TII
        head on features sampled from the prompt-free statistics of every seen class, ``known`` batches of
        ``tii_alignment.samples`` an epoch."""
        cfg = self.cfg["tii_alignment"]
        means, variances = self._statistics("tii")
        params = [*self.tii_mlp.parameters(), *self.tii_heads.parameters()]
        return self._align(params, self.tii_logits, means, variances, known, cfg, generator, "tii_alignment")

    def align_heads(self, known: int, generator: torch.Generator) -> list[dict]:
        """The heads' alignment (``hide_promtp_wtp_and_tap_engine.train_task_adaptive_prediction``): every head on
        features sampled from the prompted statistics of every seen class, ``known`` batches of
        ``alignment.samples`` an epoch."""
        cfg = self.cfg["alignment"]
        means, variances = self._statistics("wtp")

        def logits(f: torch.Tensor) -> torch.Tensor:
            return torch.cat([h(f) for h in self.heads], dim=1)

        return self._align(list(self.heads.parameters()), logits, means, variances, known, cfg, generator,
                           "alignment")

    def _align(self, params, logits_fn, means, variances, known, cfg, generator, desc) -> list[dict]:
        for p in params:
            p.requires_grad_(True)
        with full_precision():
            rows = align(params, logits_fn, lambda: sample_centroids(means, variances, cfg["samples"], generator),
                         known, cfg["samples"], cfg, generator, desc)
        for p in params:
            p.requires_grad_(False)
        return rows

    # ---- per-task state (the frozen backbone is stored elsewhere)
    def task_state(self) -> dict[str, torch.Tensor]:
        """Task t's file: ``prompt`` (prompt t as used), ``head.<s>.weight|bias`` and ``tii.head.<s>.weight|bias`` of
        every task s <= t as they are after task t, ``tii.<fc1|fc2|norm>.<weight|bias>`` and the statistics of
        task t's classes ``stats.<tii|wtp>_<means|vars>``. Needs :meth:`finish_task` first."""
        if self._pending or len(self.stats) != self.num_tasks:
            raise RuntimeError("task_state() needs finish_task() first (the TII training and the class statistics)")
        state = {"prompt": self.prompts[-1].detach().clone()}
        for s, (h, g) in enumerate(zip(self.heads, self.tii_heads)):
            for name in ("weight", "bias"):
                state[f"head.{s}.{name}"] = getattr(h, name).detach().clone()
                state[f"tii.head.{s}.{name}"] = getattr(g, name).detach().clone()
        for name, p in self.tii_mlp.named_parameters():
            state[f"tii.{name}"] = p.detach().clone()
        for name in _Statistics.NAMES:
            state[f"stats.{name}"] = getattr(self.stats[-1], name).detach().clone()
        return state

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Append finished task t = ``num_tasks`` from its :meth:`task_state`: prompt t, the statistics of its
        classes; every head, every TII head and the TII MLP replaced by the file's."""
        if self._pending:
            raise RuntimeError("finish_task() the current task before loading another")
        t = self.num_tasks
        expected = {"prompt", *(f"{p}head.{s}.{n}" for p in ("", "tii.") for s in range(t + 1) for n in ("weight", "bias")),
                    *(f"tii.{n}" for n, _ in self.tii_mlp.named_parameters()), *(f"stats.{n}" for n in _Statistics.NAMES)}
        if set(state) != expected:
            raise ValueError(f"task {t}'s state: missing {sorted(expected - set(state))}, unexpected "
                             f"{sorted(set(state) - expected)}")
        device = self._device()
        self.prompts.append(nn.Parameter(state["prompt"].to(device), requires_grad=False))
        for prefix, heads in (("head", self.heads), ("tii.head", self.tii_heads)):
            for s in range(t + 1):
                w, b = state[f"{prefix}.{s}.weight"], state[f"{prefix}.{s}.bias"]
                if s == t:
                    heads.append(skip_init(nn.Linear, w.shape[1], w.shape[0], device=device).requires_grad_(False))
                with torch.no_grad():
                    heads[s].weight.copy_(w)
                    heads[s].bias.copy_(b)
        with torch.no_grad():
            for name, p in self.tii_mlp.named_parameters():
                p.copy_(state[f"tii.{name}"])
        self.stats.append(_Statistics(**{n: state[f"stats.{n}"] for n in _Statistics.NAMES}).to(device))


def build(settings: dict, vit: nn.Module, seed: int) -> HiDePromptViT:
    """The model of a HiDe-Prompt experiment before task 0 (the state chain's factory, :mod:`ifcl.catalog.hide_prompt`):
    ``settings['hide']`` its prompt, tii, tii_alignment, alignment and centroids; nothing is drawn before task 0
    (``seed`` unused: task 0's :meth:`HiDePromptViT.begin_task` draws from the task's generator)."""
    s = settings["hide"]
    return HiDePromptViT(vit, prompt=s["prompt"], tii=s["tii"], tii_alignment=s["tii_alignment"],
                         alignment=s["alignment"], centroids=s["centroids"])
