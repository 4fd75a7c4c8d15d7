"""Cross-tier orthogonality regularizer (pure functions over factor tensors).

The paper penalizes overlap between the column spaces of the trainable tier's ``B`` and the *frozen*
tiers' ``B`` (``gamma ||B_frozen^T B_train||_F^2``, frozen factors detached), summed over adapted
layers. The A-side form (``||A_frozen A_train^T||_F^2``, row spaces) is offered for ablations.

Example:
    >>> import torch
    >>> from hilora_lightning.orthogonality import pair_penalty
    >>> b_root = torch.eye(4)[:, :2]          # spans e1, e2
    >>> b_leaf = torch.eye(4)[:, 2:]          # spans e3, e4
    >>> float(pair_penalty(b_root, b_leaf))
    0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ORTHO_SIDES", "frozen_groups", "grouped_penalty", "pair_penalty", "stage_penalty"]

ORTHO_SIDES = ("B", "A")


def pair_penalty(frozen: Tensor, trainable: Tensor, side: str = "B") -> Tensor:
    """``||F^T T||_F^2`` for ``B`` factors (rows x r) or ``||F T^T||_F^2`` for ``A`` factors (r x in).

    ``frozen`` is detached, so gradients reach ``trainable`` only.
    """
    if side not in ORTHO_SIDES:
        raise ValueError(f"orthogonality side must be one of {ORTHO_SIDES}, got {side!r}")
    f = frozen.detach().to(trainable.dtype)
    gram = f.transpose(-2, -1) @ trainable if side == "B" else f @ trainable.transpose(-2, -1)
    return gram.pow(2).sum()


FrozenGroups = list[tuple[list[int], Tensor]]


def frozen_groups(
    trainable: Sequence[Tensor],
    frozen: Sequence[tuple[float, Sequence[Tensor]]],
    side: str = "B",
) -> FrozenGroups:
    """Precompute the frozen side of :func:`stage_penalty`: per layer ``[sqrt(g_1) F_1, sqrt(g_2) F_2, ...]``.

    ``sum_k g_k ||F_k^T T||^2 = ||[sqrt(g_1) F_1, ...]^T T||^2``, so the frozen tiers of a layer fold
    into one matrix; layers of equal shapes are stacked for one batched product. Frozen factors do
    not change during a stage, so callers may cache the result (:class:`HiLoRAViT` does).

    Returns:
        ``(layer indices, stacked frozen matrices)`` per shape group; empty if every gamma is 0.
    """
    if side not in ORTHO_SIDES:
        raise ValueError(f"orthogonality side must be one of {ORTHO_SIDES}, got {side!r}")
    if not trainable:
        raise ValueError("stage_penalty needs at least one trainable factor")
    for _gamma, factors in frozen:
        if len(factors) != len(trainable):
            raise ValueError(
                f"frozen tier has {len(factors)} factors but the trainable tier has {len(trainable)}; "
                "they must come from the same adapted layers"
            )
    weighted = [(math.sqrt(g), fs) for g, fs in frozen if g != 0]
    if not weighted:
        return []
    cat_dim = -1 if side == "B" else -2
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[list[int], list[Tensor]]] = {}
    with torch.no_grad():
        for i, t in enumerate(trainable):
            f = torch.cat([w * fs[i].detach().to(t.dtype) for w, fs in weighted], dim=cat_dim)
            idx, mats = groups.setdefault((tuple(f.shape), tuple(t.shape)), ([], []))
            idx.append(i)
            mats.append(f)
        return [(idx, torch.stack(mats).flatten(0, -3)) for idx, mats in groups.values()]


def grouped_penalty(trainable: Sequence[Tensor], groups: FrozenGroups, side: str = "B") -> Tensor:
    """The penalty of ``trainable`` against precomputed :func:`frozen_groups` (one bmm per group)."""
    total = torch.zeros((), dtype=torch.float32, device=trainable[0].device if trainable else None)
    for idx, f_stack in groups:
        t_stack = torch.stack([trainable[i] for i in idx]).flatten(0, -3)
        gram = f_stack.transpose(-2, -1) @ t_stack if side == "B" else f_stack @ t_stack.transpose(-2, -1)
        total = total + gram.pow(2).sum().float()
    return total


def stage_penalty(
    trainable: Sequence[Tensor],
    frozen: Sequence[tuple[float, Sequence[Tensor]]],
    side: str = "B",
) -> Tensor:
    """Sum over frozen tiers and layers of ``gamma * pair_penalty(frozen_l, trainable_l)``.

    Args:
        trainable: the training tier's factor per adapted matrix (2-D, or 3-D stacked segments).
        frozen: ``(gamma, factors)`` per frozen tier, factors aligned with ``trainable``.
        side: ``"B"`` (the paper's column-space penalty) or ``"A"``.
    """
    return grouped_penalty(trainable, frozen_groups(trainable, frozen, side), side)
