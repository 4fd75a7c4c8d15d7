"""Lightning callbacks usable in any Lightning project."""

from __future__ import annotations

from hilora_lightning.callbacks.subspace_clustering import SubspaceClustering, SubspaceFactorSource
from hilora_lightning.callbacks.tier_cascade import TierCascade

__all__ = ["SubspaceClustering", "SubspaceFactorSource", "TierCascade"]
