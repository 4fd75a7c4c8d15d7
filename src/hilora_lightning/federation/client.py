"""What a simulated client is: its data, and the state that stays on it between rounds.

A client is *not* a model copy: the orchestrator keeps one frozen backbone and loads a client's
tiers and head into it when the client trains. Per client it stores only the leaf factors, the
personal head and the server-side LSAC features.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from hilora_lightning.federation.client import ClientData
    >>> ds = TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    >>> ClientData(client_id=0, train=ds, test=ds, group=1).num_samples
    4
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ClientData", "ClientState", "check_federation", "select_clients", "split_unseen", "state_bytes"]


@dataclasses.dataclass
class ClientData:
    """One client's private data.

    Attributes:
        client_id: unique, non-negative id.
        train: the local training set (items ``(image, label)``).
        test: the local test set, following the client's label distribution.
        group: the latent group if known (used only to score clustering, never by the method).
    """

    client_id: int
    train: Dataset
    test: Dataset
    group: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.client_id, bool) or not isinstance(self.client_id, int) or self.client_id < 0:
            raise ValueError(f"client_id must be a non-negative int, got {self.client_id!r}")
        for name in ("train", "test"):
            if len(getattr(self, name)) == 0:  # type: ignore[arg-type]
                raise ValueError(
                    f"client {self.client_id} has an empty {name} set; every client needs at least one "
                    f"{name} sample (re-partition, or drop the client)"
                )

    @property
    def num_samples(self) -> int:
        """Training samples, the client's aggregation weight."""
        return len(self.train)  # type: ignore[arg-type]


@dataclasses.dataclass
class ClientState:
    """What stays on (or about) a client between rounds; everything on the CPU.

    Attributes:
        leaf: the client's leaf factors (tier-free keys), once it has trained its leaf.
        head: the client's personal head, once it has one.
        features: the server's EMA of the client's normalized root ``B`` per adapted matrix.
        rounds_trained: how many rounds the client took part in.
    """

    leaf: dict[str, Tensor] | None = None
    head: dict[str, Tensor] | None = None
    features: dict[str, Tensor] | None = None
    rounds_trained: int = 0


def state_bytes(state: dict[str, Tensor] | None) -> int:
    """Bytes of the tensors in ``state`` as they would travel (0 for ``None``)."""
    if not state:
        return 0
    return sum(t.numel() * t.element_size() for t in state.values())


def split_unseen(
    clients: Sequence[ClientData], fraction: float = 0.2, seed: int = 0
) -> tuple[list[ClientData], list[ClientData]]:
    """Hold out ``fraction`` of the clients as unseen, stratified by latent group where groups exist.

    Each group gives ``round(fraction * size)`` clients (the paper holds out 20%); clients without a
    group form one stratum. The choice is seeded; order within each list follows the input.

    Example:
        >>> from hilora_lightning.data import digits_federation
        >>> train, unseen = split_unseen(digits_federation(10, num_groups=2), 0.2)
        >>> sorted(c.group for c in unseen)
        [0, 1]
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    strata: dict[int | None, list[int]] = {}
    for i, c in enumerate(clients):
        strata.setdefault(c.group, []).append(i)
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for members in strata.values():
        k = int(round(fraction * len(members)))
        held.update(int(i) for i in rng.choice(members, size=k, replace=False))
    if len(held) == len(clients):
        raise ValueError(f"holding out {fraction:.0%} leaves no training client; lower the fraction")
    return [c for i, c in enumerate(clients) if i not in held], [c for i, c in enumerate(clients) if i in held]


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


def check_federation(clients: Sequence[ClientData], unseen: Sequence[ClientData], min_clients: int) -> None:
    """Reject an empty federation, repeated client ids and a ``min_clients`` above the client count."""
    if not clients:
        raise ValueError("a federation needs at least one client, got none")
    ids = [c.client_id for c in clients] + [c.client_id for c in unseen]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"client ids must be unique across clients and unseen clients, repeated: {dupes}")
    if min_clients > len(clients):
        raise ValueError(f"min_clients={min_clients} exceeds the {len(clients)} training clients")
