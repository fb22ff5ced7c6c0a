"""LAE's rules (ifcl.methods.lae) against hand-computed cases of what its official code computes (gqk/LAE main.py,
libml/model/pet/adapter.py, timm's ModelEmaV2, libml/optim/scheduler.py)."""
import math

import pytest
import torch

from ifcl.methods.lae import Adapter, ema_update, ensemble, linear_lr, new_task_loss, online_trainable


def test_a_new_adapter_adds_nothing_and_its_scale_is_learnt_from_one():
    adapter = Adapter(8, bottleneck=5)
    x = torch.randn(3, 4, 8)
    assert torch.equal(adapter(x), torch.zeros_like(x))
    assert adapter.down.weight.shape == (5, 8) and adapter.scale.item() == 1.0 and adapter.scale.requires_grad
    with torch.no_grad():
        adapter.up.weight.fill_(1.0)
        adapter.scale.fill_(0.5)
    expected = 0.5 * torch.nn.functional.gelu(adapter.down(x)).sum(-1, keepdim=True).expand_as(x)
    torch.testing.assert_close(adapter(x), expected)


def test_the_offline_module_is_an_exponential_moving_average_of_parameters_and_buffers():
    offline = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    online = {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(7)}
    ema_update(offline, online, decay=0.75)
    torch.testing.assert_close(offline["w"], torch.tensor([1.5, 1.5]))  # 0.75 · 1 + 0.25 · 3, 0.75 · 2 + 0
    assert int(offline["n"]) == 4  # 0.75 · 3 + 0.25 · 7, cast back to an integer
    ema_update(offline, online, decay=0.75)
    torch.testing.assert_close(offline["w"], torch.tensor([1.875, 1.125]))
    assert int(offline["n"]) == 4  # 4.75, truncated


def test_the_ema_is_timms_model_ema_v2():
    """The official offline module is timm's ModelEmaV2 of the online adapters: the same numbers step by step."""
    from timm.utils.model_ema import ModelEmaV2

    torch.manual_seed(0)
    online = Adapter(6, 3)
    with torch.no_grad():
        online.up.weight.normal_()
    theirs = ModelEmaV2(online, decay=0.9)
    ours = {k: v.clone() for k, v in online.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))
        theirs.update(online)
        ema_update(ours, online.state_dict(), decay=0.9)
    for name, value in theirs.module.state_dict().items():
        torch.testing.assert_close(ours[name], value)


def test_the_ensemble_takes_per_class_the_larger_softmax_probability():
    online = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    offline = torch.log(torch.tensor([[0.1, 0.3, 0.6]]))
    torch.testing.assert_close(ensemble(online, [offline]), torch.tensor([[0.7, 0.3, 0.6]]))
    torch.testing.assert_close(ensemble(online, []), torch.tensor([[0.7, 0.2, 0.1]]))
    torch.testing.assert_close(ensemble(online, [offline], only_offline=True), torch.tensor([[0.1, 0.3, 0.6]]))


def test_the_loss_covers_the_current_tasks_classes_only():
    logits = torch.tensor([[9.0, 9.0, 1.0, 0.0]])  # two old classes with large logits, then the task's two
    loss = new_task_loss(logits, torch.tensor([2]), num_old=2)
    assert loss.item() == pytest.approx(-torch.log_softmax(torch.tensor([1.0, 0.0]), 0)[0].item())


def test_the_online_module_waits_three_epochs_from_the_second_task_on():
    assert [online_trainable(0, e) for e in range(4)] == [True] * 4
    assert [online_trainable(1, e) for e in range(5)] == [False, False, False, True, True]
    assert online_trainable(2, 0, freeze_epochs=0)


