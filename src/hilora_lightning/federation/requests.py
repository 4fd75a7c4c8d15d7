"""What the server asks of a client and what comes back: plain values shared by every backend.

A :class:`FitRequest` says everything one local update needs (tier states, head, seeds, the local
budget, which slots train in which phase, what goes back and what stays on the client); the
:class:`~hilora_lightning.federation.runtime.ClientRuntime` executes it the same way in process
and on a Flower SuperNode. No Lightning, no timm here.

Example:
    >>> from hilora_lightning.federation.requests import FitRequest
    >>> from hilora_lightning.tiers import Tier
    >>> req = FitRequest(client_id=3, round=1, tier=Tier.ROOT, view={}, head={}, seed=7, leaf_seed=9)
    >>> req.tier.value, req.upload, req.keeps_leaf
    ('root', 'AB', False)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import Tensor

from hilora_lightning.tiers import Tier

__all__ = ["UPLOADS", "EvalRequest", "FitReply", "FitRequest", "Phase", "State"]

State = dict[str, Tensor]

#: Which part of the trained slot a reply carries: both factors, ``A`` only (FedSA-LoRA), nothing.
UPLOADS = ("AB", "A", "")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One part of a local update.

    Attributes:
        active: slots that contribute to the forward pass.
        train: slots that get gradients (a subset of ``active``).
        share: fraction of the round's local steps this phase takes.
        gates: whether the gates train in this phase.
        head: whether the head trains in this phase.
    """

    active: tuple[Tier, ...]
    train: tuple[Tier, ...]
    share: float = 1.0
    gates: bool = False
    head: bool = True


@dataclasses.dataclass(frozen=True)
class FitRequest:
    """One client's local update.

    Attributes:
        client_id, round: who and when (``round < 0``: a probe or an unseen client's fine-tune).
        tier: the slot whose factors are uploaded (HiLoRA: the stage's tier).
        view: the server's slot states; a slot in ``cached`` is absent (the client holds it), a
            ``None`` leaf is the client's own (or, if it has none yet, fresh from ``leaf_seed``).
        head: the server's head (empty when not sent); ``own_head``: a client holding its own
            head uses that instead.
        seed, leaf_seed: the local update's seed; the seed of a fresh leaf.
        cached: frozen tiers the client already holds (not sent); ``final``: tiers of this request
            frozen from now on (the client keeps them); ``send_head``: whether the head travels.
        batch_size, epochs, steps: the local budget (``steps`` wins over ``epochs``).
        phases: the slots active and trained per phase (empty: HiLoRA's stage, ``tier`` trains
            with the tiers above it active and frozen, and the orthogonality penalty).
        phase_epochs: each phase runs ``epochs`` epochs (unseen fine-tuning) instead of a share of
            the steps.
        upload: which factors of ``tier`` go back (see :data:`UPLOADS`).
        keep: slots whose trained state stays on the client (``(slot, "AB" | "A" | "B")``); the
            kept part overlays the server's state the next time the slot is loaded.
        keep_head: the trained head stays on the client (a personal head).
        return_head: the trained head goes back in the reply.
        gates: load the client's gates (or ``gate_init``) and keep them after training.
        gate_init: gates of a client that has none yet (``None``: the model's initial gates).
    """

    client_id: int
    round: int
    tier: Tier
    view: Mapping[Tier, Mapping[str, Tensor] | None]
    head: Mapping[str, Tensor]
    seed: int
    leaf_seed: int
    own_head: bool = False
    cached: tuple[Tier, ...] = ()
    final: tuple[Tier, ...] = ()
    send_head: bool = True
    batch_size: int = 32
    epochs: int = 1
    steps: int | None = None
    phases: tuple[Phase, ...] = ()
    phase_epochs: bool = False
    upload: str = "AB"
    keep: tuple[tuple[Tier, str], ...] = ()
    keep_head: bool = False
    return_head: bool = True
    gates: bool = False
    gate_init: Mapping[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.upload not in UPLOADS:
            raise ValueError(f"upload must be one of {UPLOADS}, got {self.upload!r}")

    @property
    def keeps_leaf(self) -> bool:
        """Whether the leaf slot's trained state stays on the client."""
        return any(slot is Tier.LEAF for slot, _ in self.keep)


@dataclasses.dataclass(frozen=True)
class FitReply:
    """What came back: the uploaded factors and head (``None`` when they stay on the client)."""

    factors: State | None
    head: State | None
    num_samples: int = 0


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """Score one client on its test split with ``tiers`` active (see :class:`FitRequest` for the rest).

    ``metric="loss"`` gives the mean training loss on the client's *training* data instead (routing
    an unseen client by loss).
    """

    client_id: int
    tiers: tuple[Tier, ...]
    view: Mapping[Tier, Mapping[str, Tensor] | None]
    head: Mapping[str, Tensor]
    own_head: bool = False
    cached: tuple[Tier, ...] = ()
    round: int = 0
    gates: bool = False
    gate_init: Mapping[str, Tensor] | None = None
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if self.metric not in ("accuracy", "loss"):
            raise ValueError(f"metric must be 'accuracy' or 'loss', got {self.metric!r}")
