"""What shapes a federation's result, as flat ``{key: text}`` items: stored in every checkpoint, compared on resume.

A resumed run must be the run that was interrupted: same federation and clustering settings,
same model and adapter settings, same backbone weights (by SHA-256), same trainer precision, same
client partition, same checkpoint format. Each differing key is reported with its old and new
value.

Example:
    >>> from hilora_lightning.federation.config import FederationConfig
    >>> from hilora_lightning.federation.fingerprint import config_items, differences
    >>> old, new = config_items(FederationConfig(rounds=19)), config_items(FederationConfig(rounds=20))
    >>> differences(old, new)
    ['federation.rounds: checkpoint 19, this run 20']
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from hilora_lightning.data.clients import ClientData

__all__ = ["LENGTHENING_KEYS", "client_items", "config_items", "differences", "lengthened", "model_items"]

#: keys whose growth only lengthens the schedule: a finished (or interrupted) run continues with more of them
LENGTHENING_KEYS = ("federation.rounds",)


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}", sub, out)
    else:
        out[prefix] = _text(value)


#: nested settings added after checkpoints existed: left out while at their defaults, so a run that does not
#: use them has the fingerprint it had before (and resumes an older checkpoint)
OPTIONAL_SECTIONS = ("robust", "privacy")


def config_items(config: Any, prefix: str = "federation") -> dict[str, str]:
    """Every field of a config dataclass (nested ones flattened), e.g. ``federation.clustering.k_max``;
    an :data:`OPTIONAL_SECTIONS` section at its defaults is left out."""
    data = dataclasses.asdict(config)
    for name in OPTIONAL_SECTIONS:
        value = getattr(config, name, None)
        if dataclasses.is_dataclass(value) and value == type(value)():  # type: ignore[misc]
            data.pop(name, None)
    out: dict[str, str] = {}
    _flatten(prefix, data, out)
    return out


def model_items(model: Any) -> dict[str, str]:
    """A :class:`~hilora_lightning.model.HiLoRAViT`'s hyper-parameters (adapter settings included) and
    the SHA-256 of its frozen weights."""
    out: dict[str, str] = {}
    _flatten("model", {k: v for k, v in dict(model.hparams).items() if k != "stage"}, out)  # stage: run state
    out["model.backbone_sha256"] = model.backbone_fingerprint()
    return out


def client_items(clients: Sequence[ClientData], unseen: Sequence[ClientData] = ()) -> dict[str, str]:
    """The partition: every client's id, training and test sizes, latent group and validation size (when it
    has a validation split: a client without one reads as before the split existed)."""
    def row(c: ClientData) -> list[Any]:
        base = [c.client_id, c.num_samples, len(c.test), c.group]  # type: ignore[arg-type]
        return base if c.val is None else [*base, len(c.val)]  # type: ignore[arg-type]

    def rows(cs: Sequence[ClientData]) -> list[list[Any]]:
        return [row(c) for c in sorted(cs, key=lambda c: c.client_id)]

    return {"data.clients": _text(rows(clients)), "data.unseen": _text(rows(unseen))}


def differences(saved: Mapping[str, str], current: Mapping[str, str], width: int = 80) -> list[str]:
    """``key: checkpoint OLD, this run NEW`` for every key whose value differs (or exists on one side only)."""
    def cut(v: str | None) -> str:
        v = "(absent)" if v is None else v
        return v if len(v) <= width else v[: width - 3] + "..."

    return [f"{k}: checkpoint {cut(saved.get(k))}, this run {cut(current.get(k))}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def lengthened(saved: Mapping[str, str], current: Mapping[str, str]) -> tuple[list[str], set[str]]:
    """Split the differences into changes that only lengthen the schedule and the rest.

    Returns ``(["federation.rounds: 5 -> 7"], {other differing keys})``: a key of
    :data:`LENGTHENING_KEYS` whose integer value grew is a lengthening; every other differing key
    (one of those keys that shrank included) is in the second value, to be refused.

    Example:
        >>> grew, rest = lengthened({"federation.rounds": "5", "seed": "0"}, {"federation.rounds": "7", "seed": "0"})
        >>> grew, rest
        (['federation.rounds: 5 -> 7'], set())
        >>> lengthened({"federation.rounds": "7"}, {"federation.rounds": "5"})[1]
        {'federation.rounds'}
    """
    grew: list[str] = []
    rest: set[str] = set()
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if key in LENGTHENING_KEYS and old is not None and new is not None:
            try:
                if int(json.loads(new)) > int(json.loads(old)):
                    grew.append(f"{key}: {old} -> {new}")
                    continue
            except (TypeError, ValueError):
                pass
        rest.add(key)
    return grew, rest
