"""SD-LoRA (WuYichen-97/SD-Lora-CL): tensor rules and the ViT model, against hand-computed or independent cases."""
import copy
import math

import pytest
import torch

from ifcl.methods.sdlora import (ORTHO_WEIGHT, component_norm, component_scales, decoupled_delta, direction,
                                 next_magnitudes, orthogonality_loss, rr_rank, unused_eval_branch_delta)
from ifcl.models.vit_lora import build_vit
from ifcl.models.vit_sdlora import SDLoRAQKV, ViTSDLoRA, _MagnitudeRef

D = 48  # embed dim of the tiny ViT


def tiny_vit():
    torch.manual_seed(0)
    return build_vit(32, 8, D, 3, 4).eval()


def fro(m):
    return math.sqrt(float((m.double() ** 2).sum()))


def randomise_current(model, gen, magnitudes=None):
    """Random values for the current task's factors and head (B ≠ 0), and the given magnitudes."""
    with torch.no_grad():
        for layer in model.lora_layers:
            for name in ("a_q", "b_q", "a_v", "b_v"):
                p = getattr(layer, name)[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        for p in model.heads[-1].parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        if magnitudes is not None:
            model.magnitudes.copy_(torch.tensor(magnitudes))


def independent_delta(alphas, factors):
    """Σ_{i<T-1} α_i B_i A_i / (‖B_i‖‖A_i‖) + α_{T-1} B_{T-1} A_{T-1}, in float64, written out term by term."""
    total = 0
    for i, (a, b) in enumerate(factors):
        term = b.double() @ a.double()
        if i < len(factors) - 1:
            term = term / (fro(b) * fro(a))
        total = total + float(alphas[i]) * term
    return total


def test_direction_is_normalised_by_the_product_of_the_factor_norms():
    eye = torch.eye(2)
    # ‖I‖_F ‖I‖_F = 2 (official); ‖I·I‖_F = √2 (the paper's notation)
    torch.testing.assert_close(direction(eye, eye), eye / 2)
    torch.testing.assert_close(direction(eye, eye, norm="product"), eye / math.sqrt(2))
    b, a = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0]])  # rank 1: both norms are √5 · 5
    expected = torch.tensor([[3.0, 4.0], [6.0, 8.0]]) / (5 * math.sqrt(5))
    torch.testing.assert_close(direction(b, a), expected)
    torch.testing.assert_close(direction(b, a, norm="product"), expected)
    assert float(component_norm(b, a)) == pytest.approx(5 * math.sqrt(5))
    with pytest.raises(ValueError, match="norm"):
        component_norm(b, a, norm="spectral")


def test_decoupled_update_normalises_every_component_but_the_current_one():
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 5, generator=g), torch.randn(4, r, generator=g)) for r in (2, 3, 1)]
    a, b = [f[0] for f in factors], [f[1] for f in factors]
    alphas = torch.tensor([0.5, 2.0, 3.0])
    scales = component_scales(alphas, a, b)
    expected = [0.5 / (fro(b[0]) * fro(a[0])), 2.0 / (fro(b[1]) * fro(a[1])), 3.0]
    torch.testing.assert_close(scales, torch.tensor(expected))
    torch.testing.assert_close(decoupled_delta(alphas, a, b).double(), independent_delta(alphas, factors))
    every = decoupled_delta(alphas, a, b, normalize_last=True).double()
    torch.testing.assert_close(every, sum(float(al) * (bi.double() @ ai.double()) / (fro(bi) * fro(ai))
                                          for al, ai, bi in zip(alphas, a, b)))
    with pytest.raises(ValueError, match="magnitudes"):
        component_scales(alphas[:2], a, b)


def test_layer_adds_the_decoupled_update_to_query_and_value_only():
    torch.manual_seed(1)
    qkv = torch.nn.Linear(12, 36)
    alphas = torch.tensor([0.7, 1.3])
    layer = SDLoRAQKV(qkv, _MagnitudeRef(alphas))
    g = torch.Generator().manual_seed(2)
    fq, fv = [], []
    for r in (3, 2):  # different ranks per task (SD-LoRA-RR)
        a_q, b_q, a_v, b_v = (torch.randn(r, 12, generator=g), torch.randn(12, r, generator=g),
                              torch.randn(r, 12, generator=g), torch.randn(12, r, generator=g))
        layer.add_component(a_q, b_q, a_v, b_v, trainable=False)
        fq.append((a_q, b_q))
        fv.append((a_v, b_v))
    x = torch.randn(2, 5, 12)
    base = (x.double() @ qkv.weight.double().T + qkv.bias.double())
    expected = base.clone()
    expected[..., :12] += x.double() @ independent_delta(alphas, fq).T
    expected[..., 24:] += x.double() @ independent_delta(alphas, fv).T
    out = layer(x)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[..., 12:24].double(), base[..., 12:24], rtol=1e-6, atol=1e-6)  # keys untouched
    with pytest.raises(ValueError, match="shape"):
        layer.add_component(torch.zeros(2, 12), torch.zeros(12, 3), torch.zeros(2, 12), torch.zeros(12, 2), True)


