"""Per-tier aggregation of LoRA factors: product space + truncated SVD (FlexLoRA / HiLoRA) and FedAvg.

HiLoRA aggregates a shared tier in *product space*: ``dW = sum_i pi_i s B_i A_i`` over the
participants, then resets the factors from the rank-r truncated SVD (``B = U_r``,
``A = S_r V_r^T``). Here that is done in factored form: QR of the stacked ``B``'s and of the
stacked ``A^T``'s, SVD of the small core, so the ``d_out x d_in`` matrix is never formed; the result
equals the dense computation up to float round-off. States are flat ``dict[str, Tensor]`` with the
tier-free keys of :func:`hilora_lightning.state.export_tier` (``<matrix>.lora_A`` / ``<matrix>.lora_B``).

Example:
    >>> import torch
    >>> from hilora_lightning.strategy.aggregation import product_space_aggregate
    >>> b = [torch.randn(6, 2) for _ in range(3)]
    >>> a = [torch.randn(2, 5) for _ in range(3)]
    >>> nb, na = product_space_aggregate(b, a, weights=[1, 1, 2], rank=2)
    >>> tuple(nb.shape), tuple(na.shape)
    ((6, 2), (2, 5))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "SPLITS",
    "factor_pairs",
    "factored_fro_norm_sq",
    "fedavg_states",
    "leave_one_out_states",
    "normalize_weights",
    "product_space_aggregate",
    "product_space_aggregate_states",
    "relative_change",
    "subspace_change",
    "select_side",
]

#: How the truncated SVD ``U S V^T`` is split into factors: ``left`` (the paper: ``B = U``,
#: ``A = S V^T``) or ``balanced`` (``B = U sqrt(S)``, ``A = sqrt(S) V^T``).
SPLITS = ("left", "balanced")


def normalize_weights(weights: Sequence[float]) -> Tensor:
    """Non-negative weights (e.g. sample counts) to float64 ``pi`` summing to one."""
    w = torch.as_tensor([float(v) for v in weights], dtype=torch.float64)
    if w.numel() == 0:
        raise ValueError("aggregation needs at least one participant, got none")
    if not torch.isfinite(w).all() or (w < 0).any() or float(w.sum()) <= 0:
        raise ValueError(
            f"aggregation weights must be finite, >= 0 and not all zero, got {[float(v) for v in weights]}"
        )
    return w / w.sum()


def product_space_aggregate(
    bs: Sequence[Tensor],
    as_: Sequence[Tensor],
    weights: Sequence[float],
    rank: int,
    split: str = "left",
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of ``sum_i pi_i B_i A_i``, computed without forming the product.

    All participants share the tier's scale ``s = alpha / rank``, so it cancels: ``B_new @ A_new`` is
    the rank-r truncation of ``sum_i pi_i B_i A_i`` and ``s * B_new @ A_new`` that of the updates.

    Args:
        bs: ``B_i`` of shape ``(p, r_i)``.
        as_: ``A_i`` of shape ``(r_i, q)``.
        weights: ``pi_i`` before normalization (sample counts).
        rank: rank of the result. If the sum has lower rank, ``B`` keeps orthonormal completion
            columns whose ``A`` rows are (numerically) zero; only when fewer than ``rank`` directions
            exist at all are the trailing factors zero.
        split: ``"left"`` or ``"balanced"``, see :data:`SPLITS`.

    Returns:
        ``(B, A)`` in float32 with shapes ``(p, rank)`` and ``(rank, q)``.
    """
    if len(bs) != len(as_):
        raise ValueError(f"got {len(bs)} B factors but {len(as_)} A factors")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank!r}")
    pi = normalize_weights(weights)
    if len(pi) != len(bs):
        raise ValueError(f"got {len(pi)} weights for {len(bs)} participants")
    p, q = bs[0].shape[0], as_[0].shape[1]
    for i, (b, a) in enumerate(zip(bs, as_)):
        if b.ndim != 2 or a.ndim != 2 or b.shape[0] != p or a.shape[1] != q or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"participant {i}: expected B (p={p}, r) and A (r, q={q}) with matching r, "
                f"got B {tuple(b.shape)} and A {tuple(a.shape)}"
            )
    b_cat = torch.cat([float(w) * b.detach().double() for w, b in zip(pi, bs)], dim=1)  # p x R
    a_cat = torch.cat([a.detach().double() for a in as_], dim=0)  # R x q
    q_b, r_b = torch.linalg.qr(b_cat)  # p x k, k x R
    q_a, r_a = torch.linalg.qr(a_cat.T)  # q x k', k' x R
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # the small core
    # a rank-deficient sum keeps orthonormal completion columns in B with ~zero rows in A: the
    # product is unchanged and those directions can still train (all-zero pairs never would)
    k = min(rank, s.numel())
    u_r, s_r, v_r = q_b @ u[:, :k], s[:k], q_a @ vh[:k].T
    if split == "left":
        new_b, new_a = u_r, s_r[:, None] * v_r.T
    else:
        root = s_r.sqrt()
        new_b, new_a = u_r * root[None, :], root[:, None] * v_r.T
    out_b = torch.zeros(p, rank, dtype=torch.float64)
    out_a = torch.zeros(rank, q, dtype=torch.float64)
    out_b[:, :k], out_a[:k] = new_b, new_a
    return out_b.float(), out_a.float()


