"""InfLoRA's formulas (liangyanshuo/InfLoRA methods/inflora.py) on random tensors."""
import math

import numpy as np
import pytest
import torch

from ifcl.methods.inflora import LayerMemory, design_reduction, lr_multipliers, threshold, update_memory


def second_moment(n, d, decay, seed):
    """C = XᵀX/n of tokens with a decaying spectrum (like real token statistics)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    x = torch.randn(n, d, generator=g) * decay ** torch.arange(d, dtype=torch.float32)
    x = x @ q.T
    return x.T @ x / n


def test_threshold_schedule():
    # the thresholds of the official configs: cifar100 (0.95, T=10) 0.95, 0.955, ..., 0.995; mimg5 (0.98, T=5) 0.98, 0.984, ... 0.996
    assert [threshold(t, 10, 0.95) for t in range(10)] == pytest.approx([0.95 + 0.005 * t for t in range(10)])
    assert [threshold(t, 5, 0.98) for t in range(5)] == pytest.approx([0.98, 0.984, 0.988, 0.992, 0.996])
    assert threshold(3, 20, 0.99) == pytest.approx(0.9915)


def test_schedule_reexported():
    assert lr_multipliers(20)[1] == 1.0 and lr_multipliers(20)[2] == pytest.approx(0.9967, abs=1e-4)


def test_first_task_design_is_top_eigenvectors_scaled():
    c = second_moment(4000, 32, 0.85, 0)
    r = design_reduction(c, None, 5)
    assert r.shape == (5, 32)
    assert r.norm(dim=1) == pytest.approx(torch.full((5,), 1 / math.sqrt(3)), abs=1e-6)
    evals, evecs = torch.linalg.eigh(c)
    top = evecs[:, -5:]
    # same subspace as the top-5 eigenvectors: projector distance ~ 0
    p1, p2 = 3 * r.T @ r, top @ top.T
    assert torch.dist(p1, p2) < 1e-4


@pytest.mark.parametrize("kind", ["remove", "retain"])
def test_designed_rows_are_orthogonal_to_the_old_space(kind):
    d = 48
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    old = q[:, :30]  # the old space
    memory = LayerMemory(old, "remove") if kind == "remove" else LayerMemory(q[:, 30:], "retain")
    r = design_reduction(second_moment(3000, d, 0.9, 2), memory, 6)
    assert (r @ old).abs().max() < 1e-6
    assert r.norm(dim=1) == pytest.approx(torch.full((6,), 1 / math.sqrt(3)), abs=1e-6)
    torch.testing.assert_close(memory.complement_projector(), torch.eye(d) - old @ old.T, atol=1e-5, rtol=0)


def test_design_uses_the_projected_second_moment_not_the_projected_tokens():
    # the official code takes singular vectors of Π⊥C, not of Π⊥CΠ⊥ (the paper's Π⊥H)
    d = 24
    c = second_moment(2000, d, 0.8, 3)
    g = torch.Generator().manual_seed(4)
    m, _ = torch.linalg.qr(torch.randn(d, 5, generator=g))
    memory = LayerMemory(m, "remove")
    r = design_reduction(c, memory, 3)
    pc = (torch.eye(d) - m @ m.T) @ c
    u, _, _ = torch.linalg.svd(pc)
    torch.testing.assert_close(3 * r.T @ r, u[:, :3] @ u[:, :3].T, atol=1e-5, rtol=0)


def test_first_task_memory_counts_prefixes_strictly_below_the_threshold():
    d = 16
    s = torch.tensor([8.0, 4.0, 2.0, 1.0] + [0.5 * 0.7**i for i in range(12)])  # distinct: unique subspaces
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    c = q @ torch.diag(s) @ q.T
    energy = (s**2) / (s**2).sum()
    cum = torch.cumsum(energy, 0)
    for eps in (0.5, float(cum[1]) + 1e-4, 0.99, 0.999):
        k = int((cum < eps).sum())
        mem = update_memory(None, c, eps)
        assert mem.kind == "remove" and mem.basis.shape == (d, max(k, 1))
        torch.testing.assert_close(mem.projector(), q[:, : max(k, 1)] @ q[:, : max(k, 1)].T, atol=1e-5, rtol=0)


def test_first_task_filling_half_the_space_stores_the_complement():
    # the official code (update_DualGPM) would store the space itself as 'retain' and then fail its assertion
    d = 16
    c = second_moment(5000, d, 1.0, 5)  # near-isotropic: most directions needed
    mem = update_memory(None, c, 0.95)
    assert mem.kind == "retain"
    k = d - mem.basis.shape[1]
    assert k >= d / 2 and mem.old_space_dim() == k
    u, s, _ = torch.linalg.svd(c)
    kept = u[:, :k]
    torch.testing.assert_close(mem.complement_projector(), torch.eye(d) - kept @ kept.T, atol=1e-4, rtol=0)
    gpm = update_memory(None, c, 0.95, dual=False)
    assert gpm.kind == "remove" and gpm.basis.shape[1] == k


def test_dualgpm_and_gpm_keep_the_same_old_space_and_switch_at_half():
    # over many tasks the two bookkeepings give the same projector (≤ 5e-6 in the reference's check);
    # DualGPM switches to 'retain' exactly when the remove memory exceeds d/2 columns.
    d, T = 32, 10
    dual = gpm = None
    switched = False
    for t in range(T):
        c = second_moment(1500, d, 0.9, 100 + t)
        eps = threshold(t, T, 0.95)
        prev_kind = None if dual is None else dual.kind
        dual = update_memory(dual, c, eps, dual=True)
        gpm = update_memory(gpm, c, eps, dual=False)
        assert gpm.kind == "remove"
        if gpm.basis.shape[1] <= d / 2:
            assert dual.kind == "remove" and dual.basis.shape[1] == gpm.basis.shape[1]
        else:
            assert dual.kind == "retain" and dual.basis.shape[1] == d - gpm.basis.shape[1]
            switched |= prev_kind == "remove"
        assert torch.dist(dual.complement_projector(), gpm.complement_projector()) < 5e-5
        b = dual.basis
        torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1]), atol=1e-5, rtol=0)
    assert switched, "the synthetic sequence should cross d/2"


def test_later_tasks_add_directions_until_the_threshold_is_reached():
    d = 20
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(7)))
    mem = LayerMemory(q[:, :3].contiguous(), "remove")
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5] + [0.01] * 14)
    c = q @ torch.diag(s) @ q.T  # directions 0-2 are old, 3.. are new
    energy = s**2 / (s**2).sum()
    explained = float(energy[:3].sum())
    # adding direction 3 then 4: the smallest count whose explained energy reaches ε
    eps = explained + float(energy[3]) + 0.5 * float(energy[4])
    new = update_memory(mem, c, eps)
    assert new.kind == "remove" and new.basis.shape[1] == 5
    torch.testing.assert_close(new.projector(), q[:, :5] @ q[:, :5].T, atol=1e-4, rtol=0)
    same = update_memory(mem, c, explained - 1e-3)  # already explained: nothing added
    assert torch.equal(same.basis, mem.basis)


def test_memory_validation():
    with pytest.raises(ValueError):
        LayerMemory(torch.zeros(4, 1), "keep")
