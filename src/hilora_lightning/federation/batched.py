"""The batched backend: a round's clients trained together, in one pass over the shared frozen backbone.

Sequential simulation runs one Lightning fit per client. Here the plans of a round that share a
structure (the same steps, budget and uploads; HiLoRA's stage plans do, and the baselines' without
gates) run as *one* pass: the clients' samples are concatenated in equal segments, every tiered layer
adds each client's own factors to its segment (:mod:`hilora_lightning.batched_lora`), slots every
client shares (the frozen root in the cluster stage) are merged into the base weight for the pass,
the heads are stacked, and the loss is the sum of the per-client mean losses (plus each client's
orthogonality penalty), so each client's gradient is exactly its own. One AdamW over the stacked
parameters equals per-client AdamWs (it is elementwise). Each client draws its batches from its own
seeded sampler as the sequential executor does, so the two agree up to float32 summation order.

What cannot batch runs one client at a time through the sequential executor, with a one-line notice
naming why (epoch budgets, gates, dropout, batch norm, Lightning callbacks or loggers, gradient
clipping, an overridden training step or loss). A client whose data raises fails alone: the pass
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

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset, default_collate

from hilora_lightning.adapter_spec import AdapterSpec
from hilora_lightning.batched_lora import StackedDelta, stacked_head
from hilora_lightning.data.clients import ClientData
from hilora_lightning.federation.backend import InProcessBackend
from hilora_lightning.federation.local import StepSampler
from hilora_lightning.federation.plan import ClientStore, FitReply, LocalPlan, ScorePlan
from hilora_lightning.federation.runtime import ClientRuntime, finish_plan, resolve_head, resolve_slots
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.orthogonality import effective_frozen, frozen_groups, grouped_penalty
from hilora_lightning.tiers import Tier

__all__ = ["BatchedBackend", "ClientDataError", "batch_refusal"]

log = logging.getLogger(__name__)

State = dict[str, Tensor]

#: Trainer options the batched pass honours (through Fabric); any other means one client at a time.
_PASSED = {"precision", "accelerator", "devices", "enable_progress_bar", "enable_model_summary",
           "enable_checkpointing", "logger", "barebones"}


class ClientDataError(RuntimeError):
    """A client's data raised inside a batched pass (the pass is run again without that client)."""

    def __init__(self, client_id: int, cause: Exception) -> None:
        super().__init__(f"client {client_id}: {type(cause).__name__}: {cause}")
        self.client_id, self.cause = client_id, cause


def batch_refusal(model: HiLoRAViT, trainer_kwargs: Mapping[str, Any]) -> str | None:
    """Why this model and these Trainer options cannot run batched (``None``: they can)."""
    cls = type(model)
    for name in ("training_step", "orthogonality_loss", "forward", "configure_optimizers", "_shared_step"):
        if getattr(cls, name) is not getattr(HiLoRAViT, name):
            return f"{cls.__name__} overrides {name}"
    extra = sorted(k for k, v in trainer_kwargs.items() if k not in _PASSED and v not in (None, False, 0))
    if extra:
        return f"Trainer options {extra} need a Lightning fit per client"
    if trainer_kwargs.get("logger") not in (None, False):
        return "a logger in trainer_kwargs needs a Lightning fit per client"
    if str(trainer_kwargs.get("devices", 1)) not in ("1", "auto"):
        return "the batched pass runs on one device"
    for m in model.model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return "batch norm would mix the clients' statistics"
        if isinstance(m, nn.Dropout) and m.p > 0:
            return "dropout draws differ from a client's own fit"
        if getattr(m, "drop_prob", 0.0):
            return "drop path draws differ from a client's own fit"
    if any(layer.tier_gate is not None for layer in model.state_layers().values()):
        return "gated layers"
    if not isinstance(model.head, nn.Linear) or not hasattr(model.model, "forward_head"):
        return "the head is not one nn.Linear after timm's forward_head"
    return None


def _plan_refusal(model: HiLoRAViT, plan: LocalPlan) -> str | None:
    if plan.gates is not None or any(s.gates for s in plan.steps):
        return "gated plans"
    if plan.budget.steps is None:
        return "epoch budgets (clients draw different numbers of batches)"
    acfg = model.adapter_config
    if any(acfg.tier(t).dropout > 0 for s in plan.steps for t in s.active):
        return "LoRA dropout"
    return None


def _structure(plan: LocalPlan) -> tuple[Any, ...]:
    """What plans must share to run in one pass."""
    steps = tuple((s.active, s.train, s.head, s.share, s.penalty) for s in plan.steps)
    return (plan.kind, steps, plan.budget, plan.upload, plan.keep, tuple(sorted(plan.slots)))


