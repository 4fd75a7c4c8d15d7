"""HiLoRA as a strategy of the round engine: stages, the rho rule, LSAC, routing, the result tables.

:class:`HiLoRAStrategy` decides what every client does in a round and folds the replies in; the
:class:`~hilora_lightning.federation.engine.FederationRunner` runs it (in process, or over Flower).
The model it holds is the *server's* copy: it gives shapes and the shared-seed initial states and
never trains.

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.federation.config import FederationConfig
    >>> from hilora_lightning.federation.hilora import HiLoRAStrategy
    >>> strategy = HiLoRAStrategy(HiLoRAViT(), FederationConfig(rounds=4, root_rounds=(1, 2), cluster_rounds=(1, 1)))
    >>> state = strategy.initial_state([0, 1])
    >>> [t.value for t in strategy.fit_phases(state)], strategy.stage_name(state)
    (['root'], 'root')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hilora_lightning.federation import transition
from hilora_lightning.federation.client import client_seed, state_bytes
from hilora_lightning.federation.config import FederationConfig
from hilora_lightning.federation.engine import Expected, Payload, RoundContext
from hilora_lightning.federation.fingerprint import config_items, model_items
from hilora_lightning.federation.local import head_state
from hilora_lightning.federation.requests import EvalRequest, FitRequest
from hilora_lightning.federation.result import FederatedResult, accuracy_summary
from hilora_lightning.federation.server_state import ClientState, ServerState
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.state import expected_shapes, export_tier
from hilora_lightning.strategy.aggregation import (
    fedavg_states,
    product_space_aggregate_states,
    relative_change,
    subspace_change,
)
from hilora_lightning.tiers import Tier

__all__ = ["TIER_VIEWS", "HiLoRAStrategy"]

#: The tier-wise table's rows: which tiers are active.
TIER_VIEWS = (("root", [Tier.ROOT]), ("root+cluster", [Tier.ROOT, Tier.CLUSTER]), ("root+cluster+leaf", list(Tier)))

State = dict[str, Tensor]


class HiLoRAStrategy:
    """The paper's method: root, then cluster on the residual, then leaf; LSAC at the transition.

    Args:
        model: the server's :class:`HiLoRAViT` (shapes, shared-seed initial states; never trained).
        config: the run's :class:`FederationConfig`.
        groups: client id -> known latent group (only to score the clustering; never used by the method).
        recluster_policy: ``policy(state) -> bool`` after each cluster-stage round (default: every
            ``clustering.recluster_every`` cluster-stage rounds).
    """

    name = "hilora"

    def __init__(self, model: HiLoRAViT, config: FederationConfig, groups: Mapping[int, int | None] | None = None,
                 recluster_policy: Callable[[ServerState], bool] | None = None) -> None:
        self.model, self.config = model, config
        self.groups = dict(groups or {})
        self.recluster_policy = recluster_policy or self.default_recluster
        model.reset_tier(Tier.ROOT, config.seed)  # the shared-seed root: B = 0, A from the run's seed
        self.initial_root = export_tier(model, Tier.ROOT)
        self.initial_head = head_state(model)
        self.head_shapes = {k: tuple(v.shape) for k, v in self.initial_head.items()}
        acfg = model.adapter_config
        if acfg.cluster.rank == acfg.root.rank:  # the probe starts as the root did in round 1
            self.probe_start = self.initial_root
        else:
            model.reset_tier(Tier.CLUSTER, config.seed)
            self.probe_start = export_tier(model, Tier.CLUSTER)
        self.last_clustering: tuple[list[int], Any] | None = None  # (client ids, ClusteringResult), for plots

    # ------------------------------------------------------------------ identity and state
    def fingerprint(self) -> dict[str, str]:
        return {"method": "hilora", **config_items(self.config), **model_items(self.model)}

    def initial_state(self, clients: Sequence[int]) -> ServerState:
        return ServerState(root=dict(self.initial_root), global_head=dict(self.initial_head),
                           clients={cid: ClientState() for cid in clients})

    def default_recluster(self, state: ServerState) -> bool:
        every = self.config.clustering.recluster_every
        return state.stage is Tier.CLUSTER and every is not None and state.rounds_in_stage % every == 0

    def fit_phases(self, state: ServerState) -> list[Tier]:
        if self.config.schedule == "per_round" and state.stage is not Tier.ROOT:
            return list(Tier)
        return [state.stage]

    def stage_name(self, state: ServerState) -> str:
        return state.stage.value

    # ------------------------------------------------------------------ heads and requests
    def head_for(self, state: ServerState, cid: int, tier: Tier) -> State:
        """The server's head for client ``cid`` at ``tier`` (its own head, if it has one, wins on the client)."""
        if self.config.head_policy == "local":
            return self.initial_head
        if tier is Tier.ROOT or not state.assignment:
            return state.global_head
        return state.cluster_heads[state.assignment[cid]]

    def _view(self, state: ServerState, cid: int, tiers: Sequence[Tier]) -> dict[Tier, State | None]:
        view: dict[Tier, State | None] = {Tier.ROOT: state.root}
        if Tier.CLUSTER in tiers and state.assignment:
            view[Tier.CLUSTER] = state.clusters[state.assignment[cid]]
        if Tier.LEAF in tiers:
            view[Tier.LEAF] = None  # the client's own (or a fresh one)
        return view

    def configure_fit(self, state: ServerState, t: int, selected: Sequence[int], tier: Tier) -> dict[int, FitRequest]:
        """What each selected client gets in round ``t`` at ``tier``.

        A client keeps each frozen tier once received (stagewise schedule), and, in the leaf stage,
        its own head after its first leaf round: those are not sent again (nor counted as downloaded).
        """
        cfg = self.config
        above = [x for x in (Tier.ROOT, Tier.CLUSTER) if x.position < tier.position]
        leaf = tier is Tier.LEAF
        out: dict[int, FitRequest] = {}
        for cid in selected:
            has_own_head = leaf and cid in state.has_final[Tier.CLUSTER]
            out[cid] = FitRequest(
                cid, t, tier, self._view(state, cid, list(Tier)[: tier.position + 1]), self.head_for(state, cid, tier),
                client_seed(cfg.seed, t, cid), client_seed(cfg.seed, 0, cid, "leaf"),
                own_head=cfg.head_policy == "local" or leaf,
                cached=tuple(x for x in above if cid in state.has_final[x]),
                final=tuple(above) if cfg.schedule == "stagewise" else (),
                send_head=cfg.head_policy == "tier" and not has_own_head,
                batch_size=cfg.batch_size, epochs=cfg.local_epochs, steps=cfg.local_steps,
                upload="" if leaf else "AB", keep=((Tier.LEAF, "AB"),) if leaf else (),
                keep_head=leaf or cfg.head_policy == "local", return_head=cfg.head_policy == "tier" and not leaf)
        return out

    def download_bytes(self, state: ServerState, req: FitRequest) -> int:
        """Bytes a request moves to the client: the shared tiers it does not hold yet, and the head."""
        total = state_bytes(dict(req.head)) if req.send_head else 0
        for x in (Tier.ROOT, Tier.CLUSTER):
            tier_state = req.view.get(x)
            if tier_state is not None and x not in req.cached:
                total += state_bytes(dict(tier_state))
        return total

    def expected(self, state: ServerState, tier: Tier) -> Expected:
        if tier is Tier.LEAF:  # leaf and personal head never leave the client
            return Expected(None, None)
        head = self.head_shapes if self.config.head_policy == "tier" else None
        return Expected(expected_shapes(self.model, tier), head, self.config.max_update_norm,
                        self.config.outlier_norm)

    # ------------------------------------------------------------------ aggregation and stages
    def _aggregate_group(self, payloads: list[Payload], tier: Tier) -> State:
        weights = [p.num_samples for p in payloads]
        states = [p.factors for p in payloads]
        if self.config.aggregation == "product":
            return product_space_aggregate_states(states, weights, self.model.adapter_config.tier(tier).rank)
        return fedavg_states(states, weights)

    def aggregate_fit(self, state: ServerState, t: int, tier: Tier, payloads: Mapping[int, Payload],
                      ok: Sequence[int]) -> float | None:
        cfg = self.config
        if cfg.schedule == "stagewise":  # frozen tiers are cached on the client once received
            if tier is not Tier.ROOT:
                state.has_final[Tier.ROOT].update(ok)
            if tier is Tier.LEAF:
                state.has_final[Tier.CLUSTER].update(ok)
        if tier is Tier.LEAF:
            return None
        track = tier is Tier.ROOT or cfg.clustering.recluster_every is not None
        rank = self.model.adapter_config.tier(tier).rank
        for cid, p in payloads.items():  # LSAC features: root stage, and cluster stage if re-clustering
            before = state.root if tier is Tier.ROOT else state.clusters.get(state.assignment.get(cid, -1))
            if track and before is not None:
                cs = state.clients[cid]
                folded = None
                if cfg.clustering.study and tier is Tier.ROOT:  # every feature; the configured one is reused
                    cs.study_features = transition.study_features(cs.study_features, p.factors, before,
                                                                  cfg.clustering, rank)
                    folded = cs.study_features[cfg.clustering.feature]
                cs.features = transition.update_features(cs.features, p.factors, before, cfg.clustering, rank,
                                                         folded)
        share_head = cfg.head_policy == "tier"
        if tier is Tier.ROOT:
            new_root = self._aggregate_group(list(payloads.values()), tier)
            rho = self.stage_statistic(state.root, new_root)
            state.root = new_root
            if share_head:
                state.global_head = fedavg_states([p.head for p in payloads.values()],  # type: ignore[misc]
                                                  [p.num_samples for p in payloads.values()])
            return rho
        rhos = []
        for j in sorted(set(state.assignment[c] for c in payloads)):
            members = [p for c, p in payloads.items() if state.assignment[c] == j]
            new = self._aggregate_group(members, tier)
            rhos.append(self.stage_statistic(state.clusters[j], new))
            state.clusters[j] = new
            if share_head:
                state.cluster_heads[j] = fedavg_states([p.head for p in members],  # type: ignore[misc]
                                                       [p.num_samples for p in members])
        return float(np.mean(rhos)) if rhos else float("nan")

    def stage_statistic(self, previous: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> float:
        """``rho_t`` of one aggregated adapter under ``config.rho_rule``."""
        if self.config.rho_rule == "subspace":
            return subspace_change(previous, current)
        return relative_change(previous, current)

    def end_of_round(self, state: ServerState, t: int, rho: float | None, ctx: RoundContext) -> None:
        """Move the stage on: the rho rule within ``(min, max)`` rounds, a reserve for later stages."""
        cfg = self.config
        state.rounds_in_stage += 1
        if state.stage is Tier.LEAF:
            return
        rank = self.model.adapter_config.tier(state.stage).rank
        if state.stage is Tier.CLUSTER and self.recluster_policy(state):
            transition.recluster(state, cfg, rank, {c: d.num_samples for c, d in ctx.clients.items()})
        if cfg.stage_over(state.stage is Tier.ROOT, state.rounds_in_stage, cfg.rounds - state.round - 1, rho):
            if state.stage is Tier.ROOT:
                state.has_final[Tier.ROOT] = set()
                self.form_clusters(state, ctx)
                state.stage = Tier.CLUSTER
            else:
                state.stage = Tier.LEAF
            state.rounds_in_stage = 0

    def form_clusters(self, state: ServerState, ctx: RoundContext) -> None:
        """LSAC (or the configured method) at the end of the root stage; one fresh adapter per cluster."""
        cfg, rank = self.config, self.model.adapter_config.root.rank
        head = state.global_head if cfg.head_policy == "tier" else self.initial_head

        def probe(ids: Sequence[int]) -> dict[int, dict[str, Tensor]]:
            return self.probe_features(state, ctx, ids, head, "transition probe")

        groups = {c: d.group for c, d in ctx.clients.items()}
        found = transition.form_clusters(state, cfg, rank, groups, probe)
        if found is not None:
            self.last_clustering = found
            ids, res = found  # kept in the state too, so the similarity plot survives a resume
            state.extra["lsac"] = {"ids": list(ids), "labels": [int(v) for v in res.labels], "k": int(res.k),
                                   "distances": torch.as_tensor(res.distances, dtype=torch.float64)}
        for j in range(state.num_clusters):
            self.model.reset_tier(Tier.CLUSTER, client_seed(cfg.seed, 0, j, "cluster"))
            state.clusters[j] = export_tier(self.model, Tier.CLUSTER)
            state.cluster_heads[j] = dict(state.global_head)

    # ------------------------------------------------------------------ evaluation
    def evaluation_requests(self, state: ServerState, tiers: list[Tier], head_level: Tier | None = None,
                            ids: Sequence[int] | None = None) -> dict[int, EvalRequest]:
        """Every training client on its own test split with ``tiers`` active.

        The head is the one of the deepest active tier's level (root: global, cluster: the cluster's,
        leaf: the client's own) unless ``head_level`` says otherwise; with ``head_policy="local"`` it is
        always the client's.
        """
        level = head_level or tiers[-1]
        own_head = self.config.head_policy == "local" or (level is Tier.LEAF and bool(state.assignment))
        out: dict[int, EvalRequest] = {}
        for cid in sorted(state.clients) if ids is None else ids:
            cached = tuple(t for t in (Tier.ROOT, Tier.CLUSTER) if t in tiers and cid in state.has_final[t])
            out[cid] = EvalRequest(cid, tuple(tiers), self._view(state, cid, tiers),
                                   self.head_for(state, cid, level), own_head=own_head, cached=cached,
                                   round=state.round + 1)
        return out

    def configure_evaluate(self, state: ServerState) -> dict[int, EvalRequest]:
        return self.evaluation_requests(state, list(Tier)[: state.stage.position + 1])

    def finish(self, state: ServerState, ctx: RoundContext) -> FederatedResult:
        """The final tables: tier-wise personalization and, with unseen clients, generalization."""
        tierwise: dict[str, dict[str, float]] = {}
        final: dict[int, float] = {}
        for name, tiers in TIER_VIEWS:
            if tiers[-1].position > state.stage.position:
                continue
            final = ctx.scores(self.evaluation_requests(state, tiers), f"final {name}")
            tierwise[name] = accuracy_summary(list(final.values()))
        fixed: dict[str, dict[str, float]] = {}
        if state.stage is Tier.LEAF and state.assignment:  # every view with the client's final head
            for name, tiers in TIER_VIEWS[:-1]:
                scores = ctx.scores(self.evaluation_requests(state, tiers, head_level=Tier.LEAF),
                                    f"final {name} (final head)")
                fixed[name] = accuracy_summary(list(scores.values()))
            fixed[TIER_VIEWS[-1][0]] = tierwise[TIER_VIEWS[-1][0]]
        generalization, routing = self.evaluate_unseen(state, ctx) if ctx.unseen and state.assignment else ({}, {})
        state.extra["routing"] = dict(routing)  # unseen client -> cluster, for exporting their models
        return FederatedResult(list(state.records), final, tierwise, dict(state.assignment), state.num_clusters,
                               state.clustering_ari, generalization, routing, state.elapsed,
                               tierwise_fixed_head=fixed, lsac_study=dict(state.extra.get("lsac_study", {})))

    def probe_features(self, state: ServerState, ctx: RoundContext, ids: Sequence[int], head: Mapping[str, Tensor],
                       step: str) -> dict[int, dict[str, Tensor]]:
        """LSAC features of a short probe update per client (``config.probe``: cluster or root slot)."""
        cfg, rank = self.config, self.model.adapter_config.root.rank
        if cfg.probe == "root":
            requests = {c: transition.root_probe_request(c, cfg, state.root, head) for c in ids}
            return transition.route_by_probe(ctx.fit(requests, step), state.root, cfg, rank)
        requests = {c: transition.probe_request(c, cfg, state.root, self.probe_start, head) for c in ids}
        return transition.route_by_probe(ctx.fit(requests, step), self.probe_start, cfg, rank)

    def route_unseen(self, state: ServerState, ctx: RoundContext, ids: Sequence[int]) -> dict[int, int]:
        """The cluster of each new client: by probe subspace (the paper) or by loss; failures join cluster 0."""
        cfg, rank = self.config, self.model.adapter_config.root.rank
        if state.num_clusters <= 1:
            return dict.fromkeys(ids, 0)
        if cfg.route_by == "loss":
            heads = {j: state.cluster_heads[j] if cfg.head_policy == "tier" else self.initial_head
                     for j in state.clusters}
            routed = transition.route_by_loss(ids, state, heads, lambda r: ctx.scores(r, "unseen loss routing"))
        else:
            head = state.global_head if cfg.head_policy == "tier" else self.initial_head
            features = self.probe_features(state, ctx, ids, head, "unseen probe")
            routed = {c: transition.route_to_cluster(transition.client_subspaces(f, rank), state.cluster_centers)[0]
                      for c, f in features.items()}
        return {c: routed.get(c, 0) for c in ids}

    def evaluate_unseen(self, state: ServerState, ctx: RoundContext
                        ) -> tuple[dict[str, dict[str, float]], dict[int, int]]:
        """Route each unseen client, then score root only, root + routed cluster, and a leaf fine-tune."""
        cfg = self.config
        ids = sorted(ctx.unseen)
        routing = self.route_unseen(state, ctx, ids)
        tier_head = cfg.head_policy == "tier"
        root_head = state.global_head if tier_head else self.initial_head
        heads = {c: state.cluster_heads[routing[c]] if tier_head else self.initial_head for c in ids}
        root_only = {c: EvalRequest(c, (Tier.ROOT,), {Tier.ROOT: state.root}, root_head) for c in ids}
        views = {c: {Tier.ROOT: state.root, Tier.CLUSTER: state.clusters[routing[c]]} for c in ids}
        zero_leaf = {c: EvalRequest(c, (Tier.ROOT, Tier.CLUSTER), views[c], heads[c]) for c in ids}
        accs: dict[str, list[float]] = {"root": list(ctx.scores(root_only, "unseen root").values()),
                                        "zero_leaf": list(ctx.scores(zero_leaf, "unseen zero_leaf").values()),
                                        "finetuned": []}
        if cfg.finetune_epochs > 0:
            fits = {}
            for c in ids:
                self.model.reset_tier(Tier.LEAF, client_seed(cfg.seed, 0, c, "leaf"))
                fresh = export_tier(self.model, Tier.LEAF)  # a fresh leaf, whatever the client held before
                fits[c] = FitRequest(c, -2, Tier.LEAF, {**views[c], Tier.LEAF: fresh}, heads[c],
                                     client_seed(cfg.seed, -2, c, "finetune"), 0, batch_size=cfg.batch_size,
                                     epochs=cfg.finetune_epochs, upload="", keep=((Tier.LEAF, "AB"),),
                                     keep_head=True, return_head=False)
            done = [c for c, r in ctx.fit(fits, "unseen finetune").items() if not isinstance(r, Exception)]
            tuned = {c: EvalRequest(c, tuple(Tier), {**views[c], Tier.LEAF: None}, heads[c], own_head=True)
                     for c in done}
            accs["finetuned"] = list(ctx.scores(tuned, "unseen finetuned").values())
        summary: dict[str, Any] = {k: accuracy_summary(v) for k, v in accs.items() if v}
        return summary, routing