def three_task_model(**kwargs):
    """A model after 3 tasks with random factors, heads and magnitudes; also the logits after each task."""
    model = ViTSDLoRA(tiny_vit(), rank=3, **kwargs)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g)
    after = []
    for t, mags in enumerate([[1.1], [0.6, 1.4], [0.9, 0.3, 1.7]]):
        model.begin_task(4 + t, t, g)
        randomise_current(model, g, mags)
        model.end_task()
        with torch.no_grad():
            after.append(model(x))
    return model, x, after


def test_model_equals_timm_with_the_dense_update_merged_into_q_and_v():
    model, x, _ = three_task_model()
    ref = tiny_vit()  # the same frozen backbone, adapted by hand
    alphas = model.magnitudes.detach()
    with torch.no_grad():
        for layer, block in zip(model.lora_layers, ref.blocks):
            for name, rows in (("q", slice(0, D)), ("v", slice(2 * D, 3 * D))):
                factors = list(zip(getattr(layer, f"a_{name}"), getattr(layer, f"b_{name}")))
                block.attn.qkv.weight[rows] += independent_delta(alphas, factors).float()
        feats = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert (feats - tiny_vit().forward_head(tiny_vit().forward_features(x), pre_logits=True)).abs().max() > 1e-2
        torch.testing.assert_close(model.features(x), feats, rtol=1e-4, atol=1e-4)
        logits = torch.cat([torch.nn.functional.linear(feats, h.weight, h.bias) for h in model.heads], dim=1)
        torch.testing.assert_close(model(x), logits, rtol=1e-4, atol=1e-4)
        assert model(x).shape == (2, 4 + 5 + 6)
        torch.testing.assert_close(model.forward_current(x), logits[:, 9:], rtol=1e-4, atol=1e-4)


def test_old_directions_are_frozen_their_magnitudes_and_the_new_task_are_trained():
    model, x, _ = three_task_model()
    g = torch.Generator().manual_seed(4)
    model.begin_task(3, 3, g)
    model.set_trainable()
    expected = {id(getattr(l, n)[-1]) for l in model.lora_layers for n in ("a_q", "b_q", "a_v", "b_v")}
    expected |= {id(model.magnitudes), id(model.heads[-1].weight), id(model.heads[-1].bias)}
    assert {id(p) for p in model.trainable_parameters()} == expected
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    # official init: B_3 = 0, so α_3 and A_3 get no gradient yet, B_3 does; the old magnitudes do
    model.forward_current(x).logsumexp(1).sum().backward()
    layer = model.lora_layers[0]
    assert model.magnitudes.grad[:3].abs().min() > 0 and model.magnitudes.grad[3] == 0
    assert layer.a_q[-1].grad.abs().max() == 0 and layer.b_q[-1].grad.abs().max() > 0
    assert layer.b_v[-1].grad.abs().max() > 0
    for name in ("a_q", "b_q", "a_v", "b_v"):
        for p in list(getattr(layer, name))[:-1]:
            assert p.grad is None and not p.requires_grad
    assert all(p.grad is None for h in model.heads[:-1] for p in h.parameters())
    assert all(p.grad is None for n, p in model.vit.named_parameters() if ".a_" not in n and ".b_" not in n)
    # with B_3 ≠ 0 everything trainable gets a gradient
    model.zero_grad(set_to_none=True)
    randomise_current(model, g)
    model.forward_current(x).logsumexp(1).sum().backward()
    assert model.magnitudes.grad.abs().min() > 0 and layer.a_q[-1].grad.abs().max() > 0