def factor_pairs(keys: Sequence[str] | Mapping[str, Tensor]) -> list[str]:
    """The adapted-matrix prefixes of a tier state (``X`` for ``X.lora_A`` / ``X.lora_B``), in order.

    Raises:
        ValueError: a key is not a LoRA factor, or an ``A`` has no ``B`` (or the reverse).
    """
    prefixes: list[str] = []
    seen: dict[str, set[str]] = {}
    for key in keys:
        prefix, _, factor = key.rpartition(".")
        if factor not in ("lora_A", "lora_B") or not prefix:
            raise ValueError(f"key {key!r} is not a LoRA factor: expected '<matrix>.lora_A' or '<matrix>.lora_B'")
        if prefix not in seen:
            seen[prefix] = set()
            prefixes.append(prefix)
        seen[prefix].add(factor)
    unpaired = [p for p, f in seen.items() if len(f) != 2]
    if unpaired:
        raise ValueError(f"LoRA factors without their partner: {unpaired[:5]}")
    return prefixes


def _check_same_keys(states: Sequence[Mapping[str, Tensor]]) -> list[str]:
    if not states:
        raise ValueError("aggregation needs at least one participant, got none")
    keys = list(states[0])
    for i, st in enumerate(states[1:], start=1):
        if set(st) != set(keys):
            diff = sorted(set(st) ^ set(keys))
            raise ValueError(f"participant {i} has different keys than participant 0: {diff[:5]}")
    return keys


def product_space_aggregate_states(
    states: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    rank: int,
    split: str = "left",
) -> dict[str, Tensor]:
    """:func:`product_space_aggregate` applied to every adapted matrix of tier states."""
    keys = _check_same_keys(states)
    out: dict[str, Tensor] = {}
    for prefix in factor_pairs(keys):
        b, a = product_space_aggregate(
            [st[f"{prefix}.lora_B"] for st in states],
            [st[f"{prefix}.lora_A"] for st in states],
            weights,
            rank,
            split,
        )
        out[f"{prefix}.lora_A"], out[f"{prefix}.lora_B"] = a, b
    return {k: out[k] for k in keys}


