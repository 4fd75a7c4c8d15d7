"""The in-process federation: many Lightning Trainers as clients of one HiLoRA server."""

from __future__ import annotations

from hilora_lightning.federation.client import ClientData, ClientState, split_unseen
from hilora_lightning.federation.config import ClusteringConfig, FederationConfig
from hilora_lightning.federation.orchestrator import FederatedOrchestrator, FederationError, Payload
from hilora_lightning.federation.result import FederatedResult, RoundRecord

__all__ = [
    "ClientData",
    "ClientState",
    "ClusteringConfig",
    "FederatedOrchestrator",
    "FederatedResult",
    "FederationConfig",
    "FederationError",
    "Payload",
    "RoundRecord",
    "split_unseen",
]
