"""Federations over real data: CIFAR-100 (GL-Dir, SC-Dir, Patho) and DomainNet (domain x Dirichlet).

Each builder partitions the official training split with a seeded partitioner and splits every
client's share into train and test with the same label mix (PAPER.md C16, option b: the client's
own data, 75/25 by default), returning :class:`~hilora_lightning.federation.client.ClientData`.

Example:
    >>> from hilora_lightning.data.federations import PARTITIONS
    >>> PARTITIONS
    ('gl-dir', 'sc-dir', 'patho')
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from hilora_lightning.data.clients import ClientData
from hilora_lightning.data.images import (
    DOMAINNET_DOMAINS,
    DOMAINNET_TEN_CLASSES,
    ArrayImageDataset,
    PathImageDataset,
    default_transform,
    load_cifar100,
    load_domainnet_index,
)
from hilora_lightning.data.partition import (
    check_partition,
    dirichlet_partition,
    domain_dirichlet_partition,
    pathological_partition,
    split_train_test,
    superclass_dirichlet_partition,
)

__all__ = ["PARTITIONS", "cifar100_federation", "domainnet_federation", "image_folder_federation"]

PARTITIONS = ("gl-dir", "sc-dir", "patho")


def cifar100_federation(
    root: str | os.PathLike[str],
    num_clients: int = 100,
    partition: str = "gl-dir",
    alpha: float = 0.3,
    classes_per_client: int = 10,
    test_fraction: float = 0.25,
    img_size: int = 224,
    download: bool = False,
    verify: bool = True,
    seed: int = 0,
    transform: Callable[[Any], Tensor] | None = None,
) -> list[ClientData]:
    """CIFAR-100 clients: ``gl-dir`` (Dirichlet(alpha) over all classes), ``sc-dir`` (superclass
    groups, Dirichlet(alpha) within; ``group`` = the latent group) or ``patho`` (``classes_per_client``)."""
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    images, fine, coarse = load_cifar100(root, train=True, download=download, verify=verify)
    groups: Sequence[int | None] = [None] * num_clients
    if partition == "gl-dir":
        parts = dirichlet_partition(fine, num_clients, alpha, seed=seed)
    elif partition == "patho":
        parts = pathological_partition(fine, num_clients, classes_per_client, seed=seed)
    else:
        superclass_of = np.zeros(int(fine.max()) + 1, dtype=np.int64)
        superclass_of[fine] = coarse
        parts, group_arr = superclass_dirichlet_partition(fine, superclass_of, num_clients, alpha, seed=seed)
        groups = [int(g) for g in group_arr]
    check_partition(parts, len(fine))
    tf = transform or default_transform(img_size)
    return [
        ClientData(i, ArrayImageDataset(images, fine, tf, tr), ArrayImageDataset(images, fine, tf, te), groups[i])
        for i, (tr, te) in enumerate(split_train_test(parts, fine, test_fraction, seed=seed))
    ]


def domainnet_federation(
    root: str | os.PathLike[str],
    clients_per_domain: int = 15,
    alpha: float = 0.6,
    domains: Sequence[str] = DOMAINNET_DOMAINS,
    classes: Sequence[str] | None = DOMAINNET_TEN_CLASSES,
    test_fraction: float = 0.25,
    img_size: int = 224,
    seed: int = 0,
    transform: Callable[[Any], Tensor] | None = None,
) -> list[ClientData]:
    """DomainNet clients: ``clients_per_domain`` per domain with Dirichlet(alpha) label skew; the
    domain is each client's latent ``group`` (paper: 6 domains x 15 clients, 10 classes)."""
    paths, labels, doms = load_domainnet_index(root, "train", domains, classes)
    parts, groups = domain_dirichlet_partition(labels, doms, clients_per_domain, alpha, seed=seed)
    check_partition(parts, len(labels))
    tf = transform or default_transform(img_size)
    clients = []
    for i, (tr, te) in enumerate(split_train_test(parts, labels, test_fraction, seed=seed)):
        clients.append(ClientData(i, PathImageDataset([paths[j] for j in tr], labels[tr], tf),
                                  PathImageDataset([paths[j] for j in te], labels[te], tf), int(groups[i])))
    return clients


def image_folder_federation(
    root: str | os.PathLike[str],
    num_clients: int,
    alpha: float = 0.5,
    test_fraction: float = 0.25,
    img_size: int = 224,
    seed: int = 0,
    transform: Callable[[Any], Tensor] | None = None,
) -> list[ClientData]:
    """Clients over any ImageFolder tree (``root/<class>/<image>``) with Dirichlet(alpha) label skew."""
    from hilora_lightning.data.images import load_image_folder_index

    paths, labels, _ = load_image_folder_index(root)
    parts = dirichlet_partition(labels, num_clients, alpha, seed=seed)
    check_partition(parts, len(labels))
    tf = transform or default_transform(img_size)
    return [
        ClientData(i, PathImageDataset([paths[j] for j in tr], labels[tr], tf),
                   PathImageDataset([paths[j] for j in te], labels[te], tf))
        for i, (tr, te) in enumerate(split_train_test(parts, labels, test_fraction, seed=seed))
    ]
