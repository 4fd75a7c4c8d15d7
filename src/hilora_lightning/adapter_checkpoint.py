"""Checks of a :class:`~hilora_lightning.model.HiLoRAViT` Lightning checkpoint before anything is built from it.

Example:
    >>> from hilora_lightning.adapter_checkpoint import check_adapter_checkpoint
    >>> try:
    ...     check_adapter_checkpoint({"state_dict": {"model.head.weight": 0}}, "a.ckpt")
    ... except ValueError as exc:
    ...     print(str(exc)[:40])
    'a.ckpt' holds no adapter factors (no '.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.errors import AdapterStateError

__all__ = ["check_adapter_checkpoint"]


def check_adapter_checkpoint(checkpoint: Any, name: str, allow_legacy: bool = False) -> None:
    """Refuse a model checkpoint without adapter factors, with non-finite ones, or without a backbone fingerprint."""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise AdapterStateError(f"{name!r} is not a Lightning checkpoint (no state_dict)")
    state = checkpoint["state_dict"]
    factors = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    if not factors:
        raise AdapterStateError(f"{name!r} holds no adapter factors (no '.lora_A.'/'.lora_B.' keys among "
                                f"{len(state)}): it was not saved from a HiLoRAViT; loading it would give fresh "
                                "adapters")
    bad = sorted(k for k, v in factors.items() if isinstance(v, Tensor) and not bool(torch.isfinite(v).all()))
    if bad:
        more = " ..." if len(bad) > 3 else ""
        raise AdapterStateError(f"{name!r} holds NaN or Inf adapter values in {bad[:3]}{more}")
    if "hilora_backbone_sha256" not in checkpoint and not allow_legacy:
        raise AdapterStateError(f"{name!r} has no backbone fingerprint, so nothing proves its adapters fit the rebuilt "
                                "backbone; pass allow_legacy=True to load a file from before fingerprints existed")
