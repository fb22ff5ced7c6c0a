"""HiDe-Prompt (thu-ml/HiDe-Prompt): tensor rules and the ViT model, against hand-computed or independent cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from ifcl.methods.hide_prompt import (align, centroid_statistics, contrastive_loss, kmeans, momentum_prompt,
                                      official_reshape, parted_contrastive_loss, prefix_sides, sample_centroids,
                                      split_parts)
from ifcl.models.vit_hide_prompt import TIIMlp, build
from ifcl.models.vit_lora import build_vit
from ifcl.training import train_classifier

D = 48  # embed dim of the tiny ViT
HEADS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest, and keeps the module quick on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit():
    torch.manual_seed(0)
    return build_vit(32, 8, D, 3, HEADS).eval()


def settings(**prompt):
    return {"prompt": {"length": 2, "layers": [0, 2], "momentum": 0.1, "contrastive": 0.5, "temperature": 0.8,
                       "layout": "official", "devices": 2, "device_batch": 4, **prompt},
            "tii": {"ratio": 2, "epochs": 2, "lr": 1e-2, "clip_grad": 1.0, "images": "train_transform"},
            "tii_alignment": {"epochs": 2, "lr": 1e-2, "samples": 3, "momentum": 0.9, "weight_decay": 0.0},
            "alignment": {"epochs": 2, "lr": 1e-2, "samples": 5, "momentum": 0.9, "weight_decay": 0.0},
            "centroids": 2}


def model_of(**prompt):
    return build({"method": "hide-prompt", "hide": settings(**prompt)}, tiny_vit(), 0)


# ---------------------------------------------------------------- tensor rules


def test_official_layout_hand_computed_and_as_the_official_reshape():
    key, value = prefix_sides([4])
    assert key.tolist() == [0, 0, 1, 1] and value.tolist() == [0, 0, 1, 1]
    key, value = prefix_sides([5])  # odd batch: the middle image gets keys from half 0, values from half 1
    assert key.tolist() == [0, 0, 0, 1, 1] and value.tolist() == [0, 0, 1, 1, 1]
    key, value = prefix_sides([4, 1])  # per GPU batch; a batch of one image is a proper key/value pair
    assert key.tolist() == [0, 0, 1, 1, 0] and value.tolist() == [0, 0, 1, 1, 1]
    key, value = prefix_sides([3, 2], layout="key_value")
    assert key.tolist() == [0] * 5 and value.tolist() == [1] * 5
    with pytest.raises(ValueError, match="layout"):
        prefix_sides([2], layout="transpose")
    # EPrompt.forward's reshape with every image on pool entry 2 (training: the task's own prompt)
    prompts = torch.randn(3, 2, 4, 5, 2, 3)  # layers, key/value, pool, length, heads, head_dim
    for b in (1, 4, 5, 6):
        out = official_reshape(prompts, torch.full((b,), 2))  # [layers, B, 2, length, heads, head_dim]
        key, value = prefix_sides([b])
        for j in range(b):
            assert torch.equal(out[:, j, 0], prompts[:, key[j], 2]) and torch.equal(out[:, j, 1], prompts[:, value[j], 2])


def test_momentum_prompt_and_split_parts():
    p, earlier = torch.tensor([1.0, 2.0]), torch.tensor([[0.0, 0.0], [2.0, 4.0]])
    torch.testing.assert_close(momentum_prompt(p, earlier, 0.1), torch.tensor([0.9 + 0.1, 1.8 + 0.2]))
    assert momentum_prompt(p, None, 0.1) is p and momentum_prompt(p, earlier, 0.0) is p
    assert [(s.start, s.stop) for s in split_parts(192, 8)][:2] == [(0, 24), (24, 48)]
    assert [s.stop - s.start for s in split_parts(8, 8)] == [1] * 8  # a last batch of 8: one image per GPU
    assert [s.stop - s.start for s in split_parts(3, 8)] == [1, 1, 1]


def independent_contrastive(features, prototypes, temperature):
    rows = [r.double() for r in prototypes] + [r.double() for r in features]
    total = 0.0
    for i, a in enumerate(rows):
        sims = [float(a @ b) / temperature for b in rows]
        top = max(sims)
        total += -(sims[i] - top - math.log(sum(math.exp(s - top) for s in sims)))
    return total / len(rows)


def test_contrastive_loss_is_the_official_orth_loss():
    g = torch.Generator().manual_seed(0)
    f, protos = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g, dtype=torch.float64)
    assert float(contrastive_loss(f, protos)) == pytest.approx(independent_contrastive(f, protos, 0.8), rel=1e-9)
    assert float(contrastive_loss(f, None, 0.5)) == pytest.approx(independent_contrastive(f, [], 0.5), rel=1e-9)
    parted = parted_contrastive_loss(f, protos, 2)  # parts of 3 and 2 images
    expected = (independent_contrastive(f[:3], protos, 0.8) + independent_contrastive(f[3:], protos, 0.8)) / 2
    assert float(parted) == pytest.approx(expected, rel=1e-9)
    # only the features carry gradient, prototype rows included
    f.requires_grad_(True)
    contrastive_loss(f, protos).backward()
    assert f.grad.abs().min() > 0


def blobs(g, centres, n):
    return torch.cat([c + 0.01 * torch.randn(n, len(c), generator=g) for c in centres])


def test_kmeans_and_centroid_statistics():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    x = blobs(g, centres, 7)[torch.randperm(21, generator=g)]
    found, labels = kmeans(x, 3, torch.Generator().manual_seed(1))
    order = found[:, 0].argsort(descending=True)  # (5, 0), (0, 5), (-5, -5)
    torch.testing.assert_close(found[order].float(), centres, atol=0.02, rtol=0)
    assert torch.bincount(labels).tolist() == [7, 7, 7]
    means, variances = centroid_statistics(x, 3, torch.Generator().manual_seed(1))
    assert means.dtype == torch.float64 and means.shape == (3, 2)
    for i in range(3):
        members = x.double()[labels == i]
        torch.testing.assert_close(means[i], members.mean(0))
        torch.testing.assert_close(variances[i], ((members - members.mean(0)) ** 2).mean(0))  # np.var: biased
    with pytest.raises(ValueError, match="at least 4"):
        kmeans(x[:3], 4, torch.Generator())
    single = torch.tensor([[0.0, 0.0], [0.0, 0.1], [9.0, 9.0]])  # a one-member cluster: variance 0
    _, v = centroid_statistics(single, 2, torch.Generator().manual_seed(0))
    assert sorted(float(r.mean()) for r in v)[0] == 0.0


def test_sampled_features_skip_zero_variance_centroids():
    means = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [7.0, 7.0]]], dtype=torch.float64)
    variances = torch.tensor([[[0.25, 1.0], [0.0, 0.0]], [[4.0, 0.01], [1.0, 1.0]]], dtype=torch.float64)
    x, y = sample_centroids(means, variances, 20000, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and len(x) == 3 * 20000
    assert y.tolist() == [0] * 20000 + [1] * 40000
    first = x[:20000]
    torch.testing.assert_close(first.mean(0), torch.tensor([1.0, 2.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(first.std(0), torch.tensor([0.25 + 1e-4, 1.0 + 1e-4]).sqrt(), atol=0.02, rtol=0)
    torch.testing.assert_close(x[20000:40000].std(0), torch.tensor([4.0 + 1e-4, 0.01 + 1e-4]).sqrt(), atol=0.03, rtol=0)


def test_alignment_takes_as_many_batches_as_earlier_classes_with_a_cosine_schedule():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    calls = []

    def logits(x):
        calls.append(len(x))
        return x @ w.T

    x, y = torch.randn(30, 2), torch.arange(3).repeat_interleave(10)
    rows = align([w], logits, lambda: (x, y), 2, 4, {"epochs": 4, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
                 torch.Generator().manual_seed(0))
    assert calls == [4] * 8  # 2 batches of 4 an epoch, not the 30 samples
    assert [r["stage_lr"] for r in rows] == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)])
    assert w.abs().sum() > 0


# ---------------------------------------------------------------- the model


def reference_features(vit, x, prefixes):
    """timm's blocks with the prefix (keys, values) [B, L, D] of block i in front of the keys and values, by hand."""
    h = vit._pos_embed(vit.patch_embed(x))
    for i, block in enumerate(vit.blocks):
        a = block.attn
        b, n, d = h.shape
        qkv = a.qkv(block.norm1(h)).reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if i in prefixes:
            pk, pv = (p.reshape(b, -1, HEADS, d // HEADS).transpose(1, 2) for p in prefixes[i])
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(d // HEADS)).softmax(-1)
        h = h + a.proj((att @ v).transpose(1, 2).reshape(b, n, d))
        h = h + block.mlp(block.norm2(h))
    return vit.norm(h)[:, 0]


def test_prompted_features_put_the_layout_s_halves_in_front_of_keys_and_values():
    model = model_of()
    g = torch.Generator().manual_seed(3)
    model.begin_task(2, 0, g)
    x = torch.randn(5, 3, 32, 32, generator=g)
    p = model.prompts[0].detach()  # [layers, 2, length, D]
    key, value = prefix_sides([3, 2])
    prefixes = {blk: (p[li][key], p[li][value]) for li, blk in enumerate([0, 2])}
    with torch.no_grad():
        ours = model.prompted_features(x, p[None], torch.zeros(5, dtype=torch.long), [3, 2])
        torch.testing.assert_close(ours, reference_features(model.vit, x, prefixes), rtol=1e-4, atol=1e-4)
        plain = model.prompted_features(x, p[None], torch.zeros(5, dtype=torch.long), [5])
        kv = {blk: (p[li][[0] * 5], p[li][[1] * 5]) for li, blk in enumerate([0, 2])}
        model.cfg["prompt"]["layout"] = "key_value"
        torch.testing.assert_close(model.prompted_features(x, p[None], torch.zeros(5, dtype=torch.long), [5]),
                                   reference_features(model.vit, x, kv), rtol=1e-4, atol=1e-4)
        assert (plain - reference_features(model.vit, x, kv)).abs().max() > 1e-3
        torch.testing.assert_close(model.uninstructed(x), reference_features(model.vit, x, {}), rtol=1e-4, atol=1e-4)


def test_tii_mlp_formula():
    mlp = TIIMlp(6, 2)
    mlp.reset(torch.Generator().manual_seed(0))
    assert mlp.fc1.weight.shape == (12, 6) and mlp.fc1.bias.abs().max() == 0
    assert 0.01 < float(mlp.fc1.weight.detach().std()) < 0.03
    x = torch.randn(4, 6)
    h = x + F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    expected = (h - h.mean(1, keepdim=True)) / torch.sqrt(h.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


def test_task_start_prompt_copy_momentum_and_trainable_parameters():
    model = model_of()
    g = torch.Generator().manual_seed(0)
    model.begin_task(2, 0, g)
    assert model.prompts[0].shape == (2, 2, 2, D) and model.prompts[0].abs().max() <= 1
    with torch.no_grad():
        model.prompts[0].fill_(2.0)
    model._pending = False
    model.stats.append(torch.nn.Module())  # as after finish_task (not read here)
    model.begin_task(3, 1, g)
    assert torch.equal(model.prompts[1].detach(), model.prompts[0].detach())  # shared_prompt_pool's copy
    with torch.no_grad():
        model.prompts[1].fill_(1.0)
    torch.testing.assert_close(model.current_prompt().detach(), torch.full((2, 2, 2, D), 0.9 * 1.0 + 0.1 * 2.0))
    params = model.trainable_parameters()
    assert {id(p) for p in params} == {id(model.prompts[1]), id(model.heads[1].weight), id(model.heads[1].bias)}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}


def labelled_batches(classes, per_class, size, generator):
    x = torch.randn(len(classes) * per_class, 3, 32, 32, generator=generator)
    y = torch.tensor(classes).repeat_interleave(per_class)
    x = x + y.view(-1, 1, 1, 1).float() * 0.3  # separable classes
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def run_task(model, t, known, g):
    classes = [known, known + 1]
    model.begin_task(2, t, g)
    train = labelled_batches(classes, 6, 4, g)
    cfg = {"optimizer": "adam", "lr": 1e-2, "head_lr": 1e-3, "weight_decay": 0.0, "epochs": 2, "schedule": "constant"}
    train_classifier(model.trainable_parameters(), lambda x: model.forward_current(x, t), train, cfg,
                     label_offset=known, head_params=list(model.heads[-1].parameters()), precision="fp32")
    stats = labelled_batches(classes, 6, 5, g)
    return model.finish_task(stats, known, train_batches=train)


def test_three_tasks_end_to_end_and_state_round_trip():
    model = model_of()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 32, 32, generator=g)
    states, outputs, tasks = [], [], []
    for t in range(3):
        before = [h.weight.detach().clone() for h in model.heads]
        mlp_before = model.tii_mlp.fc1.weight.detach().clone()
        rows = run_task(model, t, 2 * t, g)
        stages = [r["stage"] for r in rows]
        assert stages.count("tii") == 2
        assert stages.count("tii_alignment") == stages.count("alignment") == (2 if t else 0)
        if t:  # the alignment moves the old heads; the TII training and alignment move the MLP
            assert all((h.weight.detach() - b).abs().max() > 0 for h, b in zip(model.heads, before))
        assert (model.tii_mlp.fc1.weight.detach() - mlp_before).abs().max() > 0
        assert model.stats[-1].wtp_means.shape == (2, 2, D) and model.stats[-1].tii_vars.dtype == torch.float64
        states.append(model.task_state())
        with torch.no_grad():
            outputs.append(model(x))
            tasks.append(model.predict_tasks(x))
        assert outputs[-1].shape == (6, 2 * (t + 1)) and int(tasks[-1].max()) <= t
        assert not any(p.requires_grad for p in model.parameters())
    assert model.prototypes().shape == (3 * 2 * 2, D)
    assert set(states[1]) == {"prompt", "head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias",
                              "tii.head.0.weight", "tii.head.0.bias", "tii.head.1.weight", "tii.head.1.bias",
                              "tii.fc1.weight", "tii.fc1.bias", "tii.fc2.weight", "tii.fc2.bias", "tii.norm.weight",
                              "tii.norm.bias", "stats.tii_means", "stats.tii_vars", "stats.wtp_means", "stats.wtp_vars"}
    for t in range(3):
        fresh = model_of()
        for s in states[: t + 1]:
            fresh.load_task_state(s)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), outputs[t], rtol=0, atol=0)
            assert torch.equal(fresh.predict_tasks(x), tasks[t])
    with pytest.raises(ValueError, match="missing"):
        model_of().load_task_state(states[1])


