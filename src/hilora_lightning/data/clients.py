"""What a federated client's data is: a train and a test split, and an optional latent group.

These are plain data types (no Lightning, no timm), shared by the in-process federation, the
baselines and the Flower apps.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from hilora_lightning.data.clients import ClientData
    >>> ds = TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    >>> ClientData(client_id=0, train=ds, test=ds, group=1).num_samples
    4
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

__all__ = ["ClientData", "split_unseen"]


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
