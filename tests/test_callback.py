from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hilora_lightning.callbacks import SubspaceClustering

D, R, GROUPS, PER_GROUP = 24, 2, 3, 4


class MultiMemberLoRA(pl.LightningModule):
    """A toy project: one frozen Linear, one LoRA per member, each member fitting its group's update."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.base = nn.Linear(D, D)
        self.base.requires_grad_(False)
        bases = [torch.linalg.qr(torch.randn(D, R, generator=gen))[0] for _ in range(GROUPS)]
        self.targets = [bases[g] @ torch.randn(R, D, generator=gen) for g in range(GROUPS) for _ in range(PER_GROUP)]
        n = GROUPS * PER_GROUP
        self.A = nn.Parameter(torch.randn(n, R, D, generator=gen) / D**0.5)
        self.B = nn.Parameter(torch.zeros(n, D, R))
        self.seen_assignments: list[dict] = []

    def subspace_factors(self):
        return {f"member{i}": {"layer": self.B[i].detach()} for i in range(self.B.shape[0])}

    def on_subspace_clusters(self, assignment, result) -> None:
        self.seen_assignments.append(assignment)

    def training_step(self, batch, _):
        (x,) = batch
        loss = sum(((x @ (self.B[i] @ self.A[i]).T) - x @ t.T).pow(2).mean() for i, t in enumerate(self.targets))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam([self.A, self.B], lr=3e-2)


def _fit(tmp_path: Path, cb: SubspaceClustering, epochs: int, model=None, ckpt=None, **kw):
    model = model or MultiMemberLoRA()
    loader = DataLoader(TensorDataset(torch.randn(64, D, generator=torch.Generator().manual_seed(1))), batch_size=16)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, **kw)
    trainer.fit(model, loader, ckpt_path=ckpt)
    return trainer, model


def test_callback_finds_the_member_groups_and_writes_a_heatmap(tmp_path: Path) -> None:
    cb = SubspaceClustering(rank=R, k_min=2, k_max=6, ema_decay=0.5, cluster_every_n_epochs=4, start_epoch=3)
    trainer, model = _fit(tmp_path, cb, epochs=8, logger=pl.loggers.CSVLogger(tmp_path))
    truth = np.repeat(np.arange(GROUPS), PER_GROUP)
    labels = [cb.assignment[f"member{i}"] for i in range(GROUPS * PER_GROUP)]
    assert cb.k == GROUPS and adjusted_rand_score(truth, labels) == 1.0
    assert len(model.seen_assignments) == 2  # epochs 3 and 7 (0-based)
    assert trainer.callback_metrics["lsac/k"].item() == GROUPS
    assert sorted(p.name for p in Path(trainer.log_dir).glob("lsac_similarity_epoch*.png")) == [
        "lsac_similarity_epoch3.png", "lsac_similarity_epoch7.png"]
    metrics = (Path(trainer.log_dir) / "metrics.csv").read_text()
    assert "lsac/cluster/member0" in metrics


def test_callback_state_survives_a_checkpoint(tmp_path: Path) -> None:
    cb = SubspaceClustering(rank=R, k_min=1, k_max=6, cluster_every_n_epochs=2, heatmap=False)
    trainer, _ = _fit(tmp_path, cb, epochs=2, logger=False)
    ckpt = tmp_path / "cb.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = SubspaceClustering(rank=R, k_min=1, k_max=6, cluster_every_n_epochs=2, heatmap=False)
    restored.load_state_dict(torch.load(ckpt, weights_only=False)["callbacks"][cb.state_key])
    assert restored.assignment == cb.assignment and restored.k == cb.k
    assert all(torch.equal(restored.ema[m][k], cb.ema[m][k]) for m in cb.ema for k in cb.ema[m])
    resumed = SubspaceClustering(rank=R, k_min=1, k_max=6, cluster_every_n_epochs=2, heatmap=False)
    _fit(tmp_path, resumed, epochs=3, ckpt=ckpt, logger=False)  # continues from the restored EMA
    assert resumed.ema.keys() == cb.ema.keys()
    assert not torch.equal(resumed.ema["member0"]["layer"], cb.ema["member0"]["layer"])


def test_callback_resume_uses_the_restored_ema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Made able to fail: with load_state_dict a no-op the resumed EMA is the third epoch's factors alone."""
    cb = SubspaceClustering(rank=R, k_min=1, k_max=6, ema_decay=0.5, cluster_every_n_epochs=2, heatmap=False)
    trainer, _ = _fit(tmp_path, cb, epochs=2, logger=False)
    ckpt = tmp_path / "cb.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = {m: dict(v) for m, v in cb.ema.items()}
    resumed = SubspaceClustering(rank=R, k_min=1, k_max=6, ema_decay=0.5, cluster_every_n_epochs=2, heatmap=False)
    _, model = _fit(tmp_path, resumed, epochs=3, ckpt=ckpt, logger=False)
    observed = {m: v["layer"] for m, v in model.subspace_factors().items()}
    for m, b in observed.items():  # ema_normalized: decay * prev + (1 - decay) * b / ||b||_F
        expected = 0.5 * saved[m]["layer"] + 0.5 * b / b.norm()
        torch.testing.assert_close(resumed.ema[m]["layer"], expected, rtol=1e-5, atol=1e-6)
        alone = b / b.norm()
        assert (resumed.ema[m]["layer"] - alone).norm() > 1e-3  # what a no-op restore would give


def test_callback_rejects_a_module_without_factors(tmp_path: Path) -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def training_step(self, batch, _):
            return self.lin(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=1, callbacks=[SubspaceClustering()], logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)
    with pytest.raises(TypeError, match=r"Plain does not expose LoRA factors: implement subspace_factors\(\)"):
        trainer.fit(Plain(), DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rank": 0}, r"rank must be positive, got 0"), ({"k_min": 3, "k_max": 2}, r"need 1 <= k_min <= k_max"),
     ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\), got 1.0"), ({"sigma": "x"}, r"sigma must be 'median'"),
     ({"cluster_every_n_epochs": 0}, r"cluster_every_n_epochs must be positive, got 0")],
)
def test_callback_validates_its_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SubspaceClustering(**kwargs)
