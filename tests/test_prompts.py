"""L2P++, DualPrompt and CODA-Prompt pools and the prefix-prompted ViT, against hand-written references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ifcl.methods.prompts import (L2P, CodaPrompt, DualPrompt, build_pool, coda_prompt, coda_weights, cosine,
                                  gram_schmidt, key_loss, ortho_penalty)
from ifcl.models.vit_lora import build_vit
from ifcl.models.vit_prompt import PromptedViT, prefixed_block

D = 48


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_vit():
    torch.manual_seed(0)
    return build_vit(32, 8, D, 3, 4).eval()


# ---------------------------------------------------------------- prefix attention


def reference_block(block, x, pk, pv):
    """timm's block written out by hand: prefix keys/values concatenated per head before the tokens', explicit
    softmax(q kᵀ / √d_h) v."""
    a = block.attn
    b, n, d = x.shape
    hd = d // a.num_heads
    h = F.layer_norm(x, (d,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    w, bias = a.qkv.weight, a.qkv.bias
    q, k, v = (h @ w[i * d:(i + 1) * d].T + bias[i * d:(i + 1) * d] for i in range(3))
    k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    out = torch.zeros(b, n, d)
    for head in range(a.num_heads):
        sl = slice(head * hd, (head + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
        out[..., sl] = scores.softmax(-1) @ v[..., sl]
    y = x + out @ a.proj.weight.T + a.proj.bias
    return y + block.mlp(block.norm2(y))


def test_prefixed_block_is_attention_with_prefix_tokens_and_timms_block_without():
    block = tiny_vit().blocks[1]
    x, pk, pv = torch.randn(2, 5, D), torch.randn(2, 3, D), torch.randn(2, 3, D)
    ref = reference_block(block, x, pk, pv)
    torch.testing.assert_close(prefixed_block(block, x, (pk, pv)), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(prefixed_block(block, x, (pk, pv), cls_only=True), ref[:, :1], rtol=0, atol=1e-5)
    assert (prefixed_block(block, x, (pk, pv)) - block(x)).abs().max() > 1e-3
    empty = torch.zeros(2, 0, D)
    for prefix in (None, (empty, empty)):
        torch.testing.assert_close(prefixed_block(block, x, prefix), block(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(prefixed_block(block, x, prefix, cls_only=True), block(x)[:, :1], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- key matching


def test_cosine_and_the_two_key_losses_on_a_hand_case():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
    r = 1 / math.sqrt(2)
    cos = torch.tensor([[1.0, r, 0.0], [0.0, r, -1.0]])
    torch.testing.assert_close(cosine(q, keys), cos)
    idx = torch.tensor([[0, 1], [2, 1]])
    # per image: image 0 with keys 0, 1; image 1 with keys 2, 1
    per_image = (1 - 1) + (1 - r) + (1 + 1) + (1 - r)
    # official [B, B, k]: every image also with the other image's keys: image 0 with keys 2, 1, image 1 with 0, 1
    official = per_image + (1 - 0) + (1 - r) + (1 - 0) + (1 - r)
    torch.testing.assert_close(key_loss(cos, idx, "per_image"), torch.tensor(per_image))
    torch.testing.assert_close(key_loss(cos, idx, "official"), torch.tensor(official))
    with pytest.raises(ValueError):
        key_loss(cos, idx, "mean")


def test_l2p_selects_the_top_k_keys_and_stacks_their_halves():
    pool = L2P(D, generator=gen())
    assert pool.layers == [0] and pool.extra_tokens(0) == 50 and pool.extra_tokens(1) == 0
    slot = pool.e["0"]
    assert slot.prompts.shape == (30, 20, D) and slot.keys.shape == (30, D)
    assert 0 <= slot.prompts.min() and slot.prompts.max() <= 1 and slot.keys.min() >= 0
    q = torch.randn(3, D)
    cos = torch.stack([torch.stack([F.cosine_similarity(q[b], slot.keys[k], dim=0) for k in range(30)]) for b in range(3)])
    chosen = cos.argsort(dim=1, descending=True)[:, :5]
    for train in (True, False):
        (pk, pv), loss = pool(q, 0, train=train)
        assert pk.shape == pv.shape == (3, 50, D)
        for b in range(3):
            torch.testing.assert_close(pk[b], torch.cat([slot.prompts[k, :10] for k in chosen[b]]))
            torch.testing.assert_close(pv[b], torch.cat([slot.prompts[k, 10:] for k in chosen[b]]))
        if train:
            expected = sum(1 - cos[b, k] for b in range(3) for row in chosen for k in row)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        else:
            assert loss.dim() == 0 and loss.item() == 0
    per_image = L2P(D, key_loss="per_image", generator=gen())
    _, loss = per_image(q, 0, train=True)
    torch.testing.assert_close(loss, sum(1 - cos[b, k] for b in range(3) for k in chosen[b]), rtol=1e-5, atol=1e-5)
    prefix, loss = pool(q, 1, train=True)
    assert prefix is None and loss.item() == 0


def test_dualprompt_uses_the_task_prompt_in_training_and_the_top_key_in_evaluation():
    pool = DualPrompt(D, pool_size=4, length=4, layers=(1, 2), g_length=6, g_layers=(0, 1), generator=gen())
    assert pool.layers == [0, 1, 2] and pool.extra_tokens(1) == 2 + 3 and pool.extra_tokens(2) == 2
    e = pool.e["2"]
    with torch.no_grad():
        e.keys.copy_(torch.eye(4, D))
    q = torch.zeros(3, D)
    q[0, 3], q[1, 0], q[2, 2] = 1.0, 1.0, 1.0  # image b's best key: 3, 0, 2
    (pk, pv), loss = pool(q, 2, train=True, task=1)
    assert pk.shape == (3, 2, D)
    torch.testing.assert_close(pk, e.prompts[1, :2].expand(3, -1, -1))
    torch.testing.assert_close(pv, e.prompts[1, 2:].expand(3, -1, -1))
    torch.testing.assert_close(loss, torch.tensor(3.0))  # cos(q_b, K_1) = 0 for every image
    torch.testing.assert_close(loss, sum(1 - cosine(q, e.keys)[b, 1] for b in range(3)))
    (pk, pv), loss = pool(q, 2, train=False, task=1)
    for b, k in enumerate((3, 0, 2)):
        torch.testing.assert_close(pk[b], e.prompts[k, :2])
        torch.testing.assert_close(pv[b], e.prompts[k, 2:])
    assert loss.item() == 0
    # block 1 has both: Pk = cat(Ek, Gk), Pv = cat(Ev, Gv); block 0 only g (no loss)
    g1 = pool.g["1"].prompts
    (pk, pv), loss = pool(q, 1, train=True, task=0)
    torch.testing.assert_close(pk, torch.cat([pool.e["1"].prompts[0, :2], g1[:3]]).expand(3, -1, -1))
    torch.testing.assert_close(pv, torch.cat([pool.e["1"].prompts[0, 2:], g1[3:]]).expand(3, -1, -1))
    (pk, pv), loss = pool(q, 0, train=True, task=0)
    torch.testing.assert_close(pk, pool.g["0"].prompts[:3].expand(3, -1, -1))
    assert loss.item() == 0
    assert pool(q, 3, train=True, task=0)[0] is None


# ---------------------------------------------------------------- CODA-Prompt


def test_coda_weights_and_prompt_match_the_loop_formula():
    g = gen(3)
    q, a, k = torch.randn(4, 6, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    p = torch.randn(5, 3, 6, generator=g)
    w = torch.zeros(4, 5)
    for b in range(4):
        for j in range(5):
            att = q[b] * a[j]
            w[b, j] = (att / att.norm() * (k[j] / k[j].norm())).sum()
    torch.testing.assert_close(coda_weights(q, a, k), w, rtol=1e-5, atol=1e-6)
    expected = torch.stack([sum(w[b, j] * p[j] for j in range(5)) for b in range(4)])
    torch.testing.assert_close(coda_prompt(w, p), expected, rtol=1e-5, atol=1e-6)


def reference_gram_schmidt(rows, start, stop, g):
    """The official loop (GT-RIPL/CODA-Prompt models/zoo.py), written on columns with scalar projections."""
    vv = rows.reshape(rows.shape[0], -1).T.clone()
    uu = torch.zeros_like(vv)
    uu[:, :start] = vv[:, :start]
    for k in range(start, stop):
        vk = torch.randn(vv.shape[0], generator=g)
        uk = 0
        for j in range(k):
            uj = uu[:, j]
            uk = uk + (vk * uj).sum() / (uj * uj).sum() * uj
        uu[:, k] = vk - uk
    for k in range(start, stop):
        uu[:, k] = uu[:, k] / uu[:, k].norm()
    return uu.T.reshape(rows.shape)


def test_gram_schmidt_keeps_old_rows_adds_orthonormal_ones_and_zeros_the_rest():
    rows = torch.rand(9, 2, 6, generator=gen(1))
    first = gram_schmidt(rows, 0, 3, gen(5))
    assert first.shape == rows.shape and (first[3:] == 0).all()
    torch.testing.assert_close(first, gram_schmidt(rows, 0, 3, gen(5)), rtol=0, atol=0)
    assert not torch.equal(first, gram_schmidt(rows, 0, 3, gen(6)))
    torch.testing.assert_close(first, reference_gram_schmidt(rows, 0, 3, gen(5)), rtol=1e-5, atol=1e-6)
    flat = first.reshape(9, -1)[:3]
    torch.testing.assert_close(flat @ flat.T, torch.eye(3), rtol=0, atol=1e-5)
    second = gram_schmidt(first, 3, 6, gen(7))
    assert torch.equal(second[:3], first[:3]) and (second[6:] == 0).all()
    flat = second.reshape(9, -1)[:6]
    torch.testing.assert_close(flat @ flat.T, torch.eye(6), rtol=0, atol=1e-5)
    # trained (no longer orthogonal) old rows: the official classical projections, as in the loop
    trained = rows.clone()
    torch.testing.assert_close(gram_schmidt(trained, 3, 6, gen(8)), reference_gram_schmidt(trained, 3, 6, gen(8)),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="zero norm"):
        gram_schmidt(torch.zeros(4, 3), 1, 2, gen())


def test_ortho_penalty():
    q, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen(2)))
    assert ortho_penalty(q.T).item() < 1e-12
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # t tᵀ - I = [[1, 1], [1, 0]]
    torch.testing.assert_close(ortho_penalty(t), torch.tensor(3 / 4))


def test_coda_prompt_rows_per_task_detaching_and_penalty():
    pool = CodaPrompt(D, num_tasks=3, pool_size=7, length=4, layers=(0, 2), generator=gen(4))
    slot = pool.e["2"]
    assert pool.rows(1) == (2, 4) and pool.extra_tokens(2) == 2 and pool.extra_tokens(1) == 0
    for name in ("prompts", "keys", "attention"):
        t = getattr(slot, name).detach().reshape(7, -1)
        torch.testing.assert_close(t[:2] @ t[:2].T, torch.eye(2), rtol=0, atol=1e-5)
        assert (t[2:] == 0).all()
    before = {n: p.detach().clone() for n, p in pool.named_parameters()}
    pool.begin_task(0, gen(9))  # task 0 was drawn at construction
    assert all(torch.equal(p, before[n]) for n, p in pool.named_parameters())
    pool.begin_task(1, gen(9))
    for name in ("prompts", "keys", "attention"):
        t = getattr(slot, name).detach().reshape(7, -1)
        assert torch.equal(t[:2], before[f"e.2.{name}"].reshape(7, -1)[:2]) and (t[4:] == 0).all()
        torch.testing.assert_close(t[:4] @ t[:4].T, torch.eye(4), rtol=0, atol=1e-5)
    with torch.no_grad():
        for name in ("prompts", "keys", "attention"):
            getattr(slot, name)[4:].normal_(generator=gen(11))  # rows >= f must be ignored
    q = torch.randn(3, D, generator=gen(10))
    (pk, pv), loss = pool(q, 2, train=True, task=1)
    w = coda_weights(q, slot.attention[:4], slot.keys[:4])
    combined = coda_prompt(w, slot.prompts[:4])
    torch.testing.assert_close(pk, combined[:, :2])
    torch.testing.assert_close(pv, combined[:, 2:])
    assert loss.item() == 0
    (pk.sum() + pv.square().sum()).backward()
    for name in ("prompts", "keys", "attention"):
        grad = getattr(slot, name).grad.reshape(7, -1)
        assert (grad[:2] == 0).all() and (grad[4:] == 0).all() and grad[2:4].abs().max() > 0
    (ek, ev), _ = pool(q, 2, train=False, task=1)
    torch.testing.assert_close(ek, pk.detach())
    with torch.no_grad():
        slot.keys[5] += 1.0
    torch.testing.assert_close(pool(q, 2, train=False, task=1)[0][0], ek, rtol=0, atol=0)
    with torch.no_grad():
        slot.keys[0] += 1.0
    assert not torch.allclose(pool(q, 2, train=False, task=1)[0][0], ek)
    mu = CodaPrompt(D, num_tasks=3, pool_size=7, length=4, layers=(0,), ortho_mu=0.5, generator=gen(4))
    mu.begin_task(1, gen(9))
    s = mu.e["0"]
    _, loss = mu(q, 0, train=True, task=1)
    assert loss.item() < 1e-8  # orthonormal rows [0, 4)
    with torch.no_grad():
        s.keys[3] *= 2.0
    _, loss = mu(q, 0, train=True, task=1)
    torch.testing.assert_close(loss, 0.5 * ortho_penalty(s.keys[:4].detach()), rtol=1e-4, atol=1e-6)
    assert mu(q, 0, train=False, task=1)[1].item() == 0


def test_state_round_trip_and_build_pool():
    q = torch.randn(2, D, generator=gen(1))
    settings = {"pool_size": 6, "length": 4, "layers": [0, 1], "top_k": 2, "key_loss": "per_image",
                "g_length": 2, "g_layers": [0], "ortho_mu": 0.1}
    kinds = {"l2p": L2P, "dualprompt": DualPrompt, "coda-prompt": CodaPrompt}
    for method, cls in kinds.items():
        pool = build_pool(method, settings, D, num_tasks=3, generator=gen(2))
        assert type(pool) is cls and pool.layers == [0, 1]
        pool.begin_task(1, gen(3))
        state = pool.state()
        if method == "dualprompt":
            assert set(state) == {"layers.0.prompts", "layers.0.keys", "layers.1.prompts", "layers.1.keys",
                                  "g.0.prompts"}
        if method == "coda-prompt":
            assert "layers.1.attention" in state and pool.ortho_mu == 0.1
        fresh = build_pool(method, settings, D, num_tasks=3, generator=gen(99))
        assert any(not torch.equal(state[k], v) for k, v in fresh.state().items())
        fresh.load(state)
        for layer in (0, 1):
            for train in (False, True):
                (a, b), la = pool(q, layer, train=train, task=1)
                (c, d), lc = fresh(q, layer, train=train, task=1)
                assert torch.equal(a, c) and torch.equal(b, d) and torch.equal(la, lc)
        with pytest.raises(ValueError):
            fresh.load({k: v for k, v in state.items() if not k.startswith("layers.1")})
    assert build_pool("l2p", settings, D, 3, gen()).key_loss == "per_image"
    assert build_pool("l2p", {}, D, 3, gen()).top_k == 5
    with pytest.raises(ValueError):
        build_pool("prompt", settings, D, 3, gen())


# ---------------------------------------------------------------- prompted ViT


def test_prompted_vit_features_gradients_and_heads():
    vit = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=gen(5))
    model = PromptedViT(vit, CodaPrompt(D, num_tasks=2, pool_size=4, length=4, layers=(0, 2), generator=gen(1)))
    model.begin_task(3, 0, gen(2))
    torch.testing.assert_close(model.query(x), vit.forward_head(vit.forward_features(x), pre_logits=True),
                               rtol=0, atol=1e-5)
    # prompted pass written out: every token through every block, prefixes from the pool
    q = model.query(x)
    h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for i, block in enumerate(vit.blocks):
        h = prefixed_block(block, h, model.pool(q, i, train=True, task=0)[0]) if i in (0, 2) else block(h)
    f, loss = model.features(x, train=True)
    torch.testing.assert_close(f, vit.norm(h)[:, 0], rtol=0, atol=1e-5)
    assert loss.dim() == 0
    model.begin_task(2, 1, gen(3))
    assert [p.requires_grad for p in model.heads[0].parameters()] == [False, False]
    logits, loss = model.forward_current(x, task=1)
    assert logits.shape == (2, 2)
    logits.square().sum().backward()
    assert all(p.grad is None for p in vit.parameters()) and all(p.grad is None for p in model.heads[0].parameters())
    trainable = model.trainable_parameters()
    assert len(trainable) == len(list(model.pool.parameters())) + 2
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.heads[1].parameters())
    assert all(p.grad is not None for p in model.pool.parameters())
    with torch.no_grad():
        out = model(x)
        f, _ = model.features(x)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, torch.cat([model.heads[0](f), model.heads[1](f)], 1))
    # per-task states round trip: the model after each task rebuilt from the files of tasks 0..t
    states = [None, model.task_state()]
    assert {"pool.layers.0.prompts", "pool.layers.2.attention", "head.weight", "head.bias"} <= set(states[1])
    assert not any(k.startswith("heads.") for k in states[1])
    states[0] = {**states[1], "head.weight": model.heads[0].weight.detach(), "head.bias": model.heads[0].bias.detach()}
    other = PromptedViT(tiny_vit(), CodaPrompt(D, num_tasks=2, pool_size=4, length=4, layers=(0, 2), generator=gen(7)))
    for state in states:
        other.load_task_state(state)
    with torch.no_grad():
        torch.testing.assert_close(other(x), out, rtol=0, atol=0)
    assert not any(p.requires_grad for p in other.heads.parameters())
    with pytest.raises(ValueError, match="unexpected"):
        other.load_task_state({**states[1], "heads.0.weight": states[1]["head.weight"]})
    with pytest.raises(ValueError):
        PromptedViT(tiny_vit(), L2P(D, pool_size=4, length=2, layers=(3,), top_k=1))


def test_prompted_vit_heads_are_deterministic_and_l2p_and_dualprompt_run():
    torch.manual_seed(0)
    a = PromptedViT(tiny_vit(), L2P(D, pool_size=6, length=4, top_k=2, generator=gen(1)))
    global_state = torch.random.get_rng_state()
    a.begin_task(3, 0, gen(4))
    assert torch.equal(torch.random.get_rng_state(), global_state)  # every draw from the generator
    b = PromptedViT(tiny_vit(), L2P(D, pool_size=6, length=4, top_k=2, generator=gen(1)))
    b.begin_task(3, 0, gen(4))
    assert torch.equal(a.heads[0].weight, b.heads[0].weight) and a.heads[0].weight.abs().max() <= 1 / math.sqrt(D)
    x = torch.randn(2, 3, 32, 32, generator=gen(5))
    logits, loss = a.forward_current(x, task=0)
    assert logits.shape == (2, 3) and loss.item() > 0
    vit = a.vit
    h = prefixed_block(vit.blocks[0], vit._pos_embed(vit.patch_embed(x)), a.pool(a.query(x), 0)[0])
    for block in vit.blocks[1:]:
        h = block(h)
    torch.testing.assert_close(logits, a.heads[0](vit.norm(h)[:, 0]), rtol=0, atol=1e-5)
    dual = PromptedViT(tiny_vit(), DualPrompt(D, pool_size=2, length=4, layers=(1, 2), g_length=2, g_layers=(0,),
                                              generator=gen(1)))
    dual.begin_task(2, 0, gen(2))
    logits, loss = dual.forward_current(x, task=0)
    assert logits.shape == (2, 2) and loss.item() > 0
    assert dual(x).shape == (2, 2)


def test_key_matching_stays_float32_under_bf16_autocast():
    g = gen(8)
    q, keys, a = torch.randn(3, D, generator=g), torch.rand(6, D, generator=g), torch.rand(6, D, generator=g)
    ref_cos, ref_w = cosine(q, keys), coda_weights(q, a, keys)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos, w = cosine(q, keys), coda_weights(q, a, keys)
        model = PromptedViT(tiny_vit(), L2P(D, pool_size=6, length=4, top_k=2, generator=gen(1)))
        model.begin_task(2, 0, gen(2))
        logits, loss = model.forward_current(torch.randn(2, 3, 32, 32, generator=g), task=0)
    assert cos.dtype == w.dtype == loss.dtype == torch.float32 and logits.shape == (2, 2)
    assert torch.equal(cos, ref_cos) and torch.equal(w, ref_w)