def test_begin_task_draws_the_official_init_and_resets_every_magnitude():
    models = [ViTSDLoRA(tiny_vit(), rank=4) for _ in range(2)]
    for m in models:
        m.begin_task(5, 0, torch.Generator().manual_seed(7))
    m, other = models
    layer = m.lora_layers[1]
    assert layer.a_q[0].shape == (4, D) and layer.b_v[0].shape == (D, 4)
    assert layer.a_q[0].abs().max() <= 1 / math.sqrt(D) and layer.a_q[0].abs().max() > 0.5 / math.sqrt(D)
    assert layer.b_q[0].abs().max() == 0 and layer.b_v[0].abs().max() == 0
    assert not torch.equal(layer.a_q[0], layer.a_v[0])
    head = m.heads[0]
    assert head.weight.shape == (5, D) and head.weight.abs().max() <= math.sqrt(3 / D) and head.bias.abs().max() == 0
    torch.testing.assert_close(m.magnitudes.detach(), torch.tensor([0.8]))
    for a, b in zip(m.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(2, 3, 32, 32)
    randomise_current(m, torch.Generator().manual_seed(8), [1.5])
    with torch.no_grad():
        before = m(x)
        m.end_task()
        torch.testing.assert_close(m(x), before, rtol=0, atol=0)  # end_task keeps the function
    keep = copy.deepcopy(m)
    keep.reset_magnitudes = False
    m.begin_task(3, 1, torch.Generator().manual_seed(9))
    keep.begin_task(3, 1, torch.Generator().manual_seed(9))
    torch.testing.assert_close(m.magnitudes.detach(), torch.tensor([0.8, 0.8]))
    torch.testing.assert_close(keep.magnitudes.detach(), torch.tensor([1.5, 0.8]))
    a0, b0 = m.lora_layers[1].a_q[0], m.lora_layers[1].b_q[0]
    # task 0's component is now 0.8 · B_0 A_0 / (‖B_0‖‖A_0‖), no longer 1.5 · B_0 A_0 (the official switch)
    assert float(m.lora_layers[1].scales()[0][0].detach()) == pytest.approx(0.8 / (fro(b0) * fro(a0)), rel=1e-5)
    with torch.no_grad():
        assert (m(x)[:, :5] - before).abs().max() > 1e-3
    with pytest.raises(RuntimeError):
        m.begin_task(2, 2, torch.Generator())
    with pytest.raises(ValueError, match="components"):
        ViTSDLoRA(tiny_vit(), rank=2).begin_task(2, 1, torch.Generator())


def test_task_states_rebuild_the_model_after_every_task():
    model, x, after = three_task_model()
    states = [model.task_state(t) for t in range(3)]
    torch.testing.assert_close(states[0]["magnitudes"], torch.tensor([1.1]))  # recorded after task 0
    torch.testing.assert_close(states[1]["magnitudes"], torch.tensor([0.6, 1.4]))
    assert set(states[2]) == {f"blocks.{i}.{n}" for i in range(3) for n in ("a_q", "b_q", "a_v", "b_v")} | {
        "head.weight", "head.bias", "magnitudes"}
    for t in range(3):
        fresh = ViTSDLoRA(tiny_vit(), rank=3)
        for s in states[: t + 1]:
            fresh.load_task_state(s)
        assert fresh.num_tasks == t + 1 and not any(p.requires_grad for p in fresh.parameters() if p.numel() > 1
                                                     and p is not fresh.magnitudes and fresh.heads[-1].weight is not p
                                                     and fresh.heads[-1].bias is not p)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), after[t], rtol=0, atol=0)
    with pytest.raises(ValueError, match="magnitudes"):
        ViTSDLoRA(tiny_vit(), rank=3).load_task_state(states[1])
    with pytest.raises(IndexError):
        model.task_state(3)


def test_orthogonality_loss_hand_computed_and_unweighted():
    new = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    old = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])]
    assert float(orthogonality_loss(old, new)) == pytest.approx(1.0 + (1.0 + 4.0))
    assert float(orthogonality_loss([], new)) == 0.0
    assert ORTHO_WEIGHT == 0.0
    model, _, _ = three_task_model()
    expected = sum(float(((a_old @ l_a[-1].T) ** 2).sum())
                   for layer in model.lora_layers for l_a in (layer.a_q, layer.a_v) for a_old in list(l_a)[:-1])
    assert float(model.orthogonality_loss()) == pytest.approx(expected, rel=1e-5)


def test_unused_eval_branch_keeps_only_the_last_component():
    a = [torch.eye(2), torch.tensor([[1.0, 2.0], [0.0, 1.0]])]
    b = [torch.ones(2, 2), torch.tensor([[2.0, 0.0], [0.0, 3.0]])]
    torch.testing.assert_close(unused_eval_branch_delta(a, b), 0.8 * torch.tensor([[2.0, 4.0], [0.0, 3.0]]))


def test_magnitude_rule_and_rank_reduction_schedule():
    torch.testing.assert_close(next_magnitudes(torch.zeros(0)), torch.tensor([0.8]))
    torch.testing.assert_close(next_magnitudes(torch.tensor([1.2, 0.4])), torch.tensor([0.8, 0.8, 0.8]))
    torch.testing.assert_close(next_magnitudes(torch.tensor([1.2, 0.4]), reset=False), torch.tensor([1.2, 0.4, 0.8]))
    with pytest.raises(ValueError, match="20"):
        next_magnitudes(torch.ones(21))
    assert [rr_rank(t) for t in range(11)] == [10, 10, 10, 10, 8, 8, 8, 8, 6, 6, 6]
    assert [rr_rank(t, ranks=(3, 2), starts=(0, 1)) for t in range(3)] == [3, 2, 2]
    model = ViTSDLoRA(tiny_vit(), rank=3, lora_blocks=[2], ranks=(3, 2), rank_starts=(0, 1))
    g = torch.Generator().manual_seed(5)
    for t in range(2):
        model.begin_task(2, t, g)
        randomise_current(model, g)
        model.end_task()
    assert [a.shape[0] for a in model.lora_layers[0].a_v] == [3, 2] and len(model.lora_layers) == 1
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
