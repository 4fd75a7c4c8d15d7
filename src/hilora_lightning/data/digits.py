"""The embedded default data: scikit-learn's bundled handwritten digits, as ViT-ready tensors.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey digits inside the scikit-learn wheel, so
nothing is downloaded. Images are scaled to [0, 1], resized (bilinear) to ``img_size``, repeated to
three channels and normalized with mean = std = 0.5. A fixed, seeded split keeps the images that
pretrained the embedded backbone (``source``) apart from those the adapters train and test on
(``target``). Latent client groups are made the classic way: each group sees its digits rotated by
its own multiple of 90 degrees (exact, via ``torch.rot90``).

Example:
    >>> from hilora_lightning.data.digits import load_digits_tensors, digits_split
    >>> x, y = load_digits_tensors(img_size=32)
    >>> tuple(x.shape), int(y.max())
    ((1797, 3, 32, 32), 9)
    >>> source, target = digits_split()
    >>> len(source), len(target)
    (900, 897)
"""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from hilora_lightning.data.clients import DEFAULT_VAL_FRACTION

__all__ = ["DigitsDataModule", "digits_federation", "digits_split", "load_digits_tensors", "rotate"]

SOURCE_SIZE = 900


@functools.lru_cache(maxsize=4)
def _load(img_size: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = (x.repeat(1, 3, 1, 1) - 0.5) / 0.5
    return x.contiguous(), torch.as_tensor(bunch.target, dtype=torch.long)


def load_digits_tensors(img_size: int = 32) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``(N, 3, img_size, img_size)`` normalized images and ``(N,)`` labels."""
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"img_size must be an int >= 8, got {img_size!r}")
    x, y = _load(img_size)
    return x.clone(), y.clone()


def digits_split(seed: int = 0, source_size: int = SOURCE_SIZE) -> tuple[Tensor, Tensor]:
    """Disjoint index sets: ``source`` (pretrains the backbone) and ``target`` (for the adapters)."""
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(seed))
    return perm[:source_size].sort().values, perm[source_size:].sort().values


def rotate(x: Tensor, quarter_turns: int) -> Tensor:
    """Rotate images ``(..., H, W)`` by ``quarter_turns`` x 90 degrees counter-clockwise (exact)."""
    return torch.rot90(x, k=int(quarter_turns) % 4, dims=(-2, -1))


class DigitsDataModule(pl.LightningDataModule):
    """One client's view of the target digits: a rotation and a seeded train/test split.

    Args:
        quarter_turns: rotation of every image, in multiples of 90 degrees (the latent group).
        img_size: image side in pixels.
        train_fraction: share of the client's images used for training.
        indices: which target-split images this client holds (default: all 897).
        batch_size: batch size of both loaders.
        seed: seed of the train/test split and of the training shuffle.

    Example:
        >>> dm = DigitsDataModule(quarter_turns=1, batch_size=16)
        >>> dm.setup("fit")
        >>> len(dm.train_set) + len(dm.test_set)
        897
    """

    def __init__(
        self,
        quarter_turns: int = 1,
        img_size: int = 32,
        train_fraction: float = 0.75,
        indices: Tensor | None = None,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size!r}")
        self.quarter_turns = quarter_turns
        self.img_size = img_size
        self.train_fraction = train_fraction
        self.indices = indices
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        x, y = load_digits_tensors(self.img_size)
        idx = digits_split()[1] if self.indices is None else torch.as_tensor(self.indices)
        if len(idx) < 2:
            raise ValueError(f"a client needs at least 2 images, got {len(idx)}")
        x, y = rotate(x[idx], self.quarter_turns), y[idx]
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(self.seed))
        n_train = min(max(1, round(self.train_fraction * len(idx))), len(idx) - 1)
        self.train_set = TensorDataset(x[perm[:n_train]], y[perm[:n_train]])
        self.test_set = TensorDataset(x[perm[n_train:]], y[perm[n_train:]])

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


def digits_federation(
    num_clients: int,
    num_groups: int = 4,
    img_size: int = 32,
    train_fraction: float = 0.75,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> list[Any]:
    """Split the target digits into ``num_clients`` disjoint clients in ``num_groups`` latent groups.

    Client ``i`` belongs to group ``i % num_groups`` and sees its digits rotated by ``group * 90``
    degrees (four groups at most: the four exact rotations). Each client's images are split into
    train and test with the same (shuffled) label mix; ``val_fraction`` of train is held out for
    validation (:class:`~hilora_lightning.data.clients.ClientData`).

    Returns:
        A list of :class:`~hilora_lightning.federation.client.ClientData`.

    Example:
        >>> clients = digits_federation(8, num_groups=4)
        >>> [c.group for c in clients]
        [0, 1, 2, 3, 0, 1, 2, 3]
        >>> sum(len(c.train) + len(c.val) + len(c.test) for c in clients)
        897
    """
    from hilora_lightning.data.clients import ClientData

    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
    if not 1 <= num_groups <= 4:
        raise ValueError(f"num_groups must be in [1, 4] (one per 90-degree rotation), got {num_groups!r}")
    x, y = load_digits_tensors(img_size)
    target = digits_split()[1]
    if len(target) < 2 * num_clients:
        raise ValueError(
            f"{len(target)} target digits cannot give {num_clients} clients two images each; use at most "
            f"{len(target) // 2} clients"
        )
    perm = target[torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))]
    clients = []
    for cid, chunk in enumerate(torch.tensor_split(perm, num_clients)):
        group = cid % num_groups
        n_train = min(max(1, round(train_fraction * len(chunk))), len(chunk) - 1)
        xs, ys = rotate(x[chunk], group), y[chunk]
        clients.append(
            ClientData(
                client_id=cid,
                train=TensorDataset(xs[:n_train], ys[:n_train]),
                test=TensorDataset(xs[n_train:], ys[n_train:]),
                group=group,
                val_fraction=val_fraction,
            )
        )
    return clients
