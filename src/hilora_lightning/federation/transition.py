"""The root-to-cluster transition and unseen clients: LSAC features, clustering, probe routing.

These functions are the orchestration around the pure math of
:mod:`hilora_lightning.strategy.subspace` and :mod:`hilora_lightning.strategy.clustering`.

Example:
    >>> import torch
    >>> from hilora_lightning.federation.config import ClusteringConfig
    >>> from hilora_lightning.federation.transition import update_features
    >>> f = {"m.lora_A": torch.randn(2, 5), "m.lora_B": torch.randn(4, 2)}
    >>> root = {"m.lora_A": torch.randn(2, 5), "m.lora_B": torch.zeros(4, 2)}
    >>> sorted(update_features(None, f, root, ClusteringConfig(feature="B"), rank=2))
    ['m']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hilora_lightning.federation.client import ClientData
from hilora_lightning.federation.config import ClusteringConfig
from hilora_lightning.federation.local import client_seed, evaluate, fit_client, load_view
from hilora_lightning.federation.result import accuracy_summary
from hilora_lightning.state import export_tier
from hilora_lightning.strategy.aggregation import factor_pairs, fedavg_states, product_space_aggregate_states
from hilora_lightning.strategy.clustering import cluster_distances, kmeans_cosine, match_clusters, route_to_cluster
from hilora_lightning.strategy.subspace import (
    delta_left_factor,
    ema_left_factor,
    ema_normalized,
    left_subspace,
    mean_projector_subspace,
    subspace_distances,
)
from hilora_lightning.tiers import Tier

if TYPE_CHECKING:
    from hilora_lightning.federation.orchestrator import FederatedOrchestrator

__all__ = ["client_subspaces", "evaluate_unseen", "form_clusters", "recluster", "update_features"]

UPDATE_KEY = "__update__"


def update_features(
    features: Mapping[str, Tensor] | None,
    factors: Mapping[str, Tensor],
    root_before: Mapping[str, Tensor],
    cfg: ClusteringConfig,
    rank: int,
) -> dict[str, Tensor]:
    """Fold one local root update into a client's LSAC features (per adapted matrix).

    ``B``: EMA of the Frobenius-normalized local ``B`` (paper-literal: the column space, *where* the
    update writes). ``A``: the same for ``A^T`` (the row space, *what* the update reads). ``delta``: EMA
    of the covariance of the local change ``B_i A_i - B_r A_r`` in factored form. For the k-means
    baseline it also keeps the last flattened factor update under ``"__update__"``.
    """
    prev = dict(features or {})
    out: dict[str, Tensor] = {}
    for prefix in factor_pairs(factors):
        b, a = factors[f"{prefix}.lora_B"], factors[f"{prefix}.lora_A"]
        if cfg.feature == "B":
            out[prefix] = ema_normalized(prev.get(prefix), b, cfg.ema_decay)
        elif cfg.feature == "A":
            out[prefix] = ema_normalized(prev.get(prefix), a.T, cfg.ema_decay)
        else:
            d = delta_left_factor(b, a, root_before[f"{prefix}.lora_B"], root_before[f"{prefix}.lora_A"], rank)
            out[prefix] = ema_left_factor(prev.get(prefix), d, cfg.ema_decay, rank)
    if cfg.method == "kmeans":  # the baseline clusters flattened updates; keep only the last one
        out[UPDATE_KEY] = torch.cat([(factors[k] - root_before[k]).flatten() for k in factors]).float()
    return out


def client_subspaces(features: Mapping[str, Tensor], rank: int) -> list[Tensor]:
    """Top-``rank`` left singular vectors of each feature matrix, in key order (``(p, rank)`` each)."""
    return [left_subspace(v, rank) for k, v in features.items() if k != UPDATE_KEY]


def form_clusters(orch: FederatedOrchestrator) -> None:
    """Group the clients at the end of the root stage and create one fresh adapter per cluster."""
    cfg, ccfg = orch.config, orch.config.clustering
    rank = orch.model.adapter_config.root.rank
    seen = [cid for cid in sorted(orch.clients) if orch.client_states[cid].features]
    if ccfg.method == "given":
        assert ccfg.assignment is not None
        missing = sorted(set(orch.clients) - {int(k) for k in ccfg.assignment})
        if missing:
            raise ValueError(f"clustering.assignment has no cluster for clients {missing}")
        ids = sorted({int(v) for v in ccfg.assignment.values()})
        labels = {cid: ids.index(int(ccfg.assignment[cid])) for cid in orch.clients}
        k = len(ids)
    else:
        if not seen:
            raise RuntimeError("no client has root-stage features to cluster; every root round failed?")
        subspaces = [client_subspaces(orch.client_states[c].features or {}, rank) for c in seen]
        res = cluster_distances(subspace_distances(subspaces), ccfg.k_min, ccfg.k_max, cfg.seed, sigma=ccfg.sigma)
        orch.last_clustering = (seen, res)  # for plots (similarity heatmap); not checkpointed
        k = ccfg.k or res.k
        found = res.labels
        if ccfg.method == "kmeans":
            updates = torch.stack([(orch.client_states[c].features or {})[UPDATE_KEY] for c in seen])
            found = kmeans_cosine(updates, min(k, len(seen)), cfg.seed)
        elif ccfg.method == "random":
            found = np.random.default_rng([cfg.seed, 7]).integers(0, k, size=len(seen))
        elif ccfg.k is not None:
            found = cluster_distances(res.distances, seed=cfg.seed, k=min(k, len(seen)), sigma=ccfg.sigma).labels
        labels = {cid: int(lab) for cid, lab in zip(seen, found)}
        k = int(max(labels.values())) + 1
    centers = cluster_centers(orch, labels, rank)
    for cid in sorted(set(orch.clients) - set(labels)):  # never trained in the root stage: route by probe
        labels[cid] = route(orch, orch.clients[cid], centers)
    orch.assignment, orch.num_clusters, orch.cluster_centers = labels, k, centers
    for cs in orch.client_states.values():
        cs.features = None  # served their purpose; the per-client state shrinks to leaf + head
    for j in range(k):
        orch.model.reset_tier(Tier.CLUSTER, client_seed(cfg.seed, 0, j, "cluster"))
        orch.clusters[j] = export_tier(orch.model, Tier.CLUSTER)
        orch.cluster_heads[j] = dict(orch.global_head)
    groups = [orch.clients[c].group for c in sorted(orch.clients)]
    if all(g is not None for g in groups):
        from sklearn.metrics import adjusted_rand_score

        orch.clustering_ari = float(adjusted_rand_score(groups, [labels[c] for c in sorted(orch.clients)]))


def cluster_centers(orch: FederatedOrchestrator, labels: Mapping[int, int], rank: int) -> dict[int, list[Tensor]]:
    """Per cluster and matrix: top-r eigenvectors of the members' mean projector."""
    centers: dict[int, list[Tensor]] = {}
    for j in sorted(set(labels.values())):
        members = [client_subspaces(orch.client_states[c].features or {}, rank) for c, lab in labels.items()
                   if lab == j and orch.client_states[c].features]
        if members:
            centers[j] = [mean_projector_subspace(torch.stack([m[i] for m in members])[:, None], rank)[0]
                          for i in range(len(members[0]))]
    return centers


