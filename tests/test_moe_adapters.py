"""MoE-Adapters on tensors (JiazuoYu/MoE-Adapters4CL mtil/clip/model.py, adapter.py, src/models/finetune.py,
AutoEncoder.py, evaluation.py): gating, balance loss, activate-freeze, DDAS, and the adapters in a tiny CLIP."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ifcl.methods.moe_adapters import (
    FEW_SHOT_LR, FULL_SHOT_LR, DDASAutoencoder, MoEAdaptersConfig, alexnet_extractor, autoencoder_input, balance_loss,
    classification_loss, cv_squared, ddas_lr, experts_to_freeze, noisy_top_k_gating, prob_in_top_k,
    reconstruction_errors, reconstruction_loss, select_task, selection_counts, update_frozen)
from ifcl.models.clip_moe import CLIPMoE, Expert, MoELayer
from test_diki import tiny_clip, tokens


def phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))



def randomise(model, seed=1, std=0.3):
    """Nonzero experts and routers (the trained state), for the checks that the adapters do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---- gating ----
def test_top_k_gating_without_noise_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w_gate = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.5, 1.0]])  # logits: row 0 [1, 2, 3], row 1 [3, 0.5, 1]
    gates, load = noisy_top_k_gating(x, w_gate, torch.zeros(2, 3), top_k=2, noisy=False)
    s = 1 / (1 + math.e)  # softmax([3, 2]) = [1 − s, s]; softmax([3, 1]) = [1/(1+e^-2), …]
    t = 1 / (1 + math.exp(2))
    expected = torch.tensor([[0.0, s, 1 - s], [1 - t, 0.0, t]])
    torch.testing.assert_close(gates, expected)
    assert load.tolist() == [1, 1, 2]  # samples per expert (no noise)
    assert selection_counts(gates).tolist() == [1, 1, 2]
    # top-1: the argmax with gate 1
    gates1, _ = noisy_top_k_gating(x, w_gate, torch.zeros(2, 3), top_k=1, noisy=False)
    torch.testing.assert_close(gates1, torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))


def test_noise_is_scaled_by_softplus_plus_epsilon_and_off_in_eval():
    x = torch.tensor([[1.0, -1.0]])
    w_gate = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # clean: [0, 1, 2, −1]
    w_noise = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # raw noise std: [1, 0, 0, 0]
    noise = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    std = [math.log1p(math.e) + 0.01] + [math.log(2) + 0.01] * 3
    noisy = [c + n * s for c, n, s in zip([0.0, 1.0, 2.0, -1.0], noise[0].tolist(), std)]
    gates, load = noisy_top_k_gating(x, w_gate, w_noise, top_k=2, noisy=True, noise=noise)
    order = sorted(range(4), key=lambda e: -noisy[e])
    top2 = order[:2]
    z = [math.exp(noisy[e]) for e in top2]
    expected = [0.0] * 4
    for e, v in zip(top2, z):
        expected[e] = v / sum(z)
    torch.testing.assert_close(gates, torch.tensor([expected]))
    # load: P(in top 2) per expert; in: beat the 3rd noisy value, out: beat the 2nd
    third, second = noisy[order[2]], noisy[order[1]]
    clean = [0.0, 1.0, 2.0, -1.0]
    prob = [phi((clean[e] - (third if e in top2 else second)) / std[e]) for e in range(4)]
    torch.testing.assert_close(load, torch.tensor(prob))
    # the same through prob_in_top_k directly
    top_values = torch.tensor([sorted(noisy, reverse=True)[:3]])
    torch.testing.assert_close(prob_in_top_k(torch.tensor([clean]), torch.tensor([noisy]), torch.tensor([std]),
                                             top_values, 2)[0], torch.tensor(prob))
    # evaluation: no noise, load = counts
    gates_eval, load_eval = noisy_top_k_gating(x, w_gate, w_noise, top_k=2, noisy=False, noise=noise)
    torch.testing.assert_close(gates_eval, torch.tensor([[0.0, 1 / (1 + math.e), 1 - 1 / (1 + math.e), 0.0]]))
    assert load_eval.tolist() == [0, 1, 1, 0]


