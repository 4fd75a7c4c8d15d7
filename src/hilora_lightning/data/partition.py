"""Seeded, pure partitioners: labels (and domains) in, disjoint per-client index arrays out.

The paper's settings (see ``PAPER.md`` A8, C16-C18): GL-Dir(alpha) (per class, a Dirichlet(alpha)
split over all clients), SC-Dir(alpha) (client groups own a pair of CIFAR-100 superclasses; class
proportions Dirichlet(alpha) within them: the latent groups), Patho(n) (n classes per client) and
DomainNet's domain x Dirichlet(alpha). Each client's data is then split into train and test with the
same label mix (:func:`split_train_test`). :func:`check_partition` rejects overlaps and empty clients.

Example:
    >>> import numpy as np
    >>> from hilora_lightning.data.partition import dirichlet_partition, check_partition
    >>> labels = np.repeat(np.arange(10), 50)
    >>> parts = dirichlet_partition(labels, num_clients=5, alpha=0.3, seed=0)
    >>> check_partition(parts, len(labels))
    >>> sum(len(p) for p in parts)
    500
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "check_partition",
    "dirichlet_partition",
    "domain_dirichlet_partition",
    "label_entropy",
    "partition_summary",
    "pathological_partition",
    "split_train_test",
    "superclass_dirichlet_partition",
]


def _labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {arr.shape} and dtype {arr.dtype}")
    return arr


def _check_clients(num_clients: int, n: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
    if num_clients > n:
        raise ValueError(f"cannot give {num_clients} clients at least one of only {n} samples")


def _split_by_proportions(idx: np.ndarray, props: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    idx = idx[rng.permutation(len(idx))]
    cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
    return np.split(idx, cuts)


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, alpha: float, seed: int = 0, max_tries: int = 100
) -> list[np.ndarray]:
    """GL-Dir(alpha): every class is split over all clients with Dirichlet(alpha) proportions.

    Redraws (seeded) until no client is empty, at most ``max_tries`` times.
    """
    y = _labels(labels)
    _check_clients(num_clients, len(y))
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            chunks = _split_by_proportions(np.flatnonzero(y == c), rng.dirichlet([alpha] * num_clients), rng)
            for i, chunk in enumerate(chunks):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if all(len(p) for p in out):
            return out
    raise ValueError(
        f"Dirichlet({alpha}) left a client empty in {max_tries} draws for {num_clients} clients and {len(y)} "
        "samples; raise alpha, use fewer clients or more data"
    )


def superclass_dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    superclass_of: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float = 3.0,
    superclasses_per_group: int = 2,
    seed: int = 0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """SC-Dir(alpha) (our reading, PAPER.md C17): latent groups of clients, each owning superclasses.

    The superclasses are dealt to ``S / superclasses_per_group`` groups; clients are assigned to
    groups round-robin; inside a group, each class's samples are split over the group's clients with
    Dirichlet(alpha) proportions. Returns the index arrays and each client's group.
    """
    y = _labels(labels)
    sup = np.asarray(superclass_of)
    _check_clients(num_clients, len(y))
    if sup.ndim != 1 or len(sup) <= int(y.max()):
        raise ValueError(
            f"superclass_of must map every class 0..{int(y.max())} to a superclass, got {len(sup)} entries"
        )
    supers = np.unique(sup)
    if superclasses_per_group < 1 or len(supers) % superclasses_per_group:
        raise ValueError(f"{len(supers)} superclasses cannot form groups of {superclasses_per_group}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(supers)
    n_groups = len(supers) // superclasses_per_group
    if num_clients < n_groups:
        raise ValueError(f"need at least one client per group: {num_clients} clients for {n_groups} groups")
    groups = np.arange(num_clients) % n_groups
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for g in range(n_groups):
        owned = order[g * superclasses_per_group : (g + 1) * superclasses_per_group]
        members = np.flatnonzero(groups == g)
        for c in np.flatnonzero(np.isin(sup, owned)):
            idx = np.flatnonzero(y == c)
            for m, chunk in zip(members, _split_by_proportions(idx, rng.dirichlet([alpha] * len(members)), rng)):
                parts[m].append(chunk)
    out = [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]
    return out, groups


def pathological_partition(
    labels: Sequence[int] | np.ndarray, num_clients: int, classes_per_client: int, seed: int = 0
) -> list[np.ndarray]:
    """Patho(n): each client gets ``classes_per_client`` classes; each class's samples are shared
    equally among the clients that hold it (classes are dealt so every class is used)."""
    y = _labels(labels)
    _check_clients(num_clients, len(y))
    classes = np.unique(y)
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(f"classes_per_client must be in [1, {len(classes)}], got {classes_per_client!r}")
    rng = np.random.default_rng(seed)
    decks = -(-num_clients * classes_per_client // len(classes))  # enough shuffled decks of all classes
    slots = np.concatenate([rng.permutation(classes) for _ in range(decks)])
    owned: list[list[int]] = [[] for _ in range(num_clients)]
    pos = 0
    for i in range(num_clients):
        while len(owned[i]) < classes_per_client:
            c = int(slots[pos % len(slots)])
            pos += 1
            if c not in owned[i]:
                owned[i].append(c)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        holders = [i for i in range(num_clients) if int(c) in owned[i]]
        if not holders:
            continue
        idx = np.flatnonzero(y == c)[rng.permutation(int(np.sum(y == c)))]
        for h, chunk in zip(holders, np.array_split(idx, len(holders))):
            parts[h].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def domain_dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    domains: Sequence[int] | np.ndarray,
    clients_per_domain: int,
    alpha: float = 0.6,
    seed: int = 0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """DomainNet's setting: ``clients_per_domain`` clients per domain, Dirichlet(alpha) label skew within
    each domain. Returns the index arrays and each client's domain (its latent group)."""
    y, d = _labels(labels), np.asarray(domains)
    if d.shape != y.shape:
        raise ValueError(f"domains must have one entry per sample: {d.shape} vs labels {y.shape}")
    parts: list[np.ndarray] = []
    groups: list[int] = []
    for k, dom in enumerate(np.unique(d)):
        idx = np.flatnonzero(d == dom)
        sub = dirichlet_partition(y[idx], clients_per_domain, alpha, seed=seed + k)
        parts += [idx[p] for p in sub]
        groups += [int(dom)] * clients_per_domain
    return parts, np.asarray(groups)


