"""A whole timm ViT fine-tuned slowly, one linear head per task, and per-class feature Gaussians that re-align the
heads after each task: SLCA (``GengDavid/SLCA``; rules and paper-vs-code differences in :mod:`ifcl.methods.slca`).

What the official ``FinetuneIncrementalNet`` computes: features = the CLS token after the final LayerNorm of the
ViT (``convs/vits.py``, whose pretrained final norm is replaced by a fresh ``nn.LayerNorm``), logits = the heads
of every seen task concatenated in task order (``SimpleContinualLinear``). Per task t:

* :meth:`SLCAViT.begin_task`: a new head; the trainable parameters are every backbone parameter and head t (the
  train step gives them two SGD groups: ``lr`` for the backbone, ``head_lr`` for the head);
* the train step's loss is the cross-entropy of head t (the official loss masks the old classes' logits);
* :meth:`SLCAViT.finish_task` (the task's training images under the test transform): the new classes' Gaussians,
  then, from task 1 on, the aligned copy of every head that the evaluation after task t uses.

Task t's state (:meth:`SLCAViT.task_state`) is the whole backbone after task t (every parameter moves; none with
``freeze_backbone``), head t as trained, the new classes' means and covariances and, from task 1 on, the aligned
heads 0..t: loading the states of tasks 0..t in order replaces the backbone each time and gives the model after
task t, its forward that of the aligned heads.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..methods.classifier_alignment import align_heads
from ..methods.slca import class_tasks, init_head, task_statistics
from ..runtime import full_precision
from .vit_lora import cls_features

BACKBONE = "backbone."
ALIGNED = "aligned."


class SLCAViT(nn.Module):
    """timm ViT (CLS pooling), trained whole unless ``freeze_backbone``, + one linear head per task.

    ``heads`` are the heads as trained (what the next task continues from); ``aligned`` the heads after the last
    task's classifier alignment (None before task 1 and while a task is being trained), which :meth:`forward`
    uses when present. ``means`` and ``covs`` hold each finished task's class statistics.
    ``ca``: samples_per_class, epochs, lr, momentum, weight_decay, logit_norm (None: plain cross-entropy),
    covariance_eps; ``final_norm``: "reset" (the official fresh LayerNorm, eps 1e-5) or "pretrained".
    """

    def __init__(self, vit: nn.Module, ca: dict, final_norm: str = "reset", freeze_backbone: bool = False):
        super().__init__()
        if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError("SLCAViT expects a timm ViT pooled by its CLS token (global_pool='token')")
        if final_norm == "reset":
            vit.norm = nn.LayerNorm(vit.embed_dim).to(vit.cls_token.device)
        elif final_norm != "pretrained":
            raise ValueError(f"final_norm is 'reset' or 'pretrained', not {final_norm!r}")
        self.vit = vit
        self.ca = dict(ca)
        self.freeze_backbone = freeze_backbone
        for p in self.vit.parameters():
            p.requires_grad_(not freeze_backbone)
        self.embed_dim = vit.embed_dim
        self.heads = nn.ModuleList()
        self.aligned: nn.ModuleList | None = None
        self.means: list[torch.Tensor] = []  # per task: [n_s, D] float64
        self.covs: list[torch.Tensor] = []  # per task: [n_s, D, D] float32
        self._generator: torch.Generator | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def _device(self) -> torch.device:
        return self.vit.cls_token.device

    def _append_head(self, weight: torch.Tensor, bias: torch.Tensor, trainable: bool) -> None:
        head = nn.Linear(self.embed_dim, weight.shape[0]).to(self._device())
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        for h in self.heads:
            h.requires_grad_(False)
        self.heads.append(head.requires_grad_(trainable))

    def begin_task(self, num_classes: int, task: int, generator: torch.Generator) -> None:
        """Start task t: head t drawn from ``generator`` (:func:`ifcl.methods.slca.init_head`), the old heads frozen,
        the heads as trained in use (the official ``fc.recall``). ``generator`` also draws task t's alignment
        samples in :meth:`finish_task`."""
        if task != self.num_tasks:
            raise ValueError(f"task {task} after {self.num_tasks} tasks")
        self._append_head(*init_head(num_classes, self.embed_dim, generator), trainable=True)
        self.aligned = None
        self._generator = generator

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every backbone parameter (none with ``freeze_backbone``) and head t: the official ``_stage1_training``
        optimiser's two groups."""
        backbone = [] if self.freeze_backbone else list(self.vit.parameters())
        return backbone + list(self.heads[-1].parameters())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final norm; the last block runs for that token alone
        (:func:`ifcl.models.vit_lora.cls_features`)."""
        return cls_features(self.vit, x)

    def forward_current(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Logits of head t (training, local labels)."""
        return self.heads[-1](self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over every seen class, heads in task order: the aligned heads after task t ≥ 1 (the official
        evaluation runs between the alignment and ``fc.recall``), the trained ones otherwise."""
        f = self.features(x)
        heads = self.aligned if self.aligned is not None else self.heads
        return torch.cat([h(f) for h in heads], dim=1)

    @torch.no_grad()
    def _features_of(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        feats, targets = [], []
        with full_precision():
            for x, y in batches:
                feats.append(self.features(x.to(self._device()).float()).float().cpu())
                targets.append(y.cpu())
        return torch.cat(feats), torch.cat(targets)

    def finish_task(self, batches, known: int, train_batches=None) -> list[dict]:
        """After task t's training: the Gaussians of its classes from the features of ``batches`` (the task's
        training images under the test transform, labels known..), then for t ≥ 1 the alignment of a copy of
        every trained head (on the CPU, samples from the generator given to :meth:`begin_task`). Returns one log
        row per alignment epoch (``stage``: alignment)."""
        feats, targets = self._features_of(batches)
        means, covs = task_statistics(feats, targets, known, self.heads[-1].out_features, self.ca["covariance_eps"])
        self.means.append(means)
        self.covs.append(covs)
        self.aligned = None
        if self.num_tasks == 1 or self.ca["epochs"] == 0:
            return []
        heads = copy.deepcopy(self.heads).cpu()
        rows = align_heads(heads, torch.cat(self.means), torch.cat(self.covs),
                           class_tasks([m.shape[0] for m in self.means]), self.ca, self._generator)
        self.aligned = heads.to(self._device()).requires_grad_(False)
        return [{**row, "stage": "alignment"} for row in rows]

    # ---- per-task state ----
    def task_state(self) -> dict[str, torch.Tensor]:
        """The last task's state: ``backbone.<name>`` (the whole ViT, left out with ``freeze_backbone``),
        ``head.weight``/``head.bias`` (head t as trained), ``means``, ``covs`` (its classes) and, from task 1 on,
        ``aligned.<s>.weight``/``.bias`` for every head s ≤ t."""
        if len(self.means) != self.num_tasks:
            raise RuntimeError("task_state() needs the task's class statistics: call finish_task() first")
        state = {}
        if not self.freeze_backbone:
            state.update({BACKBONE + k: v.detach().clone() for k, v in self.vit.state_dict().items()})
        state["head.weight"] = self.heads[-1].weight.detach().clone()
        state["head.bias"] = self.heads[-1].bias.detach().clone()
        state["means"] = self.means[-1].clone()
        state["covs"] = self.covs[-1].clone()
        if self.aligned is not None:
            for s, h in enumerate(self.aligned):
                state[f"{ALIGNED}{s}.weight"] = h.weight.detach().clone()
                state[f"{ALIGNED}{s}.bias"] = h.bias.detach().clone()
        return state

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Append task ``num_tasks`` from its :meth:`task_state`: its backbone replaces the model's, its head and
        statistics are appended, its aligned heads (if any) are the ones :meth:`forward` uses."""
        backbone = {k[len(BACKBONE):]: v for k, v in state.items() if k.startswith(BACKBONE)}
        if backbone:
            self.vit.load_state_dict(backbone)
        elif not self.freeze_backbone:
            raise ValueError("the task state holds no backbone, but the backbone is trained (freeze_backbone false)")
        self._append_head(state["head.weight"], state["head.bias"], trainable=False)
        self.means.append(state["means"].cpu())
        self.covs.append(state["covs"].cpu())
        aligned = sorted({int(k.split(".")[1]) for k in state if k.startswith(ALIGNED)})
        if aligned and aligned != list(range(self.num_tasks)):
            raise ValueError(f"aligned heads {aligned} in the state of task {self.num_tasks - 1}")
        self.aligned = None
        if aligned:
            self.aligned = nn.ModuleList()
            for s in aligned:
                w, b = state[f"{ALIGNED}{s}.weight"], state[f"{ALIGNED}{s}.bias"]
                head = nn.Linear(self.embed_dim, w.shape[0]).to(self._device())
                with torch.no_grad():
                    head.weight.copy_(w)
                    head.bias.copy_(b)
                self.aligned.append(head.requires_grad_(False))


def build(settings: dict, vit: nn.Module, seed: int) -> SLCAViT:
    """The model of an SLCA experiment before task 0 (the state chain's factory, :mod:`ifcl.catalog.slca`):
    ``settings`` its ``ca``, ``final_norm`` and ``freeze_backbone``; nothing is drawn before task 0 (``seed``
    unused)."""
    return SLCAViT(vit, ca=settings["ca"], final_norm=settings["final_norm"],
                   freeze_backbone=settings["freeze_backbone"])
