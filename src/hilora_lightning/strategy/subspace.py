"""LoRA subspaces and their distances (LSAC, steps 1-3), as pure tensor functions.

Per client and adapted matrix HiLoRA keeps an EMA of the Frobenius-normalized ``B`` over the root
stage, takes its top-r left singular vectors ``U`` (thin QR + SVD of the small ``R`` factor, never a
dense SVD of a ``d_out x d_in`` update), and compares clients by the principal-angle distance
``d_ij = 1 - ||U_i^T U_j||_F^2 / r`` averaged over matrices. All pairs come from one Gram product
per matrix: with ``U_all = [U_1 ... U_n]``, ``||U_i^T U_j||_F^2`` is the ``(i, j)`` block sum of
``(U_all^T U_all)^2``.

Example:
    >>> import torch
    >>> from hilora_lightning.strategy.subspace import left_subspace, pairwise_distances
    >>> u1 = left_subspace(torch.randn(10, 3), rank=3)
    >>> u = torch.stack([u1, u1, left_subspace(torch.randn(10, 3), 3)])[:, None]  # n x L x p x r
    >>> d = pairwise_distances(u)
    >>> round(float(d[0, 1]), 6)
    0.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "delta_left_factor",
    "delta_subspace",
    "ema_left_factor",
    "ema_normalized",
    "left_subspace",
    "mean_projector_subspace",
    "pairwise_distances",
    "subspace_affinity_to",
    "subspace_distances",
    "subspace_overlap",
]


def ema_normalized(previous: Tensor | None, b: Tensor, decay: float, eps: float = 1e-12) -> Tensor:
    """``B_bar = decay * B_bar + (1 - decay) * B / ||B||_F`` (the first call returns ``B / ||B||_F``).

    Works on one factor ``(p, r)`` or a stack ``(..., p, r)`` (each matrix normalized on its own).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
    b = b.detach().float()
    normed = b / b.flatten(-2).norm(dim=-1).clamp_min(eps)[..., None, None]
    if previous is None:
        return normed
    if previous.shape != normed.shape:
        raise ValueError(f"EMA state has shape {tuple(previous.shape)} but the new factor has {tuple(normed.shape)}")
    return decay * previous + (1.0 - decay) * normed