def split_train_test(
    parts: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray, test_fraction: float = 0.25, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split each client's indices into train/test with the same label mix (per-class split).

    Every class with at least two samples contributes to both sides; a client with only singleton
    classes gives one sample to the test side. A client with fewer than two samples is an error.
    """
    y = _labels(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    out = []
    for i, idx in enumerate(parts):
        train, test = [], []
        for c in np.unique(y[idx]):
            members = idx[y[idx] == c][rng.permutation(int(np.sum(y[idx] == c)))]
            n_test = int(round(test_fraction * len(members))) if len(members) > 1 else 0
            test.append(members[:n_test])
            train.append(members[n_test:])
        tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
        if len(idx) < 2:
            raise ValueError(f"client {i} has {len(idx)} samples: too few for a train and a test split")
        if len(te) == 0:  # only singleton classes: move one training sample over
            pick = int(rng.integers(len(tr)))
            tr, te = np.delete(tr, pick), tr[pick : pick + 1]
        out.append((tr, te))
    return out


def check_partition(parts: Sequence[np.ndarray], num_samples: int) -> None:
    """Raise ``ValueError`` if a client is empty, an index is out of range or in two clients."""
    seen = np.zeros(num_samples, dtype=np.int64)
    for i, p in enumerate(parts):
        if len(p) == 0:
            raise ValueError(f"client {i} received no samples; use fewer clients or a larger alpha")
        if p.min() < 0 or p.max() >= num_samples:
            raise ValueError(f"client {i} has indices outside [0, {num_samples})")
        np.add.at(seen, p, 1)
    dup = np.flatnonzero(seen > 1)
    if dup.size:
        raise ValueError(f"{dup.size} samples are in more than one client, e.g. index {int(dup[0])}")


def label_entropy(parts: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray) -> float:
    """Mean per-client entropy (nats) of the label distribution: lower means more skew."""
    y = _labels(labels)
    ents = []
    for p in parts:
        counts = np.bincount(y[p])
        q = counts[counts > 0] / counts.sum()
        ents.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ents))


def partition_summary(parts: Sequence[np.ndarray], labels: Sequence[int] | np.ndarray) -> str:
    """A printable one-screen summary: clients, sizes, classes per client, label entropy."""
    y = _labels(labels)
    sizes = np.array([len(p) for p in parts])
    classes = np.array([len(np.unique(y[p])) for p in parts])
    return (f"{len(parts)} clients, {sizes.sum()} samples; size min/median/max {sizes.min()}/"
            f"{int(np.median(sizes))}/{sizes.max()}; classes per client min/median/max {classes.min()}/"
            f"{int(np.median(classes))}/{classes.max()}; mean label entropy {label_entropy(parts, y):.3f} nats")