def test_zero_routers_give_a_random_top_k_while_training():
    x = torch.randn(64, 8)
    g = torch.Generator().manual_seed(0)
    gates, load = noisy_top_k_gating(x, torch.zeros(8, 22), torch.zeros(8, 22), top_k=2, noisy=True, generator=g)
    assert ((gates > 0).sum(1) == 2).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(64))
    assert (gates > 0).any(0).sum() > 10  # noise std softplus(0) + 0.01 spreads the choices
    assert load.shape == (22,) and load.dtype == torch.float32


# ---- balance loss ----
def test_cv_squared_by_hand():
    # unbiased variance 1, mean² 4
    torch.testing.assert_close(cv_squared(torch.tensor([1.0, 2.0, 3.0])), torch.tensor(0.25))
    torch.testing.assert_close(cv_squared(torch.tensor([0, 1, 1])), torch.tensor(0.75))  # (1/3) / (4/9)
    assert cv_squared(torch.tensor([5.0])).item() == 0.0
    torch.testing.assert_close(cv_squared(torch.tensor([2.0, 2.0])), torch.tensor(0.0))


def test_balance_loss_by_hand():
    gates = torch.tensor([[0.0, 0.25, 0.75], [0.5, 0.0, 0.5]])
    load = torch.tensor([1, 1, 2])
    importance = [0.5, 0.25, 1.25]  # mean 2/3
    m = sum(importance) / 3
    cv_imp = sum((v - m) ** 2 for v in importance) / 2 / m**2
    cv_load = (sum((v - 4 / 3) ** 2 for v in [1, 1, 2]) / 2) / (4 / 3) ** 2
    torch.testing.assert_close(balance_loss(gates, load), torch.tensor(0.01 * (cv_imp + cv_load)))
    torch.testing.assert_close(balance_loss(gates, load, weight=1.0), torch.tensor(cv_imp + cv_load))


# ---- activate-freeze ----
def test_the_two_most_chosen_experts_are_frozen_and_the_union_grows():
    assert experts_to_freeze(torch.tensor([5, 9, 1, 12, 0])) == [3, 1]
    counts = {"visual.0": torch.tensor([5, 9, 1, 12]), "text.0": torch.tensor([7, 0, 7 + 1, 2])}
    frozen = update_frozen({}, counts)
    assert frozen == {"visual.0": [1, 3], "text.0": [0, 2]}
    counts2 = {"visual.0": torch.tensor([30, 0, 1, 12]), "text.0": torch.tensor([0, 4, 0, 3])}
    assert update_frozen(frozen, counts2) == {"visual.0": [0, 1, 3], "text.0": [0, 1, 2, 3]}


# ---- DDAS ----
def test_select_task_threshold_and_reference_slot():
    thr = MoEAdaptersConfig().threshold
    assert thr == 0.0655
    # slot 0 = reference (TinyImageNet), slot t+1 = task t
    assert select_task(torch.tensor([0.05, 0.03, 0.04]), thr).item() == 0
    assert select_task(torch.tensor([0.05, 0.06, 0.01]), thr).item() == 1
    assert select_task(torch.tensor([0.02, 0.03, 0.04]), thr).item() == -1  # the reference wins: zero-shot
    assert select_task(torch.tensor([0.07, 0.08, 0.09]), thr).item() == -1  # all above the threshold
    assert select_task(torch.tensor([0.07, 0.066, 0.09]), thr).item() == -1
    assert select_task(torch.tensor([0.07, 0.0655, 0.09]), thr).item() == 0  # "> threshold" rejects, "=" passes
    assert select_task(torch.tensor([0.05, 0.03, 0.03]), thr).item() == 0  # ties: the first slot
    per_sample = torch.tensor([[0.05, 0.03, 0.04], [0.01, 0.03, 0.04], [0.1, 0.2, 0.09]])
    assert select_task(per_sample, thr).tolist() == [0, -1, -1]


def official_loop(errors, threshold):
    """`evaluation.py` zeroshot_eval's loop, transcribed."""
    best_l, best_router = errors[0], 0
    for i in range(1, len(errors)):
        if errors[i] < best_l:
            best_l, best_router = errors[i], i
        if best_l > threshold:
            best_router = 0
    return best_router - 1


def test_select_task_equals_the_official_loop_on_random_errors():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        errors = torch.rand(12, generator=g) * 0.1
        assert select_task(errors, 0.0655).item() == official_loop(errors.tolist(), 0.0655)


