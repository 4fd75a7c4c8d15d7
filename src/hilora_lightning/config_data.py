"""The ``data`` section of an experiment config: the training and unseen clients it describes.

A data set the library knows (``name``: the embedded digits, Fashion-MNIST, CIFAR-100, DomainNet, an
image folder) partitioned as the section says, or the user's own ``builder``; then the unseen clients
held out (``unseen`` ids or a stratified ``unseen_fraction``).

Example:
    >>> from hilora_lightning.config_data import build_clients
    >>> train, unseen = build_clients({"name": "digits", "num_clients": 5, "num_groups": 1}, seed=0)
    >>> len(train), len(unseen)
    (4, 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hilora_lightning.data.clients import DEFAULT_VAL_FRACTION, ClientData, split_unseen

__all__ = ["DATASETS", "DATA_KEYS", "IMAGE_FOLDER_LAYOUTS", "build_clients", "hold_out"]

#: Data sets the config can name.
DATASETS = ("digits", "fashion-mnist", "cifar100", "domainnet", "imagefolder")

#: the keys of a config's ``data`` section
DATA_KEYS = {"name", "num_clients", "num_groups", "unseen_fraction", "train_fraction", "img_size", "root",
              "download", "verify", "partition", "alpha", "classes_per_client", "clients_per_domain",
              "test_fraction", "domains", "per_client", "val_fraction", "layout", "builder", "kwargs", "transform",
              "unseen"}
#: the keys a ``data.builder`` section may hold besides the builder itself
_BUILDER_KEYS = {"builder", "kwargs", "val_fraction", "unseen_fraction", "unseen", "img_size", "transform"}
#: ``data.layout`` of ``imagefolder``: one tree split by Dirichlet, or a folder per client
IMAGE_FOLDER_LAYOUTS = ("dirichlet", "per_client")


def build_clients(data: Mapping[str, Any], seed: int, partition: tuple[int, int] | None = None
                  ) -> tuple[list[ClientData], list[ClientData]]:
    """The training and unseen clients described by the ``data`` section.

    ``data.builder`` (``"package.module:function"``, called with ``data.kwargs``) builds them with the
    user's own code (:mod:`hilora_lightning.data.hook`); ``partition`` is a Flower node's
    ``(partition_id, num_partitions)``, passed to a builder that takes them.
    """
    if "builder" in data:
        return _built_clients(data, seed, partition)
    name = data.get("name", "digits")
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: available {list(DATASETS)}")
    val = {"val_fraction": float(data.get("val_fraction", DEFAULT_VAL_FRACTION))}
    if name == "digits":
        from hilora_lightning.data.digits import digits_federation

        clients = digits_federation(int(data.get("num_clients", 10)), num_groups=int(data.get("num_groups", 4)),
                                    img_size=int(data.get("img_size", 32)),
                                    train_fraction=float(data.get("train_fraction", 0.75)), seed=seed, **val)
    elif name == "fashion-mnist":
        from hilora_lightning.data.fashion import fashion_mnist_federation

        clients = fashion_mnist_federation(
            data.get("root"), num_clients=int(data.get("num_clients", 36)), partition=data.get("partition", "sc-dir"),
            alpha=None if data.get("alpha") is None else float(data["alpha"]),
            classes_per_client=int(data.get("classes_per_client", 3)), per_client=int(data.get("per_client", 620)),
            test_fraction=float(data.get("test_fraction", 0.25)), img_size=int(data.get("img_size", 32)),
            download=bool(data.get("download", False)), seed=seed, **val)
    else:
        from hilora_lightning.data import federations

        if "root" not in data:
            raise ValueError(f"data.root is required for {name!r}: the folder that holds the data set")
        common: dict[str, Any] = {"test_fraction": float(data.get("test_fraction", 0.25)),
                                  "img_size": int(data.get("img_size", 224)), "seed": seed, **val}
        if name == "cifar100":
            clients = federations.cifar100_federation(
                data["root"], num_clients=int(data.get("num_clients", 100)), partition=data.get("partition", "gl-dir"),
                alpha=float(data.get("alpha", 0.3)), classes_per_client=int(data.get("classes_per_client", 10)),
                download=bool(data.get("download", False)), verify=bool(data.get("verify", True)), **common)
        elif name == "imagefolder":
            layout = str(data.get("layout", "dirichlet"))
            if layout not in IMAGE_FOLDER_LAYOUTS:
                raise ValueError(f"layout must be one of {IMAGE_FOLDER_LAYOUTS}, got {layout!r}")
            if layout == "per_client":
                clients = federations.image_folder_clients(data["root"], **common)
            else:
                clients = federations.image_folder_federation(
                    data["root"], num_clients=int(data.get("num_clients", 10)), alpha=float(data.get("alpha", 0.5)),
                    **common)
        else:
            from hilora_lightning.data.images import DOMAINNET_DOMAINS

            clients = federations.domainnet_federation(
                data["root"], clients_per_domain=int(data.get("clients_per_domain", 15)),
                alpha=float(data.get("alpha", 0.6)), domains=tuple(data.get("domains", DOMAINNET_DOMAINS)), **common)
    return hold_out(clients, data, seed)


def hold_out(clients: Sequence[ClientData], data: Mapping[str, Any], seed: int
             ) -> tuple[list[ClientData], list[ClientData]]:
    """Split off the unseen clients: the ids listed in ``data.unseen``, else a stratified
    ``data.unseen_fraction`` (default 0.2, seeded).

    Example:
        >>> from hilora_lightning.data.digits import digits_federation
        >>> train, unseen = hold_out(digits_federation(6, num_groups=2), {"unseen": [4, 5]}, seed=0)
        >>> [c.client_id for c in train], [c.client_id for c in unseen]
        ([0, 1, 2, 3], [4, 5])
    """
    if "unseen" not in data:
        return split_unseen(clients, float(data.get("unseen_fraction", 0.2)), seed=seed)
    if "unseen_fraction" in data:
        raise ValueError("give data.unseen (the held-out client ids) or data.unseen_fraction, not both")
    ids = data["unseen"]
    if not isinstance(ids, Sequence) or isinstance(ids, str) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"data.unseen must be a list of client ids, got {ids!r}")
    known, held = {c.client_id for c in clients}, set(ids)
    missing = sorted(held - known)
    if missing:
        raise ValueError(f"data.unseen names clients {missing} that the data does not have (client ids "
                         f"{min(known)}..{max(known)})")
    if len(held) >= len(known):
        raise ValueError(f"data.unseen holds out all {len(known)} clients; leave some to train")
    return [c for c in clients if c.client_id not in held], [c for c in clients if c.client_id in held]


def _built_clients(data: Mapping[str, Any], seed: int, partition: tuple[int, int] | None
                   ) -> tuple[list[ClientData], list[ClientData]]:
    """The clients of a ``data.builder`` (converted to :class:`ClientData`; unseen ids after training ids)."""
    from hilora_lightning.data.clients import as_federation
    from hilora_lightning.data.hook import BuilderError, call_builder

    extra = sorted(set(data) - _BUILDER_KEYS)
    if extra:
        raise ValueError(f"data.builder builds the clients itself; {extra} do not apply (a builder section takes "
                         f"{sorted(_BUILDER_KEYS)}; pass your own options in data.kwargs)")
    kwargs = data.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"data.kwargs must be a mapping of keyword arguments, got {type(kwargs).__name__}")
    raw, raw_unseen = call_builder(data["builder"], dict(kwargs), partition)
    val = float(data.get("val_fraction", DEFAULT_VAL_FRACTION))
    try:
        clients, unseen = as_federation(raw, raw_unseen, val)
    except (TypeError, ValueError) as exc:
        raise BuilderError(f"data builder {data['builder']!r}: {exc}") from exc
    if ("unseen_fraction" in data or "unseen" in data) and not unseen:
        return hold_out(clients, data, seed)
    return clients, unseen
