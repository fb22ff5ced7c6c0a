"""C-LoRA (Smith et al., TMLR 2024; the rule of a commented-out block of liangyanshuo/InfLoRA): tensor rules and the
ViT model, against hand-computed cases and an independent loop written the way the InfLoRA code base computes it."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from ifcl.methods.clora import forgetting_loss, kaiming_down, lora_update, overlap_penalty
from ifcl.models.vit_clora import CLoRAQKV, ViTCLoRA, build
from ifcl.models.vit_lora import build_vit
from ifcl.training import train_classifier

D = 48  # embed dim of the tiny ViT
ROWS = {"q": slice(0, D), "k": slice(D, 2 * D), "v": slice(2 * D, 3 * D)}


def tiny_vit():
    torch.manual_seed(0)
    return build_vit(32, 8, D, 3, 4).eval()


def test_penalty_is_the_squared_norm_of_the_elementwise_product():
    past = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    down = torch.tensor([[1.0, 2.0]])  # A: rank 1 × 2
    up = torch.tensor([[1.0], [-1.0]])  # B: 2 × rank 1
    # B A = [[1, 2], [-1, -2]]; P ⊙ B A = [[1, -4], [0, -6]]: 1 + 16 + 0 + 36
    torch.testing.assert_close(lora_update(down, up), torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))
    assert float(overlap_penalty(past, down, up)) == 53.0
    # |P| gives the same loss: the absolute value in some statements of the rule changes nothing
    assert float(overlap_penalty(past.abs(), down, up)) == 53.0
    assert float(overlap_penalty(torch.zeros(2, 2), down, up)) == 0.0
    # summed over projections and weighted (the InfLoRA code's reduction), not averaged
    assert float(forgetting_loss([(past, down, up), (2 * past, down, up)], 0.5)) == pytest.approx(0.5 * 5 * 53)
    with pytest.raises(ValueError, match="no adapted"):
        forgetting_loss([], 1.0)


def test_penalty_runs_in_float32_for_half_inputs():
    g = torch.Generator().manual_seed(0)
    past = torch.randn(6, 5, generator=g) * 1e-3
    down, up = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    exact = ((past.double() * (up.double() @ down.double())) ** 2).sum()
    value = overlap_penalty(past.bfloat16(), down, up)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(((past.bfloat16().double() * (up.double() @ down.double())) ** 2).sum()),
                                         rel=1e-5)
    assert float(overlap_penalty(past, down, up)) == pytest.approx(float(exact), rel=1e-5)


def test_down_projection_init_is_lora_default():
    a = kaiming_down(4, 100, torch.Generator().manual_seed(1))
    assert a.shape == (4, 100) and float(a.abs().max()) <= 0.1 and float(a.abs().max()) > 0.09
    torch.testing.assert_close(a, kaiming_down(4, 100, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("projections", [("k", "v"), ("q", "k", "v"), ("q", "v")])
def test_layer_adds_the_current_update_to_its_projections_only(projections):
    torch.manual_seed(1)
    qkv = torch.nn.Linear(12, 36)
    layer = CLoRAQKV(qkv, 3, projections)
    g = torch.Generator().manual_seed(2)
    down = {p: torch.randn(3, 12, generator=g) for p in projections}
    up = {p: torch.randn(12, 3, generator=g) for p in projections}
    layer.begin(down, up)
    x = torch.randn(2, 5, 12)
    base = x.double() @ qkv.weight.double().T + qkv.bias.double()
    expected = base.clone()
    rows = {"q": slice(0, 12), "k": slice(12, 24), "v": slice(24, 36)}
    for p in projections:
        expected[..., rows[p]] += x.double() @ (up[p].double() @ down[p].double()).T
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    for p in set("qkv") - set(projections):
        torch.testing.assert_close(layer(x)[..., rows[p]].double(), base[..., rows[p]], rtol=1e-6, atol=1e-6)
    # merging keeps the function and sums the update into P
    before = layer(x).detach()
    layer.merge()
    assert not layer.active
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    for p in projections:
        torch.testing.assert_close(layer.past(p), up[p] @ down[p])
    with pytest.raises(ValueError, match="shape"):
        layer.begin({p: torch.zeros(2, 12) for p in projections}, {p: torch.zeros(12, 3) for p in projections})


def randomise_current(model, gen):
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def three_task_model(**kwargs):
    """A model after 3 tasks with random factors and heads (ended), the logits after each task and the factors."""
    model = ViTCLoRA(tiny_vit(), rank=2, **kwargs)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g)
    after = []
    for t in range(3):
        model.begin_task(4 + t, t, g)
        randomise_current(model, g)
        model.end_task()
        with torch.no_grad():
            after.append(model(x))
    return model, x, after


def dense_updates(model, tasks):
    """Σ_{s in tasks} B_s A_s per adapted block and projection, from the task states (float64)."""
    out = {}
    for i in model.lora_blocks:
        for p in model.projections:
            out[i, p] = sum(model.task_state(s)[f"blocks.{i}.up_{p}"].double()
                            @ model.task_state(s)[f"blocks.{i}.down_{p}"].double() for s in tasks)
    return out


def test_model_equals_timm_with_every_update_summed_into_k_and_v():
    model, x, _ = three_task_model()
    ref = tiny_vit()
    with torch.no_grad():
        for (i, p), delta in dense_updates(model, range(3)).items():
            ref.blocks[i].attn.qkv.weight[ROWS[p]] += delta.float()
        feats = ref.forward_head(ref.forward_features(x), pre_logits=True)
        plain = tiny_vit()
        assert (feats - plain.forward_head(plain.forward_features(x), pre_logits=True)).abs().max() > 1e-2
        torch.testing.assert_close(model.features(x), feats, rtol=1e-4, atol=1e-4)
        logits = torch.cat([F.linear(feats, h.weight, h.bias) for h in model.heads], dim=1)
        torch.testing.assert_close(model(x), logits, rtol=1e-4, atol=1e-4)
        assert model(x).shape == (2, 4 + 5 + 6)
    # q is untouched by default; qkv adapts it too
    assert all(float(l.past_k.abs().sum()) > 0 and not hasattr(l, "past_q") for l in model.lora_layers)
    assert all(float(l.past_q.abs().sum()) > 0 for l in three_task_model(projections="qkv")[0].lora_layers)


def test_the_loss_penalises_the_new_update_where_the_old_ones_changed_the_weight():
    model, x, _ = three_task_model()
    g = torch.Generator().manual_seed(4)
    model.weight = 0.7
    model.begin_task(3, 3, g)
    randomise_current(model, g)
    logits, loss = model.forward_current(x)
    assert logits.shape == (2, 3)
    past = dense_updates(model, range(3))
    state = model.task_state()
    current = {(i, p): state[f"blocks.{i}.up_{p}"].double() @ state[f"blocks.{i}.down_{p}"].double()
               for i in model.lora_blocks for p in model.projections}
    expected = 0.7 * sum(((past[k] * current[k]) ** 2).sum() for k in past)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    # gradient: to the current factors and head only; the old heads and the backbone are frozen
    (logits.logsumexp(1).sum() + loss).backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model.trainable_parameters())
    assert all(h.weight.grad is None for h in model.heads[:-1])
    # task 0: no earlier update, no loss
    fresh = ViTCLoRA(tiny_vit(), rank=2, weight=5.0)
    fresh.begin_task(3, 0, g)
    randomise_current(fresh, g)
    assert float(fresh.forward_current(x)[1]) == 0.0


def test_states_round_trip_to_the_model_after_each_task():
    model, x, after = three_task_model()
    assert set(model.task_state(1)) == {f"blocks.{i}.{k}_{p}" for i in range(3) for k in ("down", "up")
                                        for p in "kv"} | {"head.weight", "head.bias"}
    assert model.task_state(0)["blocks.0.down_k"].shape == (2, D)
    for t in range(3):
        again = ViTCLoRA(tiny_vit(), rank=2)
        for s in range(t + 1):
            again.load_task_state(model.task_state(s))
        with torch.no_grad():
            torch.testing.assert_close(again(x), after[t], rtol=1e-5, atol=1e-5)
        assert not again.trainable_parameters()
    with pytest.raises(IndexError):
        model.task_state(3)
    with pytest.raises(ValueError, match="task 1"):
        ViTCLoRA(tiny_vit(), rank=2).begin_task(3, 1, torch.Generator())


def official_like_task(vit, heads, factors, t, loader, lr, epochs, weight, known):
    """One task as the InfLoRA code base would run C-LoRA: every task's update re-added to W in every forward
    (stacked sum), loss = cross-entropy of head t + weight · Σ ((Σ_{s<t} B_s A_s).detach() * B_t A_t)**2 summed,
    Adam over A_t, B_t and head t (written independently of ifcl's model and loop)."""
    current = factors[t]
    params = [p for f in current.values() for p in f] + list(heads[t].parameters())
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    base = {n: w for n, w in vit.named_parameters()}
    for _ in range(epochs):
        for x, y in loader:
            weights = dict(base)
            reg = 0.0
            for (i, p), (a, b) in current.items():
                name = f"blocks.{i}.attn.qkv.weight"
                total = sum(bs @ as_ for as_, bs in (factors[s][i, p] for s in range(t + 1)))
                weights[name] = weights[name] + F.pad(total, (0, 0, ROWS[p].start, 3 * D - ROWS[p].stop))
                if t:
                    pre = sum(bs @ as_ for as_, bs in (factors[s][i, p] for s in range(t)))
                    reg = reg + ((pre.detach() * (b @ a)) ** 2).sum()
            feats = functional_call(vit, weights, (x,))  # num_classes=0: the CLS feature after the final norm
            loss = F.cross_entropy(heads[t](feats), y - known) + weight * reg
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_two_tasks_match_an_independent_loop_and_the_files_give_the_model_back():
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 2]
    data = [TensorDataset(torch.randn(12, 3, 32, 32, generator=gen), torch.randint(0, 3, (12,), generator=gen)),
            TensorDataset(torch.randn(12, 3, 32, 32, generator=gen), torch.randint(3, 5, (12,), generator=gen))]
    cfg = {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0, "epochs": 2, "schedule": "constant"}
    weight = 50.0
    ours = ViTCLoRA(tiny_vit(), rank=2, weight=weight)
    vit, heads, factors, states = tiny_vit(), [], [], []
    for t in range(2):
        loader = list(DataLoader(data[t], batch_size=4, shuffle=False))
        ours.begin_task(sizes[t], t, torch.Generator().manual_seed(10 + t))
        start = ours.task_state()
        heads.append(torch.nn.Linear(D, sizes[t]))
        with torch.no_grad():
            heads[t].weight.copy_(start["head.weight"])
            heads[t].bias.copy_(start["head.bias"])
        factors.append({(i, p): (start[f"blocks.{i}.down_{p}"].clone().requires_grad_(),
                                 start[f"blocks.{i}.up_{p}"].clone().requires_grad_())
                        for i in range(3) for p in "kv"})
        rows = train_classifier(ours.trainable_parameters(), lambda x: ours.forward_current(x, t), loader, cfg,
                                label_offset=sum(sizes[:t]), precision="fp32")
        official_like_task(vit, heads, factors, t, loader, cfg["lr"], cfg["epochs"], weight, sum(sizes[:t]))
        for f in factors[t].values():
            for p in f:
                p.requires_grad_(False)
        states.append(ours.task_state())
        ours.end_task()
        for (i, p), (a, b) in factors[t].items():
            torch.testing.assert_close(states[t][f"blocks.{i}.down_{p}"], a, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(states[t][f"blocks.{i}.up_{p}"], b, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(states[t]["head.weight"], heads[t].weight.detach(), atol=1e-5, rtol=1e-4)
        assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    # the penalty was active in task 1 (the updates of tasks 0 and 1 overlap)
    assert overlap_penalty(ours.lora_layers[0].past_k, states[1]["blocks.0.down_k"], states[1]["blocks.0.up_k"]) > 0
    x = torch.randn(5, 3, 32, 32, generator=gen)
    again = ViTCLoRA(tiny_vit(), rank=2, weight=weight)
    for s in states:
        again.load_task_state(s)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), rtol=1e-5, atol=1e-5)