def test_the_learning_rate_falls_linearly_to_its_floor():
    assert [linear_lr(s, 4, 1.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert linear_lr(4, 4, 2.0, floor=0.1) == pytest.approx(0.2)
    assert linear_lr(1000, math.inf, 0.0028125) == 0.0028125  # the official configs: schedule_unit none


# ---- the model (ifcl.models.vit_lae) on a tiny ViT ----

import copy  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from ifcl.data.loader import make_loader  # noqa: E402
from ifcl.models.vit_lae import ViTLAE  # noqa: E402
from ifcl.models.vit_lora import build_vit  # noqa: E402
from ifcl.training import train_classifier  # noqa: E402

D = 48


def tiny_vit():
    torch.manual_seed(0)
    return build_vit(32, 8, D, 3, 4).eval()


def randomise(adapters, gen):
    with torch.no_grad():
        for p in adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def test_an_adapted_block_adds_the_adapter_of_its_normed_input_beside_the_attention():
    vit = tiny_vit()
    plain = copy.deepcopy(vit)
    model = ViTLAE(vit, adapt_blocks=[0, 2], bottleneck=3)
    gen = torch.Generator().manual_seed(1)
    model.begin_task(4, 0, gen)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    # zero up-projections: the frozen ViT's features
    torch.testing.assert_close(model.features(x), plain.forward_head(plain.forward_features(x), pre_logits=True))
    randomise(model.online, gen)
    h = plain.norm_pre(plain.patch_drop(plain._pos_embed(plain.patch_embed(x))))
    for i, block in enumerate(plain.blocks):
        n1 = block.norm1(h)
        extra = model.online[[0, 2].index(i)](n1) if i in (0, 2) else 0
        h = h + block.attn(n1) + extra
        h = h + block.mlp(block.norm2(h))
    torch.testing.assert_close(model.features(x), plain.norm(h)[:, 0], atol=1e-5, rtol=1e-5)
    model_last = ViTLAE(tiny_vit(), adapt_blocks=[2], bottleneck=3)  # the last block adapted: every token runs
    model_last.begin_task(4, 0, torch.Generator().manual_seed(1))
    randomise(model_last.online, gen)
    assert model_last.features(x).shape == (2, D)


def test_the_offline_adapters_start_at_task_one_as_a_copy_and_follow_every_step():
    model = ViTLAE(tiny_vit(), adapt_blocks=[0, 1], bottleneck=3, ema_decay=0.5, freeze_epochs=2)
    gen = torch.Generator().manual_seed(0)
    model.begin_task(3, 0, gen)
    model.end_step()  # task 0: no offline adapters yet
    assert model.offline is None
    randomise(model.online, gen)
    model.begin_task(3, 1, gen)
    for a, b in zip(model.offline.parameters(), model.online.parameters()):
        assert torch.equal(a, b) and a is not b and not a.requires_grad
    before = [p.detach().clone() for p in model.offline.parameters()]
    randomise(model.online, gen)
    model.end_step()
    for old, off, on in zip(before, model.offline.parameters(), model.online.parameters()):
        torch.testing.assert_close(off, 0.5 * old + 0.5 * on)
    # the online adapters are frozen (gradient None) in the first 2 epochs of task 1, not in task 0
    model.begin_epoch(0)
    assert all(not p.requires_grad and p.grad is None for p in model.online.parameters())
    model.begin_epoch(2)
    assert all(p.requires_grad for p in model.online.parameters())
    model.task = 0
    model.begin_epoch(0)
    assert all(p.requires_grad for p in model.online.parameters())


def test_the_prediction_is_the_per_class_maximum_of_both_models_probabilities():
    model = ViTLAE(tiny_vit(), adapt_blocks=[0], bottleneck=3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    model.begin_task(3, 0, gen)
    randomise(model.online, gen)
    torch.testing.assert_close(model(x), model.logits(x).softmax(1))  # one model before task 1
    model.begin_task(2, 1, gen)
    randomise(model.online, gen)
    on, off = model.logits(x, model.online).softmax(1), model.logits(x, model.offline).softmax(1)
    assert not torch.allclose(on, off)
    torch.testing.assert_close(model(x), torch.maximum(on, off))
    model.only_offline = True
    torch.testing.assert_close(model(x), off)


def official_like_task(model, head_sizes, t, batches, lr, epochs, freeze_epochs):
    """Task t as gqk/LAE trains it, written independently: Adam over the online adapters and every head, the loss
    of the logits sliced to task t's classes, the adapters frozen (gradient None) for the first epochs of t >= 1,
    the moving average after every step."""
    heads = list(model.heads)
    params = list(model.online.parameters()) + [p for h in heads for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    old = sum(head_sizes[:t])
    for epoch in range(epochs):
        frozen = t > 0 and epoch < freeze_epochs
        for p in model.online.parameters():
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None
        for x, y in batches:
            logits = torch.cat([h(model.features(x)) for h in heads], dim=1)
            loss = F.cross_entropy(logits[:, old:], y - old)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            if model.offline is not None:
                with torch.no_grad():
                    for a, b in zip(model.offline.parameters(), model.online.parameters()):
                        a.copy_(model.ema_decay * a + (1 - model.ema_decay) * b)


def test_two_tasks_match_the_official_optimisation_and_the_files_give_the_model_back():
    gen = torch.Generator().manual_seed(3)
    sizes = [3, 2]
    data = [TensorDataset(torch.randn(12, 3, 32, 32, generator=gen), torch.randint(0, 3, (12,), generator=gen)),
            TensorDataset(torch.randn(12, 3, 32, 32, generator=gen), torch.randint(3, 5, (12,), generator=gen))]
    cfg = {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0, "epochs": 3, "schedule": "constant"}
    ours = ViTLAE(tiny_vit(), adapt_blocks=[0, 1], bottleneck=3, ema_decay=0.9, freeze_epochs=2)
    theirs = copy.deepcopy(ours)
    states = []
    for t in range(2):
        loader = list(make_loader(data[t], 4, shuffle=False))
        ours.begin_task(sizes[t], t, torch.Generator().manual_seed(10 + t))
        theirs.begin_task(sizes[t], t, torch.Generator().manual_seed(10 + t))
        train_classifier(ours.trainable_parameters(), lambda x: ours.forward_current(x, t), loader, cfg,
                         label_offset=sum(sizes[:t]), precision="fp32", on_epoch=ours.begin_epoch,
                         on_step=ours.end_step)
        official_like_task(theirs, sizes, t, loader, cfg["lr"], cfg["epochs"], 2)
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        states.append(ours.task_state())
    assert set(states[0]) == {"head.weight", "head.bias"} | {f"online.{k}" for k in ours.online.state_dict()}
    assert {k for k in states[1] if k.startswith("offline.")}
    x = torch.randn(5, 3, 32, 32, generator=gen)
    again = ViTLAE(tiny_vit(), adapt_blocks=[0, 1], bottleneck=3, ema_decay=0.9, freeze_epochs=2)
    for s in states:
        again.load_task_state(s)
    ours.eval(), again.eval()
    torch.testing.assert_close(again(x), ours(x))
    after_first = ViTLAE(tiny_vit(), adapt_blocks=[0, 1], bottleneck=3)
    after_first.load_task_state(states[0])
    assert after_first.offline is None and after_first(x).shape == (5, 3)
