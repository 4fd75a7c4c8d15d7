"""The one client runtime: fit, evaluate, probe and fine-tune a client over a store of what stays on it.

The same code serves the in-process backend (the store is a dict per client, kept by the backend)
and the Flower ClientApp (the store is the SuperNode's ``context.state``). What stays on a client
lives only in its store and never in a reply unless the request asks for it:

* ``"leaf"``: the leaf (personal) factors,
* ``"head"``: the personal head,
* ``"gates"``: the client's gates (baselines with a router or fusion weights),
* ``"keep-root"`` / ``"keep-cluster"``: a kept part of a shared slot (FedSA-LoRA's local ``B``),
* ``"frozen-root"`` / ``"frozen-cluster"``: frozen tiers received once and not sent again.

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.data import digits_federation
    >>> from hilora_lightning.federation.requests import FitRequest
    >>> from hilora_lightning.federation.runtime import ClientRuntime
    >>> from hilora_lightning.tiers import Tier
    >>> runtime, store = ClientRuntime(HiLoRAViT()), {}
    >>> client = digits_federation(2)[0]
    >>> req = FitRequest(client.client_id, 1, Tier.LEAF, {}, {}, seed=1, leaf_seed=2, steps=1,
    ...                  upload="", keep=((Tier.LEAF, "AB"),), keep_head=True, return_head=False)
    >>> reply = runtime.fit(req, client, store)  # doctest: +SKIP
    >>> reply.factors is None and sorted(store)  # doctest: +SKIP
    ['head', 'leaf']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.data.clients import ClientData
from hilora_lightning.errors import AdapterStateError
from hilora_lightning.federation.local import (
    LoaderSpec,
    client_seed,
    eval_device,
    evaluate,
    fit_client,
    fit_current,
    head_state,
    load_view,
)
from hilora_lightning.federation.requests import EvalRequest, FitReply, FitRequest, State
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.state import export_tier
from hilora_lightning.strategy.aggregation import select_side
from hilora_lightning.tiers import Tier

__all__ = ["ClientRuntime", "Store", "side_of"]

Store = MutableMapping[str, Any]

_SHARED = (Tier.ROOT, Tier.CLUSTER)


def side_of(state: Mapping[str, Tensor], side: str) -> State:
    """``state`` itself (``"AB"``) or only its ``A`` / ``B`` factors."""
    return dict(state) if side == "AB" else select_side(state, side)


def _check_finite(state: Mapping[str, Tensor] | None, what: str, client_id: int) -> None:
    if state and not all(torch.isfinite(v).all() for v in state.values()):
        raise AdapterStateError(f"client {client_id}: the {what} holds NaN or Inf values after training; "
                                "update rejected")


class ClientRuntime:
    """Executes requests on one model for any client whose data and store it is handed.

    Args:
        model: the client-side :class:`HiLoRAViT` (frozen backbone; its slots are loaded per request).
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
    def _view(self, client_id: int, view: Mapping[Tier, Mapping[str, Tensor] | None], cached: tuple[Tier, ...],
              final: tuple[Tier, ...], store: Store) -> dict[Tier, Mapping[str, Tensor] | None]:
        """The slot states to load: the server's, or the frozen copies the client keeps; kept parts on top."""
        out: dict[Tier, Mapping[str, Tensor] | None] = {}
        for tier in _SHARED:
            key = f"frozen-{tier.value}"
            if tier in cached and view.get(tier) is None:
                if key not in store:
                    raise RuntimeError(f"client {client_id}: the server expects it to hold the frozen {tier.value} "
                                       "adapter, but it does not (the node restarted?)")
                out[tier] = store[key]
            elif view.get(tier) is not None:
                out[tier] = view[tier]
                if tier in final:  # frozen from now on: keep it, the server will not send it again
                    store[key] = view[tier]
            kept = store.get(f"keep-{tier.value}")
            if kept is not None and out.get(tier) is not None:
                out[tier] = {**out[tier], **kept}  # type: ignore[dict-item]
        if Tier.LEAF in view:
            out[Tier.LEAF] = view[Tier.LEAF] if view[Tier.LEAF] is not None else store.get("leaf")
        return out

    def _load(self, req: FitRequest | EvalRequest, store: Store, slots: tuple[Tier, ...], leaf_seed: int) -> None:
        final = req.final if isinstance(req, FitRequest) else ()
        view = self._view(req.client_id, req.view, req.cached, final, store)
        if Tier.LEAF in slots and view.get(Tier.LEAF) is None:
            self.model.reset_tier(Tier.LEAF, leaf_seed)  # no leaf yet: a fresh one (B = 0: a no-op)
            view.pop(Tier.LEAF, None)
        head = store["head"] if req.own_head and "head" in store else (req.head or self.initial_head)
        load_view(self.model, view, head)
        if req.gates:
            self.model.load_gate_state(store.get("gates") or req.gate_init or self.initial_gates)

    # ------------------------------------------------------------------ requests
    def fit(self, req: FitRequest, data: ClientData, store: Store) -> FitReply:
        """Run one local update; keep what stays on the client in ``store``; return the upload.

        The store changes only after the update is complete and finite: a failing update leaves it as it was.
        """
        model = self.model
        # the slots this update uses: a phase's active slots, or HiLoRA's stage tier (a fresh leaf if it has none)
        slots = tuple({s for p in req.phases for s in p.active}) if req.phases else (req.tier,)
        self._load(req, store, slots, req.leaf_seed)
        if not req.phases:
            fit_client(model, data.train, req.tier, req.seed, req.batch_size, req.epochs, req.steps,
                       self.trainer_kwargs, self.loader)
        else:
            total = req.steps or req.epochs * math.ceil(data.num_samples / req.batch_size)
            for i, phase in enumerate(req.phases):
                model.set_tiers(phase.active, phase.train, head=phase.head, gates=phase.gates)
                steps = None if req.phase_epochs else max(1, round(phase.share * total))
                fit_current(model, data.train, client_seed(req.seed, i, req.client_id, "phase"), req.batch_size,
                            req.epochs if req.phase_epochs else 1, steps, self.trainer_kwargs, self.loader)
        trained = export_tier(model, req.tier)
        head = head_state(model)
        kept = {slot: side_of(trained if slot is req.tier else export_tier(model, slot), side)
                for slot, side in req.keep}
        factors = side_of(trained, req.upload) if req.upload else None
        for what, state in (("update", factors), ("head", head), *((f"{s.value} state", v) for s, v in kept.items())):
            _check_finite(state, what, req.client_id)
        for slot, state in kept.items():  # every check passed: now the client's store changes
            store["leaf" if slot is Tier.LEAF else f"keep-{slot.value}"] = state
        if req.keep_head:
            store["head"] = head
        if req.gates:
            store["gates"] = model.gate_state()
        return FitReply(factors, head if req.return_head else None, data.num_samples)

    def evaluate(self, req: EvalRequest, data: ClientData, store: Store) -> float:
        """Accuracy on the client's test split (or mean loss on its training split) with ``req.tiers`` active."""
        self._load(req, store, req.tiers, leaf_seed=0)
        split = data.train if req.metric == "loss" else data.test
        return evaluate(self.model, split, list(req.tiers), device=self.device, loader=self.loader,
                        metric=req.metric)

    def release(self) -> None:
        """Move the model back to the CPU after a batch of evaluations (fits return it there themselves)."""
        if self.device.type != "cpu":
            self.model.cpu()
