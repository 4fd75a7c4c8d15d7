"""The paper's nine federated LoRA baselines, run in the same harness as HiLoRA.

Example:
    >>> from hilora_lightning.baselines import BASELINES
    >>> len(BASELINES)
    9
"""

from __future__ import annotations

from hilora_lightning.baselines.methods import (
    BASELINES,
    FDLoRA,
    FedALT,
    FedDPAF,
    FedDPAT,
    FedIT,
    FedSALoRA,
    FlexLoRA,
    LocalLoRA,
    Method,
    PF2LoRA,
    Phase,
)
from hilora_lightning.baselines.runner import BaselineRunner
from hilora_lightning.baselines.strategy import BaselineStrategy

__all__ = [
    "BASELINES",
    "BaselineRunner",
    "BaselineStrategy",
    "FDLoRA",
    "FedALT",
    "FedDPAF",
    "FedDPAT",
    "FedIT",
    "FedSALoRA",
    "FlexLoRA",
    "LocalLoRA",
    "Method",
    "PF2LoRA",
    "Phase",
]
