"""What a federated client's data is: train, validation and test splits, and an optional latent group.

These are plain data types (no timm), shared by the in-process federation, the baselines and the
Flower apps. A client comes from map-style data sets (samples as tuples or dicts), from a
``LightningDataModule`` (:meth:`ClientData.from_datamodule`) or from ``(train, test)`` tuples
(:func:`as_clients`). The validation split is a stratified slice of train unless given: per-round
figures are measured on it, the final tables on test.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from hilora_lightning.data.clients import ClientData
    >>> ds = TensorDataset(torch.zeros(20, 3, 8, 8), torch.arange(20) % 2)
    >>> c = ClientData(client_id=0, train=ds, test=ds, group=1)
    >>> c.num_samples, len(c.val)
    (18, 2)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from hilora_lightning.data.samples import SampleFormatError, SampleKeys, dataset_labels

__all__ = ["DEFAULT_VAL_FRACTION", "ClientData", "as_client", "as_clients", "as_federation", "split_unseen",
           "validation_split"]

#: share of each client's training data held out for validation when no validation set is given
DEFAULT_VAL_FRACTION = 0.1


def _is_datamodule(obj: Any) -> bool:
    """Whether ``obj`` is a ``LightningDataModule`` (by its class names: importing Lightning here is avoided)."""
    return any(c.__name__ == "LightningDataModule" for c in type(obj).__mro__)


def _check_split(client_id: int, name: str, data: Any) -> None:
    if _is_datamodule(data):
        raise TypeError(f"client {client_id}: {name} is a LightningDataModule; build the client with "
                        f"ClientData.from_datamodule({client_id}, datamodule) (or hand the DataModules to the "
                        "orchestrator as a list)")
    if isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"client {client_id}: {name} must be a map-style data set (with __len__ and __getitem__: a "
                        f"torch Dataset, a Hugging Face datasets.Dataset), got {type(data).__name__}; an iterable "
                        "stream has no size to weight the client by")
    if len(data) == 0:
        raise ValueError(f"client {client_id} has an empty {name} set; every client needs at least one {name} "
                         "sample (re-partition, or drop the client)")


@dataclasses.dataclass
class ClientData:
    """One client's private data.

    Attributes:
        client_id: unique, non-negative id.
        train: the local training set (samples ``(image, label)`` or dicts, see
            :class:`~hilora_lightning.data.samples.SampleKeys`); without ``val``, what remains of it
            after the validation slice.
        test: the local test set, following the client's label distribution (scored at the end).
        group: the latent group if known (used only to score clustering, never by the method).
        val: the validation set (per-round figures); ``None`` holds out a stratified
            ``val_fraction`` of ``train`` (seeded by the client id).
        val_fraction: the share of ``train`` held out when ``val`` is not given; ``0`` for no
            validation split (per-round figures are then measured on test, and labelled so).
        collate_fn: this client's own collate function (a DataModule's), else the loader spec's.
        label_key: the label's key in dict samples, to stratify the validation split (``None``: the
            usual names, :data:`~hilora_lightning.data.samples.LABEL_KEYS`); the loaders take theirs
            from the loader spec.
    """

    client_id: int
    train: Dataset
    test: Dataset
    group: int | None = None
    val: Dataset | None = None
    val_fraction: float = DEFAULT_VAL_FRACTION
    collate_fn: Callable[[list[Any]], Any] | None = dataclasses.field(default=None, compare=False)
    label_key: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.client_id, bool) or not isinstance(self.client_id, (int, np.integer)) or self.client_id < 0:
            raise ValueError(f"client_id must be a non-negative int, got {self.client_id!r}")
        self.client_id = int(self.client_id)
        if not 0.0 <= float(self.val_fraction) < 1.0:
            raise ValueError(f"client {self.client_id}: val_fraction must be in [0, 1), got {self.val_fraction!r}")
        for name in ("train", "test"):
            _check_split(self.client_id, name, getattr(self, name))
        if self.val is not None:
            _check_split(self.client_id, "val", self.val)
        elif self.val_fraction > 0:
            try:
                self.train, self.val = validation_split(self.train, self.val_fraction, self.client_id,
                                                        SampleKeys(label_key=self.label_key))
            except SampleFormatError as exc:
                raise SampleFormatError(
                    f"client {self.client_id}: cannot read the training labels to hold out a stratified validation "
                    f"split ({exc}); pass label_key=..., val=... or val_fraction=0") from exc

    @property
    def num_samples(self) -> int:
        """Training samples, the client's aggregation weight."""
        return len(self.train)  # type: ignore[arg-type]

    @property
    def eval_split(self) -> str:
        """Where per-round figures are measured: ``"val"``, or ``"test"`` for a client without validation."""
        return "test" if self.val is None else "val"

    def split(self, name: str) -> Dataset:
        """The ``"train"``, ``"val"`` or ``"test"`` set (``"val"`` of a client without one: its test set)."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        data = getattr(self, name)
        return self.test if data is None else data

    @classmethod
    def from_datamodule(cls, client_id: int, datamodule: Any, group: int | None = None,
                        val_fraction: float = DEFAULT_VAL_FRACTION) -> ClientData:
        """A client from a ``LightningDataModule``: its train, val (if it has one) and test data sets.

        Calls ``prepare_data()``, ``setup("fit")`` and ``setup("test")``, then takes the ``dataset``
        of ``train_dataloader()``, ``val_dataloader()`` and ``test_dataloader()`` and the training
        loader's ``collate_fn``. The federation's own batch size, seeded sampling and step budget
        govern training (the DataModule's batch size, sampler and shuffling are not used), so every
        client's update is reproducible and comparable. Without a ``val_dataloader`` a stratified
        ``val_fraction`` of train is held out.

        Example:
            >>> from hilora_lightning.data import DigitsDataModule
            >>> c = ClientData.from_datamodule(3, DigitsDataModule(quarter_turns=1))
            >>> c.client_id, c.val is not None
            (3, True)
        """
        if not _is_datamodule(datamodule):
            raise TypeError(f"from_datamodule needs a LightningDataModule, got {type(datamodule).__name__}")
        from lightning.pytorch.utilities.model_helpers import is_overridden

        name = type(datamodule).__name__
        datamodule.prepare_data()
        datamodule.setup("fit")
        loaders = {"train": _loader_of(datamodule, "train_dataloader", name)}
        if is_overridden("val_dataloader", datamodule):
            loaders["val"] = _loader_of(datamodule, "val_dataloader", name)
        datamodule.setup("test")
        if not is_overridden("test_dataloader", datamodule):
            raise TypeError(f"client {client_id}: {name} has no test_dataloader; every client needs a test split "
                            "(the federation's final figures are measured on it)")
        loaders["test"] = _loader_of(datamodule, "test_dataloader", name)
        sets = {k: _dataset_of(v, f"{name}.{k}_dataloader()") for k, v in loaders.items()}
        collate = getattr(loaders["train"], "collate_fn", None)
        from torch.utils.data import default_collate

        own = None if collate is None or collate is default_collate else collate
        return cls(client_id, sets["train"], sets["test"], group, sets.get("val"), val_fraction, own)


def _loader_of(datamodule: Any, hook: str, name: str) -> Any:
    loader = getattr(datamodule, hook)()
    if isinstance(loader, (list, tuple)):
        if len(loader) != 1:
            raise TypeError(f"{name}.{hook}() returned {len(loader)} loaders; a client takes one per split")
        loader = loader[0]
    return loader


def _dataset_of(loader: Any, where: str) -> Dataset:
    data = getattr(loader, "dataset", None)
    if data is None:
        raise TypeError(f"{where} returned a {type(loader).__name__} without a .dataset; return a torch DataLoader "
                        "over a map-style data set")
    return data


def validation_split(train: Dataset, fraction: float, seed: int,
                     keys: SampleKeys | None = None) -> tuple[Dataset, Dataset]:
    """``(rest, val)``: a stratified ``fraction`` of ``train`` held out (each class split as
    :func:`~hilora_lightning.data.partition.split_train_test` splits it), seeded. A ``TensorDataset``
    gives two ``TensorDataset`` (its rows copied, in order), a data set with a ``subset(rows)`` method
    (the library's image data sets) what it returns; anything else two ``Subset`` views.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> rest, val = validation_split(TensorDataset(torch.zeros(10, 1), torch.arange(10) % 2), 0.2, seed=0)
        >>> len(rest), len(val), sorted(int(val[i][1]) for i in range(len(val)))
        (8, 2, [0, 1])
    """
    from hilora_lightning.data.partition import split_train_test

    n = len(train)  # type: ignore[arg-type]
    if n < 2:
        raise ValueError(f"a training set of {n} sample(s) cannot give a validation split; pass val=... or "
                         "val_fraction=0")
    labels = dataset_labels(train, keys)
    assert labels is not None
    ((rest, val),) = split_train_test([np.arange(n)], labels, fraction, seed=seed)
    if isinstance(train, TensorDataset):  # stays a TensorDataset: users read .tensors, batching indexes it at once
        return tuple(TensorDataset(*(t[torch.as_tensor(i)] for t in train.tensors))  # type: ignore[return-value]
                     for i in (rest, val))
    if callable(getattr(train, "subset", None)):  # the library's image data sets keep their type and labels
        return train.subset(rest), train.subset(val)  # type: ignore[attr-defined]
    return Subset(train, rest.tolist()), Subset(train, val.tolist())


def as_client(item: Any, client_id: int, val_fraction: float = DEFAULT_VAL_FRACTION) -> ClientData:
    """A :class:`ClientData` from what a user has: a ClientData (as is), a ``LightningDataModule``, or a
    ``(train, test)`` / ``(train, val, test)`` tuple of data sets (``client_id`` fills in the id)."""
    if isinstance(item, ClientData):
        return item
    if _is_datamodule(item):
        cid = getattr(item, "client_id", client_id)
        return ClientData.from_datamodule(cid if isinstance(cid, int) else client_id, item,
                                          getattr(item, "group", None), val_fraction)
    if isinstance(item, tuple) and len(item) in (2, 3):
        train, *rest = item
        val, test = (None, rest[0]) if len(rest) == 1 else rest
        return ClientData(client_id, train, test, val=val, val_fraction=val_fraction)
    raise TypeError(f"client {client_id}: expected a ClientData, a LightningDataModule or a (train, test) / "
                    f"(train, val, test) tuple of data sets, got {type(item).__name__}")


def as_federation(clients: Sequence[Any], unseen: Sequence[Any] = (), val_fraction: float = DEFAULT_VAL_FRACTION
                  ) -> tuple[list[ClientData], list[ClientData]]:
    """Training and unseen clients as :class:`ClientData` (:func:`as_clients`; unseen ids follow the training ids).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
        >>> train, held = as_federation([(ds, ds), (ds, ds)], [(ds, ds)])
        >>> [c.client_id for c in train], [c.client_id for c in held]
        ([0, 1], [2])
    """
    train = as_clients(list(clients), val_fraction)
    first = max((c.client_id for c in train), default=-1) + 1
    return train, as_clients(list(unseen), val_fraction, first_id=first) if unseen else []


def as_clients(items: Sequence[Any], val_fraction: float = DEFAULT_VAL_FRACTION, first_id: int = 0
               ) -> list[ClientData]:
    """:func:`as_client` of each item (ids from their position, after ``first_id``); ids must be unique.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
        >>> [c.client_id for c in as_clients([(ds, ds), (ds, ds)])]
        [0, 1]
    """
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"clients must be a list, got {type(items).__name__}")
    clients = [as_client(item, first_id + i, val_fraction) for i, item in enumerate(items)]
    ids = [c.client_id for c in clients]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"client ids must be unique; {dup} appear more than once")
    return clients


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
