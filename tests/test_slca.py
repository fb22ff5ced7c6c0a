"""SLCA (GengDavid/SLCA): head init, class statistics, the slow learner's parameter groups, the alignment from the
trained heads and the per-task states, against hand-computed or independently written cases on a tiny ViT."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ifcl.methods.classifier_alignment import align_heads, mean_scale
from ifcl.methods.slca import class_tasks, init_head, task_statistics
from ifcl.models.vit_lora import build_vit
from ifcl.models.vit_slca import SLCAViT, build
from ifcl.training import train_classifier

D = 48  # embed dim of the tiny ViT
CA = {"samples_per_class": 16, "epochs": 2, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "logit_norm": 0.1,
      "covariance_eps": 1e-4}
TRAIN = {"optimizer": "sgd", "lr": 1e-4, "head_lr": 1e-2, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 1,
         "schedule": "constant"}


def tiny_vit():
    torch.manual_seed(0)
    return build_vit(32, 8, D, 3, 4).eval()


def images(classes: list[int], per_class: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of images whose mean colour depends on the class, labels the global classes."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(per_class)
    colour = torch.rand(max(classes) + 1, 3, 1, 1, generator=torch.Generator().manual_seed(99))
    x = colour[y] + 0.3 * torch.randn(len(y), 3, 32, 32, generator=gen)
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order], y[order]
    half = len(y) // 2
    return [(x[:half], y[:half]), (x[half:], y[half:])]


def run_task(model, t: int, classes: list[int], seed: int = 0) -> list[dict]:
    """begin_task -> a few SGD steps through train_classifier -> finish_task, as the state chain's train step."""
    model.begin_task(len(classes), t, torch.Generator().manual_seed(100 + t))
    batches = images(classes, 6, seed + t)
    known = min(classes)
    rows = train_classifier(model.trainable_parameters(), lambda x: model.forward_current(x, t), batches, TRAIN,
                            label_offset=known, head_params=list(model.heads[-1].parameters()), precision="fp32")
    return rows + model.finish_task(batches, known)


def test_head_init_is_a_truncated_normal_of_std_002_with_zero_bias():
    w, b = init_head(300, 400, torch.Generator().manual_seed(0))
    assert w.shape == (300, 400) and torch.equal(b, torch.zeros(300))
    assert float(w.std()) == pytest.approx(0.02, rel=0.01) and abs(float(w.mean())) < 2e-4
    assert w.abs().max() < 0.02 * 6  # the bounds ±2 are absolute: no visible truncation at std 0.02
    w2, _ = init_head(300, 400, torch.Generator().manual_seed(0))
    assert torch.equal(w, w2)


