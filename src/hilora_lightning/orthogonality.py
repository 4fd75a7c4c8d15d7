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

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ORTHO_SIDES", "pair_penalty", "stage_penalty"]

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


def stage_penalty(
    trainable: Sequence[Tensor],
    frozen: Sequence[tuple[float, Sequence[Tensor]]],
    side: str = "B",
) -> Tensor:
    """Sum over frozen tiers and layers of ``gamma * pair_penalty(frozen_l, trainable_l)``.

    Args:
        trainable: the training tier's factor per adapted matrix.
        frozen: ``(gamma, factors)`` per frozen tier, factors aligned with ``trainable``.
        side: ``"B"`` (the paper's column-space penalty) or ``"A"``.
    """
    if not trainable:
        raise ValueError("stage_penalty needs at least one trainable factor")
    total = torch.zeros((), dtype=torch.float32, device=trainable[0].device)
    for gamma, factors in frozen:
        if len(factors) != len(trainable):
            raise ValueError(
                f"frozen tier has {len(factors)} factors but the trainable tier has {len(trainable)}; "
                "they must come from the same adapted layers"
            )
        if gamma == 0:
            continue
        for f, t in zip(factors, trainable):
            total = total + gamma * pair_penalty(f, t, side).float()
    return total
