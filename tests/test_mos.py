"""MOS (sun-hailong/AAAI25-MOS): the merge, statistics, retrieval and loss rules against hand-computed or independently
written cases (the official in-place pulls iterated one by one, a ViT with parallel adapters written out with full
tokens, the official per-image retrieval loop), and the tiny model trained through the state chain's loop, rebuilt
from its task states."""
import math

import pytest
import torch
import torch.nn.functional as F

from ifcl.catalog.mos import METHODS
from ifcl.methods.classifier_alignment import mean_scale
from ifcl.methods.mos import (ADAPTER_KEYS, adapter_mean, cosine_logits, drifted, ensemble_scores, functional_adapter,
                              init_adapter, merged, next_start, official_inference_adapter, orthogonality_loss,
                              self_refined_logits, statistics_pulls)
from ifcl.models.vit_lora import build_vit
from ifcl.models.vit_mos import ViTMOS, build
from ifcl.training import train_classifier

D, DEPTH, R = 48, 3, 4
ALIGN = {"epochs": 2, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "samples_per_class": 6}
TRAIN = {"optimizer": "sgd", "lr": 0.05, "head_lr": 0.005, "weight_decay": 5e-3, "momentum": 0.9, "epochs": 2,
         "schedule": "cosine"}


def tiny_vit():
    torch.manual_seed(0)
    return build_vit(32, 8, D, DEPTH, 4).eval()


def model(**kwargs):
    kwargs = {"bottleneck": R, "statistics_batch_size": 3, "alignment": ALIGN, **kwargs}
    return ViTMOS(tiny_vit(), **kwargs)


def random_adapter(gen, scale=0.3):
    return {k: v + torch.randn(v.shape, generator=gen) * scale
            for k, v in init_adapter(DEPTH, D, R, torch.Generator().manual_seed(0)).items()}


def reference_features(vit, x, blocks):
    """The official ViT with a parallel adapter per block, every token through every block, written out:
    blocks[i] = (down_w, down_b, up_w, up_b) of block i."""
    h = vit._pos_embed(vit.patch_embed(x))
    for blk, (dw, db, uw, ub) in zip(vit.blocks, blocks):
        h = h + blk.attn(blk.norm1(h))
        h = h + (blk.mlp(blk.norm2(h)) + 0.1 * (torch.relu(h @ dw.T + db) @ uw.T + ub))
    return vit.norm(h)[:, 0]


def per_block(adapter, i):
    return tuple(adapter[k][i] for k in ADAPTER_KEYS)


def official_pulls(w, mean, m, times):
    """``times`` official reweight_adapter pulls, one by one, float64."""
    out = {k: v.double().clone() for k, v in w.items()}
    for _ in range(times):
        out = {k: (1 - m) * out[k] + m * mean[k].double() for k in out}
    return out


def test_merge_rules_equal_the_official_pulls_one_by_one():
    g = torch.Generator().manual_seed(1)
    w, mean = random_adapter(g), random_adapter(g)
    for times in (0, 1, 5):
        for k in ADAPTER_KEYS:
            torch.testing.assert_close(merged(w[k], mean[k], 0.1, times).double(), official_pulls(w, mean, 0.1, times)[k])
    seen = drifted(w, mean, 0.1, start=4)  # block i sees 4 + i + 1 pulls
    for i in range(DEPTH):
        expected = official_pulls(w, mean, 0.1, 4 + i + 1)
        for k in ADAPTER_KEYS:
            torch.testing.assert_close(seen[k][i].double(), expected[k][i])
    torch.testing.assert_close(merged(w["up_bias"], mean["up_bias"], 0.0, 7), w["up_bias"])
    with pytest.raises(ValueError):
        merged(w["up_bias"], mean["up_bias"], 0.1, -1)


