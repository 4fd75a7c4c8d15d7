"""Run a HiLoRA experiment config on Flower's simulation engine (one call, returns the result).

Example:
    >>> from hilora_lightning.flower.simulation import run_simulation
    >>> cfg = {"data": {"name": "digits", "num_clients": 4, "unseen_fraction": 0.0}}
    >>> orch, result = run_simulation(cfg, num_supernodes=4)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.simulation import run_simulation as flwr_run_simulation

from hilora_lightning.experiment import build_clients
from hilora_lightning.federation.result import FederatedResult
from hilora_lightning.flower.client_app import make_client_app
from hilora_lightning.flower.server_app import make_server_app

__all__ = ["run_simulation"]


def run_simulation(
    cfg: Mapping[str, Any],
    num_supernodes: int | None = None,
    out_dir: str | Path | None = None,
    num_cpus_per_client: float = 1.0,
    fault: Callable[[int, int, str], None] | None = None,
    message_hook: Callable[[str, Message], None] | None = None,
    verbose: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    overwrite: bool = False,
    audit_dir: str | Path | None = None,
    clients_per_node: int = 1,
) -> tuple[Any, FederatedResult]:
    """Simulate the federation of ``cfg`` with one virtual SuperNode per client (training, then unseen).

    Args:
        cfg: the experiment config (as for ``hilora-fl run``).
        num_supernodes: how many nodes (default: the number of training clients of ``cfg``).
        out_dir: where the server writes ``federation.pt``, ``result.json`` and ``rounds.csv``.
        num_cpus_per_client: Ray resources per ClientApp (how many train at once).
        fault, message_hook: see :func:`make_client_app` and :class:`FlowerBackend`.
        resume, stop_after: continue from ``out_dir/federation.pt``; stop after that many rounds.
        overwrite: replace the run that ``out_dir`` holds (without it, or ``resume``, such a folder is refused).
        audit_dir: every node audits every message it receives and sends into this folder
            (:mod:`hilora_lightning.flower.audit`).
        clients_per_node: each node serves this many clients (a site with several data sets; node ``p`` serves
            clients ``p k .. p k + k - 1``) and runs a batch's plans for them together (batched when the config's
            ``backend.name`` is ``batched``); ``num_supernodes`` then defaults to the clients / ``k``, rounded up.
    """
    clients, unseen = build_clients(cfg.get("data", {}), int(cfg.get("seed", 0)))
    if clients_per_node < 1:
        raise ValueError(f"clients_per_node must be >= 1, got {clients_per_node}")
    total = len(clients) + len(unseen)
    n = num_supernodes or -(-total // clients_per_node)
    if (n - 1) * clients_per_node >= total:
        raise ValueError(f"num_supernodes={n} exceeds what the {len(clients)} training and {len(unseen)} unseen "
                         f"clients of the config fill at {clients_per_node} per node")
    captured: dict[str, Any] = {}

    def keep(orch: Any, result: FederatedResult) -> None:
        captured["orch"], captured["result"] = orch, result

    server = make_server_app(cfg, out_dir=out_dir, resume=resume, on_result=keep, message_hook=message_hook,
                             min_nodes=n, stop_after=stop_after, overwrite=overwrite)
    backend: dict[str, Any] = {"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0}}
    client = make_client_app(cfg, fault, audit_dir=audit_dir, clients_per_node=clients_per_node)
    flwr_run_simulation(server, client, num_supernodes=n, backend_config=backend, verbose_logging=verbose)
    if "result" not in captured:
        raise RuntimeError("the Flower simulation ended without a result; see the log above for the ServerApp error")
    return captured["orch"], captured["result"]
