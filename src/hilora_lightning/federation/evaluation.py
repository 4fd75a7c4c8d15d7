"""Evaluation of a federation: per-client accuracy with chosen tiers, and the final result tables.

Example:
    >>> from hilora_lightning.federation.evaluation import TIER_VIEWS
    >>> [name for name, _ in TIER_VIEWS]
    ['root', 'root+cluster', 'root+cluster+leaf']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hilora_lightning.federation import transition
from hilora_lightning.federation.backend import EvalRequest
from hilora_lightning.federation.result import FederatedResult, accuracy_summary
from hilora_lightning.tiers import Tier

if TYPE_CHECKING:
    from hilora_lightning.federation.orchestrator import FederatedOrchestrator

__all__ = ["TIER_VIEWS", "build_result", "evaluate_clients"]

#: The tier-wise table's rows: which tiers are active.
TIER_VIEWS = (("root", [Tier.ROOT]), ("root+cluster", [Tier.ROOT, Tier.CLUSTER]), ("root+cluster+leaf", list(Tier)))


def evaluate_clients(
    orch: FederatedOrchestrator, tiers: list[Tier], head_level: Tier | None = None
) -> dict[int, float]:
    """Accuracy of every training client on its own test split with ``tiers`` active.

    The head is the one of the deepest active tier's level (root: global, cluster: the cluster's,
    leaf: the client's own) unless ``head_level`` says otherwise; with ``head_policy="local"`` it is
    always the client's.
    """
    level = head_level or tiers[-1]
    own_head = orch.config.head_policy == "local" or (level is Tier.LEAF and bool(orch.assignment))
    requests: dict[int, EvalRequest] = {}
    for cid in sorted(orch.clients):
        cs = orch.client_states[cid]
        view: dict[Tier, Any] = {Tier.ROOT: orch.root}
        if Tier.CLUSTER in tiers and orch.assignment:
            view[Tier.CLUSTER] = orch.clusters[orch.assignment[cid]]
        if Tier.LEAF in tiers:
            view[Tier.LEAF] = cs.leaf  # None: the client's own (remote) or the zero leaf
        # before clustering there are no cluster heads yet: every level uses the root's head
        head = orch.head_for(cid, level if orch.assignment else Tier.ROOT)
        cached = tuple(t for t in (Tier.ROOT, Tier.CLUSTER) if t in tiers and cid in orch.has_final[t])
        requests[cid] = EvalRequest(cid, tuple(tiers), view, head, own_head=own_head, cached=cached)
    return orch.backend.evaluate(orch, requests)


def build_result(orch: FederatedOrchestrator) -> FederatedResult:
    """The run's result; the final tables (tier-wise, unseen clients) only once the budget is spent."""
    tierwise: dict[str, dict[str, float]] = {}
    final: dict[int, float] = {}
    if orch.round < orch.config.rounds:  # stopped early (stop_after): records only, no extra evaluation
        return FederatedResult(orch.records, final, tierwise, dict(orch.assignment), orch.num_clusters,
                               orch.clustering_ari, {}, {}, orch.elapsed)
    for name, tiers in TIER_VIEWS:
        if tiers[-1].position > orch.stage.position:
            continue
        accs = evaluate_clients(orch, tiers)
        tierwise[name] = accuracy_summary(list(accs.values()))
        final = accs
    generalization, routing = transition.evaluate_unseen(orch) if orch.unseen and orch.assignment else ({}, {})
    return FederatedResult(orch.records, final, tierwise, dict(orch.assignment), orch.num_clusters,
                           orch.clustering_ari, generalization, routing, orch.elapsed)