def test_ddas_autoencoder_architecture_and_batch_error():
    ae = DDASAutoencoder()
    assert sum(p.numel() for p in ae.parameters()) == 8_696_164
    assert [tuple(p.shape) for p in ae.parameters()] == [(100, 43264), (100,), (43264, 100), (43264,)]
    small = [DDASAutoencoder(6, 2) for _ in range(3)]
    x = torch.rand(5, 6)
    per = reconstruction_errors(small, x, per_sample=True)
    assert per.shape == (5, 3)
    batch = reconstruction_errors(small, x)
    torch.testing.assert_close(batch, per.mean(0))
    torch.testing.assert_close(batch[1], F.mse_loss(small[1](x), x))  # nn.MSELoss on the batch
    torch.testing.assert_close(reconstruction_loss(small[2], x), batch[2])
    out = small[0](x)
    assert ((out > 0) & (out < 1)).all()


def test_ddas_routes_constructed_distributions():
    """Autoencoders trained on two distributions pick their own data; far data goes to the frozen CLIP."""
    torch.manual_seed(0)
    dim = 16

    def sample(centre, n):
        return autoencoder_input(centre + 0.3 * torch.randn(n, dim))

    ref_c, task_c, far_c = torch.full((dim,), -3.0), torch.full((dim,), 3.0), torch.cat([torch.full((8,), 4.0),
                                                                                       torch.full((8,), -4.0)])
    aes = []
    for centre in (ref_c, task_c):
        ae = DDASAutoencoder(dim, 4)
        opt = torch.optim.Adam(ae.parameters(), lr=0.01, weight_decay=1e-4)
        for it in range(300):
            for group in opt.param_groups:
                group["lr"] = ddas_lr(it, num_batches=10, init_lr=0.01)
            loss = reconstruction_loss(ae, sample(centre, 32))
            opt.zero_grad()
            loss.backward()
            opt.step()
        aes.append(ae)
    with torch.no_grad():
        task_err = reconstruction_errors(aes, sample(task_c, 64))
        ref_err = reconstruction_errors(aes, sample(ref_c, 64))
        far_err = reconstruction_errors(aes, sample(far_c, 64))
    thr = 0.5 * float(max(task_err.min(), ref_err.min()) + far_err.min())
    assert float(far_err.min()) > thr > float(task_err.min())
    assert select_task(task_err, thr).item() == 0
    assert select_task(ref_err, thr).item() == -1
    assert select_task(far_err, thr).item() == -1


def test_ddas_lr_decays_every_ten_epochs():
    assert ddas_lr(0, 30) == 0.01
    assert ddas_lr(299, 30) == 0.01  # epoch 9
    assert ddas_lr(300, 30) == pytest.approx(0.001)  # epoch 10
    assert ddas_lr(1000, 1563) == 0.01  # TinyImageNet: 1,000 iterations are less than one epoch
    assert ddas_lr(600, 30, init_lr=0.003) == pytest.approx(3e-5)


def test_alexnet_extractor_gives_conv5_before_relu():
    torchvision = pytest.importorskip("torchvision")
    alexnet = torchvision.models.alexnet(weights=None)
    fe = alexnet_extractor(alexnet)
    assert isinstance(fe[-1], torch.nn.Conv2d)
    with torch.no_grad():
        out = fe(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 256, 13, 13) and (out < 0).any()
    assert autoencoder_input(out).shape == (1, 256 * 13 * 13)
    assert not any(p.requires_grad for p in fe.parameters())


# ---- hyperparameters ----
def test_official_settings():
    cfg = MoEAdaptersConfig()
    assert (cfg.num_experts, cfg.top_k, cfg.num_routers, cfg.bottleneck) == (22, 2, 11, 64)
    assert (cfg.adapter_scale, cfg.adapter_dropout, cfg.label_smoothing, cfg.iterations) == (0.1, 0.1, 0.2, 1000)
    assert cfg.use_balance_loss is False
    assert list(FULL_SHOT_LR) == list(FEW_SHOT_LR) and len(FULL_SHOT_LR) == 11
    assert FULL_SHOT_LR["mtil_aircraft"] == 5e-3 and FULL_SHOT_LR["mtil_eurosat"] == 1e-4
    assert FEW_SHOT_LR["mtil_aircraft"] == 8e-3 and FEW_SHOT_LR["mtil_cifar100"] == 2e-4


