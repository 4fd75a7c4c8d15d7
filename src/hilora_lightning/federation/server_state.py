"""The server's state as one value: what a round reads, and what it builds and commits once.

A round works on :meth:`ServerState.copy` (containers copied, tensors shared: they are replaced,
never changed in place) and the runner commits the copy only when the round completes, so a round
that fails leaves the previous state untouched, in memory and on disk. :meth:`ServerState.to_dict`
holds only tensors, numbers, strings, lists and dicts (a ``weights_only`` checkpoint).

Example:
    >>> import torch
    >>> from hilora_lightning.federation.server_state import ServerState
    >>> s = ServerState(root={"m.lora_A": torch.ones(1, 2)})
    >>> work = s.copy()
    >>> work.round, work.root["m.lora_A"] = 1, torch.zeros(1, 2)
    >>> s.round, float(s.root["m.lora_A"].sum())
    (0, 2.0)
    >>> ServerState.from_dict(work.to_dict()).round
    1
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from hilora_lightning.federation.result import RoundRecord
from hilora_lightning.tiers import Tier

__all__ = ["ClientState", "ServerState"]

State = dict[str, Tensor]


@dataclasses.dataclass
class ClientState:
    """What the server knows about a client between rounds (its leaf and personal head stay on the client).

    Attributes:
        features: the server's EMA of the client's LSAC feature per adapted matrix (root stage, and
            the cluster stage when re-clustering).
        rounds_trained: how many rounds the client took part in.
        study_features: with ``clustering.study``, every LSAC feature's EMA (``{feature: per matrix}``).
        last_score: its latest per-round evaluation score (carried into a round it could not be scored in).
    """

    features: dict[str, Tensor] | None = None
    rounds_trained: int = 0
    study_features: dict[str, dict[str, Tensor]] | None = None
    last_score: float | None = None


def _copy(value: Any) -> Any:
    """Containers copied to any depth, tensors and other leaves shared."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, set):
        return set(value)
    if isinstance(value, (ClientState, RoundRecord)):
        return copy.copy(value)
    return value


@dataclasses.dataclass
class ServerState:
    """Everything the server holds about a federation.

    Attributes:
        round: completed rounds.
        stage: the tier being trained (HiLoRA); ``rounds_in_stage``: rounds spent in it.
        root: the root tier (baselines: the global LoRA); ``global_head``: its head.
        clusters, cluster_heads: per cluster id, the cluster tier and head.
        assignment: client id -> cluster id (empty before the transition).
        cluster_centers: per cluster, per adapted matrix: its routing subspace.
        num_clusters, clustering_ari: K, and the ARI against known latent groups.
        clients: per training client, what the server keeps about it (:class:`ClientState`).
        records: one :class:`~hilora_lightning.federation.result.RoundRecord` per completed round.
        has_final: per shared tier, the clients that already hold it frozen (not sent again).
        elapsed: seconds spent in rounds.
        extra: strategy-specific values (baselines: every client's latest upload, rest-of-world LoRAs).
    """

    round: int = 0
    stage: Tier = Tier.ROOT
    rounds_in_stage: int = 0
    root: State = dataclasses.field(default_factory=dict)
    global_head: State = dataclasses.field(default_factory=dict)
    clusters: dict[int, State] = dataclasses.field(default_factory=dict)
    cluster_heads: dict[int, State] = dataclasses.field(default_factory=dict)
    assignment: dict[int, int] = dataclasses.field(default_factory=dict)
    cluster_centers: dict[int, list[Tensor]] = dataclasses.field(default_factory=dict)
    num_clusters: int = 0
    clustering_ari: float | None = None
    clients: dict[int, ClientState] = dataclasses.field(default_factory=dict)
    records: list[RoundRecord] = dataclasses.field(default_factory=list)
    has_final: dict[Tier, set[int]] = dataclasses.field(
        default_factory=lambda: {Tier.ROOT: set(), Tier.CLUSTER: set()})
    elapsed: float = 0.0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def copy(self) -> ServerState:
        """A working copy for one round: containers copied, tensors shared."""
        return ServerState(**{f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to_dict(self) -> dict[str, Any]:
        """Tensors, numbers, strings, lists and dicts only (``torch.load(weights_only=True)`` reads it)."""
        return {
            "round": self.round,
            "stage": self.stage.value,
            "rounds_in_stage": self.rounds_in_stage,
            "root": self.root,
            "global_head": self.global_head,
            "clusters": self.clusters,
            "cluster_heads": self.cluster_heads,
            "assignment": self.assignment,
            "cluster_centers": self.cluster_centers,
            "num_clusters": self.num_clusters,
            "clustering_ari": self.clustering_ari,
            "clients": {cid: dataclasses.asdict(s) for cid, s in self.clients.items()},
            "records": [r.to_dict() for r in self.records],
            "has_final": {t.value: sorted(v) for t, v in self.has_final.items()},
            "elapsed": self.elapsed,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ServerState:
        """The inverse of :meth:`to_dict` (integer keys restored)."""
        return cls(
            round=int(data["round"]),
            stage=Tier.parse(data["stage"]),
            rounds_in_stage=int(data["rounds_in_stage"]),
            root=dict(data["root"]),
            global_head=dict(data["global_head"]),
            clusters={int(k): dict(v) for k, v in data["clusters"].items()},
            cluster_heads={int(k): dict(v) for k, v in data["cluster_heads"].items()},
            assignment={int(k): int(v) for k, v in data["assignment"].items()},
            cluster_centers={int(k): list(v) for k, v in data["cluster_centers"].items()},
            num_clusters=int(data["num_clusters"]),
            clustering_ari=data["clustering_ari"],
            clients={int(k): ClientState(**v) for k, v in data["clients"].items()},
            records=[RoundRecord.from_dict(r) for r in data["records"]],
            has_final={Tier.parse(k): {int(c) for c in v} for k, v in data["has_final"].items()},
            elapsed=float(data["elapsed"]),
            extra=_int_keys(dict(data.get("extra", {}))),
        )


def _int_keys(extra: dict[str, Any]) -> dict[str, Any]:
    """Per-client maps in ``extra`` (``{client_id: state}``) come back with int keys."""
    out: dict[str, Any] = {}
    for key, value in extra.items():
        if isinstance(value, dict) and value and all(isinstance(k, (int, str)) and str(k).isdigit() for k in value):
            out[key] = {int(k): v for k, v in value.items()}
        else:
            out[key] = value
    return out
