"""A baseline ``Method`` as a strategy of the round engine (the same runner, backends and checkpoints as HiLoRA).

:class:`BaselineStrategy` turns a declarative :class:`~hilora_lightning.baselines.methods.Method`
(phases of a local update, a server rule, evaluation slots, the unseen-client fine-tune) into fit
and evaluation requests that the one client runtime executes. What a client keeps (its personal
LoRA, FedSA-LoRA's local ``B``, gates, a personal head) lives in its store, so a baseline runs on
Flower and resumes mid-method like HiLoRA. The server's state: the global LoRA in
``ServerState.root``, its head in ``global_head``, and in ``extra`` every client's latest
individual LoRA and rest-of-world LoRA (FedALT).

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.baselines import FedSALoRA
    >>> from hilora_lightning.baselines.strategy import BaselineStrategy
    >>> from hilora_lightning.federation.config import FederationConfig
    >>> config = FederationConfig(rounds=10, schedule="per_round")  # baselines have no stages
    >>> s = BaselineStrategy(FedSALoRA(rounds=10), HiLoRAViT(gamma_c=0, gamma_l=0), config)
    >>> state = s.initial_state([0])
    >>> plan = s.configure_fit(state, 1, [0], s.fit_phases(state)[0])[0]
    >>> plan.upload[1], plan.keep[0][1]
    ('A', 'B')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.adapter_spec import AdapterSpec
from hilora_lightning.baselines.methods import Method, server_aggregate
from hilora_lightning.federation.client import client_seed, state_bytes
from hilora_lightning.federation.config import FederationConfig
from hilora_lightning.federation.engine import RoundContext
from hilora_lightning.federation.fingerprint import config_items
from hilora_lightning.federation.heads import HeadPolicy
from hilora_lightning.federation.plan import Budget, HeadStart, Kind, LocalPlan, Phase, ScorePlan, Start, Step
from hilora_lightning.federation.replies import Expected, Payload
from hilora_lightning.federation.result import FederatedResult, accuracy_summary
from hilora_lightning.federation.server_state import ClientState, ServerState
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.strategy.aggregation import fedavg_states, select_side
from hilora_lightning.tiers import Tier

__all__ = ["BaselineStrategy"]

G, R, P = Tier.ROOT, Tier.CLUSTER, Tier.LEAF

State = dict[str, Tensor]


class BaselineStrategy:
    """Run ``method`` with the shared model's slots (root = global, cluster = rest-of-world, leaf = personal).

    Args:
        method: the baseline.
        model: the model's :class:`~hilora_lightning.adapter_spec.AdapterSpec`, or the model to take it
            from (read once; the strategy keeps no model). Its orthogonality penalty must be off and its
            gates set as the method says (the :class:`~hilora_lightning.baselines.BaselineRunner`
            prepares a copy).
        config: the run's :class:`FederationConfig` (stage and clustering fields are HiLoRA's, ignored).
    """

    def __init__(self, method: Method, model: HiLoRAViT | AdapterSpec, config: FederationConfig) -> None:
        self.method, self.config = method, config
        self.spec = model if isinstance(model, AdapterSpec) else AdapterSpec.from_model(model)
        self.name = method.name
        self.initial_global = self.spec.fresh(G, config.seed)  # the shared-seed global LoRA: B = 0, A from the seed
        self.initial_row = self.spec.fresh(R, config.seed)
        self.initial_head = dict(self.spec.head)
        self.heads = HeadPolicy(config.head_policy, self.initial_head)
        self.initial_gates = dict(self.spec.gates)
        self.upload_slot = P if method.rule == "others" else G

    # ------------------------------------------------------------------ identity and state
    def fingerprint(self) -> dict[str, str]:
        return {"method": repr(self.method), **config_items(self.config), **self.spec.fingerprint}

    def initial_state(self, clients: Sequence[int]) -> ServerState:
        return ServerState(root=dict(self.initial_global), global_head=dict(self.initial_head),
                           clients={cid: ClientState() for cid in clients},
                           extra={"latest": {}, "row": {}, "weights": {}, "own_head": []})

    def fit_phases(self, state: ServerState) -> list[Tier]:
        return [self.upload_slot]

    def stage_name(self, state: ServerState) -> str:
        return "federated" if self.method.uploads(state.round + 1) else "local"

    # ------------------------------------------------------------------ requests
    def _view(self, state: ServerState, cid: int, row: State | None = None, phases: Sequence[Phase] | None = None
              ) -> dict[Tier, Start]:
        """How client ``cid`` starts the method's slots (``row`` overrides FedALT's rest-of-world).

        A personal slot the client has not trained yet starts fresh from its leaf seed, except in an update
        whose ``phases`` leave it inactive (FedDPA-F's global rounds): there it starts from the model's own
        initial factors, as it did before plans made starts explicit (the measured FedDPA-F figures rest on
        this; every client then shares that initial ``A``, harmless for a slot that is never aggregated).
        """
        slots = self.method.slots
        view: dict[Tier, Start] = {}
        if G in slots:  # FedSA-LoRA: the client's own B overlays it (kept in its store)
            view[G] = Start.server(state.root, overlay=True)
        if R in slots:
            view[R] = Start.server(row if row is not None else state.extra["row"].get(cid, self.initial_row),
                                   overlay=True)
        if P in slots:  # the client's own personal LoRA (fresh from its seed the first time)
            idle = phases is not None and not any(P in p.active for p in phases)
            view[P] = Start.kept(self.spec.init_seed if idle else client_seed(self.config.seed, 0, cid, "leaf"))
        return view

    def _steps(self, phases: Sequence[Phase], seed: int, cid: int, whole: bool = False) -> tuple[Step, ...]:
        """The method's phases with their seeds (``whole``: each phase runs the whole budget)."""
        return tuple(Step.of(p, client_seed(seed, i, cid, "phase"), whole) for i, p in enumerate(phases))

    def _head(self, state: ServerState) -> State:
        return self.heads.global_head(state)

    def _fallback_head(self, state: ServerState, cid: int) -> State | None:
        """The head a client without its own starts from, sent only when it needs it: it holds none yet and
        the server's differs from the initial head (which the client builds itself)."""
        head = self._head(state)
        if cid in state.extra.get("own_head", ()) or all(torch.equal(head[k], v) for k, v in self.initial_head.items()):
            return None
        return head

    def _keep(self) -> tuple[tuple[Tier, str], ...]:
        keep: list[tuple[Tier, str]] = []
        if P in self.method.slots:
            keep.append((P, "AB"))
        if self.method.rule == "A":
            keep.append((G, "B"))
        return tuple(keep)

    def _gates(self) -> State | None:
        return self.initial_gates if self.method.gate_mode is not None else None

    def configure_fit(self, state: ServerState, t: int, selected: Sequence[int], phase: Tier) -> dict[int, LocalPlan]:
        cfg, method = self.config, self.method
        uploads = method.uploads(t)
        share_head = uploads and self.heads.shared
        upload = (self.upload_slot, "A" if method.rule == "A" else "AB") if uploads else None
        budget = Budget(cfg.batch_size, cfg.local_epochs, cfg.local_steps)
        phases = method.phases(t)
        return {cid: LocalPlan(
            Kind.TRAIN, cid, t, self._view(state, cid, phases=phases),
            HeadStart(self._head(state), own=False) if share_head else HeadStart(self._fallback_head(state, cid),
                                                                                 own=True),
            self._steps(phases, client_seed(cfg.seed, t, cid, method.name), cid), budget, upload=upload,
            keep=self._keep(), keep_head=not share_head, return_head=share_head, gates=self._gates())
            for cid in selected}

    def download_bytes(self, state: ServerState, req: LocalPlan) -> int:
        rule = self.method.rule
        down = 0
        if rule in ("fedavg", "product"):
            down += state_bytes(state.root)
        elif rule == "A":
            down += state_bytes(select_side(state.root, "A"))
        elif rule == "others":
            down += state_bytes(dict(req.slots[R].sent or {}))
        if req.head.state is not None:
            down += state_bytes(dict(req.head.state))
        return down

    def expected(self, state: ServerState, phase: Tier) -> Expected:
        if not self.method.uploads(state.round + 1):
            return Expected(None, None)
        shapes = self.spec.shapes(self.upload_slot)
        if self.method.rule == "A":
            shapes = {k: v for k, v in shapes.items() if k.endswith(".lora_A")}
        head = self.head_shapes if self.heads.shared else None
        return Expected(shapes, head, self.config.max_update_norm,
                        self.config.outlier_norm)

    @property
    def head_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.initial_head.items()}

    # ------------------------------------------------------------------ server
    def aggregate_fit(self, state: ServerState, t: int, phase: Tier, payloads: Mapping[int, Payload],
                      ok: Sequence[int]) -> float | None:
        if not (self.method.uploads(t) and self.heads.shared):  # these clients kept their head
            state.extra["own_head"] = sorted({*state.extra.get("own_head", ()), *ok})
        if not self.method.uploads(t):
            return None
        ids = sorted(payloads)
        latest = state.extra["latest"]
        weights = {c: payloads[c].num_samples for c in ids}
        weights.update({c: w for c, w in state.extra.get("weights", {}).items() if c not in weights})
        state.root, state.extra["latest"], row = server_aggregate(
            self.method.rule, {c: payloads[c].factors for c in ids}, weights, state.root, latest,
            self.spec.rank(G))
        state.extra["weights"] = {c: weights[c] for c in set(state.extra["latest"]) | set(ids)}
        if self.method.rule == "others":
            state.extra["row"] = row
        if self.heads.shared:
            state.global_head = fedavg_states([payloads[c].head for c in ids],  # type: ignore[misc]
                                              [weights[c] for c in ids])
        return None

    def end_of_round(self, state: ServerState, t: int, rho: float | None, ctx: RoundContext) -> None:
        return None

    # ------------------------------------------------------------------ evaluation
    def _eval(self, state: ServerState, cid: int, view: Mapping[Tier, Start] | None = None,
              gate_init: Mapping[str, Tensor] | None = None) -> ScorePlan:
        gates = (gate_init or self.initial_gates) if self.method.gate_mode is not None else None
        return ScorePlan(cid, state.round + 1, tuple(self.method.eval_active), view or self._view(state, cid),
                         HeadStart(self._head(state), own=True), gates)

    def configure_evaluate(self, state: ServerState) -> dict[int, ScorePlan]:
        return {cid: self._eval(state, cid) for cid in sorted(state.clients)}

    def _fusion(self, state: ServerState, cid: int, view: Mapping[Tier, Start], seed_round: int) -> LocalPlan:
        """FDLoRA's adaptive fusion: only the gates train on the client's data; the client keeps them."""
        cfg, method = self.config, self.method
        phase = Phase(method.eval_active, (), method.fusion_share, gates=True, head=False)
        return LocalPlan(Kind.FUSE, cid, state.round + 1, view, HeadStart(self._head(state), own=True),
                         self._steps((phase,), client_seed(cfg.seed, seed_round, cid, method.name), cid),
                         Budget(cfg.batch_size, cfg.local_epochs, cfg.local_steps), gates=self.initial_gates)

    def newcomer_row(self, state: ServerState) -> State:
        """FedALT's rest-of-world for a new client: the mean of every client's latest individual LoRA."""
        latest = state.extra["latest"]
        if not latest:
            return self.initial_row
        return fedavg_states(list(latest.values()), [state.extra["weights"][c] for c in latest])

    def unseen_gates(self) -> State:
        """The gates a new client starts from (the method's zero-shot weights, if it has some)."""
        gates = dict(self.initial_gates)
        if self.method.zero_shot_gate is not None:
            w = torch.tensor(self.method.zero_shot_gate, dtype=torch.float32)
            gates = {k: (w.clone() if k.endswith(".weights") else v) for k, v in gates.items()}
        return gates

    def finish(self, state: ServerState, ctx: RoundContext) -> FederatedResult:
        """Fuse (FDLoRA), evaluate the clients and the unseen clients."""
        if self.method.fusion_share > 0:
            ctx.fit({cid: self._fusion(state, cid, self._view(state, cid), -3) for cid in sorted(state.clients)},
                    "fusion")
        final = ctx.scores(self.configure_evaluate(state), "final personalized")
        generalization = self.evaluate_unseen(state, ctx) if ctx.unseen else {}
        return FederatedResult(list(state.records), final, {"personalized": accuracy_summary(list(final.values()))},
                               {}, 0, None, generalization, {}, state.elapsed)

    def evaluate_unseen(self, state: ServerState, ctx: RoundContext) -> dict[str, dict[str, float]]:
        """Unseen clients: accuracy as they arrive (``zero_leaf``) and after ``finetune_epochs`` of
        fine-tuning their personal part (``finetuned``)."""
        cfg, method = self.config, self.method
        ids = sorted(ctx.unseen)
        row = self.newcomer_row(state)
        gates = self.unseen_gates()
        views = {c: self._view(state, c, row=row) for c in ids}
        arrive = {c: self._eval(state, c, views[c], gates) for c in ids}
        accs: dict[str, Any] = {"zero_leaf": list(ctx.scores(arrive, "unseen zero_leaf").values()), "finetuned": []}
        if cfg.finetune_epochs > 0:
            phases = tuple(method.unseen_phases())
            trained = [s for s in (G, R, P) if any(s in p.train for p in phases)]
            # the fine-tune starts from the gates every client trains with (FDLoRA: 0.5 / 0.5, not the zero-shot 1 / 0)
            fits = {c: LocalPlan(Kind.FINETUNE, c, state.round + 1, views[c], HeadStart(self._head(state)),
                                 self._steps(phases, client_seed(cfg.seed, -2, c, method.name), c, whole=True),
                                 Budget(cfg.batch_size, cfg.finetune_epochs), keep=tuple((s, "AB") for s in trained),
                                 keep_head=True, gates=self._gates()) for c in ids}
            done = [c for c, r in ctx.fit(fits, "unseen finetune").items() if not isinstance(r, Exception)]
            if method.fusion_share > 0:
                ctx.fit({c: self._fusion(state, c, views[c], -2) for c in done}, "unseen fusion")
            tuned = {c: self._eval(state, c, views[c], gates) for c in done}
            accs["finetuned"] = list(ctx.scores(tuned, "unseen finetuned").values())
        return {k: accuracy_summary(v) for k, v in accs.items() if v}
