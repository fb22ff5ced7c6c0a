"""InfLoRA+CA's classifier alignment (liangyanshuo/InfLoRA methods/inflora_ca.py) on synthetic features."""
import pytest
import torch
import torch.nn.functional as F

from ifcl.methods.classifier_alignment import (align_heads, class_statistics, logit_normalized_cross_entropy,
                                               mean_scale, sample_features)

CA = {"samples_per_class": 256, "epochs": 5, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "logit_norm": 0.1,
      "covariance_eps": 1e-4}


def test_class_statistics_match_torch_cov_plus_eps():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mean, cov = class_statistics(x, 1e-4)
    assert mean.dtype == torch.float64 and cov.dtype == torch.float32
    torch.testing.assert_close(mean, x.double().mean(0))
    torch.testing.assert_close(cov, (torch.cov(x.double().T) + 1e-4 * torch.eye(6, dtype=torch.float64)).float())
    with pytest.raises(ValueError):
        class_statistics(x[:1])


def test_mean_scale_shrinks_older_tasks_only():
    assert mean_scale(3, 3) == pytest.approx(1.0)
    assert mean_scale(0, 3) == pytest.approx(0.925)
    assert mean_scale(0, 1) == pytest.approx(0.95)


def test_logit_normalisation_formula():
    z = torch.tensor([[3.0, 4.0, 0.0, 1.0, 1.0], [0.5, -1.0, 2.0, 0.0, 0.0]])
    y = torch.tensor([1, 3])
    # heads of sizes 2 and 3: nu = mean(|z_0| + 1e-7, |z_1| + 1e-7) per sample
    nu0 = ((5.0 + 1e-7) + (2 ** 0.5 + 1e-7)) / 2
    nu1 = ((torch.tensor([0.5, -1.0]).norm().item() + 1e-7) + (2.0 + 1e-7)) / 2
    expected = F.cross_entropy(z / torch.tensor([[nu0], [nu1]]) / 0.1, y)
    torch.testing.assert_close(logit_normalized_cross_entropy(z, y, [2, 3], 0.1), expected)
    torch.testing.assert_close(logit_normalized_cross_entropy(z, y, [2, 3], None), F.cross_entropy(z, y))


def test_samples_follow_the_scaled_gaussians():
    means = torch.tensor([[1.0, 2.0], [-3.0, 0.0]], dtype=torch.float64)
    covs = torch.stack([torch.tensor([[1.0, 0.5], [0.5, 2.0]]), torch.eye(2) * 0.1])
    x, y = sample_features(means, covs, [0.5, 1.0], 20000, torch.Generator().manual_seed(0))
    assert y.tolist().count(0) == 20000
    torch.testing.assert_close(x[y == 0].mean(0), torch.tensor([0.5, 1.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x[y == 0].T), covs[0], atol=0.05, rtol=0)


def test_alignment_removes_the_bias_of_the_newest_head():
    g = torch.Generator().manual_seed(0)
    d = 8
    means = torch.randn(4, d, generator=g, dtype=torch.float64) * 3
    covs = torch.stack([torch.eye(d) * 0.5] * 4)
    heads = torch.nn.ModuleList([torch.nn.Linear(d, 2), torch.nn.Linear(d, 2)])
    with torch.no_grad():  # heads that separate their own classes, the new one with a large bias
        for s, h in enumerate(heads):
            h.weight.copy_(means[2 * s : 2 * s + 2].float() * 0.3)
            h.bias.fill_(0.0 if s == 0 else 30.0)
    x, y = sample_features(means, covs, [1.0] * 4, 200, torch.Generator().manual_seed(1))
    acc = lambda: (torch.cat([h(x) for h in heads], 1).argmax(1) == y).float().mean().item()
    before = acc()
    rows = align_heads(heads, means, covs, [0, 0, 1, 1], CA, torch.Generator().manual_seed(2))
    assert len(rows) == 5 and rows[-1]["lr"] == pytest.approx(0.01 * (1 + torch.cos(torch.tensor(0.8 * torch.pi)).item()) / 2)
    assert before < 0.7 and acc() > 0.85  # measured: 0.63 -> 0.89
    assert not any(p.requires_grad for h in heads for p in h.parameters())
