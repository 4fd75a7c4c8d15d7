"""Clients from Hugging Face ``datasets``: a client column, the library's partitioners, or Flower Datasets.

An image data set of the Hub (``{"image": PIL, "label": int}``) becomes clients whose samples are
dicts ``{"pixel_values": tensor, "label": int}`` (the loaders read them by key, see
:mod:`hilora_lightning.data.samples`). Needs the ``hf`` extra (``pip install
"hilora-lightning[hf]"``: ``datasets``, and ``flwr-datasets`` for :func:`flower_partition`).
Nothing here downloads: hand over a ``datasets.Dataset`` you built or loaded
(``load_dataset(...)``, ``load_from_disk(path)``), or a path saved with ``save_to_disk``.

Example:
    >>> import numpy as np
    >>> from datasets import Dataset
    >>> from PIL import Image
    >>> ds = Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 8, "label": [0, 1] * 4,
    ...                         "site": [0, 0, 0, 0, 1, 1, 1, 1]})
    >>> clients = hf_clients(ds, client_column="site", img_size=32, val_fraction=0)
    >>> [(c.client_id, c.num_samples, len(c.test)) for c in clients]
    [(0, 3, 1), (1, 3, 1)]
    >>> tuple(clients[0].train[0]["pixel_values"].shape)
    (3, 32, 32)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from hilora_lightning.data.clients import DEFAULT_VAL_FRACTION, ClientData
from hilora_lightning.data.partition import (
    check_partition,
    dirichlet_partition,
    pathological_partition,
    split_train_test,
)

__all__ = ["HF_PARTITIONS", "HFImageTransform", "flower_partition", "hf_clients", "load_hf_dataset"]

#: partitions of :func:`hf_clients` without a client column (the library's partitioners)
HF_PARTITIONS = ("iid", "dirichlet", "patho")
#: Flower Datasets partitioners :func:`flower_partition` builds by name
FLOWER_PARTITIONERS = ("iid", "dirichlet", "pathological")


class HFImageTransform:
    """A ``datasets`` batch transform: images (PIL, arrays) through ``transform`` as ``pixel_values``, labels kept.

    Picklable, so loaders with worker processes can carry it.
    """

    def __init__(self, transform: Callable[[Any], Tensor], image_key: str = "image", label_key: str = "label") -> None:
        self.transform, self.image_key, self.label_key = transform, image_key, label_key

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key in (self.image_key, self.label_key):
            if key not in batch:
                raise KeyError(f"the data set has no column {key!r} (its columns: {sorted(batch)}); pass "
                               f"image_key= / label_key= to name the image and label columns")
        images = [self.transform(_pil(x)) for x in batch[self.image_key]]
        return {"pixel_values": images, "label": [int(v) for v in batch[self.label_key]]}


def _pil(x: Any) -> Any:
    if type(x).__module__.startswith("PIL"):
        return x.convert("RGB")
    from PIL import Image

    return Image.fromarray(np.asarray(x, dtype=np.uint8)).convert("RGB")


def load_hf_dataset(data: Any, split: str = "train") -> Any:
    """A ``datasets.Dataset`` from itself, a ``DatasetDict`` (its ``split``) or a ``save_to_disk`` folder."""
    import datasets

    if isinstance(data, (str, os.PathLike)):
        if not os.path.isdir(data):
            raise FileNotFoundError(f"no Hugging Face data set folder at {str(data)!r} (expected a folder written by "
                                    "Dataset.save_to_disk / DatasetDict.save_to_disk)")
        data = datasets.load_from_disk(str(data))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"the DatasetDict has no split {split!r} (its splits: {sorted(data)})")
        data = data[split]
    if not isinstance(data, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, a DatasetDict or a save_to_disk folder, got "
                        f"{type(data).__name__}")
    return data


def _clients(ds: Any, parts: Sequence[np.ndarray], labels: np.ndarray, ids: Sequence[int],
             groups: Sequence[int | None], transform: Callable[[Any], Tensor], image_key: str, label_key: str,
             test_fraction: float, val_fraction: float, seed: int) -> list[ClientData]:
    tf = HFImageTransform(transform, image_key, label_key)
    out = []
    for cid, group, (tr, te) in zip(ids, groups, split_train_test(list(parts), labels, test_fraction, seed=seed)):
        out.append(ClientData(int(cid), ds.select(tr.tolist()).with_transform(tf),
                              ds.select(te.tolist()).with_transform(tf), group, val_fraction=val_fraction))
    return out


def hf_clients(
    dataset: Any,
    client_column: str | None = None,
    num_clients: int | None = None,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_client: int = 2,
    image_key: str = "image",
    label_key: str = "label",
    group_column: str | None = None,
    img_size: int = 224,
    transform: Callable[[Any], Tensor] | None = None,
    test_fraction: float = 0.25,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    split: str = "train",
) -> list[ClientData]:
    """Clients of one Hugging Face image data set.

    With ``client_column`` every distinct value is a client (sorted; ids 0..n-1, the column's own
    order); else ``num_clients`` clients are drawn by ``partition``: ``"iid"``, ``"dirichlet"``
    (``alpha``) or ``"patho"`` (``classes_per_client``). Each client's rows are split into train
    and test per class (``test_fraction``), then ``val_fraction`` of train is held out.
    ``group_column`` gives each client its latent group (the value of its first row: scoring only).
    Images go through ``transform`` (default: resize to ``img_size`` and normalize).
    """
    from hilora_lightning.data.images import default_transform

    ds = load_hf_dataset(dataset, split)
    for key in (image_key, label_key, client_column, group_column):
        if key is not None and key not in ds.column_names:
            raise ValueError(f"the data set has no column {key!r}; its columns: {ds.column_names}")
    labels = np.asarray(ds.with_format(None)[label_key], dtype=np.int64)
    groups: list[int | None]
    if client_column is not None:
        if num_clients is not None:
            raise ValueError("give client_column or num_clients, not both (the column decides the clients)")
        owner = np.asarray(ds.with_format(None)[client_column])
        values = sorted(set(owner.tolist()))
        parts = [np.flatnonzero(owner == v) for v in values]
    else:
        if num_clients is None:
            raise ValueError("without client_column, num_clients says how many clients to draw")
        if partition not in HF_PARTITIONS:
            raise ValueError(f"partition must be one of {HF_PARTITIONS}, got {partition!r}")
        if partition == "iid":
            order = np.random.default_rng(seed).permutation(len(labels))
            parts = [np.sort(p) for p in np.array_split(order, num_clients)]
        elif partition == "dirichlet":
            parts = dirichlet_partition(labels, num_clients, alpha, seed=seed)
        else:
            parts = pathological_partition(labels, num_clients, classes_per_client, seed=seed)
        check_partition(parts, len(labels))
    if group_column is not None:
        column = ds.with_format(None)[group_column]
        groups = [int(column[int(p[0])]) for p in parts]
    else:
        groups = [None] * len(parts)
    tf = transform or default_transform(img_size)
    return _clients(ds, parts, labels, range(len(parts)), groups, tf, image_key, label_key, test_fraction,
                    val_fraction, seed)


def flower_partition(
    dataset: Any,
    partitioner: str = "iid",
    num_partitions: int = 10,
    partition_id: int | None = None,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    image_key: str = "image",
    label_key: str = "label",
    img_size: int = 224,
    test_fraction: float = 0.25,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 42,
    split: str = "train",
) -> list[ClientData]:
    """Clients from a Flower Datasets partitioner over a local Hugging Face data set (a config's data builder).

    ``partitioner``: ``"iid"`` (``IidPartitioner``), ``"dirichlet"`` (``DirichletPartitioner`` by
    ``label_key`` with ``alpha``) or ``"pathological"`` (``PathologicalPartitioner`` with
    ``classes_per_partition``). A Flower node passes its ``partition_id`` and gets its one client;
    without one, every partition is a client (an in-process run of the same config). Use it as
    ``data: {builder: "hilora_lightning.data.hf:flower_partition", kwargs: {dataset: PATH, ...}}``.

    Example:
        >>> from datasets import Dataset
        >>> from PIL import Image
        >>> ds = Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 12, "label": [0, 1, 2] * 4})
        >>> [c.client_id for c in flower_partition(ds, "iid", num_partitions=3, partition_id=1, val_fraction=0)]
        [1]
    """
    try:
        from flwr_datasets import partitioner as flp
    except ImportError as exc:
        raise ImportError("flower_partition needs Flower Datasets: pip install flwr-datasets "
                          "(or hilora-lightning[hf])") from exc
    from hilora_lightning.data.images import default_transform

    ds = load_hf_dataset(dataset, split)
    if partitioner == "iid":
        part = flp.IidPartitioner(num_partitions)
    elif partitioner == "dirichlet":
        part = flp.DirichletPartitioner(num_partitions, label_key, alpha, min_partition_size=2, seed=seed)
    elif partitioner == "pathological":
        part = flp.PathologicalPartitioner(num_partitions, label_key, classes_per_partition, seed=seed)
    else:
        raise ValueError(f"partitioner must be one of {FLOWER_PARTITIONERS}, got {partitioner!r}")
    if partition_id is not None and not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} is outside the {num_partitions} partitions")
    part.dataset = ds.add_column("__row__", list(range(len(ds))))
    ids = list(range(num_partitions)) if partition_id is None else [partition_id]
    parts = [np.asarray(part.load_partition(i)["__row__"], dtype=np.int64) for i in ids]
    labels = np.asarray(ds.with_format(None)[label_key], dtype=np.int64)
    return _clients(ds, parts, labels, ids, [None] * len(ids), default_transform(img_size), image_key, label_key,
                    test_fraction, val_fraction, seed)
