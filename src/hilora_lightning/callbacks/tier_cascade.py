"""``TierCascade``: root, then cluster, then leaf in one ``trainer.fit``, resumable mid-cascade.

At the start of each epoch the callback asks :meth:`TierCascade.stage_for_epoch` which tier trains
(default: ``epochs`` per tier, in order) and, on a change, switches the module's stage (that tier
and the head train, the tiers above stay active and frozen, the orthogonality penalty follows) and
rebuilds the optimizer over the newly trainable parameters, so no stale optimizer state or frozen
parameter is carried over. Its state (the tier and the schedule) is in ``state_dict()``, and
:class:`~hilora_lightning.model.HiLoRAViT` checkpoints carry their stage, so
``trainer.fit(model, ckpt_path=...)`` resumes at the right tier with the right optimizer state.

Example:
    >>> from hilora_lightning.callbacks import TierCascade
    >>> cascade = TierCascade({"root": 2, "cluster": 1, "leaf": 3})
    >>> [cascade.stage_for_epoch(e).value for e in range(6)]
    ['root', 'root', 'cluster', 'leaf', 'leaf', 'leaf']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from hilora_lightning.tiers import Tier

__all__ = ["TierCascade"]


class TierCascade(Callback):
    """Train the tiers one after another inside one ``fit``.

    Args:
        epochs: epochs per tier, e.g. ``{"root": 3, "cluster": 2, "leaf": 2}`` (a tier left out, or
            with 0 epochs, is skipped); epochs past the sum stay with the last tier.
    """

    def __init__(self, epochs: Mapping[Tier | str, int] | None = None) -> None:
        raw = {Tier.parse(k): v for k, v in (epochs or {t: 1 for t in Tier}).items()}
        for tier, n in raw.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"epochs for tier {tier.value!r} must be an int >= 0, got {n!r}")
        self.epochs = {t: raw.get(t, 0) for t in Tier}
        if sum(self.epochs.values()) == 0:
            raise ValueError(f"TierCascade needs at least one epoch for some tier, got {dict(epochs or {})}")
        self.current: Tier | None = None
        self.epoch = -1  # the last epoch started (saved, so a lengthened schedule is checked against it)

    def stage_for_epoch(self, epoch: int) -> Tier:
        """The tier that trains in ``epoch`` (0-based); override for another schedule."""
        seen = 0
        last = Tier.ROOT
        for tier in Tier:
            if self.epochs[tier] == 0:
                continue
            seen += self.epochs[tier]
            last = tier
            if epoch < seen:
                return tier
        return last

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "set_stage", None)):
            raise TypeError(f"{type(pl_module).__name__} has no set_stage(tier); TierCascade drives a HiLoRAViT "
                            "(or a module with the same stage switch)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch(trainer, pl_module, self.stage_for_epoch(trainer.current_epoch))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._switch(trainer, pl_module, self.stage_for_epoch(trainer.current_epoch))

    def _switch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tier: Tier) -> None:
        self.current, self.epoch = tier, trainer.current_epoch
        if getattr(pl_module, "stage", None) is tier:
            return  # already there (a resumed checkpoint restored the stage and its optimizer state)
        pl_module.set_stage(tier)  # type: ignore[operator]
        trainer.strategy.setup_optimizers(trainer)  # a fresh optimizer over the newly trainable parameters

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"current": None if self.current is None else self.current.value,
                "epochs": {t.value: n for t, n in self.epochs.items()}, "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the cascade; a schedule that only lengthens the saved one (the same tier in every epoch the
        saved schedule had or the checkpoint trained, more epochs after) is taken, any other change is refused.

        Example:
            >>> cascade = TierCascade({"root": 1, "cluster": 1, "leaf": 4})  # the leaf stage lengthened
            >>> cascade.load_state_dict({"epochs": {"root": 1, "cluster": 1, "leaf": 2}, "epoch": 3})
            >>> TierCascade({"root": 2, "leaf": 1}).load_state_dict({"epochs": {"root": 1, "leaf": 1}})
            Traceback (most recent call last):
            ...
            ValueError: this checkpoint's cascade had epochs ... (the same tier in each of the first 2 epochs, ...)
        """
        saved = {t: 0 for t in Tier} | {Tier.parse(k): int(v) for k, v in state_dict.get("epochs", {}).items()}
        if any(saved.values()) and saved != self.epochs:
            old = TierCascade({t.value: n for t, n in saved.items()})
            total = max(sum(saved.values()), int(state_dict.get("epoch", -1)) + 1)  # epochs planned or trained
            if sum(self.epochs.values()) < sum(saved.values()) or any(
                    old.stage_for_epoch(e) is not self.stage_for_epoch(e) for e in range(total)):
                raise ValueError(
                    f"this checkpoint's cascade had epochs {({t.value: n for t, n in saved.items()})}, this "
                    f"TierCascade has {({t.value: n for t, n in self.epochs.items()})}; resume with the same schedule "
                    "or one that "
                    "only lengthens it (the same tier in each of the first "
                    f"{total} epochs, e.g. more epochs for its last tier)")
            rank_zero_info(f"TierCascade: the schedule is lengthened from {({t.value: n for t, n in saved.items()})} "
                           f"to {({t.value: n for t, n in self.epochs.items()})}")
        current = state_dict.get("current")
        self.current = None if current is None else Tier.parse(current)
        self.epoch = int(state_dict.get("epoch", -1))
