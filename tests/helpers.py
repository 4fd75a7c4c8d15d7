"""Shared test helpers (imported as ``from helpers import ...``)."""

from __future__ import annotations

import torch

from hilora_lightning.layer import TieredLoRALinear
from hilora_lightning.tiers import Tier


def randomize_tiers(layer: TieredLoRALinear, seed: int = 0, scale: float = 0.1) -> None:
    """Give every tier non-zero random factors (a fresh tier has B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tier in Tier:
            for param in (layer.lora_A[tier.value], layer.lora_B[tier.value]):
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
