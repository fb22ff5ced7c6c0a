"""EASE (sun-hailong/CVPR24-Ease): tensor rules and the ViT model, against hand-computed or independent cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from ifcl.catalog.ease import EASE, METHODS
from ifcl.methods.ease import (Adapter, class_means, class_sums, complement, complete_prototypes, concatenated_logits,
                               reweighted_logits, subspace_weights)
from ifcl.models.vit_ease import ViTEASE, adapted_block, adapted_cls_block, build
from ifcl.models.vit_lora import build_vit
from ifcl.settings import plain
from ifcl.training import train_classifier

D = 48  # embed dim of the tiny ViT


def tiny_vit():
    torch.manual_seed(0)
    return build_vit(32, 8, D, 3, 4).eval()


def randomise(adapters, gen, std=0.3):
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_adapter_is_scaled_relu_bottleneck_starting_at_zero():
    torch.manual_seed(0)
    a = Adapter(6, 3, scale=0.1, dropout=0.5)
    assert a.down.weight.abs().max() <= 1 / math.sqrt(6) and a.down.weight.abs().max() > 0
    assert a.up.weight.abs().max() == 0 and a.down.bias.abs().max() == 0 and a.up.bias.abs().max() == 0
    x = torch.randn(2, 4, 6)
    assert a(x).abs().max() == 0  # a new adapter adds nothing
    with torch.no_grad():
        a.down.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, -1.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0]]))
        a.down.bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
        a.up.weight.copy_(torch.ones(6, 3))
        a.up.bias.fill_(1.0)
    v = torch.tensor([[1.0, 2.0, -3.0, 0, 0, 0]])
    # down: [1, -2 + 0.5, -6] -> ReLU [1, 0, 0] -> up: 1 + 1 = 2 in every output -> scaled 0.2
    torch.testing.assert_close(a(v), torch.full((1, 6), 0.2))
    torch.manual_seed(3)
    outs = {tuple(a(v.repeat(64, 1), train=True)[:, 0].tolist()) for _ in range(2)}
    assert len(outs) == 2  # dropout on the hidden units while training: 0.1 · (1 + 2) or 0.1 · 1
    assert {round(o, 5) for o in a(v.repeat(64, 1), train=True)[:, 0].tolist()} == {0.3, 0.1}


def test_adapted_block_adds_the_adapter_beside_the_mlp_after_the_attention():
    vit = tiny_vit()
    block = vit.blocks[1]
    adapter = Adapter(D, 5)
    randomise(adapter, torch.Generator().manual_seed(1))
    x = torch.randn(2, 17, D)
    with torch.no_grad():
        h = x + block.attn(block.norm1(x))  # written out: the adapter reads the stream after the attention
        expected = h + block.mlp(block.norm2(h)) + 0.1 * adapter.up(F.relu(adapter.down(h)))
        torch.testing.assert_close(adapted_block(block, x, adapter), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adapted_block(block, x, None), block(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(adapted_cls_block(block, x, adapter), expected[:, :1], rtol=1e-5, atol=1e-5)
        assert (adapted_block(block, x, adapter) - block(x)).abs().max() > 1e-2


def test_class_prototypes_are_per_class_means():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 0, 2, 1])
    sums, counts = class_sums(f, y, 3)
    torch.testing.assert_close(class_means(sums, counts), torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 0.0]]))
    assert counts.tolist() == [2, 1, 1]
    with pytest.raises(ValueError, match="samples"):
        class_means(*class_sums(f, y, 4))
    with pytest.raises(ValueError, match="labels"):
        class_sums(f, y, 2)


def test_complement_is_a_softmax_over_donor_similarities():
    old_own = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    donors_own = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    donors_new = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    e = math.e
    c = math.exp(1 / math.sqrt(2))  # the second old class is at 45° from both donors: equal weights
    expected = torch.tensor([[2 * e / (e + 1), 4 / (e + 1)], [2 * c / (2 * c), 4 * c / (2 * c)]])
    torch.testing.assert_close(complement(old_own, donors_own, donors_new), expected)


def loop_complete(prototypes, sizes, recalc):
    """The official double loop of solve_sim_reset / solve_similarity, entry by entry."""
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    out = prototypes.clone()
    for s in range(len(sizes) - 1):
        for k in range(s + 1, len(sizes)):
            hi = bounds[-1] if recalc else bounds[k + 1]
            for i in range(bounds[s], bounds[s + 1]):
                sims = torch.tensor([float(F.cosine_similarity(prototypes[i, s], prototypes[j, s], dim=0))
                                     for j in range(bounds[k], hi)])
                w = sims.softmax(0)
                out[i, k] = sum(w[n] * prototypes[j, k] for n, j in enumerate(range(bounds[k], hi)))
    return out


@pytest.mark.parametrize("recalc", [True, False])
def test_complete_prototypes_fills_old_classes_in_newer_subspaces(recalc):
    sizes = [2, 3, 1, 2]
    table = torch.randn(8, 4, 5, generator=torch.Generator().manual_seed(0))
    out = complete_prototypes(table, sizes, recalc)
    torch.testing.assert_close(out, loop_complete(table, sizes, recalc))
    measured = torch.tensor([[k <= s for k in range(4)] for s in [0, 0, 1, 1, 1, 2, 3, 3]])
    torch.testing.assert_close(out[measured], table[measured], rtol=0, atol=0)
    assert (out[~measured] - table[~measured]).abs().min() > 0
    # the newest subspace's complement does not depend on recalc, the older ones' do
    other = complete_prototypes(table, sizes, not recalc)
    torch.testing.assert_close(other[:6, 3], out[:6, 3])
    assert (other[:2, 1] - out[:2, 1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="prototypes"):
        complete_prototypes(table[:7], sizes)


def test_subspace_weights_divide_alpha_by_the_last_task_index():
    w = subspace_weights([2, 1, 1], alpha=0.1)
    expected = torch.tensor([[1.0, 0.05, 0.05]] * 2 + [[0.05, 1.0, 0.05], [0.05, 0.05, 1.0]])
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(subspace_weights([3], alpha=0.1), torch.ones(3, 1))
    wb = subspace_weights([1, 2], alpha=0.4, beta=0.7)
    torch.testing.assert_close(wb, torch.tensor([[0.7, 1.0, 0.4], [0.7, 0.4, 1.0], [0.7, 0.4, 1.0]]))


def test_reweighted_logits_sum_weighted_per_subspace_cosines():
    g = torch.Generator().manual_seed(2)
    feats, protos = torch.randn(3, 2, 4, generator=g), torch.randn(5, 2, 4, generator=g)
    w = torch.rand(5, 2, generator=g)
    expected = torch.zeros(3, 5)
    for b in range(3):
        for c in range(5):
            expected[b, c] = sum(w[c, k] * F.cosine_similarity(feats[b, k], protos[c, k], dim=0) for k in range(2))
    torch.testing.assert_close(reweighted_logits(feats, protos, w), expected)
    flat = F.cosine_similarity(feats.flatten(1)[:, None], protos.flatten(1)[None], dim=-1)
    torch.testing.assert_close(concatenated_logits(feats, protos), flat)


def test_begin_task_draws_the_official_init_and_trains_only_the_new_task():
    model = ViTEASE(tiny_vit(), bottleneck=4)
    model.begin_task(3, 0, torch.Generator().manual_seed(0))
    adapter = model.adapters[0][2]
    assert adapter.down.weight.shape == (4, D) and adapter.up.weight.abs().max() == 0
    assert 0.5 / math.sqrt(D) < adapter.down.weight.abs().max() <= 1 / math.sqrt(D)
    head = model.heads[0]
    assert head.weight.shape == (3, D) and head.weight.abs().max() <= 1 / math.sqrt(D) and float(head.sigma.detach()) == 1.0
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.finish_task([(x, torch.tensor([0, 1, 2, 0]))], 0)
    g = torch.Generator().manual_seed(2)
    model.begin_task(2, 1, g)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(model.trainable_parameters()) == 3 * 4 + 2
    randomise(model.adapters[1], g)
    model.forward_current(x).logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.adapters[0].parameters()) and model.heads[0].weight.grad is None
    assert all(p.grad is None for p in model.vit.parameters())
    with pytest.raises(RuntimeError):
        model.forward(x)  # task 1 has no prototypes yet
    with pytest.raises(RuntimeError):
        model.begin_task(2, 2, g)
    with pytest.raises(ValueError, match="tasks 0"):
        ViTEASE(tiny_vit()).begin_task(2, 1, g)


def test_training_forward_is_the_cosine_head_with_the_adapters_dropout():
    model = ViTEASE(tiny_vit(), bottleneck=4)
    g = torch.Generator().manual_seed(0)
    model.begin_task(3, 0, g)
    randomise(model.adapters[0], g)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        feature = model.subspace_features(x)[:, 0]
        expected = F.linear(F.normalize(feature), F.normalize(model.heads[0].weight))
        torch.manual_seed(0)
        a, b = model.forward_current(x), model.forward_current(x)
        assert (a - b).abs().max() > 1e-4  # dropout 0.1 in the training forward
        model.adapter_dropout = 0.0
        for adapter in model.adapters[0]:
            adapter.dropout = 0.0
        torch.testing.assert_close(model.forward_current(x), expected, rtol=1e-5, atol=1e-5)


def test_features_without_adapters_and_with_init_ptm_are_the_backbones():
    vit = tiny_vit()
    model = ViTEASE(vit, bottleneck=4, use_init_ptm=True, beta=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 32, 32, generator=g)
    model.begin_task(2, 0, g)
    with torch.no_grad():
        plain = vit.forward_head(vit.forward_features(x), pre_logits=True)
        feats = model.subspace_features(x)
        assert feats.shape == (3, 2, D)
        torch.testing.assert_close(feats[:, 0], plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats[:, 1], plain, rtol=1e-5, atol=1e-5)  # up = 0: a new adapter adds nothing
        randomise(model.adapters[0], g)
        assert (model.subspace_features(x)[:, 1] - plain).abs().max() > 1e-2


def three_tasks(sizes=(3, 2, 2), **kwargs):
    """A model trained through the state chain's calls for 3 tasks (SGD, a few steps each), the logits after each
    task, the task images and the model."""
    model = ViTEASE(tiny_vit(), bottleneck=4, **kwargs)
    g = torch.Generator().manual_seed(0)
    cfg = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 2, "schedule": "cosine"}
    x_test = torch.rand(5, 3, 32, 32, generator=g)
    images, after, known = [], [], 0
    for t, n in enumerate(sizes):
        x = torch.rand(2 * n, 3, 32, 32, generator=g)
        y = torch.arange(2 * n) % n + known
        images.append((x, y))
        model.begin_task(n, t, g)
        model.to("cpu").eval()
        rows = train_classifier(model.trainable_parameters(), lambda v: model.forward_current(v, t),
                                [(x[:n], y[:n]), (x[n:], y[n:])], cfg, label_offset=known,
                                head_params=list(model.heads[-1].parameters()), precision="fp32")
        assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
        assert model.adapters[-1][0].up.weight.abs().max() > 0  # trained
        rows = model.finish_task([(x[:3], y[:3]), (x[3:], y[3:])], known)
        assert rows == [{"stage": "prototypes", "images": 2 * n, "classes": n, "subspaces": t + 1 + int(
            model.use_init_ptm)}]
        with torch.no_grad():
            after.append(model(x_test))
        known += n
    return model, images, x_test, after


def test_three_tasks_give_the_independently_computed_ease_logits():
    model, images, x_test, after = three_tasks()
    assert [a.shape[1] for a in after] == [3, 5, 7]
    with torch.no_grad():
        # prototypes measured with each task's own final adapters, in every subspace up to its own
        table = torch.zeros(7, 3, D)
        start = 0
        for t, (x, y) in enumerate(images):
            n = len(set(y.tolist()))
            feats = model.subspace_features(x, tasks=t + 1)
            for c in range(n):
                table[start + c, : t + 1] = feats[y - start == c].mean(0)
            start += n
        torch.testing.assert_close(model.prototypes[1], table[3:5, :2], rtol=1e-5, atol=1e-5)
        full = loop_complete(table, [3, 2, 2], recalc=True)
        feats = model.subspace_features(x_test)
        expected = torch.zeros(5, 7)
        for c in range(7):
            own = 0 if c < 3 else 1 if c < 5 else 2
            for k in range(3):
                cos = F.cosine_similarity(feats[:, k], full[c, k][None], dim=-1)
                expected[:, c] += cos * (1.0 if k == own else 0.1 / 2)
        torch.testing.assert_close(after[2], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"use_init_ptm": True, "beta": 1.0, "recalc_sim": False}])
def test_task_states_rebuild_the_model_after_every_task(kwargs):
    model, _, x_test, after = three_tasks(**kwargs)
    states = [model.task_state(t) for t in range(3)]
    first = int(kwargs.get("use_init_ptm", False))
    assert states[1]["prototypes"].shape == (2, 2 + first, D)
    assert set(states[0]) == {f"blocks.{b}.{n}" for b in range(3) for n in ("down.weight", "down.bias", "up.weight",
                                                                              "up.bias")} | {
        "head.weight", "head.sigma", "prototypes"}
    for t in range(3):
        fresh = ViTEASE(tiny_vit(), bottleneck=4, **kwargs)
        for s in states[: t + 1]:
            fresh.load_task_state(s)
        assert not any(p.requires_grad for p in fresh.parameters())
        with torch.no_grad():
            torch.testing.assert_close(fresh(x_test), after[t], rtol=0, atol=0)
    with pytest.raises(ValueError, match="prototypes"):
        ViTEASE(tiny_vit(), bottleneck=4, **kwargs).load_task_state(states[1])
    with pytest.raises(ValueError, match="holds"):
        ViTEASE(tiny_vit(), bottleneck=4, **kwargs).load_task_state({"prototypes": states[0]["prototypes"]})
    with pytest.raises(IndexError):
        model.task_state(3)


def test_declaration_and_builder():
    (method,) = METHODS
    assert method.name == "ease" and method.statistics_images == "test_transform" and not method.drop_last
    assert method.task_images == "train_transform" and method.model_keys == ("ease",)
    settings = plain(EASE())
    assert settings["ease"] == {"bottleneck": 64, "adapter_scale": 0.1, "adapter_dropout": 0.1, "alpha": 0.1,
                                "use_init_ptm": False, "beta": 0.0, "recalc_sim": True, "reweight": True}
    model = build({"method": "ease", **settings}, tiny_vit(), 0)
    assert model.bottleneck == 64 and model.alpha == 0.1 and model.reweight and not model.use_init_ptm
    off = build({"ease": {**settings["ease"], "reweight": False, "bottleneck": 3}}, tiny_vit(), 0)
    off.begin_task(2, 0, torch.Generator().manual_seed(0))
    x = torch.rand(4, 3, 32, 32)
    off.finish_task([(x, torch.tensor([0, 1, 0, 1]))], 0)
    with torch.no_grad():
        prototypes, _ = off.classifier()
        torch.testing.assert_close(off(x), concatenated_logits(off.subspace_features(x), prototypes))
