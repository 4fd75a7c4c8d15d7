"""Local plans as Flower messages, and back: the wire format of both Flower apps.

A plan travels as it is: slot states the server sends (``Origin.SERVER``) and the head and gates it
gives as ``ArrayRecord`` s (float32), everything else in one ``ConfigRecord``. A slot the client holds
(frozen, kept, or fresh from a seed) carries no state: the in-process copy a ``FROZEN`` start may hold
never leaves the server. The client store lives in ``context.state`` (:func:`load_store`,
:func:`save_store`).

Example:
    >>> from hilora_lightning.federation.plan import HeadStart, Kind, LocalPlan, Start, Step
    >>> from hilora_lightning.flower.messages import decode_plan, encode_plan
    >>> from hilora_lightning.tiers import Tier
    >>> plan = LocalPlan(Kind.TRAIN, 3, 2, {Tier.ROOT: Start.server({})}, HeadStart(None),
    ...                  (Step((Tier.ROOT,), (Tier.ROOT,), seed=1),), upload=(Tier.ROOT, "AB"))
    >>> decode_plan(encode_plan(plan)) == plan
    True
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from hilora_lightning.federation.plan import (
    Budget,
    ClientStore,
    HeadStart,
    Kind,
    LocalPlan,
    Origin,
    ScorePlan,
    Start,
    Step,
)
from hilora_lightning.flower.codec import from_record, to_record
from hilora_lightning.tiers import Tier

__all__ = ["decode_plan", "decode_plans", "encode_plan", "encode_plans", "load_store", "load_stores", "save_store",
           "split_records"]

_STORE = "store-"


def _tiers(names: Any) -> tuple[Tier, ...]:
    return tuple(Tier.parse(str(t)) for t in (names or []))


def _encode_common(content: RecordDict, plan: LocalPlan | ScorePlan) -> dict[str, Any]:
    slots = {}
    for slot, start in plan.slots.items():
        if start.sent is not None:
            content[f"slot-{slot.value}"] = to_record(start.sent)
        slots[slot.value] = [start.origin.value, -1 if start.seed is None else start.seed, start.overlay, start.freeze]
    if plan.head.state is not None:
        content["head"] = to_record(plan.head.state)
    if plan.gates is not None:
        content["gates"] = to_record(plan.gates)
    return {"kind": plan.kind.value, "client_id": plan.client_id, "round": plan.round, "slots": json.dumps(slots),
            "own_head": plan.head.own}


def _decode_common(content: RecordDict, c: Any) -> dict[str, Any]:
    slots: dict[Tier, Start] = {}
    for name, (origin, seed, overlay, freeze) in json.loads(str(c["slots"])).items():
        key = f"slot-{name}"
        state = from_record(content[key]) if key in content else None
        slots[Tier.parse(name)] = Start(Origin(origin), state, None if seed < 0 else int(seed), bool(overlay),
                                        bool(freeze))
    return {"client_id": int(c["client_id"]), "round": int(c["round"]), "slots": slots,
            "head": HeadStart(from_record(content["head"]) if "head" in content else None, bool(c["own_head"])),
            "gates": from_record(content["gates"]) if "gates" in content else None}


def encode_plan(plan: LocalPlan | ScorePlan) -> RecordDict:
    """The message content of a plan (only what travels: no state the client holds)."""
    content = RecordDict()
    config = _encode_common(content, plan)
    if isinstance(plan, ScorePlan):
        config.update(active=[t.value for t in plan.active], metric=plan.metric, split=str(plan.split))
    else:
        steps = [[[t.value for t in s.active], [t.value for t in s.train], s.seed, s.head, s.gates,
                  -1.0 if s.share is None else s.share, [[t.value, g] for t, g in s.penalty]] for s in plan.steps]
        b = plan.budget
        config.update(steps=json.dumps(steps), batch_size=b.batch_size, epochs=b.epochs,
                      budget_steps=-1 if b.steps is None else b.steps,
                      upload=json.dumps(None if plan.upload is None else [plan.upload[0].value, plan.upload[1]]),
                      keep=json.dumps([[t.value, side] for t, side in plan.keep]), keep_head=plan.keep_head,
                      return_head=plan.return_head)
    content["config"] = ConfigRecord(config)
    return content


def decode_plan(content: RecordDict) -> LocalPlan | ScorePlan:
    """The plan a message carries (raises ``ValueError``/``KeyError`` on a malformed one)."""
    c = content["config"]
    common = _decode_common(content, c)
    kind = Kind(str(c["kind"]))
    if kind is Kind.SCORE:
        return ScorePlan(active=_tiers(c["active"]), metric=str(c["metric"]), split=str(c.get("split", "test")),
                         **common)
    steps = tuple(Step(_tiers(a), _tiers(t), int(seed), bool(h), bool(g), None if share < 0 else float(share),
                       tuple((Tier.parse(x), float(gamma)) for x, gamma in pen))
                  for a, t, seed, h, g, share, pen in json.loads(str(c["steps"])))
    budget_steps = int(c["budget_steps"])  # type: ignore[arg-type]
    upload = json.loads(str(c["upload"]))
    return LocalPlan(kind, steps=steps,
                     budget=Budget(int(c["batch_size"]), int(c["epochs"]),  # type: ignore[arg-type]
                                   None if budget_steps < 0 else budget_steps),
                     upload=None if upload is None else (Tier.parse(upload[0]), str(upload[1])),
                     keep=tuple((Tier.parse(t), str(side)) for t, side in json.loads(str(c["keep"]))),
                     keep_head=bool(c["keep_head"]), return_head=bool(c["return_head"]), **common)


def encode_plans(plans: Mapping[int, LocalPlan | ScorePlan]) -> RecordDict:
    """Several clients' plans in one message, for a node that serves them all: each plan's records under
    ``"<client id>/"`` (:func:`decode_plans` reads both forms)."""
    content = RecordDict()
    for cid, plan in plans.items():
        for key, record in encode_plan(plan).items():
            content[f"{cid}/{key}"] = record
    return content


def split_records(content: RecordDict) -> dict[int, RecordDict]:
    """The per-client parts of a message for (or from) several clients (keys ``"<client id>/<record>"``).

    Example:
        >>> from flwr.app import ConfigRecord
        >>> parts = split_records(RecordDict({"3/metrics": ConfigRecord({"a": 1}), "5/metrics": ConfigRecord()}))
        >>> sorted(parts), list(parts[3].keys())
        ([3, 5], ['metrics'])
    """
    out: dict[int, RecordDict] = {}
    for key, record in content.items():
        prefix, sep, name = key.partition("/")
        if not sep or not prefix.isdigit():
            raise ValueError(f"a message for several clients holds only '<client id>/<record>' entries, got {key!r}")
        out.setdefault(int(prefix), RecordDict())[name] = record
    return out


def decode_plans(content: RecordDict) -> dict[int, LocalPlan | ScorePlan]:
    """The plans a message carries, by client: one (:func:`encode_plan`) or several (:func:`encode_plans`)."""
    if "config" in content:
        plan = decode_plan(content)
        return {plan.client_id: plan}
    plans = {cid: decode_plan(part) for cid, part in split_records(content).items()}
    for cid, plan in plans.items():
        if plan.client_id != cid:
            raise ValueError(f"the plan filed under client {cid} is for client {plan.client_id}")
    return plans


def _store_prefix(client_id: int | None) -> str:
    return _STORE if client_id is None else f"{_STORE}{client_id}/"


def load_store(state: RecordDict, client_id: int | None = None) -> ClientStore:
    """The client store kept in a SuperNode's ``context.state`` (``client_id``: one of a node's several
    clients; ``None``: the node's one client)."""
    prefix = _store_prefix(client_id)
    flat: dict[str, Mapping[str, Tensor]] = {}
    for key in list(state.keys()):
        name = key[len(prefix):]
        if key.startswith(prefix) and "/" not in name and isinstance(state[key], ArrayRecord):
            flat[name] = from_record(state[key])
    return ClientStore.from_dict(flat)


def load_stores(state: RecordDict) -> list[ClientStore]:
    """Every client store a node's ``context.state`` holds (its one client's, or each of its clients')."""
    ids = sorted({int(k[len(_STORE):].partition("/")[0]) for k in state.keys()
                  if k.startswith(_STORE) and "/" in k and k[len(_STORE):].partition("/")[0].isdigit()})
    return [load_store(state), *(load_store(state, cid) for cid in ids)]


def save_store(state: RecordDict, store: ClientStore, client_id: int | None = None) -> None:
    """Replace the client store in ``context.state`` by ``store`` (``client_id`` as in :func:`load_store`)."""
    prefix = _store_prefix(client_id)
    flat = store.to_dict()
    for key in [k for k in state.keys() if k.startswith(prefix) and "/" not in k[len(prefix):]
                and k[len(prefix):] not in flat]:
        del state[key]
    for key, value in flat.items():
        state[prefix + key] = to_record(value)
