"""``BaselineRunner``: one federated LoRA baseline in the same harness as the HiLoRA orchestrator.

Same clients, same client sampling per round (:func:`~hilora_lightning.federation.client.select_clients`),
same seeds, same local optimizer and Lightning Trainer per client update, same evaluation and the
same unseen-client protocol as :class:`~hilora_lightning.federation.FederatedOrchestrator`; only
the strategy (a :class:`~hilora_lightning.baselines.methods.Method`) differs. Failing clients are
dropped and recorded; a round with fewer than ``min_clients`` successes raises
:class:`~hilora_lightning.federation.FederationError` and leaves the state of the last round.

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.baselines import BaselineRunner, FedIT
    >>> from hilora_lightning.data import digits_federation
    >>> from hilora_lightning.federation import FederationConfig
    >>> runner = BaselineRunner(FedIT(rounds=2), HiLoRAViT(gamma_c=0, gamma_l=0), digits_federation(3),
    ...                         FederationConfig(rounds=2, root_rounds=(1, 1), cluster_rounds=(0, 0),
    ...                                          local_steps=2), progress=False)
    >>> result = runner.run()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.baselines.methods import Method, Phase, server_aggregate
from hilora_lightning.errors import AdapterStateError
from hilora_lightning.federation.client import ClientData, check_federation, select_clients, state_bytes
from hilora_lightning.federation.config import FederationConfig
from hilora_lightning.federation.local import (
    client_seed,
    eval_device,
    evaluate,
    fit_current,
    head_state,
    load_view,
)
from hilora_lightning.federation.orchestrator import Payload, require_min_clients
from hilora_lightning.federation.result import FederatedResult, RoundRecord, accuracy_summary
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.state import export_tier, validate_tier_state
from hilora_lightning.strategy.aggregation import fedavg_states, select_side
from hilora_lightning.tiers import Tier

__all__ = ["BaselineClient", "BaselineRunner"]

G, R, P = Tier.ROOT, Tier.CLUSTER, Tier.LEAF

State = dict[str, Tensor]


@dataclasses.dataclass
class BaselineClient:
    """What stays on a client between rounds: personal factors, local ``B`` (FedSA), head, gates."""

    personal: State | None = None
    local_b: State | None = None
    head: State | None = None
    gates: State | None = None


@dataclasses.dataclass
class _Update:
    """A client's round: what it uploads (``factors``, ``head``) and what it keeps on success."""

    factors: State | None
    head: State | None
    keep: BaselineClient
    num_samples: int


