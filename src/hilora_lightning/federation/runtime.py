"""The one executor: run a client's :class:`~hilora_lightning.federation.plan.LocalPlan` or
:class:`~hilora_lightning.federation.plan.ScorePlan` on the shared model over its store.

The same code serves the in-process backend (which keeps a :class:`ClientStore` per client) and the
Flower ClientApp (the store lives in the SuperNode's ``context.state``). The executor makes no
decision: it resolves each slot's start as the plan says, runs the plan's steps with Lightning, and
returns the reply and the client's new store. What stays on a client is in its store and in a
reply only if the plan uploads it.

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.data import digits_federation
    >>> from hilora_lightning.federation.plan import ClientStore, HeadStart, Kind, LocalPlan, Start, Step
    >>> from hilora_lightning.federation.runtime import ClientRuntime
    >>> from hilora_lightning.tiers import Tier
    >>> runtime, client = ClientRuntime(HiLoRAViT()), digits_federation(2)[0]
    >>> plan = LocalPlan(Kind.TRAIN, client.client_id, 1, {Tier.LEAF: Start.kept(seed=2)}, HeadStart(None, own=True),
    ...                  (Step((Tier.LEAF,), (Tier.LEAF,), seed=1),), keep=((Tier.LEAF, "AB"),), keep_head=True)
    >>> reply, store = runtime.fit(plan, client, ClientStore())  # doctest: +SKIP
    >>> reply.factors is None and sorted(store.to_dict())  # doctest: +SKIP
    ['head', 'leaf']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.data.clients import ClientData
from hilora_lightning.errors import AdapterStateError
from hilora_lightning.federation.client_logger import for_client
from hilora_lightning.federation.local import LoaderSpec, eval_device, evaluate, fit_current, head_state, load_view
from hilora_lightning.federation.plan import ClientStore, FitReply, LocalPlan, Origin, ScorePlan, State
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.state import export_tier
from hilora_lightning.strategy.aggregation import select_side
from hilora_lightning.tiers import Tier

__all__ = ["ClientRuntime", "finish_plan", "resolve_head", "resolve_slots", "side_of"]


def side_of(state: Mapping[str, Tensor], side: str) -> State:
    """``state`` itself (``"AB"``) or only its ``A`` / ``B`` factors."""
    return dict(state) if side == "AB" else select_side(state, side)


def _check_finite(state: Mapping[str, Tensor] | None, what: str, client_id: int) -> None:
    if state and not all(torch.isfinite(v).all() for v in state.values()):
        raise AdapterStateError(f"client {client_id}: the {what} holds NaN or Inf values after training; "
                                "update rejected")


class ClientRuntime:
    """Executes plans on one model for any client whose data and store it is handed.

    Args:
        model: the client-side :class:`HiLoRAViT` (frozen backbone; its slots are loaded per plan).
        trainer_kwargs: passed to every local ``lightning.pytorch.Trainer`` (``precision``,
            ``accelerator``, ``logger``...); ``callbacks`` may be a list (deep-copied per fit) or a
            factory returning a fresh list.
        loader: the DataLoader options of every client loader.
    """

    def __init__(self, model: HiLoRAViT, trainer_kwargs: Mapping[str, Any] | None = None,
                 loader: LoaderSpec | Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.loader = LoaderSpec.from_dict(loader)
        self.device = eval_device(self.trainer_kwargs)
        self.initial_head = head_state(model)
        self.initial_gates = model.gate_state()

    # ------------------------------------------------------------------ loading
    def _load(self, plan: LocalPlan | ScorePlan, store: ClientStore) -> None:
        states = resolve_slots(plan, store)
        for slot, state in states.items():
            if state is None:
                self.model.reset_tier(slot, int(plan.slots[slot].seed))  # type: ignore[arg-type]
        load_view(self.model, states, resolve_head(plan, store) or self.initial_head)
        if plan.gates is not None:
            self.model.load_gate_state(store.gates or plan.gates or self.initial_gates)

    # ------------------------------------------------------------------ plans
    def fit(self, plan: LocalPlan, data: ClientData, store: ClientStore) -> tuple[FitReply, ClientStore]:
        """Run one local plan; return the upload and the client's new store.

        The store is a value: the returned one holds what the plan keeps, and only after the update is
        complete and finite; a failing update raises and the client's store stays as it was.
        """
        model = self.model
        self._load(plan, store)
        trainer_kwargs = for_client(self.trainer_kwargs, plan.client_id, plan.round)  # client/<id>/ at the round
        for step in plan.steps:
            model.set_tiers(step.active, step.train, head=step.head, gates=step.gates, penalty=step.penalty)
            epochs, steps = plan.budget.of_step(step.share, data.num_samples)
            fit_current(model, data.train, step.seed, plan.budget.batch_size, epochs, steps, trainer_kwargs,
                        self.loader_for(data))
        gates = model.gate_state() if plan.gates is not None else None
        return finish_plan(plan, data, store, {slot: export_tier(model, slot) for slot in plan.outputs},
                           head_state(model), gates)

    def evaluate(self, plan: ScorePlan, data: ClientData, store: ClientStore) -> float:
        """Accuracy (or mean loss) on the plan's split of the client's data, with ``plan.active``."""
        self._load(plan, store)
        return evaluate(self.model, data.split(str(plan.split)), list(plan.active), device=self.device,
                        loader=self.loader_for(data), metric=plan.metric)

    def loader_for(self, data: ClientData) -> LoaderSpec:
        """The loader spec of ``data``'s loaders (its own ``collate_fn`` wins over the spec's)."""
        return self.loader.for_client(data.collate_fn)

    def release(self) -> None:
        """Move the model back to the CPU after a batch of evaluations (fits return it there themselves)."""
        if self.device.type != "cpu":
            self.model.cpu()


def resolve_slots(plan: LocalPlan | ScorePlan, store: ClientStore) -> dict[Tier, Mapping[str, Tensor] | None]:
    """Each slot's starting state as its :class:`Start` names it (``None``: fresh from ``start.seed``)."""
    out: dict[Tier, Mapping[str, Tensor] | None] = {}
    for slot, start in plan.slots.items():
        if start.origin is Origin.SERVER:
            state = start.state
        elif start.origin is Origin.FROZEN:
            state = store.frozen.get(slot, start.state)
            if state is None:
                raise RuntimeError(f"client {plan.client_id}: the server expects it to hold the frozen {slot.value} "
                                   "adapter, but it does not (the node restarted?)")
        elif start.origin is Origin.KEPT:
            state = store.kept.get(slot)
        else:
            state = None
        kept = store.kept.get(slot) if start.overlay else None
        out[slot] = {**state, **kept} if kept is not None and state is not None else state
    return out


