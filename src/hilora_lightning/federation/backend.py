"""Where client work runs: in this process (the default) or on remote nodes (the Flower backend).

The :class:`~hilora_lightning.federation.FederatedOrchestrator` decides *what* every client does
(stage, tiers, head, seed) and aggregates; a backend *executes* it. :class:`InProcessBackend` loads
each client's view into the shared model and runs a Lightning ``Trainer.fit``; the Flower backend
(:mod:`hilora_lightning.flower`) sends the same requests as Flower messages to ClientApps, which keep
their leaf and personal head themselves. Requests go out as a batch, so a remote backend runs the
clients in parallel.

Example:
    >>> from hilora_lightning.federation.backend import FitRequest
    >>> from hilora_lightning.tiers import Tier
    >>> FitRequest(client_id=3, round=1, tier=Tier.ROOT, view={}, head={}, seed=7, leaf_seed=9).tier.value
    'root'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from torch import Tensor

from hilora_lightning.federation.local import evaluate, fit_client, head_state, load_view
from hilora_lightning.tiers import Tier

if TYPE_CHECKING:
    from hilora_lightning.federation.orchestrator import FederatedOrchestrator

__all__ = ["ClientBackend", "EvalRequest", "FitReply", "FitRequest", "InProcessBackend"]


@dataclasses.dataclass(frozen=True)
class FitRequest:
    """One client's local update: its tier states (``view``), head, and seeds.

    ``view[Tier.LEAF]`` is the server's copy of the leaf (``None`` when the client holds it, or has
    none yet: it then starts from ``leaf_seed``). ``head`` is the server's choice; with
    ``own_head`` a client that holds its own head uses that instead. For a remote client,
    ``cached`` names the frozen tiers it already holds (not sent again), ``final`` the tiers of this
    request that are frozen from now on (to keep), and ``send_head`` whether it needs the head.
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


@dataclasses.dataclass(frozen=True)
class FitReply:
    """What came back: the trained tier's factors and head (``None`` when they stay on the client)."""

    factors: dict[str, Tensor] | None
    head: dict[str, Tensor] | None


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """Score one client on its test split with ``tiers`` active (``own_head``, ``cached``: see :class:`FitRequest`)."""

    client_id: int
    tiers: tuple[Tier, ...]
    view: Mapping[Tier, Mapping[str, Tensor] | None]
    head: Mapping[str, Tensor]
    own_head: bool = False
    cached: tuple[Tier, ...] = ()


class ClientBackend(Protocol):
    """Executes batches of client requests; a failed client maps to the exception it raised."""

    def fit(self, orch: FederatedOrchestrator, requests: Mapping[int, FitRequest]) -> dict[int, FitReply | Exception]:
        ...

    def evaluate(self, orch: FederatedOrchestrator, requests: Mapping[int, EvalRequest]) -> dict[int, float]:
        ...


class InProcessBackend:
    """Every client in turn on the orchestrator's one shared model (the default backend)."""

    def fit(self, orch: FederatedOrchestrator, requests: Mapping[int, FitRequest]) -> dict[int, FitReply | Exception]:
        cfg, model = orch.config, orch.model
        out: dict[int, FitReply | Exception] = {}
        for cid, req in requests.items():
            try:
                if req.tier is Tier.LEAF and req.view.get(Tier.LEAF) is None:
                    model.reset_tier(Tier.LEAF, req.leaf_seed)
                load_view(model, dict(req.view), req.head)
                factors = fit_client(model, orch.clients[cid].train, req.tier, req.seed, cfg.batch_size,
                                     cfg.local_epochs, cfg.local_steps, orch.trainer_kwargs)
                out[cid] = FitReply(factors, head_state(model))
            except Exception as exc:  # reported per client; the orchestrator drops and records it
                out[cid] = exc
        return out

    def evaluate(self, orch: FederatedOrchestrator, requests: Mapping[int, EvalRequest]) -> dict[int, float]:
        out: dict[int, float] = {}
        for cid, req in requests.items():
            if Tier.LEAF in req.tiers and req.view.get(Tier.LEAF) is None:
                orch.model.reset_tier(Tier.LEAF, 0)  # no leaf yet: the zero (no-op) leaf
            load_view(orch.model, dict(req.view), req.head)
            out[cid] = evaluate(orch.model, orch.clients[cid].test, list(req.tiers), device=orch.eval_device)
        return out