def probe_features(orch: FederatedOrchestrator, data: ClientData) -> dict[str, Tensor]:
    """LSAC features of a probe: a fresh LoRA trained briefly on top of the frozen root.

    The probe starts exactly as the root did in round 1 (``B = 0``, the shared-seed ``A``) and trains
    in the cluster slot while the learned root stays frozen, so its factors are comparable with the
    training clients' root-stage features, which the first rounds (from ``B = 0``) dominate.
    """
    cfg, model = orch.config, orch.model
    head = orch.global_head if cfg.head_policy == "tier" else orch.initial_head
    start = orch.initial_root
    if model.adapter_config.cluster.rank != model.adapter_config.root.rank:  # cannot reuse the root's init
        model.reset_tier(Tier.CLUSTER, cfg.seed)
        start = export_tier(model, Tier.CLUSTER)
    load_view(model, {Tier.ROOT: orch.root, Tier.CLUSTER: start}, head)
    factors = fit_client(model, data.train, Tier.CLUSTER, client_seed(cfg.seed, -1, data.client_id, "probe"),
                         cfg.batch_size, 1, cfg.probe_steps, orch.trainer_kwargs)
    return update_features(None, factors, start, cfg.clustering, model.adapter_config.root.rank)


def route(orch: FederatedOrchestrator, data: ClientData, centers: Mapping[int, list[Tensor]]) -> int:
    """The cluster whose subspaces have the largest mean ``cos^2`` of principal angles to the probe's."""
    u = client_subspaces(probe_features(orch, data), orch.model.adapter_config.root.rank)
    return route_to_cluster(u, centers)[0]


@torch.no_grad()
def route_by_loss(orch: FederatedOrchestrator, data: ClientData) -> int:
    """The cluster whose adapter (on the frozen root, with its head) has the lowest loss on the client's data."""
    from torch.utils.data import DataLoader

    losses: dict[int, float] = {}
    model = orch.model
    was_training = model.training
    model.eval()
    for j in sorted(orch.clusters):
        head = orch.cluster_heads[j] if orch.config.head_policy == "tier" else orch.initial_head
        load_view(model, {Tier.ROOT: orch.root, Tier.CLUSTER: orch.clusters[j]}, head)
        total = count = 0.0
        with model.using_tiers([Tier.ROOT, Tier.CLUSTER]):
            for x, y in DataLoader(data.train, batch_size=256):
                total += float(model.compute_loss(model(x), y)) * len(y)
                count += len(y)
        losses[j] = total / max(count, 1.0)
    model.train(was_training)
    return min(sorted(losses), key=lambda j: losses[j])