@dataclasses.dataclass
class _Job:
    plan: LocalPlan | ScorePlan
    data: ClientData
    store: ClientStore
    slots: dict[Tier, State] = dataclasses.field(default_factory=dict)
    head: State = dataclasses.field(default_factory=dict)


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
            reason = model_reason or _plan_refusal(runtime.model, plan)
            if reason is not None or len(requests) == 1:
                if reason is not None:
                    self._say(reason)
                alone.append(cid)
            else:
                groups.setdefault(_structure(plan), []).append(cid)
        self._before = {cid: self.store(cid) for cid in requests}
        out: dict[int, FitReply | Exception] = {}
        for cid in alone:
            try:
                out[cid], self.stores[cid] = runtime.fit(requests[cid], self.data[cid], self.store(cid))
            except Exception as exc:  # reported per client (its store unchanged)
                out[cid] = exc
            self._progress(len(out))
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
                out.update(_fit_pass(self._runtime(), list(jobs.values())))
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

    def _job(self, plan: LocalPlan | ScorePlan) -> _Job:
        """A client's resolved starting states (fresh slots made from the spec, as reset_tier makes them)."""
        assert self._spec is not None
        store = self.store(plan.client_id)
        try:
            resolved = resolve_slots(plan, store)
        except Exception as exc:
            raise ClientDataError(plan.client_id, exc) from exc
        slots = {t: dict(s) if s is not None else self._spec.fresh(t, int(plan.slots[t].seed))  # type: ignore[arg-type]
                 for t, s in resolved.items()}
        head = resolve_head(plan, store) or self._runtime().initial_head
        return _Job(plan, self.data[plan.client_id], store, slots, dict(head))

    # ------------------------------------------------------------------ evaluate
    def evaluate(self, requests: Mapping[int, ScorePlan]) -> dict[int, float | Exception]:
        runtime = self._runtime()
        reason = None if self.batch_eval else "unbatched evaluation"
        reason = reason or batch_refusal(runtime.model, {})
        groups: dict[tuple[Any, ...], list[int]] = {}
        alone: dict[int, ScorePlan] = {}
        for cid, plan in requests.items():
            why = reason or ("gated plans" if plan.gates is not None else None)
            if why is not None or len(requests) == 1:
                alone[cid] = plan
            else:
                groups.setdefault((plan.active, plan.metric, tuple(sorted(plan.slots))), []).append(cid)
        out: dict[int, float | Exception] = dict(super().evaluate(alone)) if alone else {}
        try:
            for ids in groups.values():
                for chunk in self._chunks(ids):
                    jobs: list[_Job] = []
                    for cid in chunk:
                        try:
                            jobs.append(self._job(requests[cid]))
                        except ClientDataError as err:
                            out[cid] = err.cause
                    try:
                        out.update(_score_pass(runtime, jobs))
                    except Exception as exc:  # each client alone says whose data it was
                        self._say(f"a scoring pass that raised ({type(exc).__name__}: {str(exc)[:120]}): its clients")
                        out.update(super().evaluate({j.plan.client_id: requests[j.plan.client_id] for j in jobs}))
        finally:
            runtime.release()
        return {cid: out[cid] for cid in requests}


# ---------------------------------------------------------------------- the passes
def _same(states: Sequence[State]) -> bool:
    first = states[0]
    return all(s is first or all(torch.equal(s[k], first[k]) for k in first) for s in states[1:])


class _Pass:
    """The model set up for one batched step: shared slots merged, per-client terms installed.

    ``stacked[slot][(path, "lora_A" | "lora_B")]`` holds every client's factor of one layer as one tensor
    (``C x segments x ...``; a parameter when the slot trains), used by the forward as it is.
    """

    def __init__(self, model: HiLoRAViT, jobs: Sequence[_Job], active: Sequence[Tier], train: Sequence[Tier],
                 device: torch.device) -> None:
        self.model, self.jobs, self.device = model, jobs, device
        self.layers = model.state_layers()
        model.set_tiers((), (), head=False)
        self.shared = [t for t in active if t not in train and _same([j.slots[t] for j in jobs])]
        self.active = tuple(active)
        self.stacked: dict[Tier, dict[tuple[str, str], Tensor]] = {}
        for t in active:
            if t in self.shared:
                continue
            self.stacked[t] = {}
            for path, layer in self.layers.items():
                for name in ("lora_A", "lora_B"):
                    v = torch.stack([torch.stack([j.slots[t][_key(path, seg, name)] for seg, _, _ in layer.segments])
                                     for j in jobs]).to(device)
                    self.stacked[t][(path, name)] = nn.Parameter(v) if t in train else v

    def __enter__(self) -> _Pass:
        from hilora_lightning.state import import_tier

        for t in self.shared:
            import_tier(self.model, t, self.jobs[0].slots[t])
        for path, layer in self.layers.items():
            if self.shared:
                layer.merge(self.shared)
            terms = [(self.stacked[t][(path, "lora_A")], self.stacked[t][(path, "lora_B")], layer.scaling[t])
                     for t in self.active if t in self.stacked]
            layer.batched = StackedDelta(len(self.jobs), terms)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers.values():
            layer.batched = None
            layer.unmerge()

    def states(self, t: Tier) -> list[State]:
        """Each client's state of slot ``t`` (CPU float32), keyed as ``export_tier`` keys it."""
        out: list[State] = [{} for _ in self.jobs]
        for path, layer in self.layers.items():
            for name in ("lora_A", "lora_B"):
                v = self.stacked[t][(path, name)].detach().to("cpu", torch.float32)
                for n in range(len(self.jobs)):
                    for s, (seg, _, _) in enumerate(layer.segments):
                        out[n][_key(path, seg, name)] = v[n, s].clone()
        return out