class BaselineRunner:
    """Run ``method`` over ``clients`` with the shared model and the run's :class:`FederationConfig`.

    Uses ``config.rounds``, sampling (``fraction_fit``, ``min_clients``), ``local_steps`` /
    ``local_epochs``, ``batch_size``, ``head_policy``, ``eval_every``, ``finetune_epochs`` and
    ``seed``; the stage and clustering fields are HiLoRA's and ignored. The orthogonality penalty is
    switched off on ``model`` (no baseline has one). ``upload_hook`` sees every upload as a
    :class:`~hilora_lightning.federation.Payload` (tier: the slot uploaded) and may raise to reject it.
    """

    def __init__(
        self,
        method: Method,
        model: HiLoRAViT,
        clients: Sequence[ClientData],
        config: FederationConfig,
        unseen: Sequence[ClientData] = (),
        trainer_kwargs: Mapping[str, Any] | None = None,
        upload_hook: Callable[[Payload], None] | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, HiLoRAViT):
            raise TypeError(f"model must be a HiLoRAViT, got {type(model).__name__}")
        check_federation(clients, unseen, config.min_clients)
        acfg = model.adapter_config
        if method.rule == "others" and acfg.cluster.rank != acfg.leaf.rank:
            raise ValueError(
                f"{method.name} keeps the rest-of-world LoRA (an average of individual LoRAs) in the cluster slot: "
                f"it needs cluster rank == leaf rank, got {acfg.cluster.rank} and {acfg.leaf.rank}"
            )
        self.method, self.model, self.config = method, model.cpu(), config
        self.clients = {c.client_id: c for c in clients}
        self.unseen = {c.client_id: c for c in unseen}
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.upload_hook = upload_hook
        self.progress = progress
        model.hparams["gamma_c"] = model.hparams["gamma_l"] = 0.0
        model.set_gates(method.gate_tiers if method.gate_mode else None, method.gate_mode or "input",
                        method.gate_init)
        model.reset_tier(G, config.seed)  # the shared-seed global LoRA: B = 0, A from the run's seed
        model.reset_tier(R, config.seed)
        self.global_state = export_tier(model, G)
        self.initial_row = export_tier(model, R)
        self.initial_head = head_state(model)
        self.initial_gates = model.gate_state()
        self.global_head = dict(self.initial_head)
        self.latest: dict[int, State] = {}  # FedALT: every client's last uploaded individual LoRA
        self.row: dict[int, State] = {}  # FedALT: each client's rest-of-world LoRA
        self.client_states = {cid: BaselineClient() for cid in self.clients}
        self.records: list[RoundRecord] = []
        self.round = 0
        self.elapsed = 0.0
        self.eval_device = eval_device(self.trainer_kwargs)

    # ------------------------------------------------------------------ the loop
    def run(self) -> FederatedResult:
        """Run every round, fuse (FDLoRA), evaluate the clients and the unseen clients."""
        while self.round < self.config.rounds:
            start = time.perf_counter()
            record = self._run_round(self.round + 1)
            record.seconds = time.perf_counter() - start
            self.elapsed += record.seconds
            self.records.append(record)
            self.round += 1
            if self.progress:
                print(record.progress_line(self.config.rounds), flush=True)
        start = time.perf_counter()
        if self.method.fusion_share > 0:
            for cid in sorted(self.clients):
                self._fuse(cid)
        final = self.evaluate_clients()
        generalization = self.evaluate_unseen() if self.unseen else {}
        self.elapsed += time.perf_counter() - start
        return FederatedResult(self.records, final, {"personalized": accuracy_summary(list(final.values()))}, {}, 0,
                               None, generalization, {}, self.elapsed)

    def _run_round(self, t: int) -> RoundRecord:
        cfg = self.config
        selected = select_clients(list(self.clients), cfg.fraction_fit, cfg.min_clients, cfg.seed, t)
        uploads = self.method.uploads(t)
        updates: dict[int, _Update] = {}
        failed: dict[int, str] = {}
        down: dict[int, int] = {}
        for cid in selected:
            try:
                down[cid] = self._load_client(cid, uploads)
                self._train(cid, self.method.phases(t), t)
                updates[cid] = self._collect(cid, uploads)
            except Exception as exc:  # a failing client is dropped and recorded, the round goes on
                failed[cid] = f"{type(exc).__name__}: {exc}"
        ok = [c for c in selected if c in updates]
        require_min_clients(t, ok, selected, cfg.min_clients, failed)
        if uploads:
            self._aggregate({c: updates[c] for c in ok})
        for cid in ok:
            self.client_states[cid] = updates[cid].keep
        up = sum(state_bytes(updates[c].factors) + state_bytes(updates[c].head) for c in ok)
        record = RoundRecord(t, "federated" if uploads else "local", selected, ok, failed, None,
                             bytes_up_per_client=up / len(ok),
                             bytes_down_per_client=sum(down[c] for c in ok) / len(ok))
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            s = accuracy_summary(list(self.evaluate_clients().values()))
            record.acc_mean, record.acc_p10, record.acc_min, record.acc_std = s["mean"], s["p10"], s["min"], s["std"]
        return record

    # ------------------------------------------------------------------ one client
    def _view(self, cid: int, row: State | None = None) -> dict[Tier, State]:
        """The slot states client ``cid`` starts from (``row`` overrides FedALT's rest-of-world)."""
        method, cs = self.method, self.client_states.get(cid, BaselineClient())
        view: dict[Tier, State] = {}
        if G in method.slots:
            view[G] = {**self.global_state, **(cs.local_b or {})} if method.rule == "A" else self.global_state
        if R in method.slots:
            view[R] = row if row is not None else self.row.get(cid, self.initial_row)
        if P in method.slots:
            if cs.personal is None:
                self.model.reset_tier(P, client_seed(self.config.seed, 0, cid, "leaf"))
                view[P] = export_tier(self.model, P)
            else:
                view[P] = cs.personal
        return view

    def _head(self, cid: int, uploads: bool) -> State:
        cs = self.client_states.get(cid, BaselineClient())
        if self.config.head_policy == "local":
            return cs.head or self.initial_head
        return self.global_head if uploads or cs.head is None else cs.head

    def _load_client(self, cid: int, uploads: bool) -> int:
        """Load the client's view, head and gates into the model; return the bytes it downloads."""
        view, head = self._view(cid), self._head(cid, uploads)
        load_view(self.model, view, head)
        self.model.load_gate_state(self.client_states[cid].gates or self.initial_gates)
        rule = self.method.rule
        down = 0
        if rule in ("fedavg", "product"):
            down += state_bytes(self.global_state)
        elif rule == "A":
            down += state_bytes(select_side(self.global_state, "A"))
        elif rule == "others":
            down += state_bytes(view[R])
        if uploads and self.config.head_policy == "tier":
            down += state_bytes(head)
        return down

    def _steps(self, data: ClientData) -> int:
        cfg = self.config
        return cfg.local_steps or cfg.local_epochs * math.ceil(data.num_samples / cfg.batch_size)

    def _train(self, cid: int, phases: Sequence[Phase], t: int, data: ClientData | None = None,
               epochs: int | None = None) -> None:
        """Run the phases; ``epochs`` (unseen fine-tuning) gives each phase that many epochs instead."""
        data = data or self.clients[cid]
        total = self._steps(data)
        for i, phase in enumerate(phases):
            self.model.set_tiers(phase.active, phase.train, head=phase.head, gates=phase.gates)
            seed = client_seed(self.config.seed, t, cid, f"{self.method.name}|{i}")
            steps = None if epochs is not None else max(1, round(phase.share * total))
            fit_current(self.model, data.train, seed, self.config.batch_size, epochs or 1, steps, self.trainer_kwargs)

    def _collect(self, cid: int, uploads: bool) -> _Update:
        """Split the trained model into the upload and what stays on the client (validated)."""
        method, model = self.method, self.model
        keep = BaselineClient(gates=model.gate_state() or None)
        shared_head = uploads and self.config.head_policy == "tier"
        head = head_state(model)
        keep.head = None if shared_head else head  # a shared head comes back as the average
        factors: State | None = None
        if P in method.slots:
            keep.personal = export_tier(model, P)
            _check_finite(keep.personal, "personal LoRA")
        if G in method.slots:
            trained = export_tier(model, G)
            if method.rule == "A":
                factors, keep.local_b = select_side(trained, "A"), select_side(trained, "B")
            else:
                factors = trained
        if method.rule == "others":
            factors = keep.personal
        if not uploads:
            factors = None
        _check_finite(head, "head")
        update = _Update(factors, head if shared_head else None, keep, self.clients[cid].num_samples)
        if factors is not None:
            if self.upload_hook is not None:
                slot = P if method.rule == "others" else G
                self.upload_hook(Payload(cid, self.round + 1, slot, factors, update.head, update.num_samples))
            validate_tier_state(factors, {k: tuple(v.shape) for k, v in factors.items()}, self.config.max_update_norm)
        return update

    # ------------------------------------------------------------------ server
    def _aggregate(self, updates: Mapping[int, _Update]) -> None:
        ids = sorted(updates)
        weights = {c: self.clients[c].num_samples for c in set(ids) | set(self.latest)}
        self.global_state, self.latest, row = server_aggregate(
            self.method.rule, {c: updates[c].factors or {} for c in ids}, weights, self.global_state, self.latest,
            self.model.adapter_config.root.rank)
        if self.method.rule == "others":
            self.row = row
        if self.config.head_policy == "tier":
            self.global_head = fedavg_states([updates[c].head for c in ids],  # type: ignore[misc]
                                             [weights[c] for c in ids])

    # ------------------------------------------------------------------ evaluation
    def evaluate_clients(self) -> dict[int, float]:
        """Personalized accuracy of every training client with the method's evaluation slots."""
        out: dict[int, float] = {}
        for cid, data in sorted(self.clients.items()):
            load_view(self.model, self._view(cid), self._head(cid, False))
            self.model.load_gate_state(self.client_states[cid].gates or self.initial_gates)
            out[cid] = evaluate(self.model, data.test, list(self.method.eval_active), device=self.eval_device)
        return out

    def _fuse(self, cid: int, data: ClientData | None = None) -> None:
        """FDLoRA's adaptive fusion: train only the gates on the client's data, keep them."""
        data = data or self.clients[cid]
        phase = Phase(self.method.eval_active, (), self.method.fusion_share, gates=True, head=False)
        if cid in self.clients:
            load_view(self.model, self._view(cid), self._head(cid, False))
            self.model.load_gate_state(self.client_states[cid].gates or self.initial_gates)
        self._train(cid, [phase], -3, data)
        if cid in self.client_states:
            self.client_states[cid].gates = self.model.gate_state()

    def newcomer_row(self) -> State:
        """FedALT's rest-of-world for a new client: the mean of every client's latest individual LoRA."""
        if not self.latest:
            return self.initial_row
        return fedavg_states(list(self.latest.values()), [self.clients[c].num_samples for c in self.latest])

    def unseen_start(self, cid: int, row: State | None = None) -> tuple[dict[Tier, State], State, State]:
        """What new client ``cid`` starts from: slots (a fresh personal part from its seed), head and gates.

        ``row`` is FedALT's rest-of-world LoRA for newcomers (default: :meth:`newcomer_row`).
        """
        method = self.method
        view = self._view(cid, row=self.newcomer_row() if row is None else row)
        head = self.global_head if self.config.head_policy == "tier" else self.initial_head
        gates = dict(self.initial_gates)
        if method.zero_shot_gate is not None:
            w = torch.tensor(method.zero_shot_gate, dtype=torch.float32)
            gates = {k: (w.clone() if k.endswith(".weights") else v) for k, v in gates.items()}
        return view, head, gates

    def evaluate_unseen(self) -> dict[str, dict[str, float]]:
        """Unseen clients: accuracy as they arrive (``zero_leaf``) and after ``finetune_epochs`` of
        fine-tuning their personal part (``finetuned``)."""
        accs: dict[str, list[float]] = {"zero_leaf": [], "finetuned": []}
        tiers = list(self.method.eval_active)
        row = self.newcomer_row()
        for cid, data in sorted(self.unseen.items()):
            view, head, gates = self.unseen_start(cid, row)
            load_view(self.model, view, head)
            self.model.load_gate_state(gates)
            accs["zero_leaf"].append(evaluate(self.model, data.test, tiers, device=self.eval_device))
            if self.config.finetune_epochs > 0:
                self._train(cid, self.method.unseen_phases(), -2, data, epochs=self.config.finetune_epochs)
                if self.method.fusion_share > 0:
                    self._fuse(cid, data)
                accs["finetuned"].append(evaluate(self.model, data.test, tiers, device=self.eval_device))
        return {k: accuracy_summary(v) for k, v in accs.items() if v}


def _check_finite(state: Mapping[str, Tensor], what: str) -> None:
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise AdapterStateError(f"the client's {what} holds NaN or Inf values after training; update rejected")