def test_parameter_counts_at_vit_b16_widths():
    for width, per_expert in ((768, 99_136), (512, 66_112)):
        layer = MoELayer(width)
        assert sum(p.numel() for p in layer.experts[0].parameters()) == per_expert
        assert sum(p.numel() for p in layer.experts.parameters()) == 22 * per_expert
        assert layer.gate[0].numel() + layer.noise[0].numel() == 2 * width * 22
        assert len(layer.gate) == 11


# ---- the model ----
def test_expert_init_and_formula():
    torch.manual_seed(0)
    ex = Expert(8, 4).eval()
    assert ex.up.weight.abs().sum() == 0 and ex.up.bias.abs().sum() == 0 and ex.down.bias.abs().sum() == 0
    x = torch.randn(3, 5, 8)
    assert (ex(x) == 0).all()
    with torch.no_grad():
        ex.up.weight.normal_()
        ex.up.bias.normal_()
        ex.down.bias.normal_()
    expected = 0.1 * (torch.relu(x @ ex.down.weight.T + ex.down.bias) @ ex.up.weight.T + ex.up.bias)
    torch.testing.assert_close(ex(x), expected)


def test_at_init_the_model_is_the_frozen_clip():
    clip = tiny_clip()
    frozen = copy.deepcopy(clip)
    model = CLIPMoE(clip, num_experts=5, num_tasks=3)
    x = torch.rand(4, 3, 32, 32)
    t = tokens(["a photo of a cat.", "a dog.", "a red car parked."])
    ref_img = F.normalize(frozen.encode_image(x), dim=-1)
    ref_txt = F.normalize(frozen.encode_text(t), dim=-1)
    for task in (None, -1, 0, 2):
        torch.testing.assert_close(model.encode_image(x, task), ref_img, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.encode_text(t, task), ref_txt, rtol=0, atol=1e-6)
    # training mode (noise, dropout) too: the up-projections are 0
    model.train()
    torch.testing.assert_close(model.encode_image(x, 1), ref_img, rtol=0, atol=1e-6)
    # the zero-shot path is the frozen CLIP even with trained adapters
    randomise(model)
    model.eval()
    torch.testing.assert_close(model.encode_image(x, None), ref_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.encode_text(t, -1), ref_txt, rtol=0, atol=1e-6)
    assert not torch.allclose(model.encode_image(x, 0), ref_img, atol=1e-3)
    assert not torch.allclose(model.encode_text(t, 0), ref_txt, atol=1e-3)


def dense_moe(x, state, name, task, num_experts, top_k=2):
    """The mixture written densely from the flat state: gates from the first token, every expert on every token."""
    c = x[:, 0]
    logits = c @ state[f"{name}.router.{task}.gate"]
    top = logits.topk(top_k, dim=1)
    gates = torch.zeros_like(logits).scatter(1, top.indices, top.values.softmax(1))
    out = torch.zeros_like(x)
    for e in range(num_experts):
        p = f"{name}.expert.{e}"
        h = torch.relu(x @ state[f"{p}.down.weight"].T + state[f"{p}.down.bias"])
        out = out + gates[:, e, None, None] * 0.1 * (h @ state[f"{p}.up.weight"].T + state[f"{p}.up.bias"])
    return out


def reference_image(clip, state, images, task, num_experts):
    v = clip.visual
    x = v._embeds(images)
    for i, block in enumerate(v.transformer.resblocks):
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False)[0]
        x = x + block.mlp(block.ln_2(x)) + dense_moe(x, state, f"visual.{i}", task, num_experts)
    return F.normalize(v._pool(x)[0] @ v.proj, dim=-1)


def reference_text(clip, state, toks, task, num_experts):
    x = clip.token_embedding(toks) + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=clip.attn_mask)[0]
        x = x + block.mlp(block.ln_2(x)) + dense_moe(x, state, f"text.{i}", task, num_experts)
    x = clip.ln_final(x)[torch.arange(x.shape[0]), toks.argmax(-1)]
    return F.normalize(x @ clip.text_projection, dim=-1)


def test_adapters_sit_beside_the_mlp_on_the_residual_stream():
    clip = tiny_clip()
    frozen = copy.deepcopy(clip)
    model = CLIPMoE(clip, num_experts=5, num_tasks=3)
    randomise(model)
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    t = tokens(["a photo of a cat.", "a dog.", "a red car parked on the street."])
    state = model.trainable_state(1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x, 1), reference_image(frozen, state, x, 1, 5),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(t, 1), reference_text(frozen, state, t, 1, 5),
                                   rtol=1e-5, atol=1e-5)
        # per-image tasks: each image as if alone with its task, −1 the frozen CLIP
        tasks = torch.tensor([1, -1, 0, 1])
        mixed = model.encode_image(x, tasks)
        for b, task in enumerate(tasks.tolist()):
            torch.testing.assert_close(mixed[b], model.encode_image(x[b:b + 1], task)[0], rtol=1e-5, atol=1e-5)