def fedavg_states(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted mean of every tensor (FedIT: ``A`` and ``B`` averaged separately; also heads)."""
    keys = _check_same_keys(states)
    pi = normalize_weights(weights)
    if len(pi) != len(states):
        raise ValueError(f"got {len(pi)} weights for {len(states)} participants")
    out: dict[str, Tensor] = {}
    for key in keys:
        ref = states[0][key]
        total = sum(float(w) * st[key].detach().double() for w, st in zip(pi, states))
        out[key] = torch.as_tensor(total).to(ref.dtype)
    return out


def leave_one_out_states(
    states: Mapping[int, Mapping[str, Tensor]], weights: Mapping[int, float]
) -> dict[int, dict[str, Tensor]]:
    """For every participant ``i``, the weighted mean of the *other* participants' states.

    FedALT's rest-of-world LoRA: client ``i`` receives the average of every other client's individual
    LoRA (``A`` and ``B`` averaged separately). A lone participant gets no entry.

    Example:
        >>> import torch
        >>> out = leave_one_out_states({0: {"x": torch.tensor([1.0])}, 1: {"x": torch.tensor([3.0])},
        ...                             2: {"x": torch.tensor([5.0])}}, {0: 1, 1: 1, 2: 2})
        >>> [round(float(out[i]["x"]), 4) for i in range(3)]
        [4.3333, 3.6667, 2.0]
    """
    ids = sorted(states)
    out: dict[int, dict[str, Tensor]] = {}
    for i in ids:
        others = [j for j in ids if j != i]
        if others:
            out[i] = fedavg_states([states[j] for j in others], [weights[j] for j in others])
    return out


def select_side(state: Mapping[str, Tensor], side: str) -> dict[str, Tensor]:
    """Only the ``A`` (``side="A"``) or ``B`` factors of a tier state (FedSA-LoRA shares ``A`` alone)."""
    if side not in ("A", "B"):
        raise ValueError(f"side must be 'A' or 'B', got {side!r}")
    suffix = f".lora_{side}"
    return {k: v for k, v in state.items() if k.endswith(suffix)}


def factored_fro_norm_sq(b: Tensor, a: Tensor) -> Tensor:
    """``||B A||_F^2 = sum((B^T B) * (A A^T))`` without forming ``B A``."""
    b, a = b.double(), a.double()
    return ((b.T @ b) * (a @ a.T)).sum()


def relative_change(
    previous: Mapping[str, Tensor], current: Mapping[str, Tensor], scaling: float = 1.0, eps: float = 1e-12
) -> float:
    """HiLoRA's ``rho_t = ||dW_{t+1} - dW_t||_F / (||dW_t||_F + eps)`` over all adapted matrices.

    ``dW = s B A`` per matrix; norms are summed over matrices (one global Frobenius norm), all in
    factored form (``B_1 A_1 - B_0 A_0 = [B_1, -B_0] [A_1; A_0]``). From an all-zero previous update
    (a fresh tier) the change is ``inf`` (``0`` if nothing changed).
    """
    keys = _check_same_keys([previous, current])
    diff_sq = torch.zeros((), dtype=torch.float64)
    prev_sq = torch.zeros((), dtype=torch.float64)
    for prefix in factor_pairs(keys):
        b0, a0 = previous[f"{prefix}.lora_B"], previous[f"{prefix}.lora_A"]
        b1, a1 = current[f"{prefix}.lora_B"], current[f"{prefix}.lora_A"]
        diff_sq += factored_fro_norm_sq(torch.cat([b1, -b0], dim=1), torch.cat([a1, a0], dim=0))
        prev_sq += factored_fro_norm_sq(b0, a0)
    diff = scaling * float(diff_sq.clamp_min(0).sqrt())
    if float(prev_sq) == 0.0:  # the first aggregation of a fresh (B = 0) tier: no relative change yet
        return float("inf") if diff > 0 else 0.0
    return diff / (scaling * float(prev_sq.sqrt()) + eps)


def subspace_change(previous: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> float:
    """A convergence statistic blind to growth: how much the *directions* of ``dW = B A`` moved.

    Per adapted matrix, ``1 - <C_0, C_1>_F / (||C_0||_F ||C_1||_F)`` with ``C = dW dW^T`` (the update's
    column covariance, each direction weighted by its energy), averaged over matrices. It is 0 when the
    update only grew or shrank, 1 when the new directions are orthogonal to the old, and it ignores
    directions without singular value. Computed in factored form: ``<C_0, C_1> = ||dW_0^T dW_1||_F^2 =
    tr(G^T P_0 G P_1)`` with ``G = B_0^T B_1``, ``P = A A^T``. ``inf`` from an all-zero previous update.

    Example:
        >>> import torch
        >>> b, a = torch.randn(6, 2), torch.randn(2, 5)
        >>> prev = {"m.lora_B": b, "m.lora_A": a}
        >>> round(subspace_change(prev, {"m.lora_B": 3 * b, "m.lora_A": a}), 9)  # grew, same directions
        0.0
    """
    keys = _check_same_keys([previous, current])
    changes = []
    for prefix in factor_pairs(keys):
        b0, a0 = previous[f"{prefix}.lora_B"].double(), previous[f"{prefix}.lora_A"].double()
        b1, a1 = current[f"{prefix}.lora_B"].double(), current[f"{prefix}.lora_A"].double()
        p0, p1 = a0 @ a0.mT, a1 @ a1.mT
        g = b0.mT @ b1
        cross = (g.mT @ p0 @ g @ p1).diagonal(dim1=-2, dim2=-1).sum(-1)
        g0, g1 = b0.mT @ b0, b1.mT @ b1
        n0 = (g0 @ p0 @ g0 @ p0).diagonal(dim1=-2, dim2=-1).sum(-1)
        n1 = (g1 @ p1 @ g1 @ p1).diagonal(dim1=-2, dim2=-1).sum(-1)
        if bool((n0 <= 0).all()):
            return float("inf") if bool((n1 > 0).any()) else 0.0
        changes.append((1 - cross / (n0 * n1).sqrt().clamp_min(1e-300)).clamp(0, 1).mean())
    return float(torch.stack(changes).mean()) if changes else 0.0

