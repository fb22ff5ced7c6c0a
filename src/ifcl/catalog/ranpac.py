"""RanPAC (McDonnell et al., NeurIPS 2023; ``RanPAC/RanPAC``): frozen ViT features, a fixed random projection with
a ReLU, and a ridge-regression head over every seen class fitted in closed form after each task, its λ chosen on
held-out samples of the task. Math: :mod:`ifcl.methods.ranpac`; model: :class:`ifcl.models.vit_ranpac.RanPACViT`;
the state chain's steps (:mod:`ifcl.steps.state`), its task pass a fit on the training images under the test
transform (no optimiser). This is the paper's "No Phase 1" row: the first-session adaptation of the backbone
(adapter, SSF or VPT trained on task 0) is not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Method
from ..settings import setting

RIDGES = [10.0 ** k for k in range(-8, 9)]  # the official 10.0 ** np.arange(-8, 9)


@dataclass(frozen=True, kw_only=True)
class Head:
    """RanPAC's random projection and ridge head (RanPAC/RanPAC RanPAC.py, setup_RP and replace_fc)"""

    projection: int = setting(10000, "M, the width of the random projection (official 10000); 0: no projection, the "
                                     "ridge regression on the features themselves (the paper's 'No RPs')", minimum=0)
    ridges: list[float] = setting(RIDGES, "the λ tried on each task (official 1e-8, 1e-7, ..., 1e8)", min_items=1)
    fit_fraction: float = setting(0.8, "the share of a task's samples each λ is fitted on, in the shuffled order; the "
                                       "rest scores it (official 0.8)", exclusive_minimum=0, exclusive_maximum=1)


@dataclass(frozen=True, kw_only=True)
class RanPAC:
    ranpac: Head = setting(Head(), "RanPAC's head")


METHODS = (Method(
    name="ranpac", protocol="cil", title="RanPAC",
    description="frozen ViT features through a fixed random projection and a ReLU, a ridge-regression head over "
                "every seen class fitted in closed form after each task, λ chosen on held-out samples (settings under "
                "ranpac; RanPAC/RanPAC, without its first-session adaptation)",
    model="ifcl.models.vit_ranpac:build", settings=RanPAC, model_keys=("ranpac",), task_images="test_transform"),)
