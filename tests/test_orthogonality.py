from __future__ import annotations

import numpy as np
import pytest
import torch

from hilora_lightning.orthogonality import pair_penalty, stage_penalty


def test_b_side_penalty_and_gradient_match_reference() -> None:
    gen = np.random.default_rng(0)
    f_np, t_np = gen.normal(size=(10, 3)), gen.normal(size=(10, 4))
    frozen = torch.tensor(f_np, requires_grad=True)
    train = torch.tensor(t_np, requires_grad=True)
    loss = pair_penalty(frozen, train, "B")
    np.testing.assert_allclose(loss.item(), np.sum((f_np.T @ t_np) ** 2), rtol=1e-12)
    loss.backward()
    np.testing.assert_allclose(train.grad.numpy(), 2 * f_np @ f_np.T @ t_np, rtol=1e-10)
    assert frozen.grad is None  # frozen factors are detached


def test_a_side_penalty_matches_reference() -> None:
    gen = np.random.default_rng(1)
    f_np, t_np = gen.normal(size=(3, 10)), gen.normal(size=(4, 10))
    loss = pair_penalty(torch.tensor(f_np), torch.tensor(t_np), "A")
    np.testing.assert_allclose(loss.item(), np.sum((f_np @ t_np.T) ** 2), rtol=1e-12)


def test_orthogonal_subspaces_give_zero() -> None:
    q, _ = torch.linalg.qr(torch.randn(12, 6, dtype=torch.float64))
    assert pair_penalty(q[:, :3], q[:, 3:]).item() == pytest.approx(0.0, abs=1e-24)


def test_stage_penalty_weights_and_sums_layers() -> None:
    t = [torch.randn(2, 8, 3) for _ in range(3)]  # stacked segments, as the layers store them
    r = [torch.randn(2, 8, 3) for _ in range(3)]
    c = [torch.randn(2, 8, 3) for _ in range(3)]
    expected = sum(0.1 * (ri.transpose(-1, -2) @ ti).pow(2).sum() + 0.5 * (ci.transpose(-1, -2) @ ti).pow(2).sum()
                   for ri, ci, ti in zip(r, c, t))
    got = stage_penalty(t, [(0.1, r), (0.5, c)])
    torch.testing.assert_close(got, expected.float())


def test_stage_penalty_errors() -> None:
    with pytest.raises(ValueError, match=r"frozen tier has 1 factors but the trainable tier has 2"):
        stage_penalty([torch.zeros(2, 2)] * 2, [(0.1, [torch.zeros(2, 2)])])
    with pytest.raises(ValueError, match=r"orthogonality side must be one of \('B', 'A'\), got 'C'"):
        pair_penalty(torch.zeros(2, 2), torch.zeros(2, 2), "C")
    with pytest.raises(ValueError, match=r"stage_penalty needs at least one trainable factor"):
        stage_penalty([], [])
