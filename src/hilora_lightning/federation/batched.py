"""The batched backend: a round's clients trained together, in one pass over the shared frozen backbone.

Sequential simulation runs one Lightning fit per client. Here the plans of a round that share a
structure (the same steps, budget and uploads; HiLoRA's stage plans and unseen fine-tunes do, and the
baselines', gated ones too) run as *one* pass: the clients' samples are concatenated in equal segments,
every tiered layer adds each client's own factors to its segment (:mod:`hilora_lightning.batched_lora`),
slots every client shares (the frozen root in the cluster stage) are merged into the base weight for the
pass, the heads are stacked, and the loss is the sum of the per-client mean losses (plus each client's
orthogonality penalty), so each client's gradient is exactly its own. One AdamW over the stacked
parameters equals per-client AdamWs (it is elementwise). Each client draws its batches from its own
seeded sampler as the sequential executor does, so the two agree up to float32 summation order.

Clients with different numbers of batches (epoch budgets over data sets of different sizes) share a
pass too: a short batch (an epoch's last) is padded with weight 0, a client whose batches have run out
leaves the pass, and its rows are put back to their state after its last batch (AdamW moves a parameter
on a zero gradient as well). Gated layers (FedALT's routers, FDLoRA's fusion weights) carry every
client's own gates, stacked. Gradient clipping (``gradient_clip_val``, by norm or value) clips each
client's own gradient.

What cannot batch runs one client at a time through the sequential executor, with a one-line notice
naming why (dropout, batch norm, Lightning callbacks or loggers, other Trainer options, an
overridden training step or loss). A client whose data raises fails alone: the pass
runs again without it. Precision and device come from the ``trainer_kwargs`` through Lightning Fabric.

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.data import digits_federation
    >>> from hilora_lightning.federation import FederatedOrchestrator, FederationConfig
    >>> from hilora_lightning.federation.batched import BatchedBackend
    >>> cfg = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_steps=2)
    >>> orch = FederatedOrchestrator(HiLoRAViT(), digits_federation(4), cfg, backend=BatchedBackend())
    >>> orch.run().summary()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from hilora_lightning.adapter_spec import AdapterSpec
from hilora_lightning.federation.backend import InProcessBackend
from hilora_lightning.federation.batched_pass import ClientDataError, Job, fit_pass, score_pass
from hilora_lightning.federation.local import LoaderSpec
from hilora_lightning.federation.plan import ClientStore, FitReply, LocalPlan, ScorePlan
from hilora_lightning.federation.runtime import ClientRuntime, resolve_head, resolve_slots
from hilora_lightning.model import HiLoRAViT

__all__ = ["BatchedBackend", "ClientDataError", "batch_refusal"]

log = logging.getLogger(__name__)

#: Trainer options the batched pass honours (through Fabric); any other means one client at a time.
_PASSED = {"precision", "accelerator", "devices", "enable_progress_bar", "enable_model_summary",
           "enable_checkpointing", "logger", "barebones", "gradient_clip_val", "gradient_clip_algorithm"}


def batch_refusal(model: HiLoRAViT, trainer_kwargs: Mapping[str, Any]) -> str | None:
    """Why this model and these Trainer options cannot run batched (``None``: they can)."""
    cls = type(model)
    for name in ("training_step", "compute_loss", "orthogonality_loss", "forward", "configure_optimizers",
                 "_shared_step"):
        if getattr(cls, name) is not getattr(HiLoRAViT, name):
            return f"{cls.__name__} overrides {name}"
    extra = sorted(k for k, v in trainer_kwargs.items() if k not in _PASSED and v not in (None, False, 0))
    if extra:
        return f"Trainer options {extra} need a Lightning fit per client"
    if trainer_kwargs.get("logger") not in (None, False):
        return "a logger in trainer_kwargs needs a Lightning fit per client"
    clip = trainer_kwargs.get("gradient_clip_val")
    if clip not in (None, 0, 0.0):
        if str(trainer_kwargs.get("gradient_clip_algorithm") or "norm") not in ("norm", "value"):
            return f"gradient_clip_algorithm={trainer_kwargs.get('gradient_clip_algorithm')!r}"
        if str(trainer_kwargs.get("precision", "32-true")).startswith("16"):
            return "gradient clipping under fp16 loss scaling"
    if str(trainer_kwargs.get("devices", 1)) not in ("1", "auto"):
        return "the batched pass runs on one device"
    for m in model.model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "batch norm would mix the clients' statistics"
        if isinstance(m, nn.Dropout) and m.p > 0:
            return "dropout draws differ from a client's own fit"
        if getattr(m, "drop_prob", 0.0):
            return "drop path draws differ from a client's own fit"
    if not isinstance(model.head, nn.Linear) or not hasattr(model.model, "forward_head"):
        return "the head is not one nn.Linear after timm's forward_head"
    return None


def _gated(model: HiLoRAViT) -> bool:
    return any(layer.tier_gate is not None for layer in model.state_layers().values())


def _plan_refusal(model: HiLoRAViT, plan: LocalPlan | ScorePlan, loader: LoaderSpec) -> str | None:
    if (plan.gates is None) == _gated(model):
        return "plans whose gates do not match the model's (gates on one side only)"
    if isinstance(plan, ScorePlan):
        return None
    if plan.budget.steps is None and loader.persistent_workers:
        return "epoch budgets with persistent loader workers (they draw another epoch order)"
    acfg = model.adapter_config
    if any(acfg.tier(t).dropout > 0 for s in plan.steps for t in s.active):
        return "LoRA dropout"
    return None


def _structure(plan: LocalPlan) -> tuple[Any, ...]:
    """What plans must share to run in one pass."""
    steps = tuple((s.active, s.train, s.head, s.gates, s.share, s.penalty) for s in plan.steps)
    return (plan.kind, steps, plan.budget, plan.upload, plan.keep, tuple(sorted(plan.slots)), plan.gates is None)


class BatchedBackend(InProcessBackend):
    """Runs the plans of a batch that share a structure in one pass (see the module docstring).

    Args:
        clients_per_pass: the most clients in one pass (a memory bound; ``None``: all of a group).
        notice: called once per reason with a one-line message when plans run one client at a time
            (default: the ``hilora_lightning`` logger at warning level).
        batch_eval: score plans batched too (each client's split with its own slots and head).
    """

    def __init__(self, clients_per_pass: int | None = None, notice: Callable[[str], None] | None = None,
                 batch_eval: bool = True) -> None:
        super().__init__()
        if clients_per_pass is not None and clients_per_pass < 1:
            raise ValueError(f"clients_per_pass must be >= 1 or None, got {clients_per_pass}")
        self.clients_per_pass, self.batch_eval = clients_per_pass, batch_eval
        self.notice = notice or log.warning
        self._said: set[str] = set()
        self._spec: AdapterSpec | None = None

    def bind(self, runtime: ClientRuntime, data: Any) -> None:
        super().bind(runtime, data)
        self._spec = AdapterSpec.from_model(runtime.model)

    def _say(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            self.notice(f"batched backend: {reason} run one client at a time")

    def _chunks(self, ids: Sequence[int]) -> Iterator[list[int]]:
        size = self.clients_per_pass or max(len(ids), 1)
        for i in range(0, len(ids), size):
            yield list(ids[i:i + size])

    # ------------------------------------------------------------------ fit
    def fit(self, requests: Mapping[int, LocalPlan]) -> dict[int, FitReply | Exception]:
        runtime = self._runtime()
        model_reason = batch_refusal(runtime.model, runtime.trainer_kwargs)
        groups: dict[tuple[Any, ...], list[int]] = {}
        alone: list[int] = []
        for cid, plan in requests.items():
            reason = model_reason or _plan_refusal(runtime.model, plan, runtime.loader)
            if reason is not None or len(requests) == 1:
                if reason is not None:
                    self._say(reason)
                alone.append(cid)
            else:
                groups.setdefault(_structure(plan), []).append(cid)
        before = {cid: self.store(cid) for cid in requests}
        out = super().fit({cid: requests[cid] for cid in alone}) if alone else {}  # one at a time, as in process
        self._before = before  # every client of the batch, for reject
        for ids in groups.values():
            for chunk in self._chunks(ids):
                for cid, result in self._fit_chunk({c: requests[c] for c in chunk}).items():
                    if isinstance(result, Exception):
                        out[cid] = result
                    else:
                        out[cid], self.stores[cid] = result
                self._progress(len(out))
        return {cid: out[cid] for cid in requests}

    def _progress(self, done: int) -> None:
        if self.on_client is not None:
            self.on_client(done)

    def _fit_chunk(self, plans: Mapping[int, LocalPlan]) -> dict[int, tuple[FitReply, ClientStore] | Exception]:
        out: dict[int, tuple[FitReply, ClientStore] | Exception] = {}
        pending = dict(plans)
        while pending:
            try:
                jobs = {c: self._job(p) for c, p in pending.items()}
            except ClientDataError as err:
                out[err.client_id] = err.cause
                pending.pop(err.client_id)
                continue
            if len(jobs) == 1:  # nothing to batch with: the sequential executor
                out.update(self._one_by_one(pending))
                break
            try:
                out.update(fit_pass(self._runtime(), list(jobs.values())))
                break
            except ClientDataError as err:  # that client fails alone; the others run again without it
                out[err.client_id] = err.cause
                pending.pop(err.client_id)
            except Exception as exc:  # not one client's data (a shape, a device): each client alone says whose
                self._say(f"a pass that raised ({type(exc).__name__}: {str(exc)[:120]}): its clients")
                out.update(self._one_by_one(pending))
                break
        return out

    def _one_by_one(self, plans: Mapping[int, LocalPlan]) -> dict[int, tuple[FitReply, ClientStore] | Exception]:
        out: dict[int, tuple[FitReply, ClientStore] | Exception] = {}
        for cid, plan in plans.items():
            try:
                out[cid] = self._runtime().fit(plan, self.data[cid], self.store(cid))
            except Exception as exc:
                out[cid] = exc
        return out

    def _job(self, plan: LocalPlan | ScorePlan) -> Job:
        """A client's resolved starting states (fresh slots made from the spec, as reset_tier makes them)."""
        assert self._spec is not None
        store = self.store(plan.client_id)
        try:
            resolved = resolve_slots(plan, store)
        except Exception as exc:
            raise ClientDataError(plan.client_id, exc) from exc
        slots = {t: dict(s) if s is not None else self._spec.fresh(t, int(plan.slots[t].seed))  # type: ignore[arg-type]
                 for t, s in resolved.items()}
        runtime = self._runtime()
        head = resolve_head(plan, store) or runtime.initial_head
        gates = dict(store.gates or plan.gates or runtime.initial_gates) if plan.gates is not None else None
        data = self.data[plan.client_id]
        return Job(plan, data, store, slots, dict(head), runtime.loader_for(data).collate(), gates)

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, requests: Mapping[int, ScorePlan]) -> dict[int, float | Exception]:
        runtime = self._runtime()
        reason = None if self.batch_eval else "unbatched evaluation"
        reason = reason or batch_refusal(runtime.model, {})
        groups: dict[tuple[Any, ...], list[int]] = {}
        alone: dict[int, ScorePlan] = {}
        for cid, plan in requests.items():
            why = reason or _plan_refusal(runtime.model, plan, runtime.loader)
            if why is not None or len(requests) == 1:
                alone[cid] = plan
            else:
                groups.setdefault((plan.active, plan.metric, plan.split, tuple(sorted(plan.slots))), []).append(cid)
        out: dict[int, float | Exception] = dict(super().evaluate(alone)) if alone else {}
        try:
            for ids in groups.values():
                for chunk in self._chunks(ids):
                    jobs: list[Job] = []
                    for cid in chunk:
                        try:
                            jobs.append(self._job(requests[cid]))
                        except ClientDataError as err:
                            out[cid] = err.cause
                    try:
                        out.update(score_pass(runtime, jobs))
                    except Exception as exc:  # each client alone says whose data it was
                        self._say(f"a scoring pass that raised ({type(exc).__name__}: {str(exc)[:120]}): its clients")
                        out.update(super().evaluate({j.plan.client_id: requests[j.plan.client_id] for j in jobs}))
        finally:
            runtime.release()
        return {cid: out[cid] for cid in requests}
