"""HiLoRA on Flower: a ServerApp (the orchestrator's loop over Flower's Grid) and a ClientApp.

Needs the optional extra: ``pip install "hilora-lightning[flower]"`` (Flower >= 1.22, Message API;
the simulation engine needs ``flwr[simulation]``, which the extra includes). The rest of the
package never imports ``flwr``.

Example:
    >>> from hilora_lightning.flower import make_client_app, make_server_app, run_simulation
    >>> cfg = {"data": {"name": "digits", "num_clients": 4, "unseen_fraction": 0.0}}
    >>> run_simulation(cfg, num_supernodes=4)  # doctest: +SKIP
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "hilora_lightning.flower needs Flower: install the extra with pip install 'hilora-lightning[flower]' "
        "(or pip install 'flwr[simulation]>=1.22')"
    ) from exc

from hilora_lightning.flower.client_app import make_client_app
from hilora_lightning.flower.server_app import FlowerBackend, RemoteData, make_server_app, run_federation
from hilora_lightning.flower.simulation import run_simulation

__all__ = ["FlowerBackend", "RemoteData", "make_client_app", "make_server_app", "run_federation", "run_simulation"]