def left_subspace(b: Tensor, rank: int) -> Tensor:
    """Top-``rank`` left singular vectors of ``b`` (``(..., p, k)``, ``k`` small) via thin QR + small SVD.

    Returns ``(..., p, rank)`` with orthonormal columns spanning the top-``rank`` left singular
    subspace; if ``b`` has fewer than ``rank`` columns, the extra columns are zero (they add nothing
    to ``||U_i^T U_j||_F``). When all columns are kept, the basis is ``Q`` itself (same span; use
    projectors, not individual columns, to compare).
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank!r}")
    q, r = torch.linalg.qr(b.detach().float())  # (..., p, k), (..., k, k); float32 is ample for a basis
    if rank >= q.shape[-1]:
        # all k directions are kept: Q spans exactly the same subspace as the k singular vectors, so
        # the small SVD (which only orders them) can be skipped; every projector-based use is equal
        return _take_columns(q, rank)
    u_small, _, _ = torch.linalg.svd(r.double(), full_matrices=False)  # order by singular value
    return _take_columns(q @ u_small.float(), rank)


def delta_subspace(b_local: Tensor, a_local: Tensor, b_ref: Tensor, a_ref: Tensor, rank: int) -> Tensor:
    """Left subspace of the local change ``B_i A_i - B_r A_r`` (HiLoRA's ``delta`` feature), factored.

    ``B_i A_i - B_r A_r = [B_i, -B_r] [A_i; A_r]``: QR of both stacked factors and an SVD of the
    small core give its left singular vectors without forming the ``p x q`` matrix.
    """
    b_cat = torch.cat([b_local.detach().double(), -b_ref.detach().double()], dim=-1)
    a_cat = torch.cat([a_local.detach().double(), a_ref.detach().double()], dim=-2)
    q_b, r_b = torch.linalg.qr(b_cat)
    _, r_a = torch.linalg.qr(a_cat.transpose(-2, -1))
    u_small, _, _ = torch.linalg.svd(r_b @ r_a.transpose(-2, -1), full_matrices=False)
    return _take_columns(q_b @ u_small, rank)  # already ordered by singular value


def _take_columns(u: Tensor, rank: int) -> Tensor:
    """The first ``rank`` columns of ``u`` as float32, zero-padded if ``u`` has fewer."""
    if u.shape[-1] == rank:
        return u.float()
    k = min(rank, u.shape[-1])
    out = torch.zeros(*u.shape[:-1], rank, dtype=torch.float32)
    out[..., :k] = u[..., :k]
    return out


def pairwise_distances(u: Tensor, chunk: int | None = 128) -> Tensor:
    """``D_ij = 1 - mean_l ||U_il^T U_jl||_F^2 / r`` for subspaces ``u`` of shape ``(n, L, p, r)``.

    Per matrix ``l`` the Gram product ``U_all^T U_all`` is computed in column chunks of ``chunk``
    clients, and only on and below the diagonal (the matrix is symmetric), so the work is about half
    of one full ``(n r) x (n r)`` Gram product and the memory ``(n r) x (chunk r)``. Returns a symmetric
    ``(n, n)`` float64 matrix with zero diagonal.
    """
    if u.ndim != 4:
        raise ValueError(f"expected subspaces shaped (clients, matrices, p, r), got {tuple(u.shape)}")
    n, n_mat, p, r = u.shape
    sim = torch.zeros(n, n, dtype=torch.float64)
    step = n if chunk is None else max(1, chunk)
    for layer in range(n_mat):
        flat = u[:, layer].float().permute(1, 0, 2).reshape(p, n * r)  # p x (n r), client-major columns
        for start in range(0, n, step):
            stop = min(n, start + step)
            gram = flat[:, start * r :].T @ flat[:, start * r : stop * r]  # rows from the chunk down
            sim[start:, start:stop] += gram.square_().view(n - start, r, stop - start, r).sum(dim=(1, 3)).double()
    sim = torch.tril(sim) + torch.tril(sim, -1).T
    dist = 1.0 - sim / (n_mat * r)
    dist.fill_diagonal_(0.0)
    return dist.clamp_(0.0, 1.0)


def mean_projector_subspace(u_members: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors of ``(1/m) sum_i U_i U_i^T`` per matrix, for ``u_members`` ``(m, L, p, r)``.

    The mean projector equals ``W W^T`` with ``W = [U_1 ... U_m] / sqrt(m)``, so its eigenvectors are
    the left singular vectors of ``W``; returns ``(L, p, rank)``.
    """
    if u_members.ndim != 4 or u_members.shape[0] == 0:
        raise ValueError(f"expected member subspaces shaped (m > 0, L, p, r), got {tuple(u_members.shape)}")
    m, n_mat, p, r = u_members.shape
    w = u_members.permute(1, 2, 0, 3).reshape(n_mat, p, m * r)
    return left_subspace(w, rank)


def subspace_overlap(u: Sequence[Tensor], center: Sequence[Tensor]) -> float:
    """Mean ``cos^2`` of principal angles, ``mean_m ||U_m^T C_m||_F^2 / r``, over paired matrices.

    ``u`` and ``center`` hold one ``(p_m, r)`` / ``(p_m, r_c)`` basis per adapted matrix (heights may
    differ between matrices): 1 for identical subspaces, 0 for orthogonal ones.
    """
    if len(u) != len(center) or not len(u):
        raise ValueError(f"need the same non-zero number of matrices, got {len(u)} and {len(center)}")
    return float(
        torch.stack([(a.double().T @ c.double()).square().sum() / a.shape[-1] for a, c in zip(u, center)]).mean()
    )


def subspace_affinity_to(u: Tensor, centers: Tensor) -> Tensor:
    """Mean ``cos^2`` of principal angles between ``u`` ``(L, p, r)`` and each center ``(K, L, p, r_c)``.

    ``mean_l ||U_l^T C_kl||_F^2 / r``: 1 for identical subspaces, 0 for orthogonal ones; shape ``(K,)``.
    """
    if u.ndim != 3 or centers.ndim != 4 or centers.shape[1:3] != u.shape[:2]:
        raise ValueError(
            f"expected u (L, p, r) and centers (K, L, p, r_c) with matching L and p, got "
            f"{tuple(u.shape)} and {tuple(centers.shape)}"
        )
    return torch.tensor([subspace_overlap(list(u), list(c)) for c in centers], dtype=torch.float64)


def ema_left_factor(previous: Tensor | None, factor: Tensor, decay: float, rank: int) -> Tensor:
    """EMA of a normalized left factor's *covariance*, kept in factored form ``(p, rank)``.

    With ``D = factor / ||factor||_F`` it returns ``M`` such that ``M M^T`` is the rank-``rank``
    truncation of ``decay * M_prev M_prev^T + (1 - decay) * D D^T``: an EMA over rounds that, unlike an
    EMA of the factor itself, does not depend on the factor's basis (signs, rotations). Used for the
    ``delta`` feature, whose factors come from an SVD each round.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
    d = factor.detach().double()
    d = d / d.flatten(-2).norm(dim=-1).clamp_min(1e-12)[..., None, None]
    if previous is None:
        stacked = d
    else:
        stacked = torch.cat([decay**0.5 * previous.double(), (1.0 - decay) ** 0.5 * d], dim=-1)
    q, r = torch.linalg.qr(stacked)
    u, s, _ = torch.linalg.svd(r, full_matrices=False)
    return _take_columns((q @ u) * s[..., None, :], rank)


def delta_left_factor(b_local: Tensor, a_local: Tensor, b_ref: Tensor, a_ref: Tensor, rank: int) -> Tensor:
    """``U_r S_r`` of the local change ``B_i A_i - B_r A_r`` (factored; ``p x rank``)."""
    b_cat = torch.cat([b_local.detach().double(), -b_ref.detach().double()], dim=-1)
    a_cat = torch.cat([a_local.detach().double(), a_ref.detach().double()], dim=-2)
    q_b, r_b = torch.linalg.qr(b_cat)
    _, r_a = torch.linalg.qr(a_cat.transpose(-2, -1))
    u_small, s, _ = torch.linalg.svd(r_b @ r_a.transpose(-2, -1), full_matrices=False)
    return _take_columns((q_b @ u_small) * s[..., None, :], rank)


def subspace_distances(subspaces: Sequence[Sequence[Tensor]], chunk: int | None = None) -> np.ndarray:
    """:func:`pairwise_distances` for per-client lists of ``(p_m, r)`` subspaces whose ``p_m`` may differ.

    Matrices of equal shape are stacked and compared together; the result is the distance averaged
    over all matrices, as a float64 numpy array.
    """
    n_mat = len(subspaces[0])
    groups: dict[tuple[int, ...], list[int]] = {}
    for m, u in enumerate(subspaces[0]):
        groups.setdefault(tuple(u.shape), []).append(m)
    total = np.zeros((len(subspaces), len(subspaces)))
    for mats in groups.values():
        stacked = torch.stack([torch.stack([client[m] for m in mats]) for client in subspaces])
        total += len(mats) * pairwise_distances(stacked, chunk=chunk).numpy()
    return total / n_mat