def test_task_statistics_are_each_classes_mean_and_unbiased_covariance_plus_eps():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(30, 5, generator=gen)
    targets = torch.tensor([7, 8, 9] * 10)
    means, covs = task_statistics(feats, targets, known=7, num_classes=3, eps=1e-4)
    assert means.dtype == torch.float64 and covs.dtype == torch.float32
    for i in range(3):
        rows = feats.numpy()[targets.numpy() == 7 + i].astype(np.float64)
        np.testing.assert_allclose(means[i].numpy(), rows.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(covs[i].numpy(), np.cov(rows.T, ddof=1) + 1e-4 * np.eye(5), rtol=1e-5, atol=1e-7)


def test_class_tasks_give_the_official_scales_for_equal_tasks():
    """The official τ_c = c // task_size; s_c = 0.9 + 0.1 (τ_c + 1) / (t + 1)."""
    tasks = class_tasks([2, 2, 2])
    assert tasks == [c // 2 for c in range(6)]
    assert [mean_scale(tau, 2) for tau in tasks] == pytest.approx([0.9 + 0.1 * (c // 2 + 1) / 3 for c in range(6)])


def test_features_are_the_cls_token_after_a_fresh_final_norm():
    """final_norm reset: timm's blocks, then LayerNorm(eps 1e-5, weight 1, bias 0) of the CLS token (the official
    convs/vits.py deletes the pretrained norm); pretrained: timm's own pre-logits."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = tiny_vit()
    with torch.no_grad():
        torch.nn.init.normal_(reference.norm.weight)  # a pretrained norm that is not the identity
        h = reference.blocks(reference._pos_embed(reference.patch_embed(x)))[:, 0]
        expected_reset = F.layer_norm(h, (D,), eps=1e-5)
        expected_pretrained = reference.forward_head(reference.forward_features(x), pre_logits=True)
        reset = SLCAViT(copy.deepcopy(reference), CA, final_norm="reset")
        kept = SLCAViT(copy.deepcopy(reference), CA, final_norm="pretrained")
        torch.testing.assert_close(reset.features(x), expected_reset, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(kept.features(x), expected_pretrained, rtol=1e-4, atol=1e-5)
    assert reset.vit.norm.eps == 1e-5 and kept.vit.norm.eps == 1e-6


def test_trainable_parameters_are_the_whole_backbone_and_the_new_head_only():
    model = SLCAViT(tiny_vit(), CA)
    model.begin_task(2, 0, torch.Generator().manual_seed(0))
    model.begin_task(3, 1, torch.Generator().manual_seed(1))
    ids = {id(p) for p in model.trainable_parameters()}
    assert ids == {id(p) for p in model.vit.parameters()} | {id(p) for p in model.heads[1].parameters()}
    assert all(p.requires_grad for p in model.vit.parameters())
    assert not any(p.requires_grad for p in model.heads[0].parameters())
    frozen = SLCAViT(tiny_vit(), CA, freeze_backbone=True)
    frozen.begin_task(2, 0, torch.Generator().manual_seed(0))
    assert {id(p) for p in frozen.trainable_parameters()} == {id(p) for p in frozen.heads[0].parameters()}
    assert not any(p.requires_grad for p in frozen.vit.parameters())


def test_one_sgd_step_moves_the_backbone_at_lr_and_the_head_at_head_lr():
    """SGD with weight decay from zero momentum: p ← p - η (∇p + λ p), η = 1e-4 for every backbone parameter and 1e-2
    for head t; the old head does not move (its logits are not in the loss)."""
    model = SLCAViT(tiny_vit(), CA)
    model.begin_task(2, 0, torch.Generator().manual_seed(0))
    model.begin_task(2, 1, torch.Generator().manual_seed(1))
    x, y = images([2, 3], 2, 0)[0]
    reference = copy.deepcopy(model)
    F.cross_entropy(reference.forward_current(x), y - 2).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_classifier(model.trainable_parameters(), lambda v: model.forward_current(v, 1), [(x, y)], TRAIN,
                     label_offset=2, head_params=list(model.heads[-1].parameters()), precision="fp32")
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if name.startswith("heads.0."):
            assert torch.equal(p, before[name]), name
            continue
        lr = 1e-2 if name.startswith("heads.1.") else 1e-4
        expected = before[name] - lr * (q.grad + 5e-4 * before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-8, msg=name)
        assert not torch.equal(p, before[name]), name


def test_alignment_starts_from_the_trained_heads_and_leaves_them_as_trained():
    """After task 2 the aligned heads are align_heads on a copy of the heads as trained (the official fc.recall),
    not on the heads aligned after task 1; the trained heads are unchanged and forward uses the aligned ones."""
    model = SLCAViT(tiny_vit(), CA)
    assert run_task(model, 0, [0, 1]) and model.aligned is None  # task 0: statistics only, no alignment
    rows = run_task(model, 1, [2, 3])
    assert [r["stage"] for r in rows if "stage" in r] == ["alignment"] * CA["epochs"]
    after_task1 = copy.deepcopy(model.aligned)
    model.begin_task(2, 2, torch.Generator().manual_seed(102))
    batches = images([4, 5], 6, 2)
    train_classifier(model.trainable_parameters(), lambda x: model.forward_current(x, 2), batches, TRAIN,
                     label_offset=4, head_params=list(model.heads[-1].parameters()), precision="fp32")
    trained = copy.deepcopy(model.heads)
    generator_state = model._generator.get_state()
    model.finish_task(batches, 4)
    for h, g in zip(model.heads, trained):  # the trained heads are what the next task continues from
        assert torch.equal(h.weight, g.weight) and torch.equal(h.bias, g.bias)
    means, covs = torch.cat(model.means), torch.cat(model.covs)
    assert means.shape == (6, D) and covs.shape == (6, D, D)

    def aligned_from(heads):
        heads = copy.deepcopy(heads)
        align_heads(heads, means, covs, [0, 0, 1, 1, 2, 2], CA, torch.Generator().set_state(generator_state))
        return heads

    expected, from_aligned = aligned_from(trained), aligned_from(list(after_task1) + [trained[2]])
    for h, e, a in zip(model.aligned, expected, from_aligned):
        assert torch.equal(h.weight, e.weight) and torch.equal(h.bias, e.bias)
    assert not torch.equal(model.aligned[0].weight, from_aligned[0].weight)
    x = batches[0][0]
    with torch.no_grad():
        f = model.features(x)
        torch.testing.assert_close(model(x), torch.cat([h(f) for h in expected], 1))


def test_no_alignment_with_zero_epochs():
    model = SLCAViT(tiny_vit(), {**CA, "epochs": 0})
    run_task(model, 0, [0, 1])
    rows = run_task(model, 1, [2, 3])
    assert len(rows) == TRAIN["epochs"] and all("stage" not in r for r in rows)
    assert model.aligned is None and "aligned.0.weight" not in model.task_state()


@pytest.mark.parametrize("freeze", [False, True])
def test_task_states_rebuild_the_model_after_every_task(freeze):
    settings = {"ca": CA, "final_norm": "reset", "freeze_backbone": freeze}
    model = build(settings, tiny_vit(), seed=0)
    x = images([0, 1, 2, 3, 4, 5], 2, 7)[0][0]
    states, outputs = [], []
    for t in range(3):
        run_task(model, t, [2 * t, 2 * t + 1])
        states.append(model.task_state())
        with torch.no_grad():
            outputs.append(model(x))
    assert (sum(k.startswith("backbone.") for k in states[0]) == 0) == freeze
    assert "aligned.0.weight" not in states[0] and sorted(k for k in states[2] if k.startswith("aligned.")) == [
        f"aligned.{s}.{n}" for s in range(3) for n in ("bias", "weight")]
    assert states[1]["means"].shape == (2, D) and states[1]["covs"].shape == (2, D, D)
    for t in range(3):
        fresh = build(settings, tiny_vit(), seed=0)
        for state in states[: t + 1]:
            fresh.load_task_state(state)
        with torch.no_grad():
            assert torch.equal(fresh(x), outputs[t]), t
    if not freeze:  # the backbone moved: task 0's file would not give task 2's model
        assert not torch.equal(states[0]["backbone.blocks.0.attn.qkv.weight"],
                               states[2]["backbone.blocks.0.attn.qkv.weight"])
    # training continues from a replayed model exactly as from the live one (heads as trained, statistics)
    fresh = build(settings, tiny_vit(), seed=0)
    for state in states:
        fresh.load_task_state(state)
    assert [torch.equal(a.weight, b.weight) for a, b in zip(fresh.heads, model.heads)] == [True] * 3
    assert all(torch.equal(a, b) for a, b in zip(fresh.covs, model.covs))


def test_task_state_needs_the_statistics_and_a_state_needs_its_backbone():
    model = SLCAViT(tiny_vit(), CA)
    model.begin_task(2, 0, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="finish_task"):
        model.task_state()
    model.finish_task(images([0, 1], 4, 0), 0)
    state = {k: v for k, v in model.task_state().items() if not k.startswith("backbone.")}
    with pytest.raises(ValueError, match="no backbone"):
        SLCAViT(tiny_vit(), CA).load_task_state(state)