def evaluate_unseen(orch: FederatedOrchestrator) -> tuple[dict[str, dict[str, float]], dict[int, int]]:
    """Route each unseen client, then score root only, root + routed cluster, and a leaf fine-tune."""
    cfg = orch.config
    centers = orch.cluster_centers
    routing: dict[int, int] = {}
    accs: dict[str, list[float]] = {"root": [], "zero_leaf": [], "finetuned": []}
    for cid, data in sorted(orch.unseen.items()):
        if orch.num_clusters <= 1:
            j = 0
        elif cfg.route_by == "loss":
            j = route_by_loss(orch, data)
        else:
            j = route(orch, data, centers)
        routing[cid] = j
        root_head = orch.global_head if cfg.head_policy == "tier" else orch.initial_head
        cluster_head = orch.cluster_heads[j] if cfg.head_policy == "tier" else orch.initial_head
        load_view(orch.model, {Tier.ROOT: orch.root}, root_head)
        accs["root"].append(evaluate(orch.model, data.test, [Tier.ROOT], device=orch.eval_device))
        load_view(orch.model, {Tier.CLUSTER: orch.clusters[j]}, cluster_head)
        accs["zero_leaf"].append(evaluate(orch.model, data.test, [Tier.ROOT, Tier.CLUSTER], device=orch.eval_device))
        if cfg.finetune_epochs > 0:
            orch.model.reset_tier(Tier.LEAF, client_seed(cfg.seed, 0, cid, "leaf"))
            fit_client(orch.model, data.train, Tier.LEAF, client_seed(cfg.seed, -2, cid, "finetune"),
                       cfg.batch_size, cfg.finetune_epochs, None, orch.trainer_kwargs)
            accs["finetuned"].append(evaluate(orch.model, data.test, list(Tier), device=orch.eval_device))
    summary: dict[str, Any] = {k: accuracy_summary(v) for k, v in accs.items() if v}
    return summary, routing


def recluster(orch: FederatedOrchestrator) -> None:
    """Re-run LSAC on the clients' cluster-stage features; keep ids by member overlap (Hungarian).

    Clusters matched to an old cluster keep its adapter and head; split-off or new clusters start
    from the product-space mean (weighted by samples) of their members' previous cluster adapters.
    """
    cfg, ccfg = orch.config, orch.config.clustering
    rank = orch.model.adapter_config.cluster.rank
    seen = [c for c in sorted(orch.clients) if orch.client_states[c].features]
    if len(seen) < 2:
        return
    subspaces = [client_subspaces(orch.client_states[c].features or {}, rank) for c in seen]
    res = cluster_distances(subspace_distances(subspaces), ccfg.k_min, ccfg.k_max, cfg.seed, sigma=ccfg.sigma)
    old = [orch.assignment[c] for c in seen]
    mapping = match_clusters(old, res.labels)
    next_id = max(orch.clusters) + 1
    new_ids: dict[int, int] = {}
    for label in sorted(mapping):
        target = mapping[label]
        if target is None:
            target, next_id = next_id, next_id + 1
        new_ids[label] = target
    assignment = dict(orch.assignment)
    assignment.update({c: new_ids[int(lab)] for c, lab in zip(seen, res.labels)})
    clusters, heads = {}, {}
    for label, j in new_ids.items():
        if mapping[label] is not None:
            clusters[j], heads[j] = orch.clusters[j], orch.cluster_heads[j]
            continue
        members = [c for c, lab in zip(seen, res.labels) if int(lab) == label]
        weights = [orch.clients[c].num_samples for c in members]
        clusters[j] = product_space_aggregate_states([orch.clusters[orch.assignment[c]] for c in members], weights,
                                                     rank)
        heads[j] = fedavg_states([orch.cluster_heads[orch.assignment[c]] for c in members], weights)
    for c in assignment:  # clients whose old cluster vanished without them being re-clustered keep theirs
        if assignment[c] not in clusters:
            clusters[assignment[c]] = orch.clusters[assignment[c]]
            heads[assignment[c]] = orch.cluster_heads[assignment[c]]
    orch.assignment, orch.clusters, orch.cluster_heads = assignment, clusters, heads
    orch.num_clusters = len(clusters)
    orch.cluster_centers = cluster_centers(orch, {c: assignment[c] for c in seen}, rank)
    for cs in orch.client_states.values():
        cs.features = None