def test_image_only_variant_leaves_the_text_tower_alone():
    clip = tiny_clip()
    frozen = copy.deepcopy(clip)
    model = CLIPMoE(clip, num_experts=4, num_tasks=2, towers=("visual",))
    randomise(model)
    t = tokens(["a cat."])
    torch.testing.assert_close(model.encode_text(t, 0), F.normalize(frozen.encode_text(t), dim=-1), rtol=0, atol=1e-6)
    assert set(model.selection_counts()) == {"visual.0", "visual.1", "visual.2"}


def test_gradients_reach_only_the_current_router_and_unfrozen_experts():
    model = CLIPMoE(tiny_clip(), num_experts=5, num_tasks=3)
    randomise(model, std=0.1)
    frozen = {"visual.0": [0, 1, 2, 3, 4], "text.1": [2]}
    params = model.set_trainable(1, frozen)
    model.train()
    model.set_generator(torch.Generator().manual_seed(0))
    x = torch.rand(6, 3, 32, 32)
    t = tokens(["a cat.", "a dog.", "a car."])
    loss = classification_loss(model.encode_image(x, 1), model.encode_text(t, 1), torch.tensor([0, 1, 2, 0, 1, 2]),
                               model.clip.logit_scale)
    loss.backward()
    assert all(p.grad is None for p in model.clip.parameters() if not any(p is q for q in params)
               and not _is_moe(model, p))
    layers = dict(model._named_layers())
    for name, layer in layers.items():
        assert layer.gate[1].grad is not None and layer.gate[1].grad.abs().sum() > 0
        assert layer.noise[1].grad is not None
        for task in (0, 2):
            assert layer.gate[task].grad is None and layer.noise[task].grad is None
        for e, ex in enumerate(layer.experts):
            if e in frozen.get(name, ()):
                assert all(p.grad is None and not p.requires_grad for p in ex.parameters())
    chosen = [e for e, ex in enumerate(layers["visual.1"].experts) if ex.up.weight.grad is not None]
    assert chosen and all(layers["visual.1"].experts[e].up.weight.grad.abs().sum() > 0 for e in chosen)
    n_expert = sum(p.numel() for p in layers["visual.1"].experts[0].parameters())
    assert sum(p.numel() for p in params) == model.parameter_count(1, frozen)
    assert model.parameter_count(1) - model.parameter_count(1, frozen) == 5 * n_expert + sum(
        p.numel() for p in layers["text.1"].experts[2].parameters())
    assert torch.isfinite(model.balance_loss())


def _is_moe(model, p):
    return any(p is q for layer in model._all_layers() for q in layer.parameters())


def test_training_mode_noise_dropout_and_counts():
    model = CLIPMoE(tiny_clip(), num_experts=6, num_tasks=2)
    randomise(model, std=0.2)
    x = torch.rand(5, 3, 32, 32)
    t = tokens(["a cat.", "a dog.", "a car.", "a tree."])
    model.eval()
    a = model.encode_image(x, 0)
    torch.testing.assert_close(model.encode_image(x, 0), a)  # deterministic in eval
    assert all((c == 0).all() for c in model.selection_counts().values())  # counts only while training
    model.train()
    model.set_generator(torch.Generator().manual_seed(0))
    b = model.encode_image(x, 0)
    model.encode_text(t, 0)
    assert not torch.allclose(a, b)
    counts = model.selection_counts()
    assert all(int(c.sum()) == 5 * 2 for name, c in counts.items() if name.startswith("visual"))
    assert all(int(c.sum()) == 4 * 2 for name, c in counts.items() if name.startswith("text"))
    frozen = update_frozen({}, counts)
    assert all(len(v) == 2 for v in frozen.values()) and len(frozen) == 6
    model.reset_counts()
    assert all((c == 0).all() for c in model.selection_counts().values())
    model.eval()
    assert not model.clip.training and all(not layer.training for layer in model._all_layers())


