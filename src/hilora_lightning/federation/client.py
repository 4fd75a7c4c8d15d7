"""What a simulated client is: its data, and the state that stays on it between rounds.

A client is *not* a model copy: one frozen backbone serves every client, whose tiers and head are
loaded into it for each request. Its leaf and personal head stay in its store (see
:mod:`hilora_lightning.federation.runtime`); the server keeps only its LSAC features and counters.

Example:
    >>> from hilora_lightning.federation.client import client_seed, select_clients
    >>> picked = select_clients([5, 3, 9, 7], fraction=0.5, min_clients=1, seed=0, round_idx=1)
    >>> len(picked), picked == select_clients([7, 9, 3, 5], 0.5, 1, seed=0, round_idx=1)
    (2, True)
    >>> client_seed(0, 1, 3) == client_seed(0, 1, 3) != client_seed(0, 2, 3)
    True
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from hilora_lightning.data.clients import ClientData, as_federation, split_unseen  # the data types live in data/
from hilora_lightning.federation.server_state import ClientState

__all__ = ["ClientData", "ClientState", "check_federation", "client_seed", "select_clients", "split_unseen",
           "state_bytes"]


def client_seed(seed: int, round_idx: int, client_id: int, purpose: str = "fit") -> int:
    """A deterministic seed per (run, round, client, purpose): resumed runs replay the same draws."""
    return zlib.crc32(f"{seed}|{round_idx}|{client_id}|{purpose}".encode())


def state_bytes(state: dict[str, Tensor] | None) -> int:
    """Bytes of the tensors in ``state`` as they would travel (0 for ``None``)."""
    if not state:
        return 0
    return sum(t.numel() * t.element_size() for t in state.values())


def select_clients(ids: Sequence[int], fraction: float, min_clients: int, seed: int, round_idx: int) -> list[int]:
    """Seeded sampling of ``max(min_clients, ceil(fraction * n))`` of ``ids`` for round ``round_idx``.

    Every strategy of a comparison draws the same clients in the same round.

    Example:
        >>> select_clients([3, 1, 2], 1.0, 1, seed=0, round_idx=1)
        [1, 2, 3]
    """
    ids = sorted(ids)
    k = min(len(ids), max(min_clients, math.ceil(fraction * len(ids))))
    rng = np.random.default_rng([seed, round_idx])
    return sorted(int(i) for i in rng.choice(ids, size=k, replace=False))


def check_federation(clients: Sequence[Any], unseen: Sequence[Any], min_clients: int
                     ) -> tuple[list[ClientData], list[ClientData]]:
    """The federation's clients as :class:`ClientData` (DataModules and ``(train, test)`` tuples converted,
    ids by position, unseen ids after the training ones); reject an empty federation, repeated client
    ids and a ``min_clients`` above the client count."""
    if not clients:
        raise ValueError("a federation needs at least one client, got none")
    train, held = as_federation(clients, unseen)
    ids = [c.client_id for c in train] + [c.client_id for c in held]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"client ids must be unique across clients and unseen clients, repeated: {dupes}")
    if min_clients > len(train):
        raise ValueError(f"min_clients={min_clients} exceeds the {len(train)} training clients")
    return train, held
