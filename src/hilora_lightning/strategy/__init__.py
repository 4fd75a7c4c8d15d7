"""Pure strategy math shared by the in-process orchestrator and the Flower apps (no Trainer, no I/O)."""

from __future__ import annotations

from hilora_lightning.strategy.aggregation import (
    factor_pairs,
    fedavg_states,
    product_space_aggregate,
    product_space_aggregate_states,
    relative_change,
)

__all__ = [
    "factor_pairs",
    "fedavg_states",
    "product_space_aggregate",
    "product_space_aggregate_states",
    "relative_change",
]
