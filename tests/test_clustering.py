from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from hilora_lightning.strategy.clustering import (
    choose_k_by_eigengap,
    cluster_distances,
    gaussian_affinity,
    kmeans_cosine,
    match_clusters,
    route_to_cluster,
)
from hilora_lightning.strategy.subspace import left_subspace, mean_projector_subspace, pairwise_distances


def synthetic_clients(k: int, per_group: int, seed: int, p: int = 48, r: int = 4, n_mat: int = 3, noise: float = 0.3):
    """LoRA B factors drawn from k hidden subspaces (one basis per group and matrix) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    bases = [[torch.linalg.qr(torch.randn(p, r, generator=gen))[0] for _ in range(n_mat)] for _ in range(k)]
    labels, subspaces = [], []
    for g in range(k):
        for _ in range(per_group):
            mats = [bases[g][m] @ torch.randn(r, r, generator=gen) + noise * torch.randn(p, r, generator=gen) / p**0.5
                    for m in range(n_mat)]
            subspaces.append(torch.stack([left_subspace(b, r) for b in mats]))
            labels.append(g)
    return torch.stack(subspaces), np.array(labels), bases


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
@pytest.mark.parametrize(("sigma", "k_min"), [("median", 2), ("local", 1)])
def test_hidden_subspace_groups_are_recovered_and_eigengap_finds_k(k: int, sigma: str, k_min: int) -> None:
    u, truth, _ = synthetic_clients(k, per_group=5, seed=k)
    res = cluster_distances(pairwise_distances(u), k_min=k_min, k_max=10, seed=0, sigma=sigma)
    assert res.k == k
    assert adjusted_rand_score(truth, res.labels) == 1.0


@pytest.mark.parametrize("sigma", ["median", "local"])
def test_iid_clients_give_one_cluster_when_k_min_is_one(sigma: str) -> None:
    u, _, _ = synthetic_clients(1, per_group=12, seed=0)
    assert cluster_distances(pairwise_distances(u), k_min=1, k_max=5, sigma=sigma).k == 1


def test_median_sigma_with_k_min_one_merges_two_groups() -> None:
    """Documents the paper rule's weak spot that the ``local`` option exists for."""
    u, _, _ = synthetic_clients(2, per_group=5, seed=2)
    assert cluster_distances(pairwise_distances(u), k_min=1, sigma="median").k == 1
    assert cluster_distances(pairwise_distances(u), k_min=1, sigma="local").k == 2


def test_affinity_uses_median_distance() -> None:
    d = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=float)
    s, sigma = gaussian_affinity(d)
    assert sigma == 2.0
    np.testing.assert_allclose(s, np.exp(-(d**2) / 8.0))
    s0, sigma0 = gaussian_affinity(np.zeros((3, 3)))
    assert sigma0 == 0.0 and np.all(s0 == 1.0)
    with pytest.raises(ValueError, match=r"sigma must be one of \('median', 'local'\), got 'mean'"):
        gaussian_affinity(d, "mean")


def test_eigengap_reference_on_block_affinity() -> None:
    s = np.kron(np.eye(3), np.ones((4, 4))) + 1e-3
    k, eig = choose_k_by_eigengap(s, 1, 8)
    assert k == 3 and eig[0] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match=r"need 1 <= k_min <= k_max, got k_min=3, k_max=2"):
        choose_k_by_eigengap(s, 3, 2)


def test_fixed_k_and_input_errors() -> None:
    u, _, _ = synthetic_clients(3, per_group=3, seed=1)
    assert cluster_distances(pairwise_distances(u), k=2).k == 2
    with pytest.raises(ValueError, match=r"k must be in \[1, 9\] for 9 clients, got 10"):
        cluster_distances(pairwise_distances(u), k=10)
    with pytest.raises(ValueError, match=r"distance matrix must be a non-empty square matrix, got shape \(2, 3\)"):
        cluster_distances(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"distance matrix holds NaN or Inf values"):
        cluster_distances(np.full((2, 2), np.nan))


def test_kmeans_cosine_baseline() -> None:
    gen = np.random.default_rng(0)
    centers = gen.normal(size=(3, 20))
    x = np.concatenate([c * gen.uniform(0.5, 3.0, size=(4, 1)) + 0.05 * gen.normal(size=(4, 20)) for c in centers])
    labels = kmeans_cosine(x, 3)
    assert adjusted_rand_score(np.repeat([0, 1, 2], 4), labels) == 1.0
    assert labels[0] == 0  # relabelled by first member
    with pytest.raises(ValueError, match=r"k must be in \[1, 12\], got 0"):
        kmeans_cosine(x, 0)


def test_match_clusters_by_overlap() -> None:
    old = [0, 0, 0, 1, 1, 1]
    assert match_clusters(old, [1, 1, 1, 0, 0, 0]) == {0: 1, 1: 0}
    split = match_clusters(old, [0, 0, 2, 1, 1, 1])
    assert split[0] == 0 and split[1] == 1 and split[2] is None
    with pytest.raises(ValueError, match=r"old and new assignments must cover the same clients"):
        match_clusters([0, 1], [0])


def test_unseen_client_is_routed_to_its_group() -> None:
    u, truth, bases = synthetic_clients(4, per_group=4, seed=3)
    centers = {g: mean_projector_subspace(u[truth == g], rank=4) for g in range(4)}
    gen = torch.Generator().manual_seed(99)
    for g in range(4):
        noisy = [b @ torch.randn(4, 4, generator=gen) + 0.3 * torch.randn(48, 4, generator=gen) / 48**0.5
                 for b in bases[g]]
        probe = torch.stack([left_subspace(m, 4) for m in noisy])
        best, scores = route_to_cluster(probe, centers)
        assert best == g and scores[g] == max(scores.values())
    with pytest.raises(ValueError, match=r"no clusters to route to"):
        route_to_cluster(probe, {})


def test_routing_accepts_matrices_of_different_heights() -> None:
    q1, _ = torch.linalg.qr(torch.randn(12, 6))
    q2, _ = torch.linalg.qr(torch.randn(5, 4))
    probe = [q1[:, :2], q2[:, :2]]  # e.g. a qkv slice and a proj matrix
    centers = {3: [q1[:, 2:4], q2[:, 2:4]], 1: [q1[:, :2], q2[:, 2:4]]}
    best, scores = route_to_cluster(probe, centers)
    assert best == 1 and scores[1] == pytest.approx(0.5, abs=1e-6) and scores[3] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"need the same non-zero number of matrices, got 2 and 1"):
        route_to_cluster(probe, {0: [q1[:, :2]]})