def test_forward_current_loss_and_gradients():
    model = model_of()
    g = torch.Generator().manual_seed(1)
    run_task(model, 0, 0, g)
    model.begin_task(2, 1, g)
    model.zero_grad(set_to_none=True)  # what task 0's optimiser left
    x = torch.randn(4, 3, 32, 32, generator=g)
    logits, extra = model.forward_current(x, 1)
    f = model.prompted_features(x, model.current_prompt()[None].detach(), torch.zeros(4, dtype=torch.long), [2, 2])
    expected = 0.5 * (independent_contrastive(f[:2].detach(), model.prototypes(), 0.8)
                      + independent_contrastive(f[2:].detach(), model.prototypes(), 0.8)) / 2
    assert float(extra.detach()) == pytest.approx(expected, rel=1e-5)
    (F.cross_entropy(logits, torch.tensor([0, 1, 0, 1])) + extra).backward()
    assert model.prompts[1].grad.abs().max() > 0 and model.heads[1].weight.grad.abs().max() > 0
    assert model.prompts[0].grad is None and model.heads[0].weight.grad is None
    assert all(p.grad is None for p in model.tii_mlp.parameters())


def test_end_task_needs_the_augmented_images_unless_told_otherwise():
    model = model_of()
    g = torch.Generator().manual_seed(2)
    model.begin_task(2, 0, g)
    with pytest.raises(ValueError, match="train_batches"):
        model.finish_task(labelled_batches([0, 1], 6, 5, g), 0)
    other = model_of()
    other.cfg["tii"]["images"] = "test_transform"
    other.begin_task(2, 0, torch.Generator().manual_seed(2))
    rows = other.finish_task(labelled_batches([0, 1], 6, 5, g), 0)
    assert [r["stage"] for r in rows] == ["tii", "tii"]
    with pytest.raises(RuntimeError, match="finish_task"):
        model.task_state()


def test_tii_training_is_adam_with_clipped_gradients_on_the_task_s_classes():
    model = model_of()
    model.cfg["tii"].update(epochs=1, lr=0.05, clip_grad=0.01)
    g = torch.Generator().manual_seed(4)
    model.begin_task(2, 0, g)
    model._pending = False
    model.begin_task(2, 1, g)
    train = labelled_batches([2, 3], 4, 3, g)
    mlp, head = TIIMlp(D, 2), torch.nn.Linear(D, 2)
    mlp.load_state_dict(model.tii_mlp.state_dict())
    head.load_state_dict(model.tii_heads[1].state_dict())
    params = [*mlp.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=0.05)
    norms = []
    for x, y in train:
        loss = F.cross_entropy(head(mlp(model.uninstructed(x))), y - 2)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.01)))
        opt.step()
    assert min(norms) > 0.01  # the clipping acts
    old = model.tii_heads[0].weight.detach().clone()
    model.train_tii(train, 2, None, None, None, torch.Generator())
    torch.testing.assert_close(model.tii_mlp.fc1.weight.detach(), mlp.fc1.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.tii_heads[1].weight.detach(), head.weight.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(model.tii_heads[0].weight.detach(), old)
