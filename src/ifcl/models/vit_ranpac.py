"""RanPAC's model (``RanPAC/RanPAC``): a frozen timm ViT, a fixed random projection of its CLS feature and a
ridge-regression head fitted in closed form after each task (:mod:`ifcl.methods.ranpac`), with the task-state
interface of ifcl's state chain. Its task pass is :meth:`RanPACViT.fit_task` (no optimiser).

Task t's file holds what the next task continues from and what the evaluation uses: the Gram matrix G and the
prototypes Q after task t, the head Wo after task t and the chosen λ; task 0's file also holds the projection W.
G is [M, M]: 400 MB at the official M = 10000.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..methods.ranpac import FIT_FRACTION, RIDGES, one_hot, project, random_projection, ridge_solution, select_ridge
from ..progress import track
from ..runtime import full_precision
from .vit_lora import cls_features


class RanPACViT(nn.Module):
    """Frozen timm ViT (CLS pooling) + RanPAC's random-projection ridge head over every seen class.

    Usage for task t: :meth:`begin_task`, :meth:`fit_task` on the task's images, then :meth:`task_state`; the
    model after task t is the backbone with the states of tasks 0..t loaded in order (:meth:`load_task_state`).
    Features, projection and head run in float32 whatever autocast surrounds them, as the official code.
    """

    def __init__(self, vit: nn.Module, width: int = 10000, ridges=RIDGES, fit_fraction: float = FIT_FRACTION,
                 generator: torch.Generator | None = None):
        super().__init__()
        if getattr(vit, "global_pool", None) != "token" or getattr(vit, "attn_pool", None) is not None:
            raise ValueError("RanPACViT expects a timm ViT pooled by its CLS token (global_pool='token')")
        self.vit = vit.requires_grad_(False)
        device = vit.cls_token.device
        projection = random_projection(vit.embed_dim, width, generator)
        self.register_buffer("projection", (projection if projection is not None else torch.zeros(0)).to(device))
        features = width or vit.embed_dim
        self.register_buffer("gram", torch.zeros(features, features, device=device))
        self.register_buffer("prototypes", torch.zeros(features, 0, device=device))
        self.register_buffer("weight", torch.zeros(0, features, device=device))
        self.ridges, self.fit_fraction = tuple(ridges), fit_fraction
        self.task_sizes: list[int] = []
        self.ridge: float | None = None
        self.heads = nn.ModuleList()  # the state chain's interface: RanPAC trains no head

    @property
    def num_classes(self) -> int:
        return sum(self.task_sizes)

    def _projection(self) -> torch.Tensor | None:
        return self.projection if self.projection.numel() else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """H = ReLU(f W) of the frozen CLS features f, in float32."""
        with torch.no_grad(), full_precision():
            return project(cls_features(self.vit, x.float()), self._projection())

    def begin_task(self, num_classes: int, task: int, generator: torch.Generator | None = None) -> None:
        if task != len(self.task_sizes):
            raise ValueError(f"task {task} after {len(self.task_sizes)} tasks")
        self.task_sizes.append(num_classes)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def fit_task(self, batches, known: int) -> list[dict]:
        """The task's pass (``replace_fc``): the features of ``batches`` (the task's training images under the test
        transform, shuffled, labels ``known``.. in class order) update G and Q; λ is chosen on this task's samples
        (:func:`ifcl.methods.ranpac.select_ridge`, on the one-hot columns of the classes seen so far: the
        official columns of unseen classes are zero in both target and prediction, so the choice is the same) and
        the head becomes ((G + λ I)⁻¹ Q)ᵀ. One log row: the chosen λ, its validation MSE and the training accuracy
        of the new head on the task's samples."""
        h, labels = [], []
        for x, y in track(batches, "features"):
            h.append(self.features(x))
            labels.append(y.to(h[-1].device))
        h, labels = torch.cat(h), torch.cat(labels)
        with full_precision():
            y = one_hot(labels, self.num_classes).to(h.device)
            self.gram = self.gram + h.T @ h
            grown = torch.zeros(self.prototypes.shape[0], self.num_classes, device=h.device)
            grown[:, : self.prototypes.shape[1]] = self.prototypes
            self.prototypes = grown + h.T @ y
            self.ridge, losses = select_ridge(h, y, self.ridges, self.fit_fraction)
            self.weight = ridge_solution(self.gram, self.prototypes, self.ridge)
            accuracy = 100.0 * float(((h @ self.weight.T).argmax(1) == labels).float().mean())
        print(f"λ = {self.ridge:g} (validation MSE {min(losses):.6g}); training accuracy {accuracy:.2f}% on "
              f"{len(labels)} images", flush=True)
        return [{"epoch": 0, "loss": min(losses), "train_acc": accuracy, "ridge": self.ridge}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every seen class: H Woᵀ."""
        h = self.features(x)
        with full_precision():
            return h @ self.weight.T

    def task_state(self) -> dict[str, torch.Tensor]:
        """G, Q and Wo after the task, its λ, and (task 0) the projection."""
        state = {"gram": self.gram.detach().clone(), "prototypes": self.prototypes.detach().clone(),
                 "weight": self.weight.detach().clone(), "ridge": torch.tensor([self.ridge], dtype=torch.float64)}
        if len(self.task_sizes) == 1:
            state["projection"] = self.projection.detach().clone()
        return state

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Append a finished task: G, Q and Wo after it (the projection from task 0's file)."""
        unexpected = sorted(set(state) - {"gram", "prototypes", "weight", "ridge", "projection"})
        if unexpected:
            raise ValueError(f"unexpected names in a RanPAC task state: {unexpected}")
        device = self.gram.device
        if "projection" in state:
            self.projection = state["projection"].to(device)
        self.gram, self.prototypes = state["gram"].to(device), state["prototypes"].to(device)
        self.weight = state["weight"].to(device)
        self.task_sizes.append(self.weight.shape[0] - self.num_classes)
        self.ridge = float(state["ridge"][0])


def build(settings: dict, vit: nn.Module, seed: int) -> RanPACViT:
    """The model of a RanPAC experiment before task 0 (the state chain's factory, :mod:`ifcl.catalog.ranpac`):
    ``settings['ranpac']`` its projection width, ridge candidates and fit fraction; W drawn from ``seed``."""
    s = settings["ranpac"]
    return RanPACViT(vit, width=s["projection"], ridges=s["ridges"], fit_fraction=s["fit_fraction"],
                     generator=torch.Generator().manual_seed(seed))
