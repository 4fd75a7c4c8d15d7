"""HiLoRA as a strategy of the round engine: stages, the rho rule, LSAC, routing, the result tables.

:class:`HiLoRAStrategy` decides what every client does in a round and folds the replies in; the
:class:`~hilora_lightning.federation.engine.FederationRunner` runs it (in process, or over Flower).
It sees the model only as an :class:`~hilora_lightning.adapter_spec.AdapterSpec` (shapes, ranks,
the shared-seed fresh states, the initial head): it never holds or trains a model.

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

from hilora_lightning.adapter_spec import AdapterSpec
from hilora_lightning.federation import transition
from hilora_lightning.federation.client import client_seed, state_bytes
from hilora_lightning.federation.config import FederationConfig
from hilora_lightning.federation.engine import RoundContext
from hilora_lightning.federation.fingerprint import config_items
from hilora_lightning.federation.heads import HeadPolicy
from hilora_lightning.federation.newcomers import Newcomers
from hilora_lightning.federation.plan import Budget, ClientStore, HeadStart, Kind, LocalPlan, ScorePlan, Start, Step
from hilora_lightning.federation.private import PrivacyLedger, privacy_summary
from hilora_lightning.federation.replies import Expected, Payload
from hilora_lightning.federation.result import FederatedResult, accuracy_summary
from hilora_lightning.federation.server_state import ClientState, ServerState
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.strategy.aggregation import (
    fedavg_states,
    relative_change,
    subspace_change,
)
from hilora_lightning.strategy.privacy import dp_aggregate
from hilora_lightning.strategy.robust import aggregate_uploads
from hilora_lightning.tiers import Tier

__all__ = ["TIER_VIEWS", "HiLoRAStrategy"]

#: The tier-wise table's rows: which tiers are active.
TIER_VIEWS = (("root", [Tier.ROOT]), ("root+cluster", [Tier.ROOT, Tier.CLUSTER]), ("root+cluster+leaf", list(Tier)))

State = dict[str, Tensor]


class HiLoRAStrategy(Newcomers):
    """The paper's method: root, then cluster on the residual, then leaf; LSAC at the transition.

    Args:
        model: the model's :class:`~hilora_lightning.adapter_spec.AdapterSpec`, or a :class:`HiLoRAViT` to
            take it from (read once; the strategy keeps no model).
        config: the run's :class:`FederationConfig`.
        groups: client id -> known latent group (only to score the clustering; never used by the method).
        recluster_policy: ``policy(state) -> bool`` after each cluster-stage round (default: every
            ``clustering.recluster_every`` cluster-stage rounds).
    """

    name = "hilora"

    def __init__(self, model: HiLoRAViT | AdapterSpec, config: FederationConfig,
                 groups: Mapping[int, int | None] | None = None,
                 recluster_policy: Callable[[ServerState], bool] | None = None) -> None:
        self.spec = model if isinstance(model, AdapterSpec) else AdapterSpec.from_model(model)
        self.config = config
        self.groups = dict(groups or {})
        self.recluster_policy = recluster_policy or self.default_recluster
        self.initial_root = self.spec.fresh(Tier.ROOT, config.seed)  # the shared-seed root: B = 0, A from the seed
        self.initial_head = dict(self.spec.head)
        self.head_shapes = {k: tuple(v.shape) for k, v in self.initial_head.items()}
        self.heads = HeadPolicy(config.head_policy, self.initial_head)
        if self.spec.rank(Tier.CLUSTER) == self.spec.rank(Tier.ROOT):  # the probe starts as the root did in round 1
            self.probe_start = self.initial_root
        else:
            self.probe_start = self.spec.fresh(Tier.CLUSTER, config.seed)
        self.last_clustering: tuple[list[int], Any] | None = None  # (client ids, ClusteringResult), for plots
        self.privacy = PrivacyLedger(config) if config.privacy.enabled else None

    # ------------------------------------------------------------------ identity and state
    def fingerprint(self) -> dict[str, str]:
        return {"method": "hilora", **config_items(self.config), **self.spec.fingerprint}

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
        return self.heads.for_tier(state, cid, tier)

    def client_model(self, state: ServerState, cid: int, store: ClientStore, unseen: bool = False
                     ) -> tuple[dict[Tier, State], State]:
        """Client ``cid``'s deployed tiers (root, its cluster, its leaf as far as it has them) and head.

        A training client uses its assigned cluster; an unseen one (``unseen=True``), after the run,
        the cluster it was routed to, with its fine-tuned leaf and head from ``store``.
        """
        if unseen:
            cluster = {int(k): int(v) for k, v in state.extra.get("routing", {}).items()}.get(cid)
        else:
            cluster = state.assignment.get(cid)
        tiers: dict[Tier, State] = {Tier.ROOT: dict(state.root)}
        if cluster is not None:
            tiers[Tier.CLUSTER] = dict(state.clusters[cluster])
        if cluster is not None and Tier.LEAF in store.kept:
            tiers[Tier.LEAF] = dict(store.kept[Tier.LEAF])
        if store.head is not None:  # its personal (or fine-tuned) head
            head = store.head
        elif cluster is not None and self.heads.shared:
            head = self.heads.cluster_head(state, cluster)  # also an unseen client's routed cluster (not assigned)
        else:
            head = self.head_for(state, cid, Tier.ROOT)
        return tiers, dict(head)

    def leaf_seed(self, cid: int) -> int:
        """The seed of client ``cid``'s fresh leaf."""
        return client_seed(self.config.seed, 0, cid, "leaf")

    def _slots(self, state: ServerState, cid: int, tiers: Sequence[Tier], freeze: Sequence[Tier] = ()
               ) -> dict[Tier, Start]:
        """How client ``cid`` starts ``tiers``: a shared tier it holds frozen is not sent again (in process
        the server's copy rides along, never over the wire); the leaf is its own (or a fresh one)."""
        out: dict[Tier, Start] = {}
        for x in tiers:
            if x is Tier.LEAF:
                out[x] = Start.kept(self.leaf_seed(cid))
                continue
            if x is Tier.CLUSTER and not state.assignment:
                raise RuntimeError(f"client {cid}: the cluster tier is asked for before the clusters exist "
                                   f"(stage {state.stage.value}, round {state.round})")
            shared = state.root if x is Tier.ROOT else state.clusters[state.assignment[cid]]
            held = x in (Tier.ROOT, Tier.CLUSTER) and cid in state.has_final[x]
            out[x] = Start.frozen(shared) if held else Start.server(shared, freeze=x in freeze)
        return out

    def stage_step(self, tier: Tier, seed: int) -> Step:
        """A stage's local step: ``tier`` (and the head) train with the tiers above it active and frozen, kept
        orthogonal to them with ``gamma_c`` (root) and ``gamma_l`` (cluster)."""
        return Step((*tier.frozen_above(), tier), (tier,), seed, head=self.spec.train_head,
                    penalty=self.spec.penalty(tier))

    def configure_fit(self, state: ServerState, t: int, selected: Sequence[int], tier: Tier) -> dict[int, LocalPlan]:
        """What each selected client does in round ``t`` at ``tier``.

        A client keeps each frozen tier once received (stagewise schedule), and, in the leaf stage,
        its own head after its first leaf round: those are not sent again (nor counted as downloaded).
        """
        cfg = self.config
        above = [x for x in (Tier.ROOT, Tier.CLUSTER) if x.position < tier.position]
        leaf = tier is Tier.LEAF
        budget = Budget(cfg.batch_size, cfg.local_epochs, cfg.local_steps)
        out: dict[int, LocalPlan] = {}
        for cid in selected:
            has_own_head = leaf and cid in state.has_final[Tier.CLUSTER]
            send_head = self.heads.shared and not has_own_head
            out[cid] = LocalPlan(
                Kind.TRAIN, cid, t, self._slots(state, cid, list(Tier)[: tier.position + 1],
                                                above if cfg.schedule == "stagewise" else ()),
                HeadStart(self.head_for(state, cid, tier) if send_head else None,
                          own=self.heads.own(leaf)),
                (self.stage_step(tier, client_seed(cfg.seed, t, cid)),), budget,
                upload=None if leaf else (tier, "AB"), keep=((Tier.LEAF, "AB"),) if leaf else (),
                keep_head=self.heads.keeps(leaf), return_head=self.heads.returns(leaf))
        return out

    def download_bytes(self, state: ServerState, plan: LocalPlan) -> int:
        """Bytes a plan moves to the client: the shared tiers it does not hold yet, and the head."""
        total = state_bytes(dict(plan.head.state)) if plan.head.state is not None else 0
        for start in plan.slots.values():
            if start.sent is not None:
                total += state_bytes(dict(start.sent))
        return total

    def expected(self, state: ServerState, tier: Tier) -> Expected:
        if tier is Tier.LEAF:  # leaf and personal head never leave the client
            return Expected(None, None)
        head = self.head_shapes if self.heads.shared else None
        private = self.privacy is not None and self.privacy.applies(tier.value)  # clipped, not rejected
        return Expected(self.spec.shapes(tier), head, self.config.max_update_norm,
                        None if private else self.config.outlier_norm)

    # ------------------------------------------------------------------ aggregation and stages
    def _aggregate_group(self, payloads: list[Payload], tier: Tier, start: State, head_start: State | None,
                         noise: torch.Generator | None = None, members: int = 0) -> tuple[State, State | None]:
        """The new state of a shared tier and its head (``None`` when heads are not shared) from its
        uploads; ``start`` / ``head_start``: what the round began from; ``noise``: the generator of a
        private release (``config.privacy``), whose fixed denominator is ``fraction_fit`` of the
        group's ``members``."""
        weights = [p.num_samples for p in payloads]
        states = [p.factors for p in payloads]
        heads = [p.head for p in payloads] if head_start is not None else None
        robust = self.config.robust
        if self.privacy is not None and noise is not None:
            new, head, _ = dp_aggregate(states, start, self.spec.rank(tier), self.privacy.clip_norm,
                                        self.privacy.noise_multiplier, noise, heads, head_start,  # type: ignore
                                        self.privacy.expected(members))
            return new, head
        if self.config.aggregation != "product":
            return fedavg_states(states, weights), None if heads is None else fedavg_states(heads, weights)  # type: ignore
        rule = robust.rule if tier.value in robust.tiers else "none"
        return aggregate_uploads(states, weights, start, self.spec.rank(tier), rule, heads, head_start,  # type: ignore
                                 robust.options())

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
        rank = self.spec.rank(tier)
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
        share_head = self.heads.shared
        private = self.privacy is not None and self.privacy.applies(tier.value)
        if private:
            self.privacy.spend(state)  # type: ignore[union-attr]  # each client is in one aggregate per round
        if tier is Tier.ROOT:
            new_root, head = self._aggregate_group(list(payloads.values()), tier, state.root,
                                                   state.global_head if share_head else None,
                                                   self.privacy.generator(t, -1) if private else None,  # type: ignore
                                                   len(state.clients))
            rho = self.stage_statistic(state.root, new_root)
            state.root = new_root
            if head is not None:
                state.global_head = head
            return rho
        rhos = []
        for j in sorted(set(state.assignment[c] for c in payloads)):
            members = [p for c, p in payloads.items() if state.assignment[c] == j]
            new, head = self._aggregate_group(members, tier, state.clusters[j],
                                              state.cluster_heads[j] if share_head else None,
                                              self.privacy.generator(t, j) if private else None,  # type: ignore
                                              sum(1 for k in state.assignment.values() if k == j))
            rhos.append(self.stage_statistic(state.clusters[j], new))
            state.clusters[j] = new
            if head is not None:
                state.cluster_heads[j] = head
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
        rank = self.spec.rank(state.stage)
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
        cfg, rank = self.config, self.spec.rank(Tier.ROOT)
        head = self.heads.global_head(state)

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
            state.clusters[j] = self.spec.fresh(Tier.CLUSTER, client_seed(cfg.seed, 0, j, "cluster"))
            state.cluster_heads[j] = dict(state.global_head)

    # ------------------------------------------------------------------ evaluation
    def evaluation_requests(self, state: ServerState, tiers: list[Tier], head_level: Tier | None = None,
                            ids: Sequence[int] | None = None) -> dict[int, ScorePlan]:
        """Every training client on its own test split with ``tiers`` active.

        The head is the one of the deepest active tier's level (root: global, cluster: the cluster's,
        leaf: the client's own) unless ``head_level`` says otherwise; with ``head_policy="local"`` it is
        always the client's.
        """
        level = head_level or tiers[-1]
        own_head = self.heads.own(level is Tier.LEAF and bool(state.assignment))
        out: dict[int, ScorePlan] = {}
        for cid in sorted(state.clients) if ids is None else ids:
            out[cid] = ScorePlan(cid, state.round + 1, tuple(tiers), self._slots(state, cid, tiers),
                                 HeadStart(self.head_for(state, cid, level), own=own_head))
        return out

    def configure_evaluate(self, state: ServerState) -> dict[int, ScorePlan]:
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
                               tierwise_fixed_head=fixed, lsac_study=dict(state.extra.get("lsac_study", {})),
                               privacy=privacy_summary(state))