def test_init_is_kaiming_down_and_zero_up():
    a = init_adapter(DEPTH, D, R, torch.Generator().manual_seed(2))
    assert a["down_weight"].shape == (DEPTH, R, D) and a["up_weight"].shape == (DEPTH, D, R)
    assert 0.5 / math.sqrt(D) < a["down_weight"].abs().max() <= 1 / math.sqrt(D)
    assert not a["up_weight"].any() and not a["down_bias"].any() and not a["up_bias"].any()


def test_inference_adapters_and_the_next_start():
    g = torch.Generator().manual_seed(3)
    ws = [random_adapter(g) for _ in range(3)]
    off = official_inference_adapter(ws, 2, 0.1)
    for k in ADAPTER_KEYS:
        torch.testing.assert_close(official_inference_adapter(ws, 0, 0.1)[k], ws[0][k])
        torch.testing.assert_close(official_inference_adapter(ws, 1, 0.1)[k], ws[0][k])  # the mean of w_0 alone
        torch.testing.assert_close(off[k], (ws[0][k] + ws[1][k]) / 2)
        torch.testing.assert_close(official_inference_adapter(ws, 2, 0.0)[k], ws[2][k])  # no merge, no drift
        torch.testing.assert_close(functional_adapter(ws, 2, 0.1)[k], 0.9 * ws[2][k] + 0.1 * (ws[0][k] + ws[1][k]) / 2)
        torch.testing.assert_close(adapter_mean(ws)[k], (ws[0][k] + ws[1][k] + ws[2][k]) / 3)
        # task 3 starts where task 2's statistics left the adapter: 7 pulls toward the mean of w_0, w_1
        torch.testing.assert_close(next_start(ws, 7, 0.1)[k].double(),
                                   official_pulls(ws[2], adapter_mean(ws[:2]), 0.1, 7)[k])
        torch.testing.assert_close(next_start(ws, 7, 0.1, "functional")[k], ws[2][k])
        torch.testing.assert_close(next_start(ws[:1], 7, 0.1)[k], ws[0][k])  # task 0: no mean to pull toward


def test_statistics_pulls_hand_counted():
    labels = torch.tensor([5, 4, 5, 5, 4, 5, 5])
    pulls, total = statistics_pulls(labels, batch_size=2, depth=3)
    # class 4 first: images 1, 4 form its one batch; class 5 (images 0, 2, 3, 5, 6) after 1 batch: 1 + [0, 0, 1, 1, 2]
    assert pulls.tolist() == [3, 0, 3, 6, 0, 6, 9] and total == 3 * (1 + 3)


def test_orthogonality_loss_hand_computed():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    means = torch.tensor([[1.0, 1.0]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    sim = m @ m.T / 0.8
    expected = -sum(torch.log_softmax(sim[i], 0)[i] for i in range(3)) / 3
    assert float(orthogonality_loss(f, means)) == pytest.approx(float(expected), rel=1e-6)
    own = f @ f.T / 0.8  # task 0: the batch alone
    assert float(orthogonality_loss(f, torch.zeros(0, 2))) == pytest.approx(
        float(-(torch.log_softmax(own, 1).diagonal()).mean()), rel=1e-6)


def test_cosine_and_ensemble_scores():
    f, p = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    torch.testing.assert_close(cosine_logits(f, p), torch.tensor([[0.6, 0.8]]))
    final, proto = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.6, 0.8]])
    torch.testing.assert_close(ensemble_scores(final, proto, 3), final.softmax(1) + (proto / (1 / 3)).softmax(1))


