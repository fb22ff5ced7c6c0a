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
