"""The root-to-cluster transition: LSAC features, clustering, re-clustering, routing by probe or loss.

These functions work on a :class:`~hilora_lightning.federation.server_state.ServerState` (a round's
working copy) and build requests; they are the orchestration around the pure math of
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

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hilora_lightning.federation.config import FEATURES, ClusteringConfig, FederationConfig
from hilora_lightning.federation.plan import HeadStart, ScorePlan, Start
from hilora_lightning.federation.server_state import ServerState
from hilora_lightning.strategy.aggregation import factor_pairs, fedavg_states, product_space_aggregate_states
from hilora_lightning.strategy.clustering import (
    SIGMA_RULES,
    cluster_distances,
    kmeans_cosine,
    match_clusters,
    route_to_cluster,
)
from hilora_lightning.strategy.subspace import (
    delta_left_factor,
    ema_left_factor,
    ema_normalized,
    left_subspace,
    mean_projector_subspace,
    subspace_distances,
)
from hilora_lightning.tiers import Tier

__all__ = ["cluster_centers", "client_subspaces", "form_clusters", "lsac_study", "recluster", "route_by_loss",
           "route_by_probe", "study_features", "update_features"]

UPDATE_KEY = "__update__"


def update_features(
    features: Mapping[str, Tensor] | None,
    factors: Mapping[str, Tensor],
    root_before: Mapping[str, Tensor],
    cfg: ClusteringConfig,
    rank: int,
    folded: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Fold one local root update into a client's LSAC features (per adapted matrix).

    ``B``: EMA of the Frobenius-normalized local ``B`` (paper-literal: the column space, *where* the
    update writes). ``A``: the same for ``A^T`` (the row space, *what* the update reads). ``delta``: EMA
    of the covariance of the local change ``B_i A_i - B_r A_r`` in factored form. For the k-means
    baseline it also keeps the last flattened factor update under ``"__update__"``. ``folded``: this
    update already folded into ``cfg.feature``'s EMA (by :func:`study_features`), used as is.
    """
    prev = dict(features or {})
    out: dict[str, Tensor] = dict(folded or {})
    for prefix in factor_pairs(factors) if folded is None else ():
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


def study_features(
    features: Mapping[str, Mapping[str, Tensor]] | None,
    factors: Mapping[str, Tensor],
    root_before: Mapping[str, Tensor],
    cfg: ClusteringConfig,
    rank: int,
) -> dict[str, dict[str, Tensor]]:
    """:func:`update_features` for every LSAC feature at once (``{feature: per-matrix EMA}``).

    For ``clustering.study``: the root stage does not depend on the feature, so the server can keep
    all three and cluster with each at the transition, a controlled comparison from one root stage.
    """
    prev = features or {}
    return {f: update_features(prev.get(f), factors, root_before, dataclasses.replace(cfg, feature=f, method="lsac"),
                               rank) for f in FEATURES}


def lsac_study(
    features: Mapping[int, Mapping[str, Mapping[str, Tensor]]],
    rank: int,
    k_min: int,
    k_max: int,
    seed: int,
    groups: Mapping[int, int | None],
) -> dict[str, dict[str, float]]:
    """LSAC with every feature and kernel-width rule on the same clients' features.

    Returns ``{"<feature>/<sigma>": {"k": K, "ari": ARI}}`` (``ari`` only when every client's latent
    group is known); with ``k_min > 1`` also ``"<feature>/<sigma>/k1"``, the same with ``k_min = 1``.
    Distances are computed once per feature.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> bases = [torch.linalg.qr(torch.randn(12, 2, generator=g))[0] for _ in range(2)]
        >>> feats = {c: {f: {"m": bases[c % 2] + 0.01 * torch.randn(12, 2, generator=g)} for f in ("A", "B", "delta")}
        ...          for c in range(8)}
        >>> out = lsac_study(feats, rank=2, k_min=2, k_max=4, seed=0, groups={c: c % 2 for c in range(8)})
        >>> out["B/median"]
        {'k': 2.0, 'ari': 1.0}
        >>> sorted(out)[:3]
        ['A/local', 'A/local/k1', 'A/median']
    """
    ids = sorted(features)
    out: dict[str, dict[str, float]] = {}
    for feature in FEATURES:
        if len(ids) < 2 or any(feature not in features[c] for c in ids):
            continue
        distances = subspace_distances([client_subspaces(features[c][feature], rank) for c in ids])
        for sigma in SIGMA_RULES:
            for lo, suffix in ((k_min, ""), (1, "/k1")) if k_min > 1 else ((k_min, ""),):
                res = cluster_distances(distances, lo, min(k_max, len(ids)), seed, sigma=sigma)
                row = {"k": float(res.k)}
                ari = _ari(groups, ids, res.labels)
                if ari is not None:
                    row["ari"] = ari
                out[f"{feature}/{sigma}{suffix}"] = row
    return out