def test_state_round_trip():
    clip_a, clip_b = tiny_clip(), tiny_clip()
    a = CLIPMoE(clip_a, num_experts=4, num_tasks=3)
    b = CLIPMoE(clip_b, num_experts=4, num_tasks=3)
    randomise(a, seed=3)
    x = torch.rand(3, 3, 32, 32)
    t = tokens(["a cat.", "a dog."])
    state = a.trainable_state(2)
    assert set(state) == set(a.expert_state()) | set(a.router_state(2))
    assert "visual.0.expert.3.down.weight" in state and "text.2.router.2.noise" in state
    assert len(a.expert_state()) == (3 + 3) * 4 * 4 and len(a.router_state(2)) == (3 + 3) * 2
    b.load_trainable_state(state)
    torch.testing.assert_close(b.encode_image(x, 2), a.encode_image(x, 2), rtol=0, atol=0)
    torch.testing.assert_close(b.encode_text(t, 2), a.encode_text(t, 2), rtol=0, atol=0)
    assert not torch.allclose(b.encode_image(x, 1), a.encode_image(x, 1))  # router 1 was not copied
    b.load_trainable_state(a.router_state(1))
    torch.testing.assert_close(b.encode_image(x, 1), a.encode_image(x, 1), rtol=0, atol=0)
    state["visual.0.expert.0.up.weight"].add_(1.0)  # a copy, not a view of the model
    torch.testing.assert_close(b.encode_image(x, 2), a.encode_image(x, 2), rtol=0, atol=0)
    with pytest.raises(KeyError):
        b.load_trainable_state({"visual.0.adapter.0.up.weight": torch.zeros(1)})
    with pytest.raises(ValueError):
        a.encode_image(x, 3)


def official_gating(x, w_gate, w_noise, k, train, noise):
    """`model.py` noisy_top_k_gating and _prob_in_top_k, transcribed (flat gather of the thresholds)."""
    clean = x @ w_gate
    if train:
        std = F.softplus(x @ w_noise) + 1e-2
        noisy = clean + noise * std
        logits = noisy
    else:
        logits = clean
    top_logits, top_indices = logits.topk(min(k + 1, w_gate.shape[1]), dim=1)
    gates = torch.zeros_like(logits).scatter(1, top_indices[:, :k], torch.softmax(top_logits[:, :k], dim=1))
    if train and k < w_gate.shape[1]:
        batch, m = clean.size(0), top_logits.size(1)
        flat = top_logits.flatten()
        pos_in = torch.arange(batch) * m + k
        thr_in = torch.gather(flat, 0, pos_in).unsqueeze(1)
        thr_out = torch.gather(flat, 0, pos_in - 1).unsqueeze(1)
        normal = torch.distributions.Normal(torch.tensor([0.0]), torch.tensor([1.0]))
        prob = torch.where(noisy > thr_in, normal.cdf((clean - thr_in) / std), normal.cdf((clean - thr_out) / std))
        load = prob.sum(0)
    else:
        load = (gates > 0).sum(0)
    return gates, load


