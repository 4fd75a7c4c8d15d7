from __future__ import annotations

import numpy as np
import pytest

from hilora_lightning.data.partition import (
    check_partition,
    dirichlet_partition,
    domain_dirichlet_partition,
    label_entropy,
    partition_summary,
    pathological_partition,
    split_train_test,
    superclass_dirichlet_partition,
)

LABELS = np.repeat(np.arange(20), 30)  # 20 classes x 30 samples
SUPER = np.arange(20) // 2  # 10 superclasses of 2 classes


def _covers_all(parts, n) -> None:
    check_partition(parts, n)
    assert sum(len(p) for p in parts) == n


def test_dirichlet_is_disjoint_complete_seeded_and_skew_grows_as_alpha_falls() -> None:
    parts = dirichlet_partition(LABELS, 10, alpha=0.3, seed=1)
    _covers_all(parts, len(LABELS))
    again = dirichlet_partition(LABELS, 10, alpha=0.3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_partition(LABELS, 10, alpha=0.3, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    ent = [np.mean([label_entropy(dirichlet_partition(LABELS, 10, a, seed=s), LABELS) for s in range(5)])
           for a in (100.0, 1.0, 0.1)]
    assert ent[0] > ent[1] > ent[2]


def test_superclass_dirichlet_gives_latent_groups() -> None:
    parts, groups = superclass_dirichlet_partition(LABELS, SUPER, num_clients=10, alpha=3.0, seed=0)
    _covers_all(parts, len(LABELS))
    assert sorted(np.bincount(groups).tolist()) == [2] * 5
    for p, g in zip(parts, groups):  # a client only sees its group's two superclasses
        assert len(np.unique(SUPER[LABELS[p]])) <= 2
        mates = [q for q, h in zip(parts, groups) if h == g]
        assert set(np.unique(SUPER[LABELS[np.concatenate(mates)]])) == set(np.unique(SUPER[LABELS[p]]))


def test_pathological_gives_n_classes_per_client() -> None:
    parts = pathological_partition(LABELS, 8, classes_per_client=5, seed=0)
    _covers_all(parts, len(LABELS))
    assert all(len(np.unique(LABELS[p])) == 5 for p in parts)


def test_domain_dirichlet() -> None:
    domains = np.tile(np.arange(3), 200)
    labels = np.repeat(np.arange(10), 60)
    parts, groups = domain_dirichlet_partition(labels, domains, clients_per_domain=4, alpha=0.6, seed=0)
    _covers_all(parts, len(labels))
    assert groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert all(len(np.unique(domains[p])) == 1 and domains[p][0] == g for p, g in zip(parts, groups))


def test_train_test_split_keeps_the_label_mix() -> None:
    parts = dirichlet_partition(LABELS, 5, alpha=1.0, seed=0)
    for (tr, te), p in zip(split_train_test(parts, LABELS, 0.25, seed=0), parts):
        assert np.array_equal(np.sort(np.concatenate([tr, te])), p) and not set(tr) & set(te)
        big = [c for c in np.unique(LABELS[p]) if np.sum(LABELS[p] == c) >= 8]
        assert all(c in LABELS[te] for c in big)
    with pytest.raises(ValueError, match=r"client 0 has 1 samples: too few for a train and a test split"):
        split_train_test([np.array([0])], LABELS)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: dirichlet_partition(LABELS, 0, 1.0), r"num_clients must be a positive int, got 0"),
        (lambda: dirichlet_partition(LABELS, 10, 0.0), r"alpha must be > 0, got 0.0"),
        (lambda: dirichlet_partition(np.zeros(3, dtype=int), 5, 1.0), r"cannot give 5 clients at least one of only 3"),
        (lambda: dirichlet_partition(np.array([0.5]), 1, 1.0), r"labels must be a non-empty 1-D integer array"),
        (lambda: pathological_partition(LABELS, 4, 30), r"classes_per_client must be in \[1, 20\], got 30"),
        (lambda: superclass_dirichlet_partition(LABELS, SUPER, 10, superclasses_per_group=3),
         r"10 superclasses cannot form groups of 3"),
        (lambda: check_partition([np.array([0, 1]), np.array([1])], 5), r"1 samples are in more than one client"),
        (lambda: check_partition([np.array([0]), np.array([], dtype=int)], 5), r"client 1 received no samples"),
    ],
)
def test_partition_errors(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_summary_is_printable() -> None:
    text = partition_summary(dirichlet_partition(LABELS, 4, 1.0), LABELS)
    assert text.startswith("4 clients, 600 samples") and "label entropy" in text