def test_self_refined_retrieval_follows_the_official_loop():
    class_task = torch.tensor([0, 0, 1, 1, 2, 2])
    # the arg-max class of row r with adapter a; row 0: 0 -> 1 -> 1 (stops), row 1: 0 -> 1 -> 2 -> 0 -> (4th: stop),
    # row 2: its own task at once
    table = {(0, 0): 2, (0, 1): 3, (1, 0): 2, (1, 1): 4, (1, 2): 0, (2, 2): 5}
    calls = []

    def logits_of(rows, tasks):
        calls.append((rows.tolist(), tasks.tolist()))
        out = torch.zeros(len(rows), 6)
        for j, (r, a) in enumerate(zip(rows.tolist(), tasks.tolist())):
            out[j, table[(r, a)]] = 10.0 + a  # remember the adapter in the value
        return out

    final = self_refined_logits(torch.tensor([0, 0, 2]), logits_of, class_task, steps=4)
    assert calls == [([0, 1, 2], [0, 0, 2]), ([0, 1], [1, 1]), ([1], [2]), ([1], [0])]
    assert final.argmax(1).tolist() == [3, 2, 5] and final.max(1).values.tolist() == [11.0, 10.0, 12.0]

    def official(start):  # the per-image loop of _eval_cnn
        out = []
        for r, prev in enumerate(start):
            loop = 0
            while True:
                loop += 1
                cur = logits_of(torch.tensor([r]), torch.tensor([prev]))
                nxt = int(class_task[cur.argmax(1)])
                if loop >= 4 or nxt == prev:
                    break
                prev = nxt
            out.append(cur)
        return torch.cat(out)

    torch.testing.assert_close(final, official([0, 0, 2]))


def test_training_forward_uses_the_official_in_place_pulls():
    g = torch.Generator().manual_seed(4)
    m = model(dropout=0.0)
    w0 = random_adapter(g)
    head = torch.randn(2, D, generator=g)
    m.load_task_state({**{f"adapter.{k}": v for k, v in w0.items()}, "head.weight": head, "head.bias": torch.zeros(2),
                       "prototypes": torch.randn(2, D, generator=g), "means": torch.randn(2, D, generator=g),
                       "covs": torch.eye(D).repeat(2, 1, 1), "statistics_pulls": torch.tensor([0])})
    m.begin_task(3, 1, g)
    m.set_trainable()
    start = {k: v.detach().clone() for k, v in m.current.items()}
    for k in ADAPTER_KEYS:
        torch.testing.assert_close(start[k], w0[k])  # task 1 starts from w_0
    with torch.no_grad():
        for k in ADAPTER_KEYS:
            m.current[k].add_(torch.randn(m.current[k].shape, generator=g) * 0.3)
    w = {k: v.detach().clone() for k, v in m.current.items()}
    x = torch.randn(2, 3, 32, 32, generator=g)
    logits, extra = m.forward_current(x)
    (logits.square().sum() + extra).backward()
    # reference: block i with w pulled i + 1 times toward w_0, each block's value a leaf
    leaves = []
    for i in range(DEPTH):
        v = official_pulls(w, w0, 0.1, i + 1)
        leaves.append(tuple(v[k][i].float().requires_grad_(True) for k in ADAPTER_KEYS))
    f = reference_features(m.vit, x, leaves)
    ref_logits = m.classifier(f)[:, 2:]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    ref_extra = 0.1 * orthogonality_loss(f, m.means)
    torch.testing.assert_close(extra, ref_extra, rtol=1e-4, atol=1e-5)
    (ref_logits.square().sum() + ref_extra).backward()
    for j, k in enumerate(ADAPTER_KEYS):
        expected = torch.stack([leaves[i][j].grad for i in range(DEPTH)])
        torch.testing.assert_close(m.current[k].grad, expected, rtol=1e-4, atol=1e-6)
        # the forward leaves the adapter pulled depth times; the step's merge once more
        torch.testing.assert_close(m.current[k].detach().double(), official_pulls(w, w0, 0.1, DEPTH)[k])
    m.end_step()
    for k in ADAPTER_KEYS:
        torch.testing.assert_close(m.current[k].detach().double(), official_pulls(w, w0, 0.1, DEPTH + 1)[k])


