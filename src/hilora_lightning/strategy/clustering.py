"""LoRA-Subspace Adaptive Clustering (LSAC, steps 4-5), its k-means baseline, re-clustering and routing.

From a distance matrix ``D`` (see :mod:`hilora_lightning.strategy.subspace`): Gaussian affinity
``S = exp(-D^2 / (2 sigma^2))`` with ``sigma`` the median off-diagonal distance; ``K`` = the largest
eigengap of the normalized Laplacian ``I - D^{-1/2} S D^{-1/2}`` within ``[k_min, k_max]``; labels
from scikit-learn's ``SpectralClustering`` on the precomputed affinity.

Example:
    >>> import numpy as np
    >>> from hilora_lightning.strategy.clustering import cluster_distances
    >>> d = np.array([[0, .1, .9, .9], [.1, 0, .9, .9], [.9, .9, 0, .1], [.9, .9, .1, 0]])
    >>> res = cluster_distances(d, k_min=2, k_max=3, seed=0)
    >>> res.k, sorted(np.bincount(res.labels).tolist())
    (2, [2, 2])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from torch import Tensor

__all__ = [
    "SIGMA_RULES",
    "ClusteringResult",
    "choose_k_by_eigengap",
    "cluster_distances",
    "gaussian_affinity",
    "kmeans_cosine",
    "match_clusters",
    "route_to_cluster",
]


@dataclasses.dataclass(frozen=True)
class ClusteringResult:
    """What LSAC found.

    Attributes:
        labels: cluster id per client, ``0 .. k-1``.
        k: the chosen number of clusters.
        distances: the ``(n, n)`` subspace distance matrix.
        affinity: the Gaussian affinity used for spectral clustering.
        eigenvalues: ascending eigenvalues of the normalized Laplacian.
        sigma: the kernel width (median off-diagonal distance).
    """

    labels: np.ndarray
    k: int
    distances: np.ndarray
    affinity: np.ndarray
    eigenvalues: np.ndarray
    sigma: float


def _as_square(d: np.ndarray | Tensor, name: str = "distance matrix") -> np.ndarray:
    arr = np.asarray(d.detach().cpu().numpy() if isinstance(d, Tensor) else d, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    return arr


#: Kernel widths: ``median`` (the paper: one sigma, the median off-diagonal distance) or ``local``
#: (self-tuning, Zelnik-Manor & Perona 2004: ``S_ij = exp(-d_ij^2 / (2 sigma_i sigma_j))`` with
#: ``sigma_i`` the distance to client i's ``LOCAL_NEIGHBOR``-th nearest neighbour; 3 rather than the
#: paper's 7, since federated client groups can have only a handful of members).
SIGMA_RULES = ("median", "local")
LOCAL_NEIGHBOR = 3


def gaussian_affinity(distances: np.ndarray | Tensor, sigma: str = "median") -> tuple[np.ndarray, float]:
    """Gaussian affinity of a distance matrix; returns ``(S, sigma)`` (for ``local`` the median sigma_i).

    ``median``: ``exp(-D^2 / (2 sigma^2))``, sigma = median off-diagonal distance (the paper). When
    most pairs lie in different groups (e.g. two groups) that sigma is a between-group distance and
    the affinity is flat, which makes ``K = 1`` win the eigengap; ``local`` keeps groups sharp there.
    If every off-diagonal distance is 0 (all clients alike) the affinity is all ones.
    """
    if sigma not in SIGMA_RULES:
        raise ValueError(f"sigma must be one of {SIGMA_RULES}, got {sigma!r}")
    d = _as_square(distances)
    n = d.shape[0]
    off = d[~np.eye(n, dtype=bool)]
    if not off.size or float(off.max()) <= 0.0:
        return np.ones_like(d), 0.0
    if sigma == "median":
        med = float(np.median(off))
        med = med if med > 0 else float(off[off > 0].min())
        return np.exp(-(d**2) / (2.0 * med**2)), med
    kth = min(LOCAL_NEIGHBOR, n - 1)
    local = np.sort(d, axis=1)[:, kth]  # column 0 is the client itself
    local = np.where(local > 0, local, float(off[off > 0].min()))
    return np.exp(-(d**2) / (2.0 * np.outer(local, local))), float(np.median(local))


def choose_k_by_eigengap(affinity: np.ndarray, k_min: int, k_max: int) -> tuple[int, np.ndarray]:
    """``K = argmax_{K in [k_min, k_max]} (lambda_{K+1} - lambda_K)`` of the normalized Laplacian.

    Returns ``(K, ascending eigenvalues)``. ``k_max`` is capped at ``n - 1`` (a gap needs a next value);
    a single client gives ``K = 1``.
    """
    from scipy.sparse.csgraph import laplacian

    s = _as_square(affinity, "affinity")
    n = s.shape[0]
    if not 1 <= k_min <= k_max:
        raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    lap = laplacian(s, normed=True)
    eig = np.sort(np.linalg.eigvalsh(0.5 * (lap + lap.T)))
    if n == 1:
        return 1, eig
    hi = min(k_max, n - 1)
    lo = min(k_min, hi)
    gaps = [eig[k] - eig[k - 1] for k in range(lo, hi + 1)]
    return lo + int(np.argmax(gaps)), eig


def cluster_distances(
    distances: np.ndarray | Tensor,
    k_min: int = 2,
    k_max: int = 10,
    seed: int = 0,
    k: int | None = None,
    sigma: str = "median",
) -> ClusteringResult:
    """Spectral clustering of clients from their subspace distances, ``K`` by eigengap unless ``k`` is given.

    Args:
        distances: ``(n, n)`` subspace distances.
        k_min: smallest K the eigengap may pick (1 lets IID clients form one cluster).
        k_max: largest K (capped at ``n - 1``).
        seed: seed of the spectral embedding's k-means.
        k: a fixed K instead of the eigengap choice.
        sigma: kernel width rule, see :data:`SIGMA_RULES`.
    """
    from sklearn.cluster import SpectralClustering

    d = _as_square(distances)
    n = d.shape[0]
    affinity, sigma_value = gaussian_affinity(d, sigma)
    chosen, eig = choose_k_by_eigengap(affinity, k_min, k_max)
    if k is not None:
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}] for {n} clients, got {k}")
        chosen = k
    if chosen == 1 or n == 1:
        labels = np.zeros(n, dtype=np.int64)
    else:
        model = SpectralClustering(n_clusters=chosen, affinity="precomputed", random_state=seed, assign_labels="kmeans")
        labels = _relabel_by_first_member(model.fit_predict(affinity))
    return ClusteringResult(labels, int(len(np.unique(labels))), d, affinity, eig, sigma_value)


def _relabel_by_first_member(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters in order of their first member, so equal partitions give equal labels."""
    order: dict[int, int] = {}
    for lab in labels.tolist():
        order.setdefault(int(lab), len(order))
    return np.array([order[int(lab)] for lab in labels], dtype=np.int64)


