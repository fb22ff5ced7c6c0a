"""RanPAC (ifcl.methods.ranpac, ifcl.models.vit_ranpac) against independently written cases: NumPy's ridge
regression in float64, the official choice of λ written out, the head accumulated over tasks against one fit on
all of them, and the model rebuilt from its task files."""
import numpy as np
import pytest
import torch

from ifcl.methods.ranpac import RIDGES, one_hot, project, random_projection, ridge_solution, select_ridge
from ifcl.models.vit_lora import build_vit
from ifcl.models.vit_ranpac import RanPACViT, build


def numpy_ridge(h, y, ridge):
    h, y = np.asarray(h, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return np.linalg.solve(h.T @ h + ridge * np.eye(h.shape[1]), h.T @ y).T


def test_projection_is_relu_of_a_gaussian_matrix_and_width_zero_is_none():
    w = random_projection(4, 6, torch.Generator().manual_seed(0))
    assert w.shape == (4, 6) and torch.equal(w, torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
    f = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    assert torch.equal(project(f, w), torch.clamp(f @ w, min=0))
    assert random_projection(4, 0) is None and torch.equal(project(f, None), f)


def test_ridge_solution_is_the_regularised_least_squares_head():
    g = torch.Generator().manual_seed(1)
    h, labels = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)
    y = one_hot(labels, 3)
    ours = ridge_solution(h.T @ h, h.T @ y, 0.1)
    assert ours.shape == (3, 5)
    np.testing.assert_allclose(ours.numpy(), numpy_ridge(h, y, 0.1), rtol=1e-4, atol=1e-5)


def test_the_ridge_is_chosen_on_the_last_fifth_by_mean_squared_error():
    g = torch.Generator().manual_seed(2)
    h, labels = torch.randn(25, 6, generator=g), torch.randint(0, 4, (25,), generator=g)
    y = one_hot(labels, 4)
    ridge, losses = select_ridge(h, y)
    n_fit = int(25 * 0.8)  # 20 fit, 5 score
    expected = [np.mean((h[n_fit:].numpy() @ numpy_ridge(h[:n_fit], y[:n_fit], r).T - y[n_fit:].numpy()) ** 2)
                for r in RIDGES]
    np.testing.assert_allclose(losses, expected, rtol=1e-3, atol=1e-6)
    assert ridge == RIDGES[int(np.argmin(expected))]
    # columns of classes no sample has (the official one-hot spans every class) change no choice
    wide = torch.cat([y, torch.zeros(25, 3)], dim=1)
    assert select_ridge(h, wide)[0] == ridge


def test_the_first_of_equal_errors_wins_as_numpy_argmin():
    h = torch.zeros(10, 2)
    y = torch.zeros(10, 2)
    assert select_ridge(h, y, ridges=(5.0, 1.0, 3.0))[0] == 5.0


def tiny_vit():
    return build_vit(16, 8, 16, 2, 2)


def batches(n, classes, offset, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, classes, (n,), generator=g) + offset)
            for _ in range(2)]


def test_the_head_after_two_tasks_is_one_ridge_fit_on_both_tasks_data():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    model = RanPACViT(vit, width=12, generator=torch.Generator().manual_seed(3))
    first, second = batches(8, 2, 0, 4), batches(8, 3, 2, 5)
    model.begin_task(2, 0)
    model.fit_task(first, known=0)
    model.begin_task(3, 1)
    rows = model.fit_task(second, known=2)
    assert model.weight.shape == (5, 12) and rows[0]["ridge"] == model.ridge
    feats = torch.cat([model.features(x) for x, _ in first + second]).double()
    labels = torch.cat([y for _, y in first + second])
    np.testing.assert_allclose(model.gram.numpy(), (feats.T @ feats).numpy(), rtol=1e-4, atol=1e-4)
    expected = numpy_ridge(feats, one_hot(labels, 5), model.ridge)
    np.testing.assert_allclose(model.weight.numpy(), expected, rtol=1e-3, atol=1e-4)
    # the ridge of task 1 was chosen on task 1's samples alone, in loader order
    h1 = torch.cat([model.features(x) for x, _ in second])
    y1 = one_hot(torch.cat([y for _, y in second]), 5)
    assert model.ridge == select_ridge(h1, y1)[0]


def test_the_model_after_a_task_rebuilt_from_its_files_gives_the_same_logits():
    torch.manual_seed(0)
    vit = tiny_vit().eval()
    settings = {"ranpac": {"projection": 10, "ridges": [0.1, 1.0, 10.0], "fit_fraction": 0.75}}
    model = build(settings, vit, seed=7)
    states = []
    for t, (classes, offset) in enumerate([(2, 0), (2, 2)]):
        model.begin_task(classes, t)
        model.fit_task(batches(8, classes, offset, 10 + t), known=offset)
        states.append(model.task_state())
    assert "projection" in states[0] and "projection" not in states[1]
    rebuilt = build(settings, tiny_vit_like(vit), seed=0)  # another seed: the projection comes from task 0's file
    for state in states:
        rebuilt.load_task_state(state)
    x = torch.randn(5, 3, 16, 16)
    assert rebuilt.task_sizes == [2, 2] and torch.equal(rebuilt(x), model(x))
    with pytest.raises(ValueError, match="unexpected names"):
        rebuilt.load_task_state({**states[1], "extra": torch.zeros(1)})


def tiny_vit_like(vit):
    other = tiny_vit()
    other.load_state_dict(vit.state_dict())
    return other.eval()
