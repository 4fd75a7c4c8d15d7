"""One batched pass: a structure's plans trained (or scored) together over the frozen backbone.

The orchestration of :mod:`hilora_lightning.batched_lora`'s math for the
:class:`~hilora_lightning.federation.batched.BatchedBackend`: each client's resolved starting states
(a :class:`Job`), the model set up for a step (shared frozen slots merged, per-client factors stacked
and installed on every tiered layer), each client's batches drawn by its own seeded sampler, one
AdamW over the stacked parameters, the per-client penalty, and the replies and new stores built by the
same rule as the sequential executor (:func:`~hilora_lightning.federation.runtime.finish_plan`).

Example:
    >>> from hilora_lightning.federation.batched_pass import ClientDataError
    >>> str(ClientDataError(3, OSError("disk on fire")))
    'client 3: OSError: disk on fire'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from hilora_lightning.batched_lora import StackedDelta, StackedGate, stacked_head
from hilora_lightning.data.clients import ClientData
from hilora_lightning.data.samples import XYCollate
from hilora_lightning.federation.local import batch_order
from hilora_lightning.federation.plan import ClientStore, FitReply, LocalPlan, ScorePlan
from hilora_lightning.federation.runtime import ClientRuntime, finish_plan
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.orthogonality import effective_frozen, frozen_groups, grouped_penalty
from hilora_lightning.state import _key
from hilora_lightning.tiers import Tier

__all__ = ["ClientDataError", "Job", "fit_pass", "score_pass"]

State = dict[str, Tensor]


class ClientDataError(RuntimeError):
    """A client's data raised inside a batched pass (the pass is run again without that client)."""

    def __init__(self, client_id: int, cause: Exception) -> None:
        super().__init__(f"client {client_id}: {type(cause).__name__}: {cause}")
        self.client_id, self.cause = client_id, cause


@dataclasses.dataclass
class Job:
    """One client's plan, data and store, with its resolved starting slot states and head."""

    plan: LocalPlan | ScorePlan
    data: ClientData
    store: ClientStore
    slots: dict[Tier, State] = dataclasses.field(default_factory=dict)
    head: State = dataclasses.field(default_factory=dict)
    collate: XYCollate = dataclasses.field(default_factory=XYCollate)
    gates: State | None = None


def _same(states: Sequence[State]) -> bool:
    first = states[0]
    return all(s is first or all(s[k] is first[k] or torch.equal(s[k], first[k]) for k in first) for s in states[1:])


class _Pass:
    """The model set up for one batched step: shared slots merged, per-client terms installed.

    ``stacked[slot][(path, "lora_A" | "lora_B")]`` holds every client's factor of one layer as one tensor
    (``C x segments x ...``; a parameter when the slot trains), used by the forward as it is; on a gated
    model ``gates[path]`` holds every client's gate of that layer (nothing is merged there: a gated
    layer weighs its slots per token).
    """

    def __init__(self, model: HiLoRAViT, jobs: Sequence[Job], active: Sequence[Tier], train: Sequence[Tier],
                 device: torch.device, train_gates: bool = False) -> None:
        self.model, self.jobs, self.device = model, jobs, device
        self.layers = model.state_layers()
        model.set_tiers((), (), head=False)
        self.gates = _stacked_gates(self.layers, jobs, device, train_gates)
        self.shared = [t for t in active if t not in train and not self.gates and _same([j.slots[t] for j in jobs])]
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

        try:
            for t in self.shared:
                import_tier(self.model, t, self.jobs[0].slots[t])
            for path, layer in self.layers.items():
                if self.shared:
                    layer.merge(self.shared)
                gated = layer.tier_gate.tiers if layer.tier_gate is not None else ()
                terms = [(self.stacked[t][(path, "lora_A")], self.stacked[t][(path, "lora_B")], layer.scaling[t],
                          gated.index(t) if t in gated else None) for t in self.active if t in self.stacked]
                gate = StackedGate(layer.tier_gate.mode, self.gates[path]) if layer.tier_gate is not None else None
                layer.batched = StackedDelta(len(self.jobs), terms, gate)
        except BaseException:  # a failed merge (non-finite shared slot): leave no layer merged or batched
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers.values():
            layer.batched = None
            layer.unmerge()

    def narrow(self, active: Sequence[int]) -> Tensor | None:
        """Run the next steps on the clients at positions ``active`` only (``None`` back: all of them)."""
        index = None if len(active) == len(self.jobs) else torch.tensor(active, device=self.device)
        for layer in self.layers.values():
            layer.batched.index = index
        return index

    def gate_params(self) -> list[Tensor]:
        """Every stacked gate tensor (the parameters a gates-training step optimizes)."""
        return [v for params in self.gates.values() for v in params.values()]

    def gate_states(self) -> list[State]:
        """Each client's gates (CPU float32), keyed as ``HiLoRAViT.gate_state`` keys them."""
        return [{f"{path}.tier_gate.{k}": v[n].detach().to("cpu", torch.float32).clone()
                 for path, params in self.gates.items() for k, v in params.items()} for n in range(len(self.jobs))]

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