@pytest.mark.parametrize("k,train", [(2, True), (2, False), (1, True), (3, True), (5, True)])
def test_gating_equals_the_official_transcription(k, train):
    g = torch.Generator().manual_seed(k)
    x, wg, wn = torch.randn(7, 6, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    noise = torch.randn(7, 5, generator=g)
    gates, load = noisy_top_k_gating(x, wg, wn, k, noisy=train, noise=noise)
    ref_gates, ref_load = official_gating(x, wg, wn, k, train, noise)
    torch.testing.assert_close(gates, ref_gates)
    torch.testing.assert_close(load.float(), ref_load.float())
    if train and k < 5:
        expected = 0.01 * (cv_squared(ref_gates.sum(0)) + cv_squared(ref_load))
        torch.testing.assert_close(balance_loss(gates, load), expected)


def test_learning_rate_schedule():
    from ifcl.methods.moe_adapters import lr_at

    assert lr_at(0, 5e-3) == pytest.approx(5e-5)  # warm-up (step + 1) / 100
    assert lr_at(99, 5e-3) == pytest.approx(5e-3)
    assert lr_at(100, 5e-3) == pytest.approx(5e-3)
    assert lr_at(550, 5e-3) == pytest.approx(2.5e-3)  # half-way through the cosine
    assert lr_at(1000, 5e-3) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(300, 1e-3, total=500) == pytest.approx(0.5e-3)


# ---- the pipeline's pieces: DDAS's extractor and weights, one task's training, the per-task state, the model ----
def test_alexnet_features_are_torchvisions_and_the_random_extractor_is_seeded():
    torchvision = pytest.importorskip("torchvision")
    from ifcl.methods.moe_adapters import alexnet_features, ddas_extractor

    torch.manual_seed(3)
    theirs = torchvision.models.alexnet(weights=None).features
    torch.manual_seed(3)
    ours = alexnet_features()
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    for (k, a), (k2, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    state = torch.random.get_rng_state()
    fe, again = ddas_extractor(None), ddas_extractor(None)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is left alone
    assert all(torch.equal(a, b) for a, b in zip(fe.state_dict().values(), again.state_dict().values()))
    torch.manual_seed(0)
    weights = {f"features.{k}": v for k, v in alexnet_features().state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(ddas_extractor(weights).state_dict().values(),
                                                   fe.state_dict().values()))  # RANDOM_EXTRACTOR_SEED 0
    assert isinstance(fe[-1], torch.nn.Conv2d) and not any(p.requires_grad for p in fe.parameters())


def test_torchvision_weights_from_a_copy_placed_by_hand(tmp_path, monkeypatch):
    """fetch_torchvision_weights: a .pth placed beside the target is checked against the sha256 prefix its name
    carries, its `features.` tensors kept as safetensors with a record, the .pth removed; a wrong file is refused."""
    import hashlib

    from ifcl.data.sources import FetchError
    from ifcl.models import weights as w

    state = {"features.0.weight": torch.randn(4, 3, 2, 2), "features.0.bias": torch.randn(4),
             "classifier.1.weight": torch.randn(2, 4)}
    pth = tmp_path / "staged.pth"
    torch.save(state, pth)
    prefix = hashlib.sha256(pth.read_bytes()).hexdigest()[:8]
    monkeypatch.setitem(w.TORCHVISION, "torchvision.fake", (f"https://download.pytorch.org/models/fake-{prefix}.pth",
                                                             prefix, "features."))
    folder = tmp_path / "data" / "weights"
    folder.mkdir(parents=True)
    pth.rename(folder / f"fake-{prefix}.pth")
    out = folder / "torchvision.fake.safetensors"
    sha = w.fetch_torchvision_weights("torchvision.fake", out)
    assert not (folder / f"fake-{prefix}.pth").exists() and w.weights_record(out).is_file()
    loaded = w.load_torchvision_weights(out)
    assert sorted(loaded) == ["features.0.bias", "features.0.weight"]
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert w.fetch_torchvision_weights("torchvision.fake", out) == sha  # again: checked, nothing fetched
    out.unlink()
    w.weights_record(out).unlink()
    torch.save({"features.0.weight": torch.zeros(1)}, folder / f"fake-{prefix}.pth")  # not the file torchvision names
    with pytest.raises(FetchError, match=f"not the {prefix}"):
        w.fetch_torchvision_weights("torchvision.fake", out)


def labelled_batches(n=3, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, 3, 32, 32, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def test_one_task_trains_only_its_router_and_the_experts_not_frozen():
    from ifcl.methods.moe_adapters import Recipe, train_task

    model = CLIPMoE(tiny_clip(), num_experts=4, num_tasks=3)
    randomise(model, std=0.05)
    before = model.trainable_state(0) | model.router_state(1) | model.router_state(2)
    frozen = {"visual.0": [0, 1], "text.2": [3]}
    model.set_generator(torch.Generator().manual_seed(0))
    data = labelled_batches()
    t = tokens(["a cat.", "a dog.", "a car."])
    rows = []
    train_task(model, 1, lambda: iter(data), t, Recipe(lr=1e-2, iterations=4, warmup=1), frozen,
               lambda *row: rows.append(row))
    after = model.trainable_state(0) | model.router_state(1) | model.router_state(2)
    assert not model.training and len(rows) == 5  # iterations + 1 steps
    assert rows[0][2] == pytest.approx(1e-2) and rows[-1][2] == pytest.approx(0.0)  # warm-up, then cosine to 0
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in changed if ".router." in k} == {k for k in before if ".router.1." in k}
    assert not {k for k in changed if k.startswith(("visual.0.expert.0.", "visual.0.expert.1.", "text.2.expert.3."))}
    assert any(".expert." in k for k in changed)
    counts = model.selection_counts()
    # every training-mode forward counted: 5 batches of 6 images and 5 passes over the 3 prompts, 2 experts each
    assert all(int(c.sum()) == 5 * 6 * 2 for name, c in counts.items() if name.startswith("visual"))
    assert all(int(c.sum()) == 5 * 3 * 2 for name, c in counts.items() if name.startswith("text"))


def test_a_tasks_state_rebuilds_the_model_after_it(tmp_path):
    """moe_state -> save_state -> load_moe_state: the same experts and routers 0..t (the later ones zero), hence the
    same features for every task, and the frozen experts for the next task."""
    from ifcl.state import load_state, save_state
    from ifcl.steps.moe_adapters import FROZEN, load_moe_state, moe_state

    model = CLIPMoE(tiny_clip(), num_experts=4, num_tasks=3)
    randomise(model)
    with torch.no_grad():
        for layer in model._all_layers():
            layer.gate[2].zero_()
            layer.noise[2].zero_()
    frozen = {"visual.1": [0, 3], "text.0": [2]}
    save_state(tmp_path / "state.safetensors", moe_state(model, 1, frozen), {"task": 1})
    tensors, _ = load_state(tmp_path / "state.safetensors")
    assert not any(".router.2." in k for k in tensors)  # routers of later tasks are not saved
    assert tensors[FROZEN + "visual.1"].tolist() == [True, False, False, True]
    fresh = CLIPMoE(tiny_clip(), num_experts=4, num_tasks=3)
    assert load_moe_state(fresh, tmp_path / "state.safetensors") == {**{n: [] for n in model.selection_counts()},
                                                                      **frozen}
    model.eval(), fresh.eval()
    x, t = torch.rand(3, 3, 32, 32), tokens(["a cat.", "a dog."])
    for task in (-1, 0, 1, 2):
        torch.testing.assert_close(fresh.encode_image(x, task), model.encode_image(x, task), rtol=0, atol=0)
        torch.testing.assert_close(fresh.encode_text(t, task), model.encode_text(t, task), rtol=0, atol=0)


def test_ddas_model_sends_each_batch_or_image_through_the_chosen_router():
    """DDASModel.logits: batch-wise, one task for the whole batch (the official choice); per image, each image as
    if alone with its own task; −1 is the frozen CLIP against the frozen CLIP's text features."""
    from ifcl.methods.moe_adapters import ddas_extractor, extractor_inputs, initial_autoencoder
    from ifcl.models.clip_moe import DDASModel

    clip = tiny_clip()
    frozen_clip = copy.deepcopy(clip)
    moe = CLIPMoE(clip, num_experts=4, num_tasks=2)
    randomise(moe)
    fe = ddas_extractor(None)
    x = torch.rand(4, 3, 32, 32)
    dim = extractor_inputs(fe, x[:1], 64).shape[1]
    aes = [initial_autoencoder(dim, 3, s) for s in range(3)]
    t = tokens(["a cat.", "a dog.", "a car."])
    texts = {task: moe.encode_text(t, task) for task in (-1, 0, 1)}
    batch = DDASModel(moe, fe, aes, threshold=1.0, batchwise=True, image_size=64).eval()
    errors = batch.errors(x)
    assert errors.shape == (3,) and int(batch.select(x)) == int(errors.argmin()) - 1
    logits, tasks = batch.logits(x, texts.__getitem__)
    chosen = int(tasks[0])
    assert (tasks == chosen).all()
    torch.testing.assert_close(logits, moe.encode_image(x, chosen) @ texts[chosen].t())
    # a threshold below every error: the frozen CLIP
    low = DDASModel(moe, fe, aes, threshold=1e-9, batchwise=True, image_size=64).eval()
    logits, tasks = low.logits(x, texts.__getitem__)
    assert (tasks == -1).all()
    reference = F.normalize(frozen_clip.encode_image(x), dim=-1) @ F.normalize(frozen_clip.encode_text(t), dim=-1).t()
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    # per image
    each = DDASModel(moe, fe, aes, threshold=1.0, batchwise=False, image_size=64).eval()
    logits, tasks = each.logits(x, texts.__getitem__)
    assert tasks.tolist() == (each.errors(x).argmin(1) - 1).tolist()
    for b, task in enumerate(tasks.tolist()):
        torch.testing.assert_close(logits[b], (moe.encode_image(x[b:b + 1], task) @ texts[task].t())[0],
                                   rtol=1e-5, atol=1e-5)
