"""TierCascade: one fit trains root, cluster, leaf in turn; a checkpoint resumes mid-cascade at the right tier."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from hilora_lightning import HiLoRAViT, Tier, export_tier
from hilora_lightning.callbacks import TierCascade
from hilora_lightning.data import DigitsDataModule


class Snapshots(pl.Callback):
    """Which tier's factors changed during each epoch, and which tier the module was in."""

    def __init__(self) -> None:
        self.before: dict[Tier, dict[str, torch.Tensor]] = {}
        self.changed: list[set[Tier]] = []
        self.stages: list[Tier] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.before = {t: export_tier(pl_module, t) for t in Tier}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.stages.append(pl_module.stage)
        self.changed.append({t for t in Tier if any(not torch.equal(v, export_tier(pl_module, t)[k])
                                                     for k, v in self.before[t].items())})


def _fit(tmp_path: Path, epochs: int, ckpt=None, model=None):
    pl.seed_everything(0, verbose=False)
    model = model or HiLoRAViT(lr=3e-3)
    snaps = Snapshots()
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[TierCascade({"root": 1, "cluster": 1, "leaf": 1}), snaps],
                         enable_checkpointing=False)
    trainer.fit(model, DigitsDataModule(batch_size=16, quarter_turns=1), ckpt_path=ckpt)
    return trainer, model, snaps


def test_one_fit_trains_each_tier_in_its_epochs(tmp_path) -> None:
    _, model, snaps = _fit(tmp_path, 3)
    assert snaps.stages == [Tier.ROOT, Tier.CLUSTER, Tier.LEAF] and model.stage is Tier.LEAF
    assert snaps.changed == [{Tier.ROOT}, {Tier.CLUSTER}, {Tier.LEAF}]  # frozen tiers never move


def test_fit_resumes_mid_cascade_at_the_right_tier(tmp_path) -> None:
    trainer, _, _ = _fit(tmp_path, 2)  # root, cluster
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    _, resumed, snaps = _fit(tmp_path, 3, ckpt=ckpt, model=HiLoRAViT(lr=3e-3))
    assert snaps.stages == [Tier.LEAF] and snaps.changed == [{Tier.LEAF}]
    state = torch.load(ckpt, weights_only=True)
    cascade_state = next(v for k, v in state["callbacks"].items() if k.startswith("TierCascade"))
    assert cascade_state["current"] == "cluster"


def test_schedule_and_arguments() -> None:
    cascade = TierCascade({"root": 0, "cluster": 2})
    assert [cascade.stage_for_epoch(e) for e in range(4)] == [Tier.CLUSTER] * 4
    with pytest.raises(ValueError, match="epochs for tier 'leaf' must be an int >= 0, got -1"):
        TierCascade({"leaf": -1})
    with pytest.raises(ValueError, match="needs at least one epoch"):
        TierCascade({"root": 0})
    with pytest.raises(ValueError, match="resume with the same schedule or one that only lengthens it"):
        TierCascade({"root": 2}).load_state_dict({"epochs": {"root": 1, "cluster": 1, "leaf": 0}})
    with pytest.raises(ValueError, match="only lengthens it"):  # shorter
        TierCascade({"root": 1, "cluster": 1}).load_state_dict({"epochs": {"root": 1, "cluster": 2, "leaf": 0}})
    with pytest.raises(ValueError, match=r"the first 4 epochs"):  # epochs 2-3 trained the cluster (past the sum)
        TierCascade({"root": 1, "cluster": 1, "leaf": 2}).load_state_dict(
            {"epochs": {"root": 1, "cluster": 1, "leaf": 0}, "epoch": 3})
    lengthened = TierCascade({"root": 1, "cluster": 1, "leaf": 3})
    lengthened.load_state_dict({"epochs": {"root": 1, "cluster": 1, "leaf": 1}, "current": "leaf", "epoch": 2})
    assert lengthened.current is Tier.LEAF and lengthened.epoch == 2
    appended = TierCascade({"root": 1, "cluster": 1, "leaf": 2})  # a tier added after the saved schedule
    appended.load_state_dict({"epochs": {"root": 1, "cluster": 1, "leaf": 0}, "epoch": 1})


def test_a_finished_cascade_is_extended_with_a_longer_leaf_stage(tmp_path) -> None:
    trainer, _, _ = _fit(tmp_path, 3)  # root, cluster, leaf: done
    ckpt = tmp_path / "done.ckpt"
    trainer.save_checkpoint(ckpt)
    pl.seed_everything(0, verbose=False)
    snaps = Snapshots()
    longer = pl.Trainer(max_epochs=5, limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[TierCascade({"root": 1, "cluster": 1, "leaf": 3}), snaps],
                        enable_checkpointing=False)
    longer.fit(HiLoRAViT(lr=3e-3), DigitsDataModule(batch_size=16, quarter_turns=1), ckpt_path=ckpt)
    assert snaps.stages == [Tier.LEAF, Tier.LEAF] and snaps.changed == [{Tier.LEAF}, {Tier.LEAF}]
