"""Fit and evaluation requests as Flower messages, and back: the wire format of both Flower apps.

Tier states travel as ``ArrayRecord`` s (float32), everything else in one ``ConfigRecord``; frozen
tiers the client holds (``cached``) and a head it does not need are left out, and a leaf is sent
only when the server has one to give (an unseen client's fresh leaf), never taken back.

Example:
    >>> from hilora_lightning.federation.requests import FitRequest
    >>> from hilora_lightning.flower.messages import decode_fit, encode_fit
    >>> from hilora_lightning.tiers import Tier
    >>> req = FitRequest(3, 2, Tier.ROOT, {Tier.ROOT: {}}, {}, seed=1, leaf_seed=2, send_head=False)
    >>> decode_fit(encode_fit(req)) == req
    True
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import Tensor

from hilora_lightning.federation.requests import EvalRequest, FitRequest, Phase
from hilora_lightning.flower.codec import from_record, to_record
from hilora_lightning.tiers import Tier

__all__ = ["RecordStore", "decode_eval", "decode_fit", "encode_eval", "encode_fit"]


def _tiers(names: Any) -> tuple[Tier, ...]:
    return tuple(Tier.parse(str(t)) for t in (names or []))


def _encode_view(content: RecordDict, view: Mapping[Tier, Mapping[str, Tensor] | None], cached: tuple[Tier, ...]
                 ) -> list[str]:
    for tier, state in view.items():
        if state is not None and tier not in cached:
            content[f"view-{tier.value}"] = to_record(state)
    return [t.value for t in view]


def _decode_view(content: RecordDict, names: Any) -> dict[Tier, dict[str, Tensor] | None]:
    return {t: from_record(content[f"view-{t.value}"]) if f"view-{t.value}" in content else None
            for t in _tiers(names)}


def encode_fit(req: FitRequest) -> RecordDict:
    """The message content of a fit request (the tiers the client holds and an unneeded head left out)."""
    content = RecordDict()
    view = _encode_view(content, req.view, req.cached)
    if req.send_head and req.head:
        content["head"] = to_record(req.head)
    if req.gate_init is not None:
        content["gate-init"] = to_record(req.gate_init)
    phases = [[[t.value for t in p.active], [t.value for t in p.train], p.share, p.gates, p.head] for p in req.phases]
    content["config"] = ConfigRecord({
        "client_id": req.client_id, "round": req.round, "tier": req.tier.value, "view": view, "seed": req.seed,
        "leaf_seed": req.leaf_seed, "own_head": req.own_head, "cached": [t.value for t in req.cached],
        "final": [t.value for t in req.final], "send_head": req.send_head, "batch_size": req.batch_size,
        "epochs": req.epochs, "steps": -1 if req.steps is None else req.steps, "phases": json.dumps(phases),
        "phase_epochs": req.phase_epochs, "upload": req.upload,
        "keep": json.dumps([[t.value, side] for t, side in req.keep]), "keep_head": req.keep_head,
        "return_head": req.return_head, "gates": req.gates})
    return content


def decode_fit(content: RecordDict) -> FitRequest:
    """The fit request a message carries (raises ``ValueError``/``KeyError`` on a malformed one)."""
    c = content["config"]
    phases = tuple(Phase(_tiers(a), _tiers(t), float(s), bool(g), bool(h))
                   for a, t, s, g, h in json.loads(str(c["phases"])))
    steps = int(c["steps"])  # type: ignore[arg-type]
    return FitRequest(
        int(c["client_id"]), int(c["round"]), Tier.parse(str(c["tier"])),  # type: ignore[arg-type]
        _decode_view(content, c["view"]), from_record(content["head"]) if "head" in content else {},
        int(c["seed"]), int(c["leaf_seed"]), bool(c["own_head"]), _tiers(c["cached"]),  # type: ignore[arg-type]
        _tiers(c["final"]), bool(c["send_head"]), int(c["batch_size"]), int(c["epochs"]),  # type: ignore[arg-type]
        None if steps < 0 else steps, phases, bool(c["phase_epochs"]), str(c["upload"]),
        tuple((Tier.parse(t), str(side)) for t, side in json.loads(str(c["keep"]))), bool(c["keep_head"]),
        bool(c["return_head"]), bool(c["gates"]),
        from_record(content["gate-init"]) if "gate-init" in content else None)


def encode_eval(req: EvalRequest) -> RecordDict:
    """The message content of an evaluation request."""
    content = RecordDict()
    view = _encode_view(content, req.view, req.cached)
    if req.head:
        content["head"] = to_record(req.head)
    if req.gate_init is not None:
        content["gate-init"] = to_record(req.gate_init)
    content["config"] = ConfigRecord({
        "client_id": req.client_id, "tiers": [t.value for t in req.tiers], "view": view, "own_head": req.own_head,
        "cached": [t.value for t in req.cached], "round": req.round, "gates": req.gates, "metric": req.metric})
    return content


def decode_eval(content: RecordDict) -> EvalRequest:
    """The evaluation request a message carries."""
    c = content["config"]
    return EvalRequest(int(c["client_id"]), _tiers(c["tiers"]), _decode_view(content, c["view"]),  # type: ignore[arg-type]
                       from_record(content["head"]) if "head" in content else {}, bool(c["own_head"]),
                       _tiers(c["cached"]), int(c["round"]), bool(c["gates"]),  # type: ignore[arg-type]
                       from_record(content["gate-init"]) if "gate-init" in content else None, str(c["metric"]))


class RecordStore(MutableMapping[str, Any]):
    """A client store over a SuperNode's ``context.state``: tier states kept as ``ArrayRecord`` s."""

    def __init__(self, state: RecordDict) -> None:
        self.state = state

    def __getitem__(self, key: str) -> dict[str, Tensor]:
        record = self.state[f"store-{key}"]
        if not isinstance(record, ArrayRecord):
            raise KeyError(key)
        return from_record(record)

    def __setitem__(self, key: str, value: Mapping[str, Tensor]) -> None:
        self.state[f"store-{key}"] = to_record(value)

    def __delitem__(self, key: str) -> None:
        del self.state[f"store-{key}"]

    def __iter__(self) -> Iterator[str]:
        return (k[len("store-"):] for k in list(self.state.keys()) if k.startswith("store-"))

    def __len__(self) -> int:
        return sum(1 for _ in self)
