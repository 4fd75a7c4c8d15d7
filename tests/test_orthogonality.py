from __future__ import annotations

import numpy as np
import pytest
import torch

from hilora_lightning.orthogonality import effective_frozen, pair_penalty, stage_penalty


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


def _dense_svd(b: np.ndarray, a: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vh = np.linalg.svd(scale * b @ a)
    r = b.shape[1]
    return u[:, :r], s[:r], vh[:r]


@pytest.mark.parametrize("side", ["B", "A"])
def test_effective_frozen_forms_match_a_dense_reference(side: str) -> None:
    gen = np.random.default_rng(3)
    b, a = gen.normal(size=(12, 4)), gen.normal(size=(4, 9))
    a[2] = 0.0  # one direction of the frozen update has no singular value
    train = gen.normal(size=(12, 3)) if side == "B" else gen.normal(size=(3, 9))
    sf, st = 2.0, 0.5
    tb, ta, tt = torch.tensor(b), torch.tensor(a), torch.tensor(train)
    raw = pair_penalty(effective_frozen(tb, ta, sf, st, "raw", side), tt, side).item()
    raw_ref = np.sum((b.T @ train) ** 2) if side == "B" else np.sum((a @ train.T) ** 2)
    np.testing.assert_allclose(raw, raw_ref, rtol=1e-10)
    scaled = pair_penalty(effective_frozen(tb, ta, sf, st, "scaled", side), tt, side).item()
    np.testing.assert_allclose(scaled, (sf * st) ** 2 * raw_ref, rtol=1e-10)
    u, s, vh = _dense_svd(b, a, sf)
    w = s / s.max()
    assert w[-1] < 1e-12  # the dead direction
    energy_ref = (np.sum((w[:, None] * (u.T @ (st * train))) ** 2) if side == "B"
                  else np.sum((w[:, None] * (vh @ (st * train).T)) ** 2))
    energy = pair_penalty(effective_frozen(tb, ta, sf, st, "energy", side), tt, side).item()
    np.testing.assert_allclose(energy, energy_ref, rtol=1e-8)


def test_energy_form_ignores_an_orthonormal_completion_and_a_zero_update() -> None:
    q = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))[0]
    a = torch.zeros(4, 6, dtype=torch.float64)
    a[0, 0] = 1.0  # only q[:, 0] carries the frozen update; q[:, 1:] is an orthonormal completion
    inside = q[:, 1:2]  # a trainable factor living in the completion
    assert pair_penalty(effective_frozen(q, a, 2.0, 2.0, "raw"), inside).item() > 0.9
    assert pair_penalty(effective_frozen(q, a, 2.0, 2.0, "energy"), inside).item() < 1e-12  # float64 rounding only
    assert pair_penalty(effective_frozen(q, a, 2.0, 2.0, "energy"), q[:, :1]).item() == pytest.approx(4.0)
    zero = effective_frozen(q, torch.zeros(4, 6, dtype=torch.float64), 2.0, 2.0, "energy")
    assert torch.count_nonzero(zero) == 0  # a frozen tier that learned nothing constrains nothing
    with pytest.raises(ValueError, match=r"orthogonality form must be one of \('raw', 'scaled', 'energy'\), got 'x'"):
        effective_frozen(q, a, 1.0, 1.0, "x")
