"""The linear probe's model: a frozen timm ViT and one linear head per task, with the task-state interface of ifcl's
state chain (``begin_task``, ``trainable_parameters``, ``forward_current``, ``forward``, ``heads``, ``task_state``,
``load_task_state``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ifcl.models.vit_lora import cls_features


class LinearProbe(nn.Module):
    def __init__(self, vit: nn.Module, normalize: bool = False):
        super().__init__()
        self.vit = vit.requires_grad_(False)
        self.normalize = normalize
        self.heads = nn.ModuleList()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            f = cls_features(self.vit, x)
        return F.normalize(f, dim=1) if self.normalize else f

    def begin_task(self, num_classes: int, task: int, generator: torch.Generator | None = None) -> None:
        """A new head for task ``task`` (PyTorch's Linear init, drawn from ``generator``); earlier heads frozen."""
        for head in self.heads:
            head.requires_grad_(False)
        head = nn.Linear(self.vit.embed_dim, num_classes)
        bound = 1.0 / self.vit.embed_dim ** 0.5
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
        self.heads.append(head.to(self.vit.cls_token.device))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads[-1].parameters())

    def forward_current(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        """Training: logits of the newest head (its task's classes)."""
        return self.heads[-1](self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation: logits of every seen class, heads in task order."""
        f = self.features(x)
        return torch.cat([head(f) for head in self.heads], dim=1)

    def task_state(self) -> dict[str, torch.Tensor]:
        """What task t's file holds: head t."""
        head = self.heads[-1]
        return {"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()}

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Append a finished task's head, frozen."""
        w = state["head.weight"]
        head = nn.Linear(w.shape[1], w.shape[0]).to(self.vit.cls_token.device)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(state["head.bias"])
        self.heads.append(head.requires_grad_(False))


def build(settings: dict, vit: nn.Module, seed: int) -> LinearProbe:
    """The model before task 0 (``settings``: the experiment's method, backbone and ``probe``); nothing is drawn."""
    return LinearProbe(vit, normalize=settings["probe"]["normalize"])
