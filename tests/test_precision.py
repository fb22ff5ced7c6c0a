"""Statistics are float32 whatever autocast surrounds them (gpu_precision: bf16 runs training and evaluation under
bf16 autocast on a GPU). Shown with the CPU's bf16 autocast, which treats ``mm`` as CUDA's does: each statistic
computed inside it equals the float32 one, while the same computation left to autocast does not (the control)."""
import contextlib

import pytest
import torch

from ifcl import runtime
from ifcl.methods.diki import fit_gaussian
from ifcl.models.diki import DIKIModel
from ifcl.models.vit_lora import ViTLoRA, build_vit

BF16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731


def tiny_model() -> ViTLoRA:
    torch.manual_seed(0)
    return ViTLoRA(build_vit(16, 4, 32, 2, 4), rank=2, lora_blocks="all").eval()


def batches(n=3):
    gen = torch.Generator().manual_seed(1)
    return [(torch.rand(4, 3, 16, 16, generator=gen), torch.zeros(4, dtype=torch.long)) for _ in range(n)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def without_full_precision(monkeypatch):
    """The control: full_precision turned into a no-op, as if the statistics ran under the step's autocast."""
    def disable():
        monkeypatch.setattr(runtime, "full_precision", contextlib.nullcontext)
        import ifcl.steps.inflora as inflora
        monkeypatch.setattr(inflora, "full_precision", contextlib.nullcontext)
        import ifcl.models.diki as diki
        monkeypatch.setattr(diki, "full_precision", contextlib.nullcontext)
    return disable


def second_moments():
    from ifcl.steps.inflora import collect_second_moments

    return collect_second_moments(tiny_model(), batches(), "cpu")


def test_inflora_second_moments_are_float32_inside_bf16_autocast(without_full_precision):
    reference = second_moments()
    with BF16():
        moments = second_moments()
    for c, ref in zip(moments, reference):
        assert c.dtype == torch.float32
        assert relative_error(c, ref) < 1e-6
        assert torch.linalg.eigvalsh(c.double()).min() > -1e-6  # positive semi-definite, as XᵀX/n is
    without_full_precision()
    with BF16():
        drifted = second_moments()
    assert max(relative_error(c, ref) for c, ref in zip(drifted, reference)) > 1e-4  # the test can fail


def class_features():
    from ifcl.steps.inflora import features

    return features(tiny_model(), batches(), "cpu")[0]


def test_ca_class_features_are_float32_inside_bf16_autocast(without_full_precision):
    reference = class_features()
    with BF16():
        feats = class_features()
    assert feats.dtype == torch.float32 and relative_error(feats, reference) < 1e-6
    without_full_precision()
    with BF16():
        drifted = class_features()
    assert relative_error(drifted, reference) > 1e-4


class FrozenTower(torch.nn.Module):
    """A stand-in for CLIPPrefix.encode_image without prefixes: a linear map of the flattened image, L2-normalised."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.proj = torch.nn.Linear(3 * 16 * 16, 16)

    def encode_image(self, images, prefix=None, weight=1.0, per_sample=None):
        return torch.nn.functional.normalize(self.proj(images.flatten(1)), dim=-1)


def test_diki_frozen_features_and_log_likelihoods_are_float32_inside_bf16_autocast(without_full_precision):
    """DIKIModel chooses the task from frozen features it computes itself: float32 under bf16 autocast too; the
    Gaussians (fitted in float64) score them in float64."""
    images = torch.cat([x for x, _ in batches(8)])
    tower = FrozenTower()
    reference = DIKIModel(tower, [], [], {}).frozen_features(images)
    gaussian = fit_gaussian(reference + 0.01 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(3)))
    with BF16():
        feats = DIKIModel(tower, [], [], {}).frozen_features(images)
        scores = gaussian.log_likelihood(feats)
    assert feats.dtype == torch.float32 and relative_error(feats, reference) < 1e-6
    assert torch.equal(scores, gaussian.log_likelihood(reference))
    without_full_precision()
    with BF16():
        drifted = DIKIModel(tower, [], [], {}).frozen_features(images)
    assert relative_error(drifted, reference) > 1e-4
