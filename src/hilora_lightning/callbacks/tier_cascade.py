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
        self.current = tier
        if getattr(pl_module, "stage", None) is tier:
            return  # already there (a resumed checkpoint restored the stage and its optimizer state)
        pl_module.set_stage(tier)  # type: ignore[operator]
        trainer.strategy.setup_optimizers(trainer)  # a fresh optimizer over the newly trainable parameters

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"current": None if self.current is None else self.current.value,
                "epochs": {t.value: n for t, n in self.epochs.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {Tier.parse(k): int(v) for k, v in state_dict.get("epochs", {}).items()}
        if saved and saved != self.epochs:
            raise ValueError(f"this checkpoint's cascade had epochs {({t.value: n for t, n in saved.items()})}, "
                             f"this TierCascade has {({t.value: n for t, n in self.epochs.items()})}; resume with "
                             "the same schedule")
        current = state_dict.get("current")
        self.current = None if current is None else Tier.parse(current)