def client_subspaces(features: Mapping[str, Tensor], rank: int) -> list[Tensor]:
    """Top-``rank`` left singular vectors of each feature matrix, in key order (``(p, rank)`` each)."""
    return [left_subspace(v, rank) for k, v in features.items() if k != UPDATE_KEY]


def form_clusters(state: ServerState, cfg: FederationConfig, rank: int, groups: Mapping[int, int | None],
                  probe: Any) -> tuple[list[int], Any] | None:
    """Group the clients at the end of the root stage (writes ``assignment``, ``num_clusters``,
    ``cluster_centers`` and ``clustering_ari`` into ``state``); return ``(ids, ClusteringResult)`` for plots.

    ``probe(client_ids)`` returns probe features for clients without root-stage features (they never
    trained in the root stage); a client whose probe fails joins the largest cluster.
    """
    ccfg = cfg.clustering
    ids_all = sorted(state.clients)
    seen = [cid for cid in ids_all if state.clients[cid].features]
    found_res = None
    if ccfg.method == "given":
        assert ccfg.assignment is not None
        missing = sorted(set(ids_all) - {int(k) for k in ccfg.assignment})
        if missing:
            raise ValueError(f"clustering.assignment has no cluster for clients {missing}")
        ids = sorted({int(v) for v in ccfg.assignment.values()})
        labels = {cid: ids.index(int(ccfg.assignment[cid])) for cid in ids_all}
        k = len(ids)
    else:
        if not seen:
            raise RuntimeError("no client has root-stage features to cluster; every root round failed?")
        subspaces = [client_subspaces(state.clients[c].features or {}, rank) for c in seen]
        res = cluster_distances(subspace_distances(subspaces), ccfg.k_min, ccfg.k_max, cfg.seed, sigma=ccfg.sigma)
        found_res = (seen, res)
        k = ccfg.k or res.k
        found = res.labels
        if ccfg.method == "kmeans":
            updates = torch.stack([(state.clients[c].features or {})[UPDATE_KEY] for c in seen])
            found = kmeans_cosine(updates, min(k, len(seen)), cfg.seed)
        elif ccfg.method == "random":
            found = np.random.default_rng([cfg.seed, 7]).integers(0, k, size=len(seen))
        elif ccfg.k is not None:
            found = cluster_distances(res.distances, seed=cfg.seed, k=min(k, len(seen)), sigma=ccfg.sigma).labels
        labels = {cid: int(lab) for cid, lab in zip(seen, found)}
        k = int(max(labels.values())) + 1
    studied = {c: state.clients[c].study_features or {} for c in seen if state.clients[c].study_features}
    if ccfg.study and studied:
        state.extra["lsac_study"] = lsac_study(studied, rank, ccfg.k_min, ccfg.k_max, cfg.seed, groups)
    features = {c: state.clients[c].features or {} for c in labels if state.clients[c].features}
    centers = cluster_centers(features, labels, rank)
    unrouted = sorted(set(ids_all) - set(labels))  # never trained in the root stage: route by probe
    if unrouted:
        largest = max(sorted(set(labels.values())), key=lambda j: sum(v == j for v in labels.values()))
        probed = probe(unrouted)
        for cid in unrouted:
            labels[cid] = route_to_cluster(client_subspaces(probed[cid], rank), centers)[0] if cid in probed \
                else largest
    state.assignment, state.num_clusters, state.cluster_centers = labels, k, centers
    for cs in state.clients.values():
        cs.features = cs.study_features = None  # served their purpose; the per-client state shrinks to its counters
    ari = _ari(groups, ids_all, [labels[c] for c in ids_all])
    if ari is not None:
        state.clustering_ari = ari
    return found_res


def _ari(groups: Mapping[int, int | None], ids: Sequence[int], labels: Sequence[int] | np.ndarray) -> float | None:
    """Adjusted Rand index of ``labels`` (one per id) against the latent groups; ``None`` unless every
    id's group is known."""
    known = [groups.get(c) for c in ids]
    if any(g is None for g in known):
        return None
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(known, labels))