def test_a_larger_weight_keeps_the_new_update_off_the_old_one():
    gen = torch.Generator().manual_seed(6)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 4, (16,), generator=gen))
    loader = list(DataLoader(data, batch_size=8, shuffle=False))
    cfg = {"optimizer": "adam", "lr": 0.02, "weight_decay": 0.0, "epochs": 3, "schedule": "constant"}
    overlap = {}
    for weight in (0.0, 1e4):
        model = ViTCLoRA(tiny_vit(), rank=2, weight=weight)
        for t in range(2):
            model.begin_task(2, t, torch.Generator().manual_seed(20 + t))
            loader_t = [(x, y % 2 + 2 * t) for x, y in loader]
            train_classifier(model.trainable_parameters(), lambda x: model.forward_current(x, t), loader_t, cfg,
                             label_offset=2 * t, precision="fp32")
            if t == 1:  # the unweighted penalty of task 1's update
                terms = [term for layer in model.lora_layers for term in layer.loss_terms()]
                overlap[weight] = sum(overlap_penalty(*term) for term in terms).item()
            model.end_task()
    assert overlap[1e4] < 0.5 * overlap[0.0]


def test_build_reads_the_settings_and_the_declaration():
    from ifcl.catalog.clora import METHODS

    (method,) = METHODS
    assert method.name == "c-lora" and method.model == "ifcl.models.vit_clora:build"
    assert method.model_keys == ("rank", "lora_blocks", "clora")
    model = build({"rank": 3, "lora_blocks": [1, 2], "clora": {"weight": 0.5, "projections": "qkv"}}, tiny_vit(), 0)
    assert model.rank == 3 and model.lora_blocks == [1, 2] and model.weight == 0.5
    assert model.projections == ("q", "k", "v") and isinstance(model.vit.blocks[1].attn.qkv, CLoRAQKV)
    assert not isinstance(model.vit.blocks[0].attn.qkv, CLoRAQKV)
    assert build({"rank": 1, "lora_blocks": "all", "clora": {"weight": 1.0}}, tiny_vit(), 0).projections == ("k", "v")
    with pytest.raises(ValueError, match="projections"):
        ViTCLoRA(tiny_vit(), projections="kq")
    with pytest.raises(ValueError, match="lora_blocks"):
        ViTCLoRA(tiny_vit(), lora_blocks=[3])
