"""Tier states and heads as Flower records: float32 NumPy arrays on the wire, whatever the precision.

Flower's ``ArrayRecord`` goes through NumPy, which has no bfloat16; everything is cast to float32
before it travels (a bf16-mixed client still keeps float32 master weights, so nothing is lost).

Example:
    >>> import torch
    >>> from hilora_lightning.flower.codec import from_record, to_record
    >>> state = {"m.lora_A": torch.ones(2, 3, dtype=torch.bfloat16)}
    >>> back = from_record(to_record(state))
    >>> back["m.lora_A"].dtype, bool((back["m.lora_A"] == 1).all())
    (torch.float32, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

__all__ = ["from_record", "to_record"]


def to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """A flat ``{key: tensor}`` as an ``ArrayRecord`` of float32 arrays (keys kept)."""
    record = ArrayRecord()
    for key, value in state.items():
        record[key] = Array(np.ascontiguousarray(value.detach().to("cpu", torch.float32).numpy()))
    return record


def from_record(record: Any) -> dict[str, Tensor]:
    """The tensors of an ``ArrayRecord`` (float32, owning their memory); anything else is malformed."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"malformed message: expected an ArrayRecord of tensors, got {type(record).__name__}")
    return {key: torch.from_numpy(np.array(arr.numpy(), dtype=np.float32, copy=True)) for key, arr in record.items()}