def resolve_head(plan: LocalPlan | ScorePlan, store: ClientStore) -> Mapping[str, Tensor] | None:
    """The head a plan starts from: the client's own (if the plan says so and it has one), else the sent one;
    ``None``: the model's initial head."""
    own = store.head if plan.head.own else None
    return own if own is not None else plan.head.state


def finish_plan(plan: LocalPlan, data: ClientData, store: ClientStore, trained: Mapping[Tier, State],
                head: State, gates: State | None) -> tuple[FitReply, ClientStore]:
    """The reply and the new store of a finished plan, from the trained slot states it uploads or keeps
    (one rule for every executor): everything checked finite before the store changes."""
    kept = {slot: side_of(trained[slot], side) for slot, side in plan.keep}
    factors = side_of(trained[plan.upload[0]], plan.upload[1]) if plan.upload else None
    for what, state in (("update", factors), ("head", head), *((f"{s.value} state", v) for s, v in kept.items())):
        _check_finite(state, what, plan.client_id)
    frozen = {**store.frozen, **{slot: dict(s.state) for slot, s in plan.slots.items()  # type: ignore[arg-type]
                                 if s.freeze}}
    new = dataclasses.replace(store, kept={**store.kept, **kept}, frozen=frozen,
                              head=head if plan.keep_head else store.head,
                              gates=gates if plan.gates is not None else store.gates)
    return FitReply(factors, head if plan.return_head else None, data.num_samples), new