def test_functional_merge_differentiates_one_merged_copy():
    g = torch.Generator().manual_seed(5)
    m = model(dropout=0.0, merge="functional")
    w0 = random_adapter(g)
    m.load_task_state({**{f"adapter.{k}": v for k, v in w0.items()}, "head.weight": torch.randn(2, D, generator=g),
                       "head.bias": torch.zeros(2), "prototypes": torch.randn(2, D, generator=g),
                       "means": torch.randn(2, D, generator=g), "covs": torch.eye(D).repeat(2, 1, 1),
                       "statistics_pulls": torch.tensor([5])})
    m.begin_task(2, 1, g)
    m.set_trainable()
    with torch.no_grad():
        for k in ADAPTER_KEYS:
            m.current[k].add_(torch.randn(m.current[k].shape, generator=g) * 0.3)
    w = {k: v.detach().clone() for k, v in m.current.items()}
    x = torch.randn(2, 3, 32, 32, generator=g)
    logits, _ = m.forward_current(x)
    v = {k: 0.9 * w[k] + 0.1 * w0[k] for k in ADAPTER_KEYS}
    ref = m.classifier(reference_features(m.vit, x, [per_block(v, i) for i in range(DEPTH)]))[:, 2:]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    for k in ADAPTER_KEYS:
        torch.testing.assert_close(m.current[k].detach(), w[k])  # no side effect of the forward


