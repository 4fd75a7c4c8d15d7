"""Lightning callbacks usable in any Lightning project."""

from __future__ import annotations

from hilora_lightning.callbacks.subspace_clustering import SubspaceClustering, SubspaceFactorSource

__all__ = ["SubspaceClustering", "SubspaceFactorSource"]