def kmeans_cosine(updates: np.ndarray | Tensor, k: int, seed: int = 0) -> np.ndarray:
    """The paper's ablation baseline: k-means on L2-normalized flattened updates (cosine geometry)."""
    from sklearn.cluster import KMeans

    x = np.asarray(updates.detach().cpu().numpy() if isinstance(updates, Tensor) else updates, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"updates must be a (clients, features) matrix, got shape {x.shape}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0]}], got {k}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return _relabel_by_first_member(labels)


def match_clusters(old: Sequence[int] | np.ndarray, new: Sequence[int] | np.ndarray) -> dict[int, int | None]:
    """Map each new cluster id to the old id it overlaps most (Hungarian on member overlap).

    New clusters left without a partner (more new clusters than old, i.e. splits or new groups)
    map to ``None``: initialize them from their members' product-space mean.
    """
    from scipy.optimize import linear_sum_assignment

    old_arr, new_arr = np.asarray(old), np.asarray(new)
    if old_arr.shape != new_arr.shape:
        raise ValueError(
            f"old and new assignments must cover the same clients, got {old_arr.shape} and {new_arr.shape}"
        )
    old_ids, new_ids = np.unique(old_arr), np.unique(new_arr)
    overlap = np.array([[np.sum((new_arr == n) & (old_arr == o)) for o in old_ids] for n in new_ids])
    rows, cols = linear_sum_assignment(-overlap)
    mapping: dict[int, int | None] = {int(n): None for n in new_ids}
    for r, c in zip(rows, cols):
        if overlap[r, c] > 0:
            mapping[int(new_ids[r])] = int(old_ids[c])
    return mapping


def route_to_cluster(
    u: Sequence[Tensor] | Tensor, centers: Mapping[int, Sequence[Tensor] | Tensor]
) -> tuple[int, dict[int, float]]:
    """Route an unseen client: the cluster with the largest mean ``cos^2`` of principal angles.

    Args:
        u: the client's probe subspace per adapted matrix (a list of ``(p_m, r)``, or a stacked
            ``(L, p, r)`` tensor).
        centers: cluster id -> the cluster's subspace per matrix, paired with ``u``.

    Returns:
        ``(best cluster id, score per cluster)``; ties go to the smallest id.
    """
    from hilora_lightning.strategy.subspace import subspace_overlap

    if not centers:
        raise ValueError("no clusters to route to")
    by_id = {int(i): subspace_overlap(list(u), list(c)) for i, c in centers.items()}
    return max(sorted(by_id), key=lambda i: by_id[i]), by_id
