import math

import pytest
import torch

from ifcl.training import lr_multipliers, per_task_accuracy


def test_official_cosine_schedule_multipliers():
    # liangyanshuo/InfLoRA utils/schedulers.py CosineSchedule, K=20 -> 1, 1, 0.9967, 0.9866, ..., 0.1784, 0.0974
    m = lr_multipliers(20)
    assert len(m) == 20
    assert m[:4] == pytest.approx([1.0, 1.0, 0.9967, 0.9866], abs=1e-4)
    assert m[-2:] == pytest.approx([0.1784, 0.0974], abs=1e-4)
    # K=50 -> 1, 1, 0.9995, ..., 0.0791, 0.0474
    m = lr_multipliers(50)
    assert m[:3] == pytest.approx([1.0, 1.0, 0.9995], abs=1e-4)
    assert m[-2:] == pytest.approx([0.0791, 0.0474], abs=1e-4)
    assert m[10] == math.cos(99 * math.pi * 9 / (200 * 49))


def test_other_schedules():
    assert lr_multipliers(1) == [1.0]
    assert lr_multipliers(3, "constant") == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        lr_multipliers(0)
    with pytest.raises(ValueError):
        lr_multipliers(3, "linear")


def test_per_task_accuracy_splits_by_class_blocks():
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 5])
    preds = torch.tensor([0, 0, 2, 2, 4, 5, 1])
    accs, counts = per_task_accuracy(preds, targets, [2, 2, 2])
    assert counts == [2, 2, 3]
    assert accs == pytest.approx([50.0, 50.0, 200 / 3])


def test_sgd_schedules_and_head_group():
    # CosineAnnealingLR(T_max=K) stepped per epoch, and MultiStepLR([18], 0.1) of liangyanshuo/InfLoRA's InfLoRA_CA1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    expected = []
    for _ in range(5):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lr_multipliers(5, "cosine") == pytest.approx(expected)
    m = lr_multipliers(20, "multistep", milestones=[18], gamma=0.1)
    assert m[:18] == [1.0] * 18 and m[18:] == pytest.approx([0.1, 0.1])

    from ifcl.training import make_optimizer

    w, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer([w, head], {"optimizer": "sgd", "lr": 0.001, "head_lr": 0.01, "weight_decay": 0.0}, [head])
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.01]
    assert opt.param_groups[1]["params"] == [head] and opt.param_groups[0]["params"] == [w]


def test_task_aware_predictions_and_task_of():
    from ifcl.training import task_aware_predictions, task_of

    sizes = [2, 3]
    targets = torch.tensor([0, 1, 2, 4])
    logits = torch.tensor([
        [0.0, 1.0, 5.0, 0.0, 0.0],  # CIL says 2 (task 1); inside task 0 the best is 1
        [0.0, 2.0, 0.0, 0.0, 0.0],
        [9.0, 0.0, 1.0, 3.0, 0.0],  # CIL says 0; inside task 1 the best is 3
        [0.0, 0.0, 0.0, 0.0, 1.0],
    ])
    assert task_aware_predictions(logits, targets, sizes).tolist() == [1, 1, 3, 4]
    assert task_of(torch.tensor([0, 1, 2, 3, 4]), sizes).tolist() == [0, 0, 1, 1, 1]


def test_timm_cosine_is_timms_scheduler_stepped_after_each_epoch_with_a_floor():
    """thu-ml/HiDe-Prompt: timm's CosineLRScheduler(t_initial=K, lr_min) with ``step(epoch)`` after epoch ``epoch``,
    so epoch e trains at the value for e - 1; min_lr is an absolute floor for every parameter group."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    from ifcl.training import train_classifier

    epochs, base, head, floor = 6, 0.5, 0.05, 1e-2
    w, h = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [w], "lr": base}, {"params": [h], "lr": head}])
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=floor)
    official = []
    for epoch in range(epochs):
        official.append([g["lr"] for g in opt.param_groups])
        sched.step(epoch)
    seen = []
    model = torch.nn.Linear(2, 3)
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    cfg = {"optimizer": "sgd", "lr": base, "head_lr": head, "momentum": 0.0, "weight_decay": 0.0, "epochs": epochs,
           "schedule": "timm-cosine", "min_lr": floor}
    import ifcl.training as training

    real = training.make_optimizer

    def spy(*args, **kwargs):
        opt = real(*args, **kwargs)
        original = opt.step

        def step(*a, **k):
            seen.append([g["lr"] for g in opt.param_groups])
            return original(*a, **k)
        opt.step = step
        return opt
    training.make_optimizer = spy
    try:
        train_classifier([model.weight, model.bias], model, [(x, y)], cfg, head_params=[model.bias], precision="fp32")
    finally:
        training.make_optimizer = real
    assert [pytest.approx(row) for row in official] == seen


def test_clip_grad_norm_clips_the_step():
    from ifcl.training import train_classifier

    for clip, expected_norm in ((None, None), (1e-3, 1e-3)):
        model = torch.nn.Linear(2, 3)
        before = model.weight.detach().clone()
        cfg = {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1,
               "schedule": "constant", **({"clip_grad_norm": clip} if clip else {})}
        train_classifier([model.weight], model, [(torch.randn(8, 2) * 10, torch.zeros(8, dtype=torch.long))], cfg,
                         precision="fp32")
        step = (model.weight.detach() - before).norm().item()
        if expected_norm is None:
            assert step > 1e-2
        else:
            assert step == pytest.approx(expected_norm, rel=1e-4)
