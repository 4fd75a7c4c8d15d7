"""Robust aggregation of a shared tier in product space: each rule becomes weights for the factored SVD.

A client's update is ``U_i = B_i A_i - B_0 A_0`` (``B_0 A_0``: the tier the round started from),
a ``d_out x d_in`` matrix that is never formed: ``U_i = L_i R_i`` with ``L_i = [B_i, -B_0]`` and
``R_i = [A_i; A_0]``, and every inner product comes from ``2r x 2r`` blocks,
``<U_i, U_j>_F = tr((L_i^T L_j)(R_j R_i^T))``, summed over the tier's adapted matrices. From that
Gram matrix ``G``:

* ``clip``: each update scaled to at most ``clip_norm`` (``||U_i|| = sqrt(G_ii)``), or to
  ``clip_factor`` times the round's median update norm; the aggregate
  ``B_0 A_0 + sum_i pi_i s_i U_i`` is ``sum_i pi_i s_i B_i A_i + (1 - sum_i pi_i s_i) B_0 A_0``, a
  weighted sum of products the factored SVD already takes (the start as one more term);
* ``geomed``: the geometric median of the updates (Weiszfeld's iteration on the distances
  ``||U_i - z||^2 = G_ii - 2 (G w)_i + w^T G w`` of ``z = sum_j w_j U_j``), a convex combination;
* ``multi_krum``: Krum scores (each update's summed squared distance to its ``n - f - 2`` nearest),
  the ``m`` best kept with their sample weights;
* ``trim``: the ``trim_fraction`` of updates farthest from the geometric median dropped.

So a robust rule only changes the weights of :func:`~hilora_lightning.strategy.aggregation.product_space_aggregate`.
For comparison with Flower's ``FedMedian`` / ``FedTrimmedAvg`` (medians of flat vectors),
:func:`coordinate_aggregate_states` takes the coordinate-wise median or trimmed mean of the dense
updates, one adapted matrix at a time, and re-factors ``B_0 A_0 + agg`` by a truncated SVD.

Example:
    >>> import torch
    >>> from hilora_lightning.strategy.robust import robust_weights, update_gram
    >>> start = {"m.lora_A": torch.randn(2, 5), "m.lora_B": torch.zeros(6, 2)}
    >>> honest = [{"m.lora_A": start["m.lora_A"], "m.lora_B": torch.randn(6, 2) * 0.1} for _ in range(4)]
    >>> hostile = {"m.lora_A": start["m.lora_A"], "m.lora_B": -50 * honest[0]["m.lora_B"]}
    >>> gram = update_gram([*honest, hostile], start)
    >>> w, w_start = robust_weights("multi_krum", gram, [1, 1, 1, 1, 1], krum_f=1, krum_m=3)
    >>> float(w[4]), round(float(w.sum() + w_start), 6)
    (0.0, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.strategy.aggregation import (
    factor_pairs,
    fedavg_states,
    normalize_weights,
    product_space_aggregate_states,
)

__all__ = [
    "COORDINATE_RULES",
    "aggregate_uploads",
    "ROBUST_RULES",
    "clip_weights",
    "combine_dense",
    "coordinate_aggregate_dense",
    "coordinate_aggregate_states",
    "dense_factors",
    "dense_gram",
    "geometric_median_weights",
    "multi_krum_weights",
    "robust_weights",
    "trimmed_weights",
    "update_gram",
    "update_norms",
]

#: rules that become weights of the factored SVD
ROBUST_RULES = ("none", "clip", "trim", "multi_krum", "geomed")
#: rules on the dense updates (chunked by adapted matrix), for comparison with Flower's
COORDINATE_RULES = ("coord_median", "coord_trimmed_mean")

State = Mapping[str, Tensor]


def _update_factors(state: State, start: State, prefix: str) -> tuple[Tensor, Tensor]:
    """``(L, R)`` with ``L @ R = B A - B_0 A_0`` for one adapted matrix (float64)."""
    b, a = state[f"{prefix}.lora_B"].double(), state[f"{prefix}.lora_A"].double()
    b0, a0 = start[f"{prefix}.lora_B"].double(), start[f"{prefix}.lora_A"].double()
    return torch.cat([b, -b0], dim=1), torch.cat([a, a0], dim=0)


def update_gram(states: Sequence[State], start: State) -> Tensor:
    """``G_ij = <U_i, U_j>_F`` summed over the tier's adapted matrices, from ``2r x 2r`` blocks (float64).

    Never forms a ``d_out x d_in`` matrix: per matrix the stacked ``L^T L`` and ``R R^T`` are
    ``2rn x 2rn``, and ``G_ij = sum((L_i^T L_j) * (R_i R_j^T))`` elementwise.
    """
    if not states:
        raise ValueError("update_gram needs at least one client state")
    n = len(states)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for prefix in factor_pairs(list(start)):
        pairs = [_update_factors(st, start, prefix) for st in states]
        k = pairs[0][0].shape[1]
        if any(left.shape[1] != k for left, _ in pairs):
            raise ValueError(f"{prefix}: every client's update must have the same rank")
        left = torch.cat([p[0] for p in pairs], dim=1)  # d_out x (k n)
        right = torch.cat([p[1] for p in pairs], dim=0)  # (k n) x d_in
        blocks = (left.T @ left) * (right @ right.T)  # (k n) x (k n); block (i, j) sums to <U_i, U_j>
        gram += blocks.reshape(n, k, n, k).sum(dim=(1, 3))
    return (gram + gram.T) / 2


def dense_gram(states: Sequence[State], start: State) -> Tensor:
    """``G_ij = <x_i - x_0, x_j - x_0>`` over every tensor of small dense states (a classifier head), float64.

    Added to :func:`update_gram` it makes a client's whole upload (factors and head) one update, so a
    rule's weights bound both: a head that moved against the others is caught as its factors are.
    """
    if not states:
        raise ValueError("dense_gram needs at least one client state")
    flat = torch.stack([torch.cat([(st[k].double() - start[k].double()).reshape(-1) for k in start])
                        for st in states])
    gram = flat @ flat.T
    return (gram + gram.T) / 2


def combine_dense(states: Sequence[State], start: State, weights: Tensor, w_start: float) -> dict[str, Tensor]:
    """``sum_i w_i x_i + w_start x_0`` of dense states (a head), in their dtype (the rule's weights applied)."""
    return {k: (sum(float(w) * st[k].double() for w, st in zip(weights, states))
                + w_start * start[k].double()).to(start[k].dtype) for k in start}


def coordinate_aggregate_dense(states: Sequence[State], start: State, rule: str,
                               trim_fraction: float = 0.1) -> dict[str, Tensor]:
    """The coordinate-wise median or trimmed mean of dense states (a head), as Flower's ``FedMedian`` /
    ``FedTrimmedAvg`` on flat vectors (the median of an even count: the mean of the middle two)."""
    if rule not in COORDINATE_RULES:
        raise ValueError(f"coordinate rule must be one of {COORDINATE_RULES}, got {rule!r}")
    return {k: _coordinate(torch.stack([st[k].double() for st in states]), rule, trim_fraction).to(start[k].dtype)
            for k in start}


def _coordinate(stacked: Tensor, rule: str, trim_fraction: float) -> Tensor:
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if rule == "coord_median":
        return ordered[n // 2] if n % 2 else ordered[n // 2 - 1: n // 2 + 1].mean(dim=0)
    cut = int(math.floor(trim_fraction * n))
    return ordered[cut: n - cut].mean(dim=0)


def update_norms(gram: Tensor) -> Tensor:
    """``||U_i||_F`` from the Gram matrix."""
    return gram.diagonal().clamp_min(0).sqrt()


def _distances_sq_to(gram: Tensor, w: Tensor) -> Tensor:
    """``||U_i - z||^2`` for ``z = sum_j w_j U_j``, from the Gram matrix."""
    return (gram.diagonal() - 2 * (gram @ w) + w @ gram @ w).clamp_min(0)


def _squared_distances(gram: Tensor) -> Tensor:
    diag = gram.diagonal()
    return (diag[:, None] + diag[None, :] - 2 * gram).clamp_min(0)


def clip_weights(gram: Tensor, pi: Tensor, clip_norm: float) -> tuple[Tensor, float]:
    """Weights of ``sum_i pi_i s_i B_i A_i + (1 - sum_i pi_i s_i) B_0 A_0``, ``s_i = min(1, c / ||U_i||)``."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    norms = update_norms(gram)
    scale = torch.where(norms > clip_norm, clip_norm / norms.clamp_min(1e-300), torch.ones_like(norms))
    w = pi * scale
    return w, float(1.0 - w.sum())


def geometric_median_weights(gram: Tensor, pi: Tensor, iters: int = 200, tol: float = 1e-10) -> Tensor:
    """Convex weights ``w`` of the geometric median ``z = sum_j w_j U_j`` (Weiszfeld, ``pi``-weighted).

    Minimizes ``sum_i pi_i ||U_i - z||`` over the span of the updates (the median lies in their
    convex hull). Distances come from the Gram matrix only.
    """
    w = pi.clone()
    scale = float(gram.diagonal().max().clamp_min(1e-300))
    for _ in range(iters):
        dist = _distances_sq_to(gram, w).sqrt()
        inv = pi / dist.clamp_min(1e-12 * math.sqrt(scale))  # an update at the median: Weiszfeld's guard
        new = inv / inv.sum()
        if float((new - w).abs().sum()) < tol:
            return new
        w = new
    return w


def multi_krum_weights(gram: Tensor, pi: Tensor, f: int, m: int | None = None) -> Tensor:
    """Multi-Krum (Blanchard et al., 2017): the ``m`` updates with the lowest Krum score, ``pi``-weighted.

    An update's score is its summed squared distance to its ``n - f - 2`` nearest other updates;
    ``m`` defaults to ``n - f``.
    """
    n = gram.shape[0]
    if not 0 <= f or n - f - 2 < 1:
        raise ValueError(f"multi-Krum with f={f} hostile clients needs n >= f + 3 updates, got n={n}")
    m = n - f if m is None else m
    if not 1 <= m <= n:
        raise ValueError(f"multi-Krum keeps m in [1, {n}] updates, got m={m}")
    dist = _squared_distances(gram)
    dist.fill_diagonal_(float("inf"))
    nearest = dist.sort(dim=1).values[:, : n - f - 2]
    scores = nearest.sum(dim=1)
    keep = scores.argsort(stable=True)[:m]
    w = torch.zeros_like(pi)
    w[keep] = pi[keep]
    return w / w.sum()


def trimmed_weights(gram: Tensor, pi: Tensor, fraction: float) -> Tensor:
    """``pi`` with the ``ceil(fraction * n)`` updates farthest from the geometric median dropped (renormalized)."""
    n = gram.shape[0]
    if not 0 <= fraction < 1:
        raise ValueError(f"trim_fraction must be in [0, 1), got {fraction!r}")
    drop = min(math.ceil(fraction * n), n - 1)
    if drop == 0:
        return pi.clone()
    dist = _distances_sq_to(gram, geometric_median_weights(gram, pi))
    far = dist.argsort(descending=True, stable=True)[:drop]
    w = pi.clone()
    w[far] = 0
    return w / w.sum()


def robust_weights(rule: str, gram: Tensor, weights: Sequence[float], clip_norm: float | None = None,
                   trim_fraction: float = 0.1, krum_f: int = 1, krum_m: int | None = None,
                   clip_factor: float | None = None) -> tuple[Tensor, float]:
    """The client weights and the start's weight of ``rule`` (:data:`ROBUST_RULES`); they sum to one.

    ``clip`` bounds each update's norm by ``clip_norm``, or (``clip_factor``) by that multiple of the
    round's median update norm, which holds while fewer than half the clients are hostile.
    ``multi_krum`` on fewer than ``krum_f + 3`` updates (a small cluster: Krum has no quorum) takes the
    geometric median.
    """
    pi = normalize_weights(weights)
    if len(pi) != gram.shape[0]:
        raise ValueError(f"got {len(pi)} weights for {gram.shape[0]} updates")
    if rule == "none":
        return pi, 0.0
    if rule == "clip":
        if clip_norm is None and clip_factor is None:
            raise ValueError("the clip rule needs clip_norm (the largest update norm ||B A - B_0 A_0||_F kept) "
                             "or clip_factor (that bound as a multiple of the round's median update norm)")
        if clip_norm is None:
            median = float(update_norms(gram).median())
            if median <= 0:  # every update (or most) is zero: nothing to scale
                return pi, 0.0
            clip_norm = float(clip_factor) * median  # type: ignore[arg-type]
        return clip_weights(gram, pi, clip_norm)
    if rule == "geomed":
        return geometric_median_weights(gram, pi), 0.0
    if rule == "multi_krum" and len(pi) < krum_f + 3:
        return geometric_median_weights(gram, pi), 0.0
    if rule == "multi_krum":
        return multi_krum_weights(gram, pi, krum_f, krum_m), 0.0
    if rule == "trim":
        return trimmed_weights(gram, pi, trim_fraction), 0.0
    raise ValueError(f"robust rule must be one of {ROBUST_RULES} (or {COORDINATE_RULES} on dense products), "
                     f"got {rule!r}")


def coordinate_aggregate_states(states: Sequence[State], start: State, rule: str, rank: int,
                                trim_fraction: float = 0.1) -> dict[str, Tensor]:
    """``B_0 A_0 +`` the coordinate-wise median or trimmed mean of the dense updates, re-factored to ``rank``.

    One adapted matrix at a time (memory: ``n`` dense ``d_out x d_in`` updates of that matrix);
    the truncated SVD splits as ``B = U_r``, ``A = S_r V_r^T`` (the paper's, as the product-space rule).
    """
    if rule not in COORDINATE_RULES:
        raise ValueError(f"coordinate rule must be one of {COORDINATE_RULES}, got {rule!r}")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    out: dict[str, Tensor] = {}
    for prefix in factor_pairs(list(start)):
        b0, a0 = start[f"{prefix}.lora_B"].double(), start[f"{prefix}.lora_A"].double()
        base = b0 @ a0
        updates = torch.stack([st[f"{prefix}.lora_B"].double() @ st[f"{prefix}.lora_A"].double() - base
                               for st in states])
        agg = _coordinate(updates, rule, trim_fraction)
        out[f"{prefix}.lora_B"], out[f"{prefix}.lora_A"] = dense_factors(base + agg, rank)
    return {k: out[k] for k in start}


def dense_factors(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(B, A)`` in float32 of the rank-``rank`` truncated SVD of a dense matrix, split as the product
    rule splits (``B = U_r``, ``A = S_r V_r^T``); zero-padded when the matrix has fewer directions."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.numel())
    new_b = torch.zeros(matrix.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, matrix.shape[1], dtype=torch.float64)
    new_b[:, :k], new_a[:k] = u[:, :k].double(), (s[:k, None] * vh[:k]).double()
    return new_b.float(), new_a.float()


def aggregate_uploads(states: Sequence[State], weights: Sequence[float], start: State, rank: int, rule: str = "none",
                      heads: Sequence[State] | None = None, head_start: State | None = None,
                      options: Mapping[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """A shared tier's new factors (rank ``rank``) and head from the clients' uploads under ``rule``.

    ``start`` / ``head_start``: the tier and head the round began from; ``heads``: the uploaded heads
    (``None``: heads are not shared, the second result is ``None``). ``options``: the rule's settings
    (``clip_norm``, ``clip_factor``, ``trim_fraction``, ``krum_f``, ``krum_m``). A client's update is
    its whole upload: with heads, ``h_i - h_0`` joins the Gram matrix and the rule's weights combine
    the heads as they combine the products; the coordinate rules take the heads' coordinate-wise
    median / trimmed mean. ``"none"``: the sample-weighted product sum and the weighted mean head.

    Example:
        >>> import torch
        >>> start = {"m.lora_A": torch.randn(2, 5), "m.lora_B": torch.zeros(6, 2)}
        >>> ups = [{"m.lora_A": start["m.lora_A"], "m.lora_B": torch.randn(6, 2)} for _ in range(5)]
        >>> new, head = aggregate_uploads(ups, [1] * 5, start, rank=2, rule="geomed")
        >>> tuple(new["m.lora_B"].shape), head is None
        ((6, 2), True)
    """
    opts = dict(options or {})
    trim = float(opts.get("trim_fraction", 0.1))
    if rule == "none":
        head = None if heads is None else fedavg_states(heads, weights)
        return product_space_aggregate_states(states, weights, rank), head
    if heads is not None and head_start is None:
        raise ValueError("robust aggregation of heads needs the head the round began from (head_start)")
    if rule in COORDINATE_RULES:
        head = None if heads is None else coordinate_aggregate_dense(heads, head_start, rule, trim)  # type: ignore
        return coordinate_aggregate_states(states, start, rule, rank, trim), head
    gram = update_gram(states, start)
    if heads is not None:
        gram = gram + dense_gram(heads, head_start)  # type: ignore[arg-type]
    w, w_start = robust_weights(rule, gram, weights, opts.get("clip_norm"), trim, int(opts.get("krum_f", 1)),
                                opts.get("krum_m"), opts.get("clip_factor"))
    head = None if heads is None else combine_dense(heads, head_start, w, w_start)  # type: ignore[arg-type]
    if w_start > 0:  # clipping keeps part of the start: B_0 A_0 enters the sum as one more term
        return product_space_aggregate_states([*states, start], [*w.tolist(), w_start], rank), head
    keep = [i for i, wi in enumerate(w.tolist()) if wi > 0]
    return product_space_aggregate_states([states[i] for i in keep], [float(w[i]) for i in keep], rank), head
