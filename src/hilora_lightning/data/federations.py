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
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from hilora_lightning.data.clients import DEFAULT_VAL_FRACTION, ClientData
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

__all__ = ["PARTITIONS", "cifar100_federation", "domainnet_federation", "image_folder_clients",
           "image_folder_federation"]

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
    val_fraction: float = DEFAULT_VAL_FRACTION,
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
        ClientData(i, ArrayImageDataset(images, fine, tf, tr), ArrayImageDataset(images, fine, tf, te), groups[i],
                   val_fraction=val_fraction)
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
    val_fraction: float = DEFAULT_VAL_FRACTION,
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
                                  PathImageDataset([paths[j] for j in te], labels[te], tf), int(groups[i]),
                                  val_fraction=val_fraction))
    return clients


def image_folder_federation(
    root: str | os.PathLike[str],
    num_clients: int,
    alpha: float = 0.5,
    test_fraction: float = 0.25,
    img_size: int = 224,
    seed: int = 0,
    transform: Callable[[Any], Tensor] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> list[ClientData]:
    """Clients over any ImageFolder tree (``root/<class>/<image>``) with Dirichlet(alpha) label skew."""
    from hilora_lightning.data.images import load_image_folder_index

    paths, labels, _ = load_image_folder_index(root)
    parts = dirichlet_partition(labels, num_clients, alpha, seed=seed)
    check_partition(parts, len(labels))
    tf = transform or default_transform(img_size)
    return [
        ClientData(i, PathImageDataset([paths[j] for j in tr], labels[tr], tf),
                   PathImageDataset([paths[j] for j in te], labels[te], tf), val_fraction=val_fraction)
        for i, (tr, te) in enumerate(split_train_test(parts, labels, test_fraction, seed=seed))
    ]


def image_folder_clients(
    root: str | os.PathLike[str],
    test_fraction: float = 0.25,
    img_size: int = 224,
    seed: int = 0,
    transform: Callable[[Any], Tensor] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> list[ClientData]:
    """One client per sub-folder: ``root/<client>/<class>/<image>`` (the layout of real sites).

    Clients are numbered in the sorted order of their folder names; class indices follow the sorted
    union of every client's class names, so the same class has the same label everywhere. A client
    folder that holds ``train/`` and ``test/`` (each ``<class>/<image>``) keeps that split; otherwise its
    images are split per class by ``test_fraction``. ``val_fraction`` of train is held out for validation.

    Example:
        >>> image_folder_clients("/nonexistent")
        Traceback (most recent call last):
        ...
        FileNotFoundError: image folder '/nonexistent' does not exist
    """
    from hilora_lightning.data.images import IMAGE_EXTENSIONS

    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    sites = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sites:
        raise ValueError(f"image folder {str(root)!r} has no client sub-folders; expected "
                         "root/<client>/<class>/<image>")

    def images(folder: Path) -> dict[str, list[Path]]:
        return {c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
                for c in sorted(folder.iterdir()) if c.is_dir() and not c.name.startswith(".")}

    layouts = []
    for site in sites:
        split = (site / "train").is_dir() and (site / "test").is_dir()
        layouts.append((images(site / "train"), images(site / "test")) if split else (images(site), None))
    classes = sorted({c for tr, te in layouts for part in (tr, te or {}) for c, files in part.items() if files})
    if not classes:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {str(root)!r}; expected "
                         "root/<client>/<class>/<image>")
    index = {c: i for i, c in enumerate(classes)}
    tf = transform or default_transform(img_size)
    rng = np.random.default_rng(seed)
    clients = []
    for cid, (site, (train, test)) in enumerate(zip(sites, layouts)):
        pairs = [(f, index[c]) for c, files in train.items() for f in files]
        if not pairs:
            raise ValueError(f"client folder {str(site)!r} holds no images")
        if test is None:
            labels = np.asarray([y for _, y in pairs])
            ((tr, te),) = split_train_test([np.arange(len(pairs))], labels, test_fraction,
                                           seed=int(rng.integers(2**31)))
            train_pairs, test_pairs = [pairs[i] for i in tr], [pairs[i] for i in te]
        else:
            train_pairs, test_pairs = pairs, [(f, index[c]) for c, files in test.items() for f in files]
        clients.append(ClientData(cid, PathImageDataset([p for p, _ in train_pairs], [y for _, y in train_pairs], tf),
                                  PathImageDataset([p for p, _ in test_pairs], [y for _, y in test_pairs], tf),
                                  val_fraction=val_fraction))
    return clients
