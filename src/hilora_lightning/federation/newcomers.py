"""How HiLoRA meets clients it has no root-stage features of: the probe update, routing to a cluster,
and the unseen clients' tables (root only, root + routed cluster, a fine-tuned leaf).

:class:`Newcomers` is a part of :class:`~hilora_lightning.federation.hilora.HiLoRAStrategy` (it uses
the strategy's ``config``, ``spec``, ``stage_step``, ``leaf_seed`` and heads); it plans and reads,
it never trains.

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.federation.config import FederationConfig
    >>> from hilora_lightning.federation.hilora import HiLoRAStrategy
    >>> s = HiLoRAStrategy(HiLoRAViT(), FederationConfig(rounds=4, root_rounds=(1, 2), cluster_rounds=(1, 1)))
    >>> plan = s.probe_plan(s.initial_state([0]), 0, s.initial_head)
    >>> plan.kind.value, plan.upload[0].value
    ('probe', 'cluster')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from hilora_lightning.federation import transition
from hilora_lightning.federation.client import client_seed
from hilora_lightning.federation.engine import RoundContext
from hilora_lightning.federation.heads import HeadPolicy
from hilora_lightning.federation.plan import Budget, HeadStart, Kind, LocalPlan, ScorePlan, Start
from hilora_lightning.federation.result import accuracy_summary
from hilora_lightning.federation.server_state import ServerState
from hilora_lightning.tiers import Tier

__all__ = ["Newcomers"]


class Newcomers:
    """Probes, routing and the unseen clients' evaluation of
    :class:`~hilora_lightning.federation.hilora.HiLoRAStrategy` (which provides these)."""

    config: Any
    spec: Any
    probe_start: dict[str, Tensor]
    initial_head: dict[str, Tensor]
    heads: HeadPolicy
    stage_step: Callable[[Tier, int], Any]
    leaf_seed: Callable[[int], int]

    def probe_features(self, state: ServerState, ctx: RoundContext, ids: Sequence[int], head: Mapping[str, Tensor],
                       step: str) -> dict[int, dict[str, Tensor]]:
        """LSAC features of a short probe update per client (``config.probe``: cluster or root slot)."""
        cfg, rank = self.config, self.spec.rank(Tier.ROOT)
        plans = {c: self.probe_plan(state, c, head) for c in ids}
        start = state.root if cfg.probe == "root" else self.probe_start
        return transition.route_by_probe(ctx.fit(plans, step), start, cfg, rank)

    def probe_plan(self, state: ServerState, cid: int, head: Mapping[str, Tensor]) -> LocalPlan:
        """``config.probe_steps`` local steps of a probe, uploaded and forgotten by the client.

        ``probe="cluster"``: a fresh LoRA in the cluster slot on top of the frozen root, starting exactly
        as the root did in round 1 (``B = 0``, the shared-seed ``A``), so its factors compare with the
        training clients' root-stage features, which the first rounds (from ``B = 0``) dominate.
        ``probe="root"``: the root slot trained from the final root (the root stage has no penalty),
        folded against that root exactly as a root-stage update is.
        """
        cfg = self.config
        slots = {Tier.ROOT: Start.server(state.root)}
        slot = Tier.ROOT
        if cfg.probe == "cluster":
            slots[Tier.CLUSTER], slot = Start.server(self.probe_start), Tier.CLUSTER
        return LocalPlan(Kind.PROBE, cid, state.round + 1, slots, HeadStart(head),
                         (self.stage_step(slot, client_seed(cfg.seed, -1, cid, "probe")),),
                         Budget(cfg.batch_size, 1, cfg.probe_steps), upload=(slot, "AB"))

    def route_unseen(self, state: ServerState, ctx: RoundContext, ids: Sequence[int]) -> dict[int, int]:
        """The cluster of each new client: by probe subspace (the paper) or by loss; failures join cluster 0."""
        cfg, rank = self.config, self.spec.rank(Tier.ROOT)
        if state.num_clusters <= 1:
            return dict.fromkeys(ids, 0)
        if cfg.route_by == "loss":
            heads = {j: self.heads.cluster_head(state, j) for j in state.clusters}
            routed = transition.route_by_loss(ids, state, heads, lambda r: ctx.scores(r, "unseen loss routing"))
        else:
            head = self.heads.global_head(state)
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
        root_head = self.heads.global_head(state)
        heads = {c: self.heads.cluster_head(state, routing[c]) for c in ids}
        rnd = state.round + 1
        root_only = {c: ScorePlan(c, rnd, (Tier.ROOT,), {Tier.ROOT: Start.server(state.root)}, HeadStart(root_head))
                     for c in ids}
        views = {c: {Tier.ROOT: Start.server(state.root), Tier.CLUSTER: Start.server(state.clusters[routing[c]])}
                 for c in ids}
        zero_leaf = {c: ScorePlan(c, rnd, (Tier.ROOT, Tier.CLUSTER), views[c], HeadStart(heads[c])) for c in ids}
        accs: dict[str, list[float]] = {"root": list(ctx.scores(root_only, "unseen root").values()),
                                        "zero_leaf": list(ctx.scores(zero_leaf, "unseen zero_leaf").values()),
                                        "finetuned": []}
        if cfg.finetune_epochs > 0:
            fits = {c: LocalPlan(  # a fresh leaf, whatever the client held before
                Kind.FINETUNE, c, rnd, {**views[c], Tier.LEAF: Start.fresh(self.leaf_seed(c))}, HeadStart(heads[c]),
                (self.stage_step(Tier.LEAF, client_seed(cfg.seed, -2, c, "finetune")),),
                Budget(cfg.batch_size, cfg.finetune_epochs), keep=((Tier.LEAF, "AB"),), keep_head=True)
                for c in ids}
            done = [c for c, r in ctx.fit(fits, "unseen finetune").items() if not isinstance(r, Exception)]
            tuned = {c: ScorePlan(c, rnd, tuple(Tier), {**views[c], Tier.LEAF: Start.kept(self.leaf_seed(c))},
                                  HeadStart(heads[c], own=True)) for c in done}
            accs["finetuned"] = list(ctx.scores(tuned, "unseen finetuned").values())
        summary: dict[str, Any] = {k: accuracy_summary(v) for k, v in accs.items() if v}
        return summary, routing
