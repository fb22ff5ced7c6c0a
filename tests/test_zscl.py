"""The full fine-tuning family of the MTIL benchmark (ifcl.methods.zscl) against hand-computed or independently
written cases of what ZSCL's official code computes (Thunderbeee/ZSCL mtil/src/models/helpers.py, finetune.py,
utils.py)."""
import math

import pytest
import torch

from ifcl.methods.zscl import (clip_logits, distillation, interpolate, l2_anchor, lr_at, running_average,
                               virtual_vocabulary, zscl_distillation)


def test_the_schedule_warms_up_linearly_then_falls_to_zero_by_a_cosine():
    assert lr_at(0, 1e-5, 100, 1000) == pytest.approx(1e-7)
    assert lr_at(99, 1e-5, 100, 1000) == pytest.approx(1e-5)
    assert lr_at(100, 1e-5, 100, 1000) == pytest.approx(1e-5)
    assert lr_at(550, 1e-5, 100, 1000) == pytest.approx(0.5e-5)
    assert lr_at(1000, 1e-5, 100, 1000) == pytest.approx(0.0, abs=1e-20)  # the loop's last (1,001st) step


def test_distillation_is_t_squared_times_the_cross_entropy_with_the_teachers_soft_targets():
    teacher = torch.tensor([[2.0, 0.0, -2.0], [0.0, 1.0, 0.0]])
    student = torch.tensor([[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    T = 2.0
    expected = 0.0
    for t_row, s_row in zip(teacher.tolist(), student.tolist()):
        p = [math.exp(v / T) for v in t_row]
        p = [v / sum(p) for v in p]
        log_q = [v / T - math.log(sum(math.exp(u / T) for u in s_row)) for v in s_row]
        expected += -sum(pi * lq for pi, lq in zip(p, log_q))
    assert distillation(teacher, student, T).item() == pytest.approx(T**2 * expected / 2, rel=1e-6)
    assert distillation(teacher, teacher, T) < distillation(teacher, student, T)


def test_zscl_distillation_adds_the_image_and_the_text_directions():
    g = torch.Generator().manual_seed(0)
    student, teacher, texts = (torch.randn(4, 8, generator=g) for _ in range(3))
    scale = torch.tensor(math.log(10.0))

    def logits(images):  # written out: cosine similarities times 10
        a = images / images.norm(dim=1, keepdim=True)
        b = texts / texts.norm(dim=1, keepdim=True)
        return 10.0 * torch.einsum("id,jd->ij", a, b)

    s, t = logits(student), logits(teacher)
    both = zscl_distillation(student, teacher, texts, scale, T=2.0)
    image = zscl_distillation(student, teacher, texts, scale, T=2.0, text_loss=False)
    text = zscl_distillation(student, teacher, texts, scale, T=2.0, image_loss=False)
    assert torch.allclose(clip_logits(student, texts, scale), s, atol=1e-5)
    assert image.item() == pytest.approx(distillation(t, s).item(), rel=1e-5)
    assert text.item() == pytest.approx(distillation(t.t(), s.t()).item(), rel=1e-5)
    assert both.item() == pytest.approx(image.item() + text.item(), rel=1e-6)
    assert zscl_distillation(teacher, teacher, texts, scale).item() < both.item()


def test_the_l2_anchor_sums_squared_differences_and_holds_the_anchor_fixed():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[0.5]], requires_grad=True)
    anchor = {"w": torch.tensor([0.0, 0.0], requires_grad=True), "b": torch.tensor([[1.0]], requires_grad=True)}
    loss = l2_anchor({"w": w, "b": b}, anchor)
    assert loss.item() == pytest.approx(1 + 4 + 0.25)
    loss.backward()
    assert torch.equal(w.grad, 2 * w.detach()) and anchor["w"].grad is None


def test_the_weight_ensemble_is_the_uniform_mean_of_the_start_and_every_snapshot():
    snapshots = [torch.tensor([float(k), 2.0 * k]) for k in range(1, 6)]  # after steps 0, 100, ..., 400
    start = torch.tensor([10.0, -10.0])
    average = {"w": start.clone()}
    for count, snapshot in enumerate(snapshots, 1):
        running_average(average, {"w": snapshot}, count)
    assert torch.allclose(average["w"], torch.stack([start, *snapshots]).mean(0))


def test_wise_ft_interpolates_every_parameter():
    out = interpolate({"a": torch.tensor([1.0]), "b": torch.tensor([4.0])},
                      {"a": torch.tensor([0.0]), "b": torch.tensor([-1.0])}, 0.8)
    assert out["a"].item() == pytest.approx(0.8) and out["b"].item() == pytest.approx(3.0)


def test_the_virtual_vocabulary_is_random_tokens_between_start_and_end_padded_to_the_context():
    tokens = virtual_vocabulary(torch.Generator().manual_seed(0), vocab_size=49408, start=49406, end=49407,
                                length=10, count=5)
    assert tokens.shape == (5, 77) and tokens.dtype == torch.long
    assert (tokens[:, 0] == 49406).all() and (tokens[:, 11] == 49407).all() and (tokens[:, 12:] == 0).all()
    assert (tokens[:, 1:11] < 49408).all() and len(set(tokens[:, 1:11].flatten().tolist())) > 40
