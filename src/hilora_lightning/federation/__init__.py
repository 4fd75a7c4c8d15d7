"""The federation: HiLoRA and the baselines as strategies of one round engine, over in-process or Flower clients.

Lazy: the value types (``ServerState``, requests, configs) import without Lightning or timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hilora_lightning._lazy import lazy_exports

_EXPORTS = {
    "ClientData": "client",
    "ClientState": "client",
    "split_unseen": "client",
    "ClusteringConfig": "config",
    "FederationConfig": "config",
    "FederationRunner": "engine",
    "Strategy": "engine",
    "HiLoRAStrategy": "hilora",
    "LoaderSpec": "local",
    "FederatedOrchestrator": "orchestrator",
    "FederationError": "orchestrator",
    "Payload": "orchestrator",
    "FederatedResult": "result",
    "RoundRecord": "result",
    "ClientRuntime": "runtime",
    "ServerState": "server_state",
}

if TYPE_CHECKING:
    from hilora_lightning.federation.client import ClientData, ClientState, split_unseen
    from hilora_lightning.federation.config import ClusteringConfig, FederationConfig
    from hilora_lightning.federation.engine import FederationRunner, Strategy
    from hilora_lightning.federation.hilora import HiLoRAStrategy
    from hilora_lightning.federation.local import LoaderSpec
    from hilora_lightning.federation.orchestrator import FederatedOrchestrator, FederationError, Payload
    from hilora_lightning.federation.result import FederatedResult, RoundRecord
    from hilora_lightning.federation.runtime import ClientRuntime
    from hilora_lightning.federation.server_state import ServerState

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = [
    "ClientData",
    "ClientRuntime",
    "ClientState",
    "ClusteringConfig",
    "FederatedOrchestrator",
    "FederatedResult",
    "FederationConfig",
    "FederationError",
    "FederationRunner",
    "HiLoRAStrategy",
    "LoaderSpec",
    "Payload",
    "RoundRecord",
    "ServerState",
    "Strategy",
    "split_unseen",
]
