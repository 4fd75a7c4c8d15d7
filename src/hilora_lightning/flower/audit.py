"""A privacy audit of every Flower message a client node receives and sends.

:func:`audit_message` checks one message's content against what may travel: records a plan or reply
may hold, arrays only of the shared tiers' factor shapes or the head's, metrics only of the known
names, and no array equal to a tensor the client keeps to itself (its leaf, its personal head) — a
check on values, not names, since a leaf's keys are a root's. :func:`audit_mod` makes it a
``ClientApp`` mod: it audits the request and the reply of every message (``query``, ``train``,
``evaluate``) against the client's store in ``context.state`` after the call, and appends one JSON
line per message to ``<log_dir>/node-<partition>.jsonl``. Raw data can reach a message only through
an array, and every array must have a factor's or the head's shape.

Example:
    >>> import torch
    >>> from flwr.app import ConfigRecord, RecordDict
    >>> from hilora_lightning.federation.plan import ClientStore
    >>> from hilora_lightning.flower.codec import to_record
    >>> from hilora_lightning.tiers import Tier
    >>> leaf = {"m.lora_A": torch.randn(2, 3), "m.lora_B": torch.randn(4, 2)}
    >>> shapes = {k: [tuple(v.shape)] for k, v in leaf.items()}
    >>> leak = RecordDict({"factors": to_record(leaf), "metrics": ConfigRecord({"num_samples": 3})})
    >>> audit_message(leak, ClientStore(kept={Tier.LEAF: leaf}), shapes, {})
    ["factors/m.lora_A equals the client's own leaf/m.lora_A", "factors/m.lora_B equals the client's own leaf/m.lora_B"]
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, Message

from hilora_lightning.federation.plan import ClientStore
from hilora_lightning.tiers import Tier

__all__ = ["ALLOWED_METRICS", "ALLOWED_RECORDS", "audit_message", "audit_mod", "shared_shapes"]

#: the records a message may hold (plans: slots, head, gates, config; replies: factors, head, metrics, info)
ALLOWED_RECORDS = {"slot-root", "slot-cluster", "head", "gates", "config", "factors", "metrics", "info", "error"}
#: the numbers a reply's metrics may hold
ALLOWED_METRICS = {"num_samples", "score", "num_examples"}
_INFO = {"client_id", "num_samples", "num_test", "num_val", "group", "unseen"}


def _private(store: ClientStore) -> dict[str, np.ndarray]:
    """What the client keeps to itself: its leaf (and any kept slot), its personal head."""
    out: dict[str, np.ndarray] = {}
    for slot, state in store.kept.items():
        for key, value in state.items():
            out[f"{slot.value}/{key}"] = value.detach().float().cpu().numpy()
    for key, value in (store.head or {}).items():
        out[f"personal head/{key}"] = value.detach().float().cpu().numpy()
    return out


Shapes = Mapping[str, Collection[tuple[int, ...]]]


def audit_message(content: Any, store: ClientStore | Sequence[ClientStore], factor_shapes: Shapes,
                  head_shapes: Shapes) -> list[str]:
    """Every way ``content`` (a ``RecordDict``) breaks the rules (empty: nothing personal travels);
    ``store``: the node's client store, or each of its clients' (a node serving several: no client's
    private arrays may travel, in any client's part); ``factor_shapes`` / ``head_shapes``: each array
    name's allowed shapes."""
    problems: list[str] = []
    private: dict[str, np.ndarray] = {}
    stores = [store] if isinstance(store, ClientStore) else list(store)
    for i, one in enumerate(stores):
        private.update({k if len(stores) == 1 else f"{k} (store {i})": v for k, v in _private(one).items()})
    for key, record in content.items():
        head, sep, rest = key.partition("/")
        name = rest if sep and head.isdigit() else key  # "<client id>/<record>" of a node serving several
        if name not in ALLOWED_RECORDS:
            problems.append(f"record {name!r} may not travel (allowed: {sorted(ALLOWED_RECORDS)})")
            continue
        if isinstance(record, ArrayRecord):
            allowed = head_shapes if name in ("head", "gates") else factor_shapes
            for key, arr in record.items():
                value = np.asarray(arr.numpy())
                if name != "gates" and tuple(value.shape) not in {tuple(x) for x in allowed.get(key, ())}:
                    problems.append(f"{name}/{key} of shape {tuple(value.shape)} is not a shared "
                                    f"{'head' if name == 'head' else 'factor'} array")
                for pkey, pvalue in private.items():
                    if pvalue.shape == value.shape and pvalue.size and np.array_equal(pvalue, value):
                        problems.append(f"{name}/{key} equals the client's own {pkey}")
        elif name == "metrics":
            extra = sorted(set(record) - ALLOWED_METRICS)
            if extra:
                problems.append(f"metrics {extra} are not among {sorted(ALLOWED_METRICS)}")
        elif name == "info":
            extra = sorted(set(record) - _INFO)
            if extra:
                problems.append(f"info {extra} are not among {sorted(_INFO)}")
    return problems


def audit_mod(log_dir: str | Path, shapes: Callable[[Context], tuple[Shapes, Shapes]]) -> Any:
    """A ``ClientApp`` mod auditing every request and reply (see the module docstring).

    ``shapes(context)`` gives the shared factor shapes and the head's (the node's model).
    """
    from hilora_lightning.flower.messages import load_stores

    folder = Path(log_dir)

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        factor_shapes, head_shapes = shapes(context)
        stores = load_stores(context.state)
        entry: dict[str, Any] = {"type": msg.metadata.message_type, "problems": []}
        for direction, message in (("in", msg), ("out", reply)):
            if message.has_error():
                continue
            entry[direction] = sorted(message.content.keys())
            entry["problems"] += [f"{direction}: {p}" for p in
                                  audit_message(message.content, stores, factor_shapes, head_shapes)]
        entry["private_arrays"] = sum(len(_private(store)) for store in stores)
        folder.mkdir(parents=True, exist_ok=True)
        partition = context.node_config.get("partition-id", context.node_id)
        with (folder / f"node-{partition}.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        return reply

    return mod


def shared_shapes(spec: Any) -> tuple[dict[str, list[tuple[int, ...]]], dict[str, list[tuple[int, ...]]]]:
    """The allowed shapes of each factor of the shared tiers (root and cluster: the same keys, maybe
    other ranks) and of the head, of an :class:`~hilora_lightning.adapter_spec.AdapterSpec`."""
    factors: dict[str, list[tuple[int, ...]]] = {}
    for tier in (Tier.ROOT, Tier.CLUSTER):
        for key, shape in spec.shapes(tier).items():
            factors.setdefault(key, []).append(tuple(shape))
    return factors, {k: [tuple(v.shape)] for k, v in spec.head.items()}
