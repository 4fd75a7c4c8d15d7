"""``SubspaceClustering``: LoRA-Subspace Adaptive Clustering (LSAC) as a Lightning callback.

Works in any Lightning project whose module exposes several *members* (clients, tasks, adapters)
with LoRA factors, through a small protocol: ``subspace_factors()`` returns, per member id, one
factor per adapted matrix (``B``, shape ``(p, r)``, for the paper's column spaces; ``A^T`` for row
spaces). After every training epoch the callback folds the factors into an EMA of their
Frobenius-normalized values; when :meth:`SubspaceClustering.should_cluster` says so it clusters the
members exactly as the federated orchestrator does at the root-to-cluster transition (same
functions), logs ``lsac/k`` and each member's cluster, writes a similarity heatmap to the logger,
and keeps everything needed to resume in ``state_dict()``.

Example:
    >>> from hilora_lightning.callbacks import SubspaceClustering
    >>> cb = SubspaceClustering(rank=8, k_min=1, k_max=6, cluster_every_n_epochs=5)
    >>> cb.should_cluster(4), cb.should_cluster(9)
    (True, True)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
from torch import Tensor

from hilora_lightning.strategy.clustering import ClusteringResult, cluster_distances
from hilora_lightning.strategy.subspace import ema_normalized, left_subspace, subspace_distances

__all__ = ["SubspaceClustering", "SubspaceFactorSource"]

log = logging.getLogger(__name__)


@runtime_checkable
class SubspaceFactorSource(Protocol):
    """What a LightningModule implements to be clustered by :class:`SubspaceClustering`."""

    def subspace_factors(self) -> Mapping[Hashable, Mapping[str, Tensor]]:
        """Per member id, one ``(p, r)`` factor per adapted matrix (same keys for every member)."""
        ...


FactorsFn = Callable[[pl.LightningModule], Mapping[Hashable, Mapping[str, Tensor]]]


class SubspaceClustering(pl.Callback):
    """Cluster the members of a module by the subspaces of their LoRA factors (LSAC).

    Args:
        rank: subspace dimension ``r`` (top-r left singular vectors of each EMA factor).
        k_min: smallest number of clusters the eigengap may pick (1 allows one cluster).
        k_max: largest number of clusters.
        ema_decay: ``lambda`` of the EMA over epochs.
        sigma: kernel width rule, ``"median"`` (the paper) or ``"local"``.
        cluster_every_n_epochs: the default schedule of :meth:`should_cluster`.
        start_epoch: no clustering before this epoch (the EMA still accumulates).
        seed: seed of the spectral embedding's k-means.
        factors_fn: how to read the factors from the module; default ``pl_module.subspace_factors()``.
        heatmap: write a similarity heatmap image each time it clusters.
    """

    def __init__(
        self,
        rank: int = 8,
        k_min: int = 2,
        k_max: int = 10,
        ema_decay: float = 0.9,
        sigma: str = "median",
        cluster_every_n_epochs: int = 1,
        start_epoch: int = 0,
        seed: int = 0,
        factors_fn: FactorsFn | None = None,
        heatmap: bool = True,
    ) -> None:
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank!r}")
        if not 1 <= k_min <= k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        if sigma not in ("median", "local"):
            raise ValueError(f"sigma must be 'median' or 'local', got {sigma!r}")
        if cluster_every_n_epochs <= 0:
            raise ValueError(f"cluster_every_n_epochs must be positive, got {cluster_every_n_epochs!r}")
        self.rank, self.k_min, self.k_max = rank, k_min, k_max
        self.ema_decay, self.sigma, self.seed = ema_decay, sigma, seed
        self.cluster_every_n_epochs, self.start_epoch = cluster_every_n_epochs, start_epoch
        self.factors_fn = factors_fn
        self.heatmap = heatmap
        self.ema: dict[str, dict[str, Tensor]] = {}
        self.assignment: dict[str, int] = {}
        self.k: int | None = None
        self.last_result: ClusteringResult | None = None

    # ------------------------------------------------------------------ policy (override points)
    def should_cluster(self, epoch: int) -> bool:
        """Whether to cluster after ``epoch`` (0-based); override for another schedule."""
        return epoch >= self.start_epoch and (epoch + 1) % self.cluster_every_n_epochs == 0

    def on_clusters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: ClusteringResult) -> None:
        """Called after each clustering; override to act on it (default: the module's hook, if any)."""
        hook = getattr(pl_module, "on_subspace_clusters", None)
        if callable(hook):
            hook(dict(self.assignment), result)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.factors_fn is None and not isinstance(pl_module, SubspaceFactorSource):
            raise TypeError(
                f"{type(pl_module).__name__} does not expose LoRA factors: implement "
                "subspace_factors() -> {member_id: {matrix_name: B (p x r)}} or pass factors_fn= to "
                "SubspaceClustering"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update_ema(self._read(pl_module))
        epoch = trainer.current_epoch
        if self.should_cluster(epoch) and len(self.ema) >= 2:
            self._cluster(trainer, pl_module, epoch)

    def _read(self, pl_module: pl.LightningModule) -> Mapping[Hashable, Mapping[str, Tensor]]:
        factors = self.factors_fn(pl_module) if self.factors_fn else pl_module.subspace_factors()  # type: ignore[operator]
        keys = None
        for member, mats in factors.items():
            if keys is None:
                keys = list(mats)
            elif list(mats) != keys:
                raise ValueError(f"member {member!r} exposes matrices {list(mats)[:3]}..., expected {keys[:3]}...")
        return factors

    def _update_ema(self, factors: Mapping[Hashable, Mapping[str, Tensor]]) -> None:
        for member, mats in factors.items():
            prev = self.ema.get(str(member), {})
            self.ema[str(member)] = {k: ema_normalized(prev.get(k), v, self.ema_decay) for k, v in mats.items()}

    def _cluster(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        members = sorted(self.ema)
        subspaces = [[left_subspace(v, self.rank) for v in self.ema[m].values()] for m in members]
        result = cluster_distances(subspace_distances(subspaces), self.k_min, min(self.k_max, len(members)),
                                   self.seed, sigma=self.sigma)
        self.assignment = {m: int(lab) for m, lab in zip(members, result.labels)}
        self.k, self.last_result = result.k, result
        pl_module.log("lsac/k", float(result.k), on_epoch=True, on_step=False)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"lsac/cluster/{m}": float(c) for m, c in self.assignment.items()},
                                       step=trainer.global_step)
        if self.heatmap and trainer.is_global_zero:  # one file under DDP, not one per rank
            self._write_heatmap(trainer, members, result, epoch)
        self.on_clusters(trainer, pl_module, result)

    def _write_heatmap(self, trainer: pl.Trainer, members: list[str], result: ClusteringResult, epoch: int) -> None:
        try:
            from hilora_lightning.plots import similarity_heatmap
        except ImportError:  # matplotlib missing: the clustering itself does not need it
            log.warning("matplotlib is not installed; skipping the LSAC similarity heatmap")
            return
        fig = similarity_heatmap(1.0 - result.distances, members, result.labels, title=f"LSAC, epoch {epoch}")
        logger = trainer.logger
        experiment = getattr(logger, "experiment", None) if logger is not None else None
        if experiment is not None and hasattr(experiment, "add_figure"):  # TensorBoard
            experiment.add_figure("lsac/similarity", fig, global_step=trainer.global_step)
        else:
            out_dir = Path(trainer.log_dir or trainer.default_root_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            fig.savefig(out_dir / f"lsac_similarity_epoch{epoch}.png", dpi=100)
        import matplotlib.pyplot as plt

        plt.close(fig)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "assignment": self.assignment, "k": self.k}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema = {m: dict(v) for m, v in state_dict.get("ema", {}).items()}
        self.assignment = dict(state_dict.get("assignment", {}))
        self.k = state_dict.get("k")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rank=self.rank, k_min=self.k_min, k_max=self.k_max)
