"""Cross-tier orthogonality regularizer (pure functions over factor tensors).

The paper penalizes overlap between the column spaces of the trainable tier's ``B`` and the *frozen*
tiers' ``B`` (``gamma ||B_frozen^T B_train||_F^2``, frozen factors detached), summed over adapted
layers. The A-side form (``||A_frozen A_train^T||_F^2``, row spaces) is offered for ablations.

Three forms of the frozen side (:func:`effective_frozen`), named by ``ORTHO_FORMS``:

* ``"raw"``: the factors as stored, ``||B_f^T B_t||^2`` (the formula as printed in the paper).
* ``"scaled"``: the factors times their LoRA scale ``s = alpha / r``, ``||(s_f B_f)^T (s_t B_t)||^2``
  (PAPER.md C7). At ``alpha = 16, r = 8`` it is 16x the raw penalty.
* ``"energy"``: the frozen update ``s_f B_f A_f = U S V^T`` enters through ``U diag(S / S_max)``, so
  each frozen direction is weighted by its share of the update and directions with no singular value
  (the orthonormal completion that an aggregated ``B = U_r`` carries) are not penalized at all.

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

__all__ = ["ORTHO_FORMS", "ORTHO_SIDES", "effective_frozen", "frozen_groups", "grouped_penalty", "pair_penalty",
           "stage_penalty"]

ORTHO_SIDES = ("B", "A")
ORTHO_FORMS = ("raw", "scaled", "energy")


def effective_frozen(b: Tensor, a: Tensor, frozen_scale: float, train_scale: float, form: str = "raw",
                     side: str = "B") -> Tensor:
    """The frozen tier's matrix ``F`` of one layer such that the penalty is ``||F^T T||^2`` (``B`` side,
    ``T`` the trainable tier's raw ``B``) or ``||F T^T||^2`` (``A`` side) in the chosen ``form``.

    Args:
        b: the frozen ``B`` (``(..., rows, r)``); a: the frozen ``A`` (``(..., r, in)``).
        frozen_scale, train_scale: the LoRA scales ``alpha / r`` of the frozen and the trainable tier.
        form: one of :data:`ORTHO_FORMS`.
        side: ``"B"`` (column spaces) or ``"A"`` (row spaces).

    Example:
        >>> import torch
        >>> b = torch.eye(4)[:, :2]                       # orthonormal columns e1, e2
        >>> a = torch.diag(torch.tensor([3.0, 0.0])) @ torch.eye(2, 4)  # only e1 carries the update
        >>> effective_frozen(b, a, 2.0, 2.0, "energy").abs().sum(0).tolist()  # e2 is not penalized
        [2.0, 0.0]
    """
    if side not in ORTHO_SIDES:
        raise ValueError(f"orthogonality side must be one of {ORTHO_SIDES}, got {side!r}")
    if form not in ORTHO_FORMS:
        raise ValueError(f"orthogonality form must be one of {ORTHO_FORMS}, got {form!r}")
    b, a = b.detach(), a.detach()
    if form == "raw":
        return b if side == "B" else a
    if form == "scaled":
        return (frozen_scale * train_scale) * (b if side == "B" else a)
    work = torch.promote_types(b.dtype, torch.float32)  # half-precision factors are decomposed in float32
    q_b, r_b = torch.linalg.qr(b.to(work))  # the update s_f B A = Q_b (s_f R_b R_a^T) Q_a^T: SVD of the core
    q_a, r_a = torch.linalg.qr(a.to(work).transpose(-2, -1))
    u, sv, vh = torch.linalg.svd(frozen_scale * r_b @ r_a.transpose(-2, -1))
    weight = train_scale * sv / sv.amax(-1, keepdim=True).clamp_min(torch.finfo(sv.dtype).tiny)
    if side == "B":
        return ((q_b @ u) * weight.unsqueeze(-2)).to(b.dtype)
    return (weight.unsqueeze(-1) * (vh @ q_a.transpose(-2, -1))).to(a.dtype)


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
