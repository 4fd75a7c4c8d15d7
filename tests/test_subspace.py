from __future__ import annotations

import numpy as np
import pytest
import torch

from hilora_lightning.strategy.subspace import (
    delta_subspace,
    ema_normalized,
    left_subspace,
    mean_projector_subspace,
    pairwise_distances,
    subspace_affinity_to,
)


def _projector(u: np.ndarray) -> np.ndarray:
    return u @ u.T


@pytest.mark.parametrize(("p", "k", "r"), [(30, 8, 8), (50, 8, 4), (20, 3, 5)])
def test_left_subspace_matches_dense_svd_projector(p: int, k: int, r: int) -> None:
    b = torch.randn(p, k, dtype=torch.float64)
    u = left_subspace(b, r).double().numpy()
    ref = np.linalg.svd(b.numpy(), full_matrices=False)[0][:, : min(r, k)]
    np.testing.assert_allclose(_projector(u), _projector(ref), atol=1e-5)
    if r > k:
        assert np.count_nonzero(u[:, k:]) == 0


def test_delta_subspace_matches_dense_svd_of_the_change() -> None:
    gen = torch.Generator().manual_seed(0)
    bi, ai, br, ar = (torch.randn(s, generator=gen, dtype=torch.float64) for s in [(40, 4), (4, 30), (40, 4), (4, 30)])
    u = delta_subspace(bi, ai, br, ar, rank=4).double().numpy()
    dense = (bi @ ai - br @ ar).numpy()
    ref = np.linalg.svd(dense)[0][:, :4]
    np.testing.assert_allclose(_projector(u), _projector(ref), atol=1e-5)


def test_ema_of_normalized_factors() -> None:
    b1, b2 = torch.randn(6, 2), torch.randn(6, 2)
    first = ema_normalized(None, b1, 0.9)
    torch.testing.assert_close(first, b1 / b1.norm())
    torch.testing.assert_close(ema_normalized(first, b2 * 7, 0.9), 0.9 * first + 0.1 * b2 / b2.norm())
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\), got 1.0"):
        ema_normalized(None, b1, 1.0)
    with pytest.raises(ValueError, match=r"EMA state has shape \(6, 2\) but the new factor has \(5, 2\)"):
        ema_normalized(first, torch.randn(5, 2), 0.9)


def test_distance_zero_for_identical_one_for_orthogonal() -> None:
    q, _ = torch.linalg.qr(torch.randn(20, 8))
    u = torch.stack([q[:, :4], q[:, :4] @ torch.linalg.qr(torch.randn(4, 4))[0], q[:, 4:]])[:, None]
    d = pairwise_distances(u)
    assert d[0, 1].item() == pytest.approx(0.0, abs=1e-6)  # same subspace, other basis
    assert d[0, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(d, d.T) and torch.all(torch.diagonal(d) == 0)


def test_pairwise_distances_match_a_loop_and_chunks_agree() -> None:
    n, n_mat, p, r = 7, 3, 16, 3
    u = torch.stack([torch.stack([left_subspace(torch.randn(p, r), r) for _ in range(n_mat)]) for _ in range(n)])
    ref = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            overlaps = [np.sum((u[i, m].double().T @ u[j, m].double()).numpy() ** 2) / r for m in range(n_mat)]
            ref[i, j] = 1 - np.mean(overlaps)
    np.fill_diagonal(ref, 0.0)
    np.testing.assert_allclose(pairwise_distances(u).numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(pairwise_distances(u, chunk=3).numpy(), pairwise_distances(u).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"expected subspaces shaped \(clients, matrices, p, r\), got \(7, 16, 3\)"):
        pairwise_distances(u[:, 0])


def test_mean_projector_subspace_matches_eigh() -> None:
    members = torch.stack([left_subspace(torch.randn(12, 3), 3) for _ in range(4)])[:, None]
    got = mean_projector_subspace(members, rank=3)[0].double().numpy()
    mean_proj = sum(_projector(m[0].double().numpy()) for m in members) / 4
    w, v = np.linalg.eigh(mean_proj)
    ref = v[:, np.argsort(w)[::-1][:3]]
    np.testing.assert_allclose(_projector(got), _projector(ref), atol=1e-5)


def test_affinity_to_centers() -> None:
    q, _ = torch.linalg.qr(torch.randn(10, 6))
    u = q[:, :3][None]
    centers = torch.stack([q[:, :3][None], q[:, 3:][None]])
    np.testing.assert_allclose(subspace_affinity_to(u, centers).numpy(), [1.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"expected u \(L, p, r\) and centers \(K, L, p, r_c\)"):
        subspace_affinity_to(u, centers[:, :, :5])
