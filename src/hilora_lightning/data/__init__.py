"""Data sets, partitioners and the client data types (the embedded digits data needs no network).

Lazy: ``from hilora_lightning.data import ClientData`` imports neither Lightning nor timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hilora_lightning._lazy import lazy_exports

_EXPORTS = {
    "ClientData": "clients",
    "split_unseen": "clients",
    "DigitsDataModule": "digits",
    "digits_federation": "digits",
    "digits_split": "digits",
    "load_digits_tensors": "digits",
    "rotate": "digits",
}

if TYPE_CHECKING:
    from hilora_lightning.data.clients import ClientData, split_unseen
    from hilora_lightning.data.digits import (
        DigitsDataModule,
        digits_federation,
        digits_split,
        load_digits_tensors,
        rotate,
    )

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = [
    "ClientData",
    "DigitsDataModule",
    "digits_federation",
    "digits_split",
    "load_digits_tensors",
    "rotate",
    "split_unseen",
]
