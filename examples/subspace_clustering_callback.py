"""The ``SubspaceClustering`` callback in an ordinary Lightning project (no federation).

A multi-task module keeps one LoRA per task on a shared frozen layer; tasks come from three hidden
groups (each group's target update lives in its own low-rank subspace). The callback clusters the
tasks by the subspaces of their LoRA ``B`` factors every few epochs, logs ``lsac/k`` and a heatmap,
and hands the assignment to the module's ``on_subspace_clusters`` hook.

    python examples/subspace_clustering_callback.py [--epochs 8] [--out runs/callback]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hilora_lightning.callbacks import SubspaceClustering

D, R, GROUPS, PER_GROUP = 24, 2, 3, 4


class MultiTaskLoRA(pl.LightningModule):
    """Implements the callback's protocol: ``subspace_factors() -> {member: {matrix: B}}``."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.base = nn.Linear(D, D).requires_grad_(False)
        bases = [torch.linalg.qr(torch.randn(D, R, generator=gen))[0] for _ in range(GROUPS)]
        self.targets = [bases[g] @ torch.randn(R, D, generator=gen) for g in range(GROUPS) for _ in range(PER_GROUP)]
        n = GROUPS * PER_GROUP
        self.A = nn.Parameter(torch.randn(n, R, D, generator=gen) / D**0.5)
        self.B = nn.Parameter(torch.zeros(n, D, R))

    def subspace_factors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {f"task{i}": {"shared_linear": self.B[i].detach()} for i in range(self.B.shape[0])}

    def on_subspace_clusters(self, assignment: dict[str, int], result: object) -> None:
        print(f"epoch {self.current_epoch}: clusters {assignment}")

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        (x,) = batch
        return sum(((x @ (self.B[i] @ self.A[i]).T) - x @ t.T).pow(2).mean() for i, t in enumerate(self.targets))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.A, self.B], lr=3e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/callback"))
    args = parser.parse_args()
    callback = SubspaceClustering(rank=R, k_min=2, k_max=6, ema_decay=0.5, cluster_every_n_epochs=4, start_epoch=3)
    loader = DataLoader(TensorDataset(torch.randn(64, D, generator=torch.Generator().manual_seed(1))), batch_size=16)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[callback], default_root_dir=args.out,
                         logger=pl.loggers.CSVLogger(args.out), enable_model_summary=False)
    trainer.fit(MultiTaskLoRA(), loader)
    print(f"K = {callback.k}; heatmaps and metrics in {trainer.log_dir}")


if __name__ == "__main__":
    main()
