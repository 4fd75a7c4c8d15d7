"""Data sets and partitioners (the embedded digits data needs no network)."""

from __future__ import annotations

from hilora_lightning.data.digits import (
    DigitsDataModule,
    digits_federation,
    digits_split,
    load_digits_tensors,
    rotate,
)

__all__ = ["DigitsDataModule", "digits_federation", "digits_split", "load_digits_tensors", "rotate"]
