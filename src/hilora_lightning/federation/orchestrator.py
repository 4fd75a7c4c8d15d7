"""``FederatedOrchestrator``: a whole personalized HiLoRA federation in one process.

One frozen backbone (a :class:`HiLoRAViT`) is shared by every simulated client; a client is its
data plus a small :class:`ClientState`. Each round reads like Flower's ``Strategy.start``: select
clients, send each what its stage needs, run a Lightning ``Trainer.fit`` per client, validate and
aggregate the uploads per tier, move the stage on, evaluate, checkpoint atomically.

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.data import digits_federation
    >>> from hilora_lightning.federation import FederatedOrchestrator, FederationConfig
    >>> orch = FederatedOrchestrator(
    ...     HiLoRAViT(), digits_federation(4),
    ...     FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_steps=2),
    ...     progress=False)
    >>> result = orch.run()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hilora_lightning.errors import AdapterStateError, HiLoraError
from hilora_lightning.federation import evaluation, transition
from hilora_lightning.federation.backend import ClientBackend, FitRequest, InProcessBackend
from hilora_lightning.federation.checkpoint import (
    federation_state,
    load_checkpoint,
    restore_federation,
    save_checkpoint,
)
from hilora_lightning.federation.client import ClientData, ClientState, check_federation, select_clients, state_bytes
from hilora_lightning.federation.config import FederationConfig
from hilora_lightning.federation.local import client_seed, eval_device, head_state
from hilora_lightning.federation.result import FederatedResult, RoundRecord, accuracy_summary
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.state import expected_shapes, export_tier, validate_tier_state
from hilora_lightning.strategy.aggregation import fedavg_states, product_space_aggregate_states, relative_change
from hilora_lightning.tiers import Tier

__all__ = ["FederatedOrchestrator", "FederationError", "Payload", "require_min_clients"]

class FederationError(HiLoraError, RuntimeError):
    """A round could not complete (too few clients succeeded); the last good state is kept."""


def require_min_clients(t: int, ok: Sequence[int], selected: Sequence[int], min_clients: int,
                        failed: Mapping[int, str], note: str = "") -> None:
    """Fail round ``t`` (keeping the previous state) when fewer than ``min_clients`` clients succeeded."""
    if len(ok) < min_clients:
        raise FederationError(
            f"round {t}: only {len(ok)} of {len(selected)} clients succeeded, fewer than "
            f"min_clients={min_clients}; failures: {dict(failed)}. The state after round {t - 1} is kept{note}"
        )


@dataclasses.dataclass(frozen=True)
class Payload:
    """One client's upload: the trained shared tier's factors, maybe the head, and its sample count."""

    client_id: int
    round: int
    tier: Tier
    factors: dict[str, Tensor]
    head: dict[str, Tensor] | None
    num_samples: int

    @property
    def nbytes(self) -> int:
        return state_bytes(self.factors) + state_bytes(self.head)


class FederatedOrchestrator:
    """Drive Lightning Trainers as federated clients through HiLoRA's stage-wise schedule.

    Args:
        model: the shared :class:`HiLoRAViT` (frozen backbone; its tiers are overwritten per client).
        clients: the training clients.
        config: schedule, sampling, local training and clustering settings.
        unseen: held-out clients, evaluated at the end by probe routing (generalization table).
        trainer_kwargs: passed to every local ``lightning.pytorch.Trainer`` (``precision``,
            ``accelerator``, ``devices``, ``logger``, ``callbacks``, ...).
        checkpoint_path: where the federation state is written atomically after every round.
        upload_hook: called with every received :class:`Payload` before validation (inspection,
            logging, privacy noise); may raise to reject it.
        progress: print a line per round.
        backend: where client work runs (default :class:`~hilora_lightning.federation.backend.InProcessBackend`;
            the Flower ServerApp passes one that sends messages to ClientApps).
    """

    def __init__(
        self,
        model: HiLoRAViT,
        clients: Sequence[ClientData],
        config: FederationConfig,
        unseen: Sequence[ClientData] = (),
        trainer_kwargs: Mapping[str, Any] | None = None,
        checkpoint_path: str | Path | None = None,
        upload_hook: Callable[[Payload], None] | None = None,
        progress: bool = True,
        backend: ClientBackend | None = None,
    ) -> None:
        if not isinstance(model, HiLoRAViT):
            raise TypeError(f"model must be a HiLoRAViT, got {type(model).__name__}")
        check_federation(clients, unseen, config.min_clients)
        self.model = model.cpu()
        self.clients = {c.client_id: c for c in clients}
        self.unseen = {c.client_id: c for c in unseen}
        self.config = config
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.upload_hook = upload_hook
        self.progress = progress
        self.backend: ClientBackend = backend or InProcessBackend()
        self.eval_device = eval_device(self.trainer_kwargs)
        self._init_state()

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        cfg, model = self.config, self.model
        model.reset_tier(Tier.ROOT, cfg.seed)  # the shared-seed root: B = 0, A from the run's seed
        self.round = 0
        self.stage = Tier.ROOT
        self.rounds_in_stage = 0
        self.root = export_tier(model, Tier.ROOT)
        self.initial_root = dict(self.root)  # B = 0, shared-seed A: where every fresh adapter starts
        self.initial_head = head_state(model)
        self.global_head = dict(self.initial_head)
        self.clusters: dict[int, dict[str, Tensor]] = {}
        self.cluster_heads: dict[int, dict[str, Tensor]] = {}
        self.assignment: dict[int, int] = {}
        self.cluster_centers: dict[int, list[Tensor]] = {}  # per cluster, per matrix: the routing subspace
        self.num_clusters = 0
        self.clustering_ari: float | None = None
        self.last_clustering: tuple[list[int], Any] | None = None  # (client ids, ClusteringResult)
        self.client_states = {cid: ClientState() for cid in self.clients}
        self.records: list[RoundRecord] = []
        self.has_final: dict[Tier, set[int]] = {Tier.ROOT: set(), Tier.CLUSTER: set()}
        self.elapsed = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit for bit (tensors, numbers, strings, lists, dicts)."""
        return federation_state(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuses a checkpoint of a different run."""
        restore_federation(self, state)

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False, stop_after: int | None = None) -> FederatedResult:
        """Run (or, with ``resume``, continue from the checkpoint) until the round budget is spent.

        Args:
            resume: continue from ``checkpoint_path`` if a checkpoint exists there.
            stop_after: return after this many completed rounds in total (to split a run). A result
                returned before the budget is spent carries the records but not the final tables.
        """
        if resume:
            if self.checkpoint_path is None:
                raise ValueError("resume=True needs a checkpoint_path")
            if self.checkpoint_path.exists():
                self.load_state_dict(load_checkpoint(self.checkpoint_path))
        last = self.config.rounds if stop_after is None else min(self.config.rounds, stop_after)
        while self.round < last:
            start = time.perf_counter()
            record = self._run_round(self.round + 1)
            record.seconds = time.perf_counter() - start
            self.elapsed += record.seconds
            self.records.append(record)
            self.round += 1
            if self.checkpoint_path is not None:
                save_checkpoint(self.state_dict(), self.checkpoint_path)
            if self.progress:
                print(record.progress_line(self.config.rounds), flush=True)
        return self._result()

    def select_clients(self, round_idx: int) -> list[int]:
        """Seeded sampling of ``max(min_clients, ceil(fraction_fit * n))`` clients."""
        cfg = self.config
        return select_clients(list(self.clients), cfg.fraction_fit, cfg.min_clients, cfg.seed, round_idx)

    def _run_round(self, t: int) -> RoundRecord:
        stage = self.stage
        selected = self.select_clients(t)
        tiers = [stage]
        if self.config.schedule == "per_round" and stage is not Tier.ROOT:
            tiers = list(Tier)
        failed: dict[int, str] = {}
        up = down = 0
        rho: float | None = None
        for tier in tiers:
            payloads, pending, tier_failed, tier_down = self._train_tier(t, tier, selected)
            failed.update(tier_failed)
            ok = [cid for cid in selected if cid not in failed]
            require_min_clients(t, ok, selected, self.config.min_clients, tier_failed,
                                note=" (checkpoint untouched)")
            if tier is not Tier.LEAF:
                rho = self._aggregate(tier, {c: p for c, p in payloads.items() if c in ok})
            for cid in ok:
                pending[cid](self.client_states[cid])
            up += sum(p.nbytes for c, p in payloads.items() if c in ok)
            down += sum(tier_down.get(c, 0) for c in ok)
            if self.config.schedule == "stagewise":  # frozen tiers are cached on the client once received
                if tier is not Tier.ROOT:
                    self.has_final[Tier.ROOT].update(ok)
                if tier is Tier.LEAF:
                    self.has_final[Tier.CLUSTER].update(ok)
        succeeded = [cid for cid in selected if cid not in failed]
        for cid in succeeded:
            self.client_states[cid].rounds_trained += 1
        rho_kept = rho if rho is not None and math.isfinite(rho) else None  # JSON has no inf
        record = RoundRecord(t, stage.value, selected, succeeded, failed, rho_kept,
                             bytes_up_per_client=up / max(len(succeeded), 1),
                             bytes_down_per_client=down / max(len(succeeded), 1))
        self._advance_stage(rho)
        if t % self.config.eval_every == 0 or t == self.config.rounds:
            summary = accuracy_summary(list(self.evaluate_clients(self._eval_tiers()).values()))
            record.acc_mean, record.acc_p10, record.acc_min, record.acc_std = (
                summary["mean"], summary["p10"], summary["min"], summary["std"])
        return record

    # ------------------------------------------------------------------ one tier
    def _fit_request(self, cid: int, t: int, tier: Tier) -> FitRequest:
        """What client ``cid`` gets in round ``t`` at ``tier``: its tiers, head, seeds, and what it holds.

        A client keeps each frozen tier once received (stagewise schedule), and, in the leaf stage, its
        own head after its first leaf round: those are not sent again (nor counted as downloaded).
        """
        cfg, cs = self.config, self.client_states[cid]
        view: dict[Tier, Any] = {Tier.ROOT: self.root}
        if tier is not Tier.ROOT:
            view[Tier.CLUSTER] = self.clusters[self.assignment[cid]]
        if tier is Tier.LEAF:
            view[Tier.LEAF] = cs.leaf
        above = [x for x in (Tier.ROOT, Tier.CLUSTER) if x.position < tier.position]
        has_own_head = tier is Tier.LEAF and cid in self.has_final[Tier.CLUSTER]
        return FitRequest(cid, t, tier, view, self.head_for(cid, tier), client_seed(cfg.seed, t, cid),
                          client_seed(cfg.seed, 0, cid, "leaf"),
                          own_head=cfg.head_policy == "local" or tier is Tier.LEAF,
                          cached=tuple(x for x in above if cid in self.has_final[x]),
                          final=tuple(above) if cfg.schedule == "stagewise" else (),
                          send_head=cfg.head_policy == "tier" and not has_own_head)

    @staticmethod
    def _download_bytes(req: FitRequest) -> int:
        """Bytes a request moves to the client: the shared tiers it does not hold yet, and the head."""
        total = state_bytes(dict(req.head)) if req.send_head else 0
        for x in (Tier.ROOT, Tier.CLUSTER):
            state = req.view.get(x)
            if state is not None and x not in req.cached:
                total += state_bytes(dict(state))
        return total

    def head_for(self, cid: int, tier: Tier) -> dict[str, Tensor]:
        """The head client ``cid`` works with at ``tier`` (by the head policy)."""
        cs = self.client_states[cid]
        if self.config.head_policy == "local":
            return cs.head or self.initial_head
        if tier is Tier.ROOT:
            return self.global_head
        if tier is Tier.CLUSTER:
            return self.cluster_heads[self.assignment[cid]]
        return cs.head or self.cluster_heads[self.assignment[cid]]

    def _train_tier(self, t: int, tier: Tier, selected: list[int]) -> tuple[
        dict[int, Payload], dict[int, Callable[[ClientState], None]], dict[int, str], dict[int, int]
    ]:
        cfg, model = self.config, self.model
        payloads: dict[int, Payload] = {}
        pending: dict[int, Callable[[ClientState], None]] = {}
        failed: dict[int, str] = {}
        downloads: dict[int, int] = {}
        expected = expected_shapes(model, tier)
        requests: dict[int, FitRequest] = {}
        for cid in selected:
            try:
                requests[cid] = self._fit_request(cid, t, tier)
                downloads[cid] = self._download_bytes(requests[cid])
            except Exception as exc:
                failed[cid] = f"{type(exc).__name__}: {exc}"
        replies = self.backend.fit(self, requests)
        for cid in requests:
            reply = replies.get(cid, RuntimeError("no reply from the client"))
            try:
                if isinstance(reply, Exception):
                    raise reply
                factors, new_head = reply.factors, reply.head
                if tier is Tier.LEAF:  # leaf and personal head never leave the client; still reject divergence
                    if factors is not None:  # in-process: the server keeps the client's state for it
                        self._validate(Payload(cid, t, tier, factors, new_head, 0), expected, bound=False)
                    pending[cid] = self._keep_on_client(tier, factors, new_head, cid)
                    continue
                if factors is None:
                    raise AdapterStateError(f"the client replied without the trained {tier.value} factors")
                share_head = cfg.head_policy == "tier"
                if share_head and new_head is None:
                    raise AdapterStateError("the client replied without its head (head_policy='tier' shares it)")
                payload = Payload(cid, t, tier, factors, new_head if share_head else None,
                                  self.clients[cid].num_samples)
                if self.upload_hook is not None:
                    self.upload_hook(payload)
                self._validate(payload, expected)
                payloads[cid] = payload
                pending[cid] = self._keep_on_client(tier, factors, new_head, cid)
            except Exception as exc:  # a failing client is dropped and recorded, the round goes on
                failed[cid] = f"{type(exc).__name__}: {exc}"
                pending.pop(cid, None)
        return payloads, pending, failed, downloads

    def _keep_on_client(self, tier: Tier, factors: dict[str, Tensor] | None, head: dict[str, Tensor] | None,
                        cid: int) -> Callable[[ClientState], None]:
        """What the client keeps after a successful round, applied only once the round commits."""
        cfg = self.config
        rank = self.model.adapter_config.tier(tier).rank
        before = self.root if tier is Tier.ROOT else self.clusters.get(self.assignment.get(cid, -1))
        track = tier is Tier.ROOT or (tier is Tier.CLUSTER and cfg.clustering.recluster_every is not None)

        def commit(cs: ClientState) -> None:
            if tier is Tier.LEAF:
                cs.leaf, cs.head = factors, head
            elif cfg.head_policy == "local":
                cs.head = head
            # LSAC features: root stage, and cluster stage if re-clustering
            if track and before is not None and factors is not None:
                cs.features = transition.update_features(cs.features, factors, before, cfg.clustering, rank)

        return commit

    def should_recluster(self, round_idx: int) -> bool:
        """Whether to re-cluster after this cluster-stage round (override for another policy).

        Default: every ``clustering.recluster_every`` cluster-stage rounds, never if that is ``None``.
        """
        every = self.config.clustering.recluster_every
        return self.stage is Tier.CLUSTER and every is not None and self.rounds_in_stage % every == 0

    def _validate(self, payload: Payload, expected: Mapping[str, tuple[int, ...]], bound: bool = True) -> None:
        """Keys, shapes, dtypes, finiteness (and the norm bound) of factors and head, on receipt."""
        validate_tier_state(payload.factors, expected, self.config.max_update_norm if bound else None)
        if payload.head is not None:
            ref = self.initial_head
            if set(payload.head) != set(ref) or any(payload.head[k].shape != ref[k].shape for k in ref):
                got = [(k, tuple(v.shape)) for k, v in payload.head.items()]
                want = [(k, tuple(v.shape)) for k, v in ref.items()]
                raise AdapterStateError(f"head update has keys/shapes {got}, expected {want}")
            if not all(torch.isfinite(v).all() for v in payload.head.values()):
                raise AdapterStateError("head update holds NaN or Inf values")

    # ------------------------------------------------------------------ aggregation and stages
    def _aggregate_group(self, payloads: list[Payload], tier: Tier) -> dict[str, Tensor]:
        weights = [p.num_samples for p in payloads]
        states = [p.factors for p in payloads]
        if self.config.aggregation == "product":
            return product_space_aggregate_states(states, weights, self.model.adapter_config.tier(tier).rank)
        return fedavg_states(states, weights)

    def _aggregate(self, tier: Tier, payloads: Mapping[int, Payload]) -> float:
        share_head = self.config.head_policy == "tier"
        if tier is Tier.ROOT:
            new_root = self._aggregate_group(list(payloads.values()), tier)
            rho = relative_change(self.root, new_root)
            self.root = new_root
            if share_head:
                self.global_head = fedavg_states([p.head for p in payloads.values()],  # type: ignore[misc]
                                                 [p.num_samples for p in payloads.values()])
            return rho
        rhos = []
        for j in sorted(set(self.assignment[c] for c in payloads)):
            members = [p for c, p in payloads.items() if self.assignment[c] == j]
            new = self._aggregate_group(members, tier)
            rhos.append(relative_change(self.clusters[j], new))
            self.clusters[j] = new
            if share_head:
                self.cluster_heads[j] = fedavg_states([p.head for p in members],  # type: ignore[misc]
                                                      [p.num_samples for p in members])
        return float(np.mean(rhos)) if rhos else float("nan")

    def _advance_stage(self, rho: float | None) -> None:
        cfg = self.config
        self.rounds_in_stage += 1
        if self.stage is Tier.LEAF:
            return
        if self.should_recluster(self.round + 1):
            transition.recluster(self)
        lo, hi = cfg.root_rounds if self.stage is Tier.ROOT else cfg.cluster_rounds
        left = cfg.rounds - self.round - 1  # rounds after this one
        reserve = (cfg.cluster_rounds[0] + 1) if self.stage is Tier.ROOT else 1
        converged = rho is not None and math.isfinite(rho) and rho <= cfg.tau_rel
        if self.rounds_in_stage >= hi or left <= reserve or (self.rounds_in_stage >= lo and converged):
            if self.stage is Tier.ROOT:
                self.has_final[Tier.ROOT] = set()
                transition.form_clusters(self)
                self.stage = Tier.CLUSTER
            else:
                self.stage = Tier.LEAF
            self.rounds_in_stage = 0

    # ------------------------------------------------------------------ evaluation
    def _eval_tiers(self) -> list[Tier]:
        return list(Tier)[: self.stage.position + 1]

    def evaluate_clients(self, tiers: list[Tier], head_level: Tier | None = None) -> dict[int, float]:
        """Accuracy of every training client on its own test split with ``tiers`` active."""
        return evaluation.evaluate_clients(self, tiers, head_level)

    def _result(self) -> FederatedResult:
        return evaluation.build_result(self)