def cluster_centers(features: Mapping[int, Mapping[str, Tensor]], labels: Mapping[int, int], rank: int
                    ) -> dict[int, list[Tensor]]:
    """Per cluster and matrix: top-r eigenvectors of the members' mean projector."""
    centers: dict[int, list[Tensor]] = {}
    for j in sorted(set(labels.values())):
        members = [client_subspaces(features[c], rank) for c, lab in labels.items() if lab == j and c in features]
        if members:
            centers[j] = [mean_projector_subspace(torch.stack([m[i] for m in members])[:, None], rank)[0]
                          for i in range(len(members[0]))]
    return centers


def route_by_probe(replies: Mapping[int, Any], start: Mapping[str, Tensor], cfg: FederationConfig, rank: int
                   ) -> dict[int, dict[str, Tensor]]:
    """LSAC features of the probes that came back (failed probes are left out)."""
    return {cid: update_features(None, r.factors, start, cfg.clustering, rank)
            for cid, r in replies.items() if not isinstance(r, Exception) and r.factors is not None}


def route_by_loss(client_ids: Sequence[int], state: ServerState, heads: Mapping[int, Mapping[str, Tensor]],
                  evaluate: Any) -> dict[int, int]:
    """Per client, the cluster whose adapter (on the frozen root, with its head) has the lowest training loss."""
    losses: dict[int, dict[int, float]] = {cid: {} for cid in client_ids}
    for j in sorted(state.clusters):
        slots = {Tier.ROOT: Start.server(state.root), Tier.CLUSTER: Start.server(state.clusters[j])}
        requests = {cid: ScorePlan(cid, state.round + 1, (Tier.ROOT, Tier.CLUSTER), slots, HeadStart(heads[j]),
                                   metric="loss") for cid in client_ids}
        for cid, loss in evaluate(requests).items():
            losses[cid][j] = loss
    return {cid: min(sorted(ls), key=lambda j: ls[j]) for cid, ls in losses.items() if ls}


def recluster(state: ServerState, cfg: FederationConfig, rank: int, weights: Mapping[int, int]) -> None:
    """Re-run LSAC on the clients' cluster-stage features; keep ids by member overlap (Hungarian).

    Clusters matched to an old cluster keep its adapter and head; split-off or new clusters start
    from the product-space mean (weighted by samples) of their members' previous cluster adapters.
    """
    ccfg = cfg.clustering
    seen = [c for c in sorted(state.clients) if state.clients[c].features]
    if len(seen) < 2:
        return
    subspaces = [client_subspaces(state.clients[c].features or {}, rank) for c in seen]
    res = cluster_distances(subspace_distances(subspaces), ccfg.k_min, ccfg.k_max, cfg.seed, sigma=ccfg.sigma)
    old = [state.assignment[c] for c in seen]
    mapping = match_clusters(old, res.labels)
    next_id = max(state.clusters) + 1
    new_ids: dict[int, int] = {}
    for label in sorted(mapping):
        target = mapping[label]
        if target is None:
            target, next_id = next_id, next_id + 1
        new_ids[label] = target
    assignment = dict(state.assignment)
    assignment.update({c: new_ids[int(lab)] for c, lab in zip(seen, res.labels)})
    clusters, heads = {}, {}
    for label, j in new_ids.items():
        if mapping[label] is not None:
            clusters[j], heads[j] = state.clusters[j], state.cluster_heads[j]
            continue
        members = [c for c, lab in zip(seen, res.labels) if int(lab) == label]
        w = [weights[c] for c in members]
        clusters[j] = product_space_aggregate_states([state.clusters[state.assignment[c]] for c in members], w, rank)
        heads[j] = fedavg_states([state.cluster_heads[state.assignment[c]] for c in members], w)
    for c in assignment:  # clients whose old cluster vanished without them being re-clustered keep theirs
        if assignment[c] not in clusters:
            clusters[assignment[c]] = state.clusters[assignment[c]]
            heads[assignment[c]] = state.cluster_heads[assignment[c]]
    features = {c: state.clients[c].features or {} for c in seen}
    state.assignment, state.clusters, state.cluster_heads = assignment, clusters, heads
    state.num_clusters = len(clusters)
    state.cluster_centers = cluster_centers(features, {c: assignment[c] for c in seen}, rank)
    for cs in state.clients.values():
        cs.features = None
