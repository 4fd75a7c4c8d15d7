"""The three adapter tiers of HiLoRA, defined once.

Example:
    >>> from hilora_lightning.tiers import Tier
    >>> [t.value for t in Tier]
    ['root', 'cluster', 'leaf']
    >>> Tier.parse("Cluster") is Tier.CLUSTER
    True
    >>> Tier.LEAF.frozen_above()
    (<Tier.ROOT: 'root'>, <Tier.CLUSTER: 'cluster'>)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = ["Tier", "parse_tiers"]


class Tier(str, enum.Enum):
    """An adapter tier, ordered from the most shared (root) to the most personal (leaf)."""

    ROOT = "root"
    CLUSTER = "cluster"
    LEAF = "leaf"

    @property
    def position(self) -> int:
        """Position in the cascade: root 0, cluster 1, leaf 2."""
        return _ORDER.index(self)

    def frozen_above(self) -> tuple[Tier, ...]:
        """The tiers trained in earlier stages, frozen while this tier trains."""
        return _ORDER[: self.position]

    @classmethod
    def parse(cls, value: Tier | str) -> Tier:
        """Turn ``"root"`` / ``"CLUSTER"`` / a :class:`Tier` into a :class:`Tier`.

        Raises:
            ValueError: for anything else, listing the valid names.
        """
        if isinstance(value, Tier):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for tier in _ORDER:
                if tier.value == key:
                    return tier
        valid = ", ".join(t.value for t in _ORDER)
        raise ValueError(f"unknown tier {value!r}: expected one of {valid}")

    def __str__(self) -> str:
        return self.value


_ORDER: tuple[Tier, ...] = (Tier.ROOT, Tier.CLUSTER, Tier.LEAF)


def parse_tiers(values: Iterable[Tier | str] | Tier | str) -> tuple[Tier, ...]:
    """Parse one tier or several into a sorted tuple without duplicates.

    Example:
        >>> parse_tiers(["leaf", "root", "root"])
        (<Tier.ROOT: 'root'>, <Tier.LEAF: 'leaf'>)
    """
    if isinstance(values, (str, Tier)):
        values = [values]
    return tuple(sorted({Tier.parse(v) for v in values}, key=lambda t: t.position))
