""""The model after task t" of a DIKI run: a frozen CLIP with the prefixes and Gaussians of tasks 0..t, classifying
by DIKI's calibrated inference (``lloongx/DIKI``: the task of each image from its frozen features under the learnt
Gaussians, the prefixes of that task scaled by λ)."""
from __future__ import annotations

import torch

from ..methods.diki import TaskGaussian, calibrate
from ..runtime import full_precision
from .clip_prefix import CLIPPrefix


def calibrated_logits(model: CLIPPrefix, prefixes: list[dict], gaussians: list[TaskGaussian], images: torch.Tensor,
                      tokens: torch.Tensor, frozen: torch.Tensor, calibration: dict):
    """DIKI's calibrated inference on one batch: the task of each image from its frozen features under the learnt
    Gaussians (batch-wise majority vote or per sample; log-likelihoods in float64), λ per image; the image tower
    with that task's prefixes scaled by λ, the text tower with the batch's (or, per sample, each selected task's)
    mean λ. Returns (logits [B, classes], task ids [B], λ [B])."""
    with full_precision():
        ids, lam = calibrate(frozen.float(), gaussians, batchwise=calibration["batchwise"],
                             scale=calibration["scale"], weight=calibration["weight"])
    lam_d = lam.to(images.device)
    if calibration["batchwise"]:
        u = int(ids[0])
        image = model.encode_image(images, prefixes[u], lam_d)
        return image @ model.encode_text(tokens, prefixes[u], float(lam.mean())).T, ids, lam
    # per sample: each image its own task; the text once per selected task with that task's mean λ
    image = model.encode_image(images, per_sample=[prefixes[int(i)] for i in ids], weight=lam_d)
    logits = torch.empty(len(images), tokens.shape[0], device=images.device)
    for u in ids.unique().tolist():
        rows = (ids == u).to(images.device)
        logits[rows] = image[rows] @ model.encode_text(tokens, prefixes[u], float(lam[ids == u].mean())).T
    return logits, ids, lam


class DIKIModel(torch.nn.Module):
    """The frozen CLIP with the prefixes and Gaussians of tasks 0..t. ``forward(images, tokens)`` -> logits over
    the tokenised class prompts (``tokenize(prompts(class_names, template))``); the frozen image features that
    choose the task are computed on the way, in float32 whatever autocast surrounds the call."""

    def __init__(self, model: CLIPPrefix, prefixes: list[dict], gaussians: list[TaskGaussian], calibration: dict):
        super().__init__()
        self.model, self.gaussians, self.calibration = model, gaussians, calibration
        self._prefix_names = [list(p) for p in prefixes]
        for t, p in enumerate(prefixes):  # buffers, so that .to(device) moves them with the model
            for name, value in p.items():
                self.register_buffer(self._buffer(t, name), value)

    @staticmethod
    def _buffer(t: int, name: str) -> str:
        return f"prefix{t}_" + name.replace(".", "_")

    def task_prefixes(self) -> list[dict]:
        return [{n: getattr(self, self._buffer(t, n)) for n in names} for t, names in enumerate(self._prefix_names)]

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's L2-normalised image features [B, D] (float32 forward, on the CPU)."""
        with full_precision():
            return self.model.encode_image(images.float()).float().cpu()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return calibrated_logits(self.model, self.task_prefixes(), self.gaussians, images, tokens,
                                 self.frozen_features(images), self.calibration)[0]
