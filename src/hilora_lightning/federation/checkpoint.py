"""Atomic federation checkpoints: write to a temp file, fsync, rename; load without unpickling code.

The state is a nested structure of dicts, lists, strings, numbers and tensors, saved with
``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses arbitrary
pickled objects. A crash (even SIGKILL) while writing leaves the previous checkpoint intact.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from hilora_lightning.federation.checkpoint import load_checkpoint, save_checkpoint
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = save_checkpoint({"round": 3, "root": {"x.lora_A": torch.ones(2)}}, d / "fed.pt")
    >>> load_checkpoint(d / "fed.pt")["round"]
    3
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hilora_lightning.atomic import atomic_write
from hilora_lightning.errors import HiLoraError
from hilora_lightning.federation.client import ClientState
from hilora_lightning.federation.result import RoundRecord
from hilora_lightning.tiers import Tier

if TYPE_CHECKING:
    from hilora_lightning.federation.orchestrator import FederatedOrchestrator

__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "federation_state", "load_checkpoint", "restore_federation",
           "save_checkpoint"]

CHECKPOINT_VERSION = 1


class CheckpointError(HiLoraError, RuntimeError):
    """A federation checkpoint is unreadable or belongs to a different run."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` atomically to ``path`` (the directory is created if needed)."""
    return atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no federation checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable federation checkpoint: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, expected a federation state dict")
    return state


def federation_state(orch: FederatedOrchestrator) -> dict[str, Any]:
    """Everything an orchestrator needs to resume bit for bit (tensors, numbers, strings, lists, dicts)."""
    return {
        "version": CHECKPOINT_VERSION,
        "config": repr(orch.config),
        "client_ids": sorted(orch.clients),
        "round": orch.round,
        "stage": orch.stage.value,
        "rounds_in_stage": orch.rounds_in_stage,
        "root": orch.root,
        "global_head": orch.global_head,
        "clusters": orch.clusters,
        "cluster_heads": orch.cluster_heads,
        "assignment": orch.assignment,
        "cluster_centers": orch.cluster_centers,
        "num_clusters": orch.num_clusters,
        "clustering_ari": orch.clustering_ari,
        "clients": {cid: dataclasses.asdict(s) for cid, s in orch.client_states.items()},
        "records": [r.to_dict() for r in orch.records],
        "has_final": {t.value: sorted(v) for t, v in orch.has_final.items()},
        "elapsed": orch.elapsed,
    }


def restore_federation(orch: FederatedOrchestrator, state: Mapping[str, Any]) -> None:
    """Restore :func:`federation_state` into ``orch``; refuses a checkpoint of a different run."""
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint version {state.get('version')!r}, expected {CHECKPOINT_VERSION}")
    if state.get("config") != repr(orch.config) or state.get("client_ids") != sorted(orch.clients):
        raise CheckpointError(
            "the checkpoint belongs to a different run (config or client ids differ); "
            "resume with the same FederationConfig and clients, or start a new checkpoint path"
        )
    orch.round, orch.rounds_in_stage = int(state["round"]), int(state["rounds_in_stage"])
    orch.stage = Tier.parse(state["stage"])
    orch.root, orch.global_head = dict(state["root"]), dict(state["global_head"])
    orch.clusters = {int(k): dict(v) for k, v in state["clusters"].items()}
    orch.cluster_heads = {int(k): dict(v) for k, v in state["cluster_heads"].items()}
    orch.assignment = {int(k): int(v) for k, v in state["assignment"].items()}
    orch.cluster_centers = {int(k): list(v) for k, v in state["cluster_centers"].items()}
    orch.num_clusters, orch.clustering_ari = int(state["num_clusters"]), state["clustering_ari"]
    orch.client_states = {int(k): ClientState(**v) for k, v in state["clients"].items()}
    orch.records = [RoundRecord.from_dict(r) for r in state["records"]]
    orch.has_final = {Tier.parse(k): set(v) for k, v in state["has_final"].items()}
    orch.elapsed = float(state["elapsed"])
