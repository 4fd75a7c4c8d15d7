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
from hilora_lightning.baselines.runner import BaselineClient, BaselineRunner

__all__ = [
    "BASELINES",
    "BaselineClient",
    "BaselineRunner",
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