def _stacked_gates(layers: Mapping[str, Any], jobs: Sequence[Job], device: torch.device, train: bool
                   ) -> dict[str, dict[str, Tensor]]:
    """Every gated layer's clients' gate tensors stacked (``{}``: the model has no gates)."""
    out: dict[str, dict[str, Tensor]] = {}
    for path, layer in layers.items():
        if layer.tier_gate is None:
            continue
        out[path] = {}
        for k in layer.tier_gate.state_dict():
            key = f"{path}.tier_gate.{k}"
            v = torch.stack([j.gates[key] for j in jobs]).to(device)  # type: ignore[index]
            out[path][k] = nn.Parameter(v) if train else v
    return out


def _stacked_heads(jobs: Sequence[Job], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Every client's head weight (``C x k x d``) and bias (``C x k``, ``None`` without one)."""
    weight = torch.stack([j.head["weight"] for j in jobs]).to(device)
    bias = torch.stack([j.head["bias"] for j in jobs]).to(device) if "bias" in jobs[0].head else None
    return weight, bias


def _schedules(jobs: Sequence[Job], i: int) -> list[list[list[int]]]:
    """Each client's index batches of step ``i``, exactly as its own fit draws them (its seeded loader)."""
    out = []
    for j in jobs:
        plan = j.plan
        assert isinstance(plan, LocalPlan)
        step, n = plan.steps[i], j.data.num_samples
        epochs, steps = plan.budget.of_step(step.share, n)
        out.append(batch_order(n, step.seed, plan.budget.batch_size, epochs, steps))
    return out


def _batches(jobs: Sequence[Job], schedules: Sequence[list[list[int]]]
             ) -> Iterator[tuple[list[int], Tensor, Tensor, Tensor | None]]:
    """Per pass step: the clients with a batch left (positions), their batches concatenated in equal
    segments, and the per-sample loss weights.

    A short batch (an epoch's last) is padded with its own first sample at weight 0; ``weights`` is
    ``None`` when every segment is a full batch (each client's mean is then a plain mean).
    """
    for k in range(max(len(s) for s in schedules)):
        active = [n for n, s in enumerate(schedules) if k < len(s)]
        width = max(len(schedules[n][k]) for n in active)
        xs, ys, sizes = [], [], []
        for n in active:
            idx, j = schedules[n][k], jobs[n]
            sizes.append(len(idx))
            try:
                x, y = _collate(j.data.train, idx + idx[:1] * (width - len(idx)), j.collate)
            except Exception as exc:
                raise ClientDataError(j.plan.client_id, exc) from exc
            xs.append(x)
            ys.append(y)
        weights = None
        if any(n != width for n in sizes):
            mask = torch.arange(width)[None, :] < torch.tensor(sizes)[:, None]
            weights = mask.float() / torch.tensor(sizes)[:, None].float()
        yield active, torch.cat(xs), torch.cat(ys), weights


def _collate(data: Any, idx: Sequence[int], collate: XYCollate) -> tuple[Tensor, Tensor]:
    """The batch a client DataLoader makes of ``data[idx]`` (in-memory tensors indexed at once: the same rows)."""
    if isinstance(data, TensorDataset) and len(data.tensors) >= 2 and collate.collate_fn is None:
        rows = torch.as_tensor(idx, dtype=torch.long)
        return data.tensors[0][rows], data.tensors[1][rows]
    return collate([data[i] for i in idx])


def _fabric(trainer_kwargs: Mapping[str, Any]) -> Any:
    from lightning.fabric import Fabric

    return Fabric(accelerator=str(trainer_kwargs.get("accelerator", "cpu")), devices=1,
                  precision=trainer_kwargs.get("precision", "32-true"))


def _features(model: HiLoRAViT, x: Tensor) -> Tensor:
    backbone: Any = model.model
    return backbone.forward_head(backbone.forward_features(x), pre_logits=True)  # type: ignore[no-any-return]


def fit_pass(runtime: ClientRuntime, jobs: list[Job]) -> dict[int, tuple[FitReply, ClientStore] | Exception]:
    """Run the jobs' plans (one structure) together; return each client's reply and new store."""
    model, first = runtime.model, jobs[0].plan
    assert isinstance(first, LocalPlan)
    fabric = _fabric(runtime.trainer_kwargs)
    clip = _clipping(runtime.trainer_kwargs)
    hp = model.hparams
    c = len(jobs)
    model.to(fabric.device)
    model.train()
    try:
        for i, step in enumerate(first.steps):
            head_w, head_b = _stacked_heads(jobs, fabric.device)
            schedules = _schedules(jobs, i)
            with _Pass(model, jobs, step.active, step.train, fabric.device, step.gates) as p:
                params = [v for t in step.train for v in p.stacked[t].values()]
                if step.gates:
                    params += p.gate_params()
                if step.head:
                    head_w = nn.Parameter(head_w)
                    head_b = nn.Parameter(head_b) if head_b is not None else None
                    params += [head_w] + ([head_b] if head_b is not None else [])
                if not params:
                    raise RuntimeError(f"nothing to train in step {i} of client {first.client_id}'s plan")
                opt = fabric.setup_optimizers(torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"]))
                penalty = _penalty_groups(model, p, step, c)
                finished = _Finished([len(sched) for sched in schedules])
                for k, (active, x, y, weights) in enumerate(_batches(jobs, schedules)):
                    x, y = x.to(fabric.device), y.to(fabric.device)
                    index = p.narrow(active)
                    w, b = (head_w, head_b) if index is None else (head_w[index], None if head_b is None else
                                                                    head_b[index])
                    with fabric.autocast():
                        logits = stacked_head(_features(model, x).reshape(len(active), -1, w.shape[-1]), w, b)
                        per_sample = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y,
                                                     reduction="none").reshape(len(active), -1)
                        if weights is None:  # each client's mean: its own gradient
                            loss = per_sample.mean(1).sum()
                        else:
                            loss = (per_sample * weights.to(per_sample.device)).sum()
                        if penalty is not None:
                            loss = loss + _penalty(p, step, penalty, model)
                    opt.zero_grad(set_to_none=True)
                    fabric.backward(loss)
                    if clip is not None:
                        _clip_per_client(params, c, *clip)
                    opt.step()
                    finished.record(k, params)
                finished.restore(params)
                for t in step.train:
                    for j, state in zip(jobs, p.states(t)):
                        j.slots[t] = state
                if step.gates:
                    for j, gates in zip(jobs, p.gate_states()):
                        j.gates = gates
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
        try:
            out[plan.client_id] = finish_plan(plan, j.data, j.store, {t: j.slots[t] for t in plan.outputs}, j.head,
                                              j.gates if plan.gates is not None else None)
        except Exception as exc:  # a non-finite update fails that client alone
            out[plan.client_id] = exc
    return out


class _Finished:
    """Each client's rows of the trained parameters as they were after its own last batch.

    A client whose batches ran out leaves the forward pass, but AdamW moves a parameter on a zero
    gradient too (momentum, decoupled decay; and its penalty still has one), so it would drift while
    the others go on: its rows are put back when the pass ends.
    """

    def __init__(self, batches: Sequence[int]) -> None:
        self.batches, self.last = list(batches), max(batches)
        self.rows: dict[int, list[Tensor]] = {}

    def record(self, k: int, params: Sequence[Tensor]) -> None:
        """After pass step ``k``: keep the rows of the clients whose last batch it was (not the longest)."""
        for n, count in enumerate(self.batches):
            if count == k + 1 < self.last:
                self.rows[n] = [q.detach()[n].clone() for q in params]

    @torch.no_grad()
    def restore(self, params: Sequence[Tensor]) -> None:
        """Put every finished client's rows back."""
        for n, rows in self.rows.items():
            for q, row in zip(params, rows):
                q[n].copy_(row)


def _clipping(trainer_kwargs: Mapping[str, Any]) -> tuple[float, str] | None:
    """Lightning's ``gradient_clip_val`` / ``gradient_clip_algorithm`` (``None``: no clipping)."""
    value = trainer_kwargs.get("gradient_clip_val")
    if value in (None, 0, 0.0):
        return None
    return float(value), str(trainer_kwargs.get("gradient_clip_algorithm") or "norm")


@torch.no_grad()
def _clip_per_client(params: Sequence[Tensor], clients: int, value: float, algorithm: str) -> None:
    """Clip each client's gradient as its own fit clips it: over its rows of every trained parameter
    (``"norm"``: ``torch.nn.utils.clip_grad_norm_``'s rule, ``"value"``: elementwise)."""
    grads = [q.grad for q in params if q.grad is not None]
    if algorithm == "value":
        for g in grads:
            g.clamp_(-value, value)
        return
    norms = torch.stack([g.reshape(clients, -1).float().norm(dim=1) for g in grads]).norm(dim=0)
    coef = (value / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).reshape(clients, *([1] * (g.dim() - 1))))


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
def score_pass(runtime: ClientRuntime, jobs: list[Job], chunk: int = 256) -> dict[int, float | Exception]:
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
    splits = [j.data.split(str(first.split)) for j in jobs]
    sizes = [len(s) for s in splits]  # type: ignore[arg-type]
    hits = [0.0] * c
    head_w, head_b = _stacked_heads(jobs, device)
    try:
        with _Pass(model, jobs, first.active, (), device):
            for start in range(0, max(sizes, default=0), chunk):
                width = min(chunk, max(sizes) - start)
                xs, ys, mask = [], [], []
                for split, n, job in zip(splits, sizes, jobs):
                    idx = [min(i, n - 1) for i in range(start, start + width)] if n else []
                    x, y = _collate(split, idx, job.collate)
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