def _key(path: str, segment: str, factor: str) -> str:
    return ".".join(p for p in (path, segment, factor) if p)


def _batches(jobs: Sequence[_Job], seeds: Sequence[int], steps: int, batch_size: int
             ) -> Iterator[tuple[Tensor, Tensor]]:
    """Each client's batches exactly as its own fit draws them (its seeded sampler), concatenated per step."""
    orders = [list(StepSampler(len(j.data.train), steps * batch_size,  # type: ignore[arg-type]
                               torch.Generator().manual_seed(seed))) for j, seed in zip(jobs, seeds)]
    for k in range(steps):
        xs, ys = [], []
        for j, order in zip(jobs, orders):
            try:
                x, y = _collate(j.data.train, order[k * batch_size:(k + 1) * batch_size])
            except Exception as exc:
                raise ClientDataError(j.plan.client_id, exc) from exc
            xs.append(x)
            ys.append(y)
        yield torch.cat(xs), torch.cat(ys)


def _collate(data: Any, idx: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The batch a DataLoader makes of ``data[idx]`` (in-memory tensors indexed at once: the same rows)."""
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
        rows = torch.as_tensor(idx, dtype=torch.long)
        return data.tensors[0][rows], data.tensors[1][rows]
    x, y = default_collate([data[i] for i in idx])[:2]
    return x, y


def _fabric(trainer_kwargs: Mapping[str, Any]) -> Any:
    from lightning.fabric import Fabric

    return Fabric(accelerator=str(trainer_kwargs.get("accelerator", "cpu")), devices=1,
                  precision=trainer_kwargs.get("precision", "32-true"))


def _features(model: HiLoRAViT, x: Tensor) -> Tensor:
    backbone: Any = model.model
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)  # type: ignore[no-any-return]


def _fit_pass(runtime: ClientRuntime, jobs: list[_Job]) -> dict[int, tuple[FitReply, ClientStore] | Exception]:
    """Run the jobs' plans (one structure) together; return each client's reply and new store."""
    model, first = runtime.model, jobs[0].plan
    assert isinstance(first, LocalPlan) and first.budget.steps is not None
    budget_steps = first.budget.steps
    fabric = _fabric(runtime.trainer_kwargs)
    hp = model.hparams
    c = len(jobs)
    model.to(fabric.device)
    model.train()
    try:
        for i, step in enumerate(first.steps):
            steps = budget_steps if step.share is None else max(1, round(step.share * budget_steps))
            head_w = torch.stack([j.head["weight"] for j in jobs]).to(fabric.device)
            head_b = torch.stack([j.head["bias"] for j in jobs]).to(fabric.device) if "bias" in jobs[0].head else None
            with _Pass(model, jobs, step.active, step.train, fabric.device) as p:
                params = [v for t in step.train for v in p.stacked[t].values()]
                if step.head:
                    head_w = nn.Parameter(head_w)
                    head_b = nn.Parameter(head_b) if head_b is not None else None
                    params += [head_w] + ([head_b] if head_b is not None else [])
                if not params:
                    raise RuntimeError(f"nothing to train in step {i} of client {first.client_id}'s plan")
                opt = fabric.setup_optimizers(torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"]))
                penalty = _penalty_groups(model, p, step, c)
                seeds = [j.plan.steps[i].seed for j in jobs]  # type: ignore[union-attr]
                for x, y in _batches(jobs, seeds, steps, first.budget.batch_size):
                    x, y = x.to(fabric.device), y.to(fabric.device)
                    with fabric.autocast():
                        logits = stacked_head(_features(model, x).reshape(c, -1, head_w.shape[-1]), head_w, head_b)
                        per_sample = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y,
                                                     reduction="none")
                        loss = per_sample.reshape(c, -1).mean(1).sum()  # each client's mean: its own gradient
                        if penalty is not None:
                            loss = loss + _penalty(p, step, penalty, model)
                    opt.zero_grad(set_to_none=True)
                    fabric.backward(loss)
                    opt.step()
                for t in step.train:
                    for j, state in zip(jobs, p.states(t)):
                        j.slots[t] = state
            for n, j in enumerate(jobs):
                j.head = {"weight": head_w[n].detach().to("cpu", torch.float32).clone()}
                if head_b is not None:
                    j.head["bias"] = head_b[n].detach().to("cpu", torch.float32).clone()
    finally:
        model.cpu()
    out: dict[int, tuple[FitReply, ClientStore] | Exception] = {}
    for j in jobs:
        plan = j.plan
        assert isinstance(plan, LocalPlan)
        wanted = {slot for slot, _ in (*plan.keep, *([plan.upload] if plan.upload else []))}
        try:
            out[plan.client_id] = finish_plan(plan, j.data, j.store, {t: j.slots[t] for t in wanted}, j.head, None)
        except Exception as exc:  # a non-finite update fails that client alone
            out[plan.client_id] = exc
    return out


def _penalty_groups(model: HiLoRAViT, p: _Pass, step: Any, clients: int) -> Any:
    """The frozen side of each client's penalty, stacked over clients (``None``: no penalty)."""
    weights = [(t, g) for t, g in step.penalty if g != 0]
    if not weights or not step.train:
        return None
    hp = model.hparams
    side, form = hp["ortho_side"], hp.get("ortho_form", "raw")
    trained = step.train[-1]
    key = "lora_B" if side == "B" else "lora_A"
    pairs = []
    trainable = [p.stacked[trained][(path, key)] for path in p.layers]
    for t, gamma in weights:
        mats = []
        for path, layer in p.layers.items():
            if t in p.stacked:
                b, a = p.stacked[t][(path, "lora_B")], p.stacked[t][(path, "lora_A")]
            else:  # shared by every client: the same frozen factors for each
                b = torch.stack([layer.lora_B[t.value]] * clients)
                a = torch.stack([layer.lora_A[t.value]] * clients)
            mats.append(effective_frozen(b, a, layer.scaling[t], layer.scaling[trained], form, side))
        pairs.append((gamma, mats))
    return frozen_groups(trainable, pairs, side)


def _penalty(p: _Pass, step: Any, groups: Any, model: HiLoRAViT) -> Tensor:
    side = model.hparams["ortho_side"]
    key = "lora_B" if side == "B" else "lora_A"
    return grouped_penalty([p.stacked[step.train[-1]][(path, key)] for path in p.layers], groups, side)


@torch.no_grad()
def _score_pass(runtime: ClientRuntime, jobs: list[_Job], chunk: int = 256) -> dict[int, float | Exception]:
    """Each client's accuracy (or mean training loss) with its own slots and head, in shared passes."""
    if not jobs:
        return {}
    model, first = runtime.model, jobs[0].plan
    assert isinstance(first, ScorePlan)
    device = runtime.device
    model.to(device)
    was_training = model.training
    model.eval()
    c = len(jobs)
    splits = [j.data.train if first.metric == "loss" else j.data.test for j in jobs]
    sizes = [len(s) for s in splits]  # type: ignore[arg-type]
    hits = [0.0] * c
    head_w = torch.stack([j.head["weight"] for j in jobs]).to(device)
    head_b = torch.stack([j.head["bias"] for j in jobs]).to(device) if "bias" in jobs[0].head else None
    try:
        with _Pass(model, jobs, first.active, (), device):
            for start in range(0, max(sizes, default=0), chunk):
                width = min(chunk, max(sizes) - start)
                xs, ys, mask = [], [], []
                for split, n in zip(splits, sizes):
                    idx = [min(i, n - 1) for i in range(start, start + width)] if n else []
                    x, y = _collate(split, idx)
                    xs.append(x)
                    ys.append(y)
                    mask.append(torch.tensor([i < n for i in range(start, start + width)]))
                x, y, m = torch.cat(xs).to(device), torch.cat(ys).to(device), torch.stack(mask).to(device)
                logits = stacked_head(_features(model, x).reshape(c, width, -1), head_w, head_b)
                if first.metric == "loss":
                    value = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y,
                                            reduction="none").reshape(c, width)
                else:
                    value = (logits.argmax(-1) == y.reshape(c, width)).float()
                for n in range(c):
                    hits[n] += float((value[n] * m[n]).sum())
    finally:
        model.train(was_training)
    return {j.plan.client_id: hits[n] / max(sizes[n], 1) for n, j in enumerate(jobs)}

