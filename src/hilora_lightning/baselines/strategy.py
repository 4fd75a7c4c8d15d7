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
    >>> req = s.configure_fit(state, 1, [0], s.fit_phases(state)[0])[0]
    >>> req.upload, req.keep[0][1]
    ('A', 'B')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.baselines.methods import Method, server_aggregate
from hilora_lightning.federation.client import client_seed, state_bytes
from hilora_lightning.federation.config import FederationConfig
from hilora_lightning.federation.engine import Expected, Payload, RoundContext
from hilora_lightning.federation.fingerprint import config_items, model_items
from hilora_lightning.federation.local import head_state
from hilora_lightning.federation.requests import EvalRequest, FitRequest, Phase
from hilora_lightning.federation.result import FederatedResult, accuracy_summary
from hilora_lightning.federation.server_state import ClientState, ServerState
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.state import expected_shapes, export_tier
from hilora_lightning.strategy.aggregation import fedavg_states, select_side
from hilora_lightning.tiers import Tier

__all__ = ["BaselineStrategy"]

G, R, P = Tier.ROOT, Tier.CLUSTER, Tier.LEAF

State = dict[str, Tensor]


class BaselineStrategy:
    """Run ``method`` with the shared model's slots (root = global, cluster = rest-of-world, leaf = personal).

    Args:
        method: the baseline.
        model: the server's model (shapes, shared-seed initial states; never trained). Its
            orthogonality penalty must be off and its gates set as the method says (the
            :class:`~hilora_lightning.baselines.BaselineRunner` prepares a copy).
        config: the run's :class:`FederationConfig` (stage and clustering fields are HiLoRA's, ignored).
    """

    def __init__(self, method: Method, model: HiLoRAViT, config: FederationConfig) -> None:
        self.method, self.model, self.config = method, model, config
        self.name = method.name
        model.reset_tier(G, config.seed)  # the shared-seed global LoRA: B = 0, A from the run's seed
        model.reset_tier(R, config.seed)
        self.initial_global = export_tier(model, G)
        self.initial_row = export_tier(model, R)
        self.initial_head = head_state(model)
        self.initial_gates = model.gate_state()
        self.upload_slot = P if method.rule == "others" else G

    # ------------------------------------------------------------------ identity and state
    def fingerprint(self) -> dict[str, str]:
        return {"method": repr(self.method), **config_items(self.config), **model_items(self.model)}

    def initial_state(self, clients: Sequence[int]) -> ServerState:
        return ServerState(root=dict(self.initial_global), global_head=dict(self.initial_head),
                           clients={cid: ClientState() for cid in clients},
                           extra={"latest": {}, "row": {}, "weights": {}})

    def fit_phases(self, state: ServerState) -> list[Tier]:
        return [self.upload_slot]

    def stage_name(self, state: ServerState) -> str:
        return "federated" if self.method.uploads(state.round + 1) else "local"

    # ------------------------------------------------------------------ requests
    def _view(self, state: ServerState, cid: int, row: State | None = None) -> dict[Tier, State | None]:
        """The slot states client ``cid`` starts from (``row`` overrides FedALT's rest-of-world)."""
        slots = self.method.slots
        view: dict[Tier, State | None] = {}
        if G in slots:
            view[G] = state.root  # FedSA-LoRA: the client's own B overlays it (kept in its store)
        if R in slots:
            view[R] = row if row is not None else state.extra["row"].get(cid, self.initial_row)
        if P in slots:
            view[P] = None  # the client's own personal LoRA (fresh from its seed the first time)
        return view

    def _keep(self) -> tuple[tuple[Tier, str], ...]:
        keep: list[tuple[Tier, str]] = []
        if P in self.method.slots:
            keep.append((P, "AB"))
        if self.method.rule == "A":
            keep.append((G, "B"))
        return tuple(keep)

    def configure_fit(self, state: ServerState, t: int, selected: Sequence[int], phase: Tier) -> dict[int, FitRequest]:
        cfg, method = self.config, self.method
        uploads = method.uploads(t)
        share_head = uploads and cfg.head_policy == "tier"
        head = state.global_head if cfg.head_policy == "tier" else self.initial_head
        upload = ("A" if method.rule == "A" else "AB") if uploads else ""
        return {cid: FitRequest(
            cid, t, self.upload_slot, self._view(state, cid), head, client_seed(cfg.seed, t, cid, method.name),
            client_seed(cfg.seed, 0, cid, "leaf"), own_head=not share_head, send_head=share_head,
            batch_size=cfg.batch_size, epochs=cfg.local_epochs, steps=cfg.local_steps,
            phases=tuple(method.phases(t)), upload=upload, keep=self._keep(), keep_head=not share_head,
            return_head=share_head, gates=method.gate_mode is not None, gate_init=self.initial_gates)
            for cid in selected}

    def download_bytes(self, state: ServerState, req: FitRequest) -> int:
        rule = self.method.rule
        down = 0
        if rule in ("fedavg", "product"):
            down += state_bytes(state.root)
        elif rule == "A":
            down += state_bytes(select_side(state.root, "A"))
        elif rule == "others":
            down += state_bytes(dict(req.view[R] or {}))
        if req.send_head:
            down += state_bytes(dict(req.head))
        return down

    def expected(self, state: ServerState, phase: Tier) -> Expected:
        if not self.method.uploads(state.round + 1):
            return Expected(None, None)
        shapes = expected_shapes(self.model, self.upload_slot)
        if self.method.rule == "A":
            shapes = {k: v for k, v in shapes.items() if k.endswith(".lora_A")}
        head = self.head_shapes if self.config.head_policy == "tier" else None
        return Expected(shapes, head, self.config.max_update_norm,
                        self.config.outlier_norm)

    @property
    def head_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.initial_head.items()}

    # ------------------------------------------------------------------ server
    def aggregate_fit(self, state: ServerState, t: int, phase: Tier, payloads: Mapping[int, Payload],
                      ok: Sequence[int]) -> float | None:
        if not self.method.uploads(t):
            return None
        ids = sorted(payloads)
        latest = state.extra["latest"]
        weights = {c: payloads[c].num_samples for c in ids}
        weights.update({c: w for c, w in state.extra.get("weights", {}).items() if c not in weights})
        state.root, state.extra["latest"], row = server_aggregate(
            self.method.rule, {c: payloads[c].factors for c in ids}, weights, state.root, latest,
            self.model.adapter_config.root.rank)
        state.extra["weights"] = {c: weights[c] for c in set(state.extra["latest"]) | set(ids)}
        if self.method.rule == "others":
            state.extra["row"] = row
        if self.config.head_policy == "tier":
            state.global_head = fedavg_states([payloads[c].head for c in ids],  # type: ignore[misc]
                                              [weights[c] for c in ids])
        return None

    def end_of_round(self, state: ServerState, t: int, rho: float | None, ctx: RoundContext) -> None:
        return None

    # ------------------------------------------------------------------ evaluation
    def _eval(self, state: ServerState, cid: int, view: Mapping[Tier, State | None] | None = None,
              gate_init: Mapping[str, Tensor] | None = None) -> EvalRequest:
        head = state.global_head if self.config.head_policy == "tier" else self.initial_head
        return EvalRequest(cid, tuple(self.method.eval_active), view or self._view(state, cid), head, own_head=True,
                           round=state.round + 1, gates=self.method.gate_mode is not None,
                           gate_init=gate_init or self.initial_gates)

    def configure_evaluate(self, state: ServerState) -> dict[int, EvalRequest]:
        return {cid: self._eval(state, cid) for cid in sorted(state.clients)}

    def _fusion(self, state: ServerState, cid: int, view: Mapping[Tier, State | None], seed_round: int,
                gate_init: Mapping[str, Tensor] | None = None) -> FitRequest:
        """FDLoRA's adaptive fusion: only the gates train on the client's data; the client keeps them."""
        cfg, method = self.config, self.method
        head = state.global_head if cfg.head_policy == "tier" else self.initial_head
        phase = Phase(method.eval_active, (), method.fusion_share, gates=True, head=False)
        return FitRequest(cid, seed_round, self.upload_slot, view, head, client_seed(cfg.seed, seed_round, cid,
                          method.name), client_seed(cfg.seed, 0, cid, "leaf"), own_head=True,
                          batch_size=cfg.batch_size, epochs=cfg.local_epochs, steps=cfg.local_steps, phases=(phase,),
                          upload="", return_head=False, gates=True, gate_init=gate_init or self.initial_gates)

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
            head = state.global_head if cfg.head_policy == "tier" else self.initial_head
            # the fine-tune starts from the gates every client trains with (FDLoRA: 0.5 / 0.5, not the zero-shot 1 / 0)
            fits = {c: FitRequest(c, -2, self.upload_slot, views[c], head, client_seed(cfg.seed, -2, c, method.name),
                                  client_seed(cfg.seed, 0, c, "leaf"), batch_size=cfg.batch_size,
                                  epochs=cfg.finetune_epochs, phases=phases, phase_epochs=True, upload="",
                                  keep=tuple((s, "AB") for s in trained), keep_head=True, return_head=False,
                                  gates=method.gate_mode is not None, gate_init=self.initial_gates) for c in ids}
            done = [c for c, r in ctx.fit(fits, "unseen finetune").items() if not isinstance(r, Exception)]
            if method.fusion_share > 0:
                ctx.fit({c: self._fusion(state, c, views[c], -2) for c in done}, "unseen fusion")
            tuned = {c: self._eval(state, c, views[c], gates) for c in done}
            accs["finetuned"] = list(ctx.scores(tuned, "unseen finetuned").values())
        return {k: accuracy_summary(v) for k, v in accs.items() if v}