def batches_of(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def run_tasks(m, num_tasks=3, classes=2, images=6, seed=6):
    """Train the model through the state chain's loop; return the data, task states and scores after each task."""
    g = torch.Generator().manual_seed(seed)
    data, states, scores = [], [], []
    test_x = torch.randn(5, 3, 32, 32, generator=g)
    for t in range(num_tasks):
        known = t * classes
        x = torch.randn(classes * images, 3, 32, 32, generator=g)
        y = torch.arange(known, known + classes).repeat(images)  # classes interleaved, as a manifest may be
        data.append((x, y))
        m.begin_task(classes, t, g)
        m.set_trainable()
        train_classifier(m.trainable_parameters(), lambda b: m.forward_current(b, t), batches_of(x, y, 4), TRAIN,
                         label_offset=known, head_params=list(m.heads[-1].parameters()), precision="fp32",
                         on_step=m.end_step)
        rows = m.finish_task(batches_of(x, y, 5), known)
        assert rows[0]["stage"] == "statistics" and all(r["stage"] == "alignment" for r in rows[1:])
        assert len(rows) == (1 if t == 0 else 1 + ALIGN["epochs"])
        states.append(m.task_state())
        with torch.no_grad():
            scores.append(m(test_x))
    return data, states, scores, test_x


def test_three_tasks_train_and_rebuild_from_their_states():
    torch.manual_seed(7)
    m = model()
    data, states, scores, test_x = run_tasks(m)
    assert set(states[0]) == {f"adapter.{k}" for k in ADAPTER_KEYS} | {"head.weight", "head.bias", "prototypes",
                                                                        "means", "covs", "statistics_pulls"}
    assert [s["head.weight"].shape[0] for s in states] == [2, 4, 6] and states[0]["covs"].shape == (2, D, D)
    # statistics: 2 classes of 6 images, batches of 3: 4 batches of depth pulls (none for task 0)
    assert [int(s["statistics_pulls"]) for s in states] == [0, 4 * DEPTH, 4 * DEPTH]
    assert scores[-1].shape == (5, 6) and torch.allclose(scores[-1].sum(1), torch.full((5,), 2.0))
    for t in range(3):
        fresh = model()
        for s in states[: t + 1]:
            fresh.load_task_state(s)
        with torch.no_grad():
            torch.testing.assert_close(fresh(test_x), scores[t], rtol=0, atol=0)
    # the next task starts from the same adapter, from the live model or from the files
    fresh = model()
    for s in states:
        fresh.load_task_state(s)
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    m.begin_task(2, 3, g1)
    fresh.begin_task(2, 3, g2)
    for k in ADAPTER_KEYS:
        torch.testing.assert_close(m.current[k], fresh.current[k], rtol=0, atol=0)
    torch.testing.assert_close(m.classifier.weight, fresh.classifier.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rows"):
        model().load_task_state(states[1])
    with pytest.raises(RuntimeError):
        m.task_state()  # task 3 has not ended


def test_statistics_follow_the_official_per_class_drift():
    torch.manual_seed(9)
    m = model(dropout=0.0, prototype_dropout=False)
    data, states, _, _ = run_tasks(m, num_tasks=2)
    x, y = data[1]
    w0, w1 = [{k: s[f"adapter.{k}"] for k in ADAPTER_KEYS} for s in states]
    # official _compute_mean: class by class, 3 images a batch in dataset order, the adapter pulled toward w_0 by
    # every block of every batch, block i seeing one more pull than block i - 1
    state = {k: v.double() for k, v in w1.items()}
    expected = []
    with torch.no_grad():
        for c in (2, 3):
            xc, feats = x[y == c], []
            for b in range(0, len(xc), 3):
                blocks = []
                for i in range(DEPTH):
                    state = {k: 0.9 * state[k] + 0.1 * w0[k].double() for k in ADAPTER_KEYS}
                    blocks.append(tuple(state[k][i].float() for k in ADAPTER_KEYS))
                feats.append(reference_features(m.vit, xc[b:b + 3], blocks))
            expected.append(torch.cat(feats).mean(0))
        torch.testing.assert_close(states[1]["means"], torch.stack(expected), rtol=1e-4, atol=1e-5)
        # prototypes: adapter 0's features
        proto = [reference_features(m.vit, x[y == c], [per_block(w0, i) for i in range(DEPTH)]).mean(0) for c in (2, 3)]
        torch.testing.assert_close(states[1]["prototypes"], torch.stack(proto), rtol=1e-4, atol=1e-5)


def test_inference_is_the_official_retrieval_on_the_drifted_adapters():
    torch.manual_seed(10)
    m = model()
    _, states, scores, x = run_tasks(m)
    ws = [{k: s[f"adapter.{k}"] for k in ADAPTER_KEYS} for s in states]
    evaluated = [ws[0], ws[0], {k: (ws[0][k] + ws[1][k]) / 2 for k in ADAPTER_KEYS}]  # w_0, then means of earlier
    with torch.no_grad():
        feats = [reference_features(m.vit, x, [per_block(a, i) for i in range(DEPTH)]) for a in evaluated]
        proto = cosine_logits(feats[0], m.prototypes)
        class_task = torch.tensor([0, 0, 1, 1, 2, 2])
        final = []
        for r in range(len(x)):
            prev, loop = int(class_task[proto[r].argmax()]), 0
            while True:
                loop += 1
                cur = m.classifier(feats[prev][r:r + 1])
                nxt = int(class_task[cur.argmax(1)])
                if loop >= 4 or nxt == prev:
                    break
                prev = nxt
            final.append(cur)
        expected = torch.cat(final).softmax(1) + (proto * 3).softmax(1)
    torch.testing.assert_close(scores[-1], expected, rtol=1e-4, atol=1e-5)
    m.ensemble = False
    with torch.no_grad():
        torch.testing.assert_close(m(x), torch.cat(final), rtol=1e-4, atol=1e-5)


def test_old_head_rows_only_decay_and_the_alignment_moves_them():
    torch.manual_seed(11)
    m = model()
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.arange(2).repeat(4)
    m.begin_task(2, 0, g)
    m.set_trainable()
    train_classifier(m.trainable_parameters(), lambda b: m.forward_current(b, 0), batches_of(x, y, 4), TRAIN,
                     head_params=list(m.heads[-1].parameters()), precision="fp32", on_step=m.end_step)
    before_end = m.classifier.weight.detach().clone()
    m.finish_task(batches_of(x, y, 4), 0)
    torch.testing.assert_close(m.classifier.weight, before_end, rtol=0, atol=0)  # no alignment after task 0
    old = m.classifier.weight.detach().clone()
    m.begin_task(2, 1, g)
    m.set_trainable()
    torch.testing.assert_close(m.classifier.weight[:2], old, rtol=0, atol=0)
    assert 0 < m.classifier.weight[2:].std() < 0.05  # timm's N(0, 0.02²) head init
    train_classifier(m.trainable_parameters(), lambda b: m.forward_current(b, 1), batches_of(x, y + 2, 4), TRAIN,
                     label_offset=2, head_params=list(m.heads[-1].parameters()), precision="fp32", on_step=m.end_step)
    ratio = m.classifier.weight.detach()[:2] / old
    assert float(ratio.max() - ratio.min()) < 1e-5 and 0.99 < float(ratio.mean()) < 1.0  # weight decay alone
    trained = m.classifier.weight.detach().clone()
    m.finish_task(batches_of(x, y + 2, 4), 2)
    assert (m.classifier.weight[:2] - trained[:2]).abs().max() > 1e-4  # aligned
    assert mean_scale(1, 1) == 1.0  # every class "current": align_heads shrinks no mean


def loaded(w0, gen, **kwargs):
    """A model holding a finished task 0 with adapter w0 (classes 0, 1)."""
    m = model(**kwargs)
    m.load_task_state({**{f"adapter.{k}": v for k, v in w0.items()}, "head.weight": torch.randn(2, D, generator=gen),
                       "head.bias": torch.zeros(2), "prototypes": torch.randn(2, D, generator=gen),
                       "means": torch.randn(2, D, generator=gen), "covs": torch.eye(D).repeat(2, 1, 1),
                       "statistics_pulls": torch.tensor([0])})
    return m


def test_prototype_dropout_only_from_task_1():
    g = torch.Generator().manual_seed(13)
    w0 = random_adapter(g, scale=1.0)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.tensor([2, 3] * 3)
    reference = torch.stack([reference_features(tiny_vit(), x[y == c], [per_block(w0, i) for i in range(DEPTH)]).mean(0)
                             for c in (2, 3)])
    prototypes = {}
    for drop in (True, False):
        m = loaded(w0, torch.Generator().manual_seed(14), prototype_dropout=drop)
        m.begin_task(2, 1, torch.Generator().manual_seed(15))
        m.finish_task(batches_of(x, y, 4), 2)
        prototypes[drop] = m.prototypes[2:]
    torch.testing.assert_close(prototypes[False], reference, rtol=1e-4, atol=1e-5)
    assert (prototypes[True] - reference).abs().max() > 1e-3
    m = model()  # task 0: no dropout, whatever the setting
    m.begin_task(2, 0, torch.Generator().manual_seed(16))
    with torch.no_grad():
        for k in ADAPTER_KEYS:
            m.current[k].copy_(w0[k])
    m.finish_task(batches_of(x, y - 2, 4), 0)
    torch.testing.assert_close(m.prototypes, reference, rtol=1e-4, atol=1e-5)


def test_declaration_and_builder():
    (m,) = METHODS
    assert m.name == "mos" and m.statistics_images == "test_transform" and not m.drop_last
    assert m.model == "ifcl.models.vit_mos:build" and m.model_keys == ("mos",)
    settings = {"mos": {"bottleneck": 4, "adapter_scale": 0.1, "adapter_dropout": 0.1, "adapter_momentum": 0.1,
                        "merge": "official", "ortho_weight": 0.1, "statistics_batch_size": 48,
                        "prototype_dropout": True, "refine_steps": 4, "ensemble": True, "alignment": ALIGN}}
    built = build(settings, tiny_vit(), 0)
    assert built.bottleneck == 4 and built.statistics_batch_size == 48 and built.alignment["samples_per_class"] == 6
    with pytest.raises(ValueError, match="merge"):
        ViTMOS(tiny_vit(), merge="ema")
