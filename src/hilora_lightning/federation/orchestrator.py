"""``FederatedOrchestrator``: a whole personalized HiLoRA federation, the public entry point.

It wires three pieces of the round engine together: the :class:`~hilora_lightning.federation.hilora.HiLoRAStrategy`
(what every client does, aggregation, stages, LSAC), a backend with the one client runtime
(:class:`~hilora_lightning.federation.backend.InProcessBackend` by default: one frozen backbone
shared by every simulated client; the Flower ServerApp passes its own), and the
:class:`~hilora_lightning.federation.engine.FederationRunner` (the loop, selection, validation,
records, evaluation cadence, atomic checkpoints, resume). Each round builds a new
:class:`~hilora_lightning.federation.server_state.ServerState` and commits it once.

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.data import digits_federation
    >>> from hilora_lightning.federation import FederatedOrchestrator, FederationConfig
    >>> orch = FederatedOrchestrator(
    ...     HiLoRAViT(), digits_federation(4),
    ...     FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_steps=2),
    ...     progress=False)
    >>> result = orch.run()  # doctest: +SKIP
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from hilora_lightning.data.clients import ClientData
from hilora_lightning.federation.backend import ClientBackend, HoldsStores
from hilora_lightning.federation.client import ClientState, check_federation
from hilora_lightning.federation.config import FederationConfig
from hilora_lightning.federation.engine import FederationError, Payload, in_process_runner, require_min_clients
from hilora_lightning.federation.hilora import HiLoRAStrategy
from hilora_lightning.federation.local import LoaderSpec
from hilora_lightning.federation.plan import ClientStore
from hilora_lightning.federation.result import FederatedResult, RoundRecord
from hilora_lightning.federation.server_state import ServerState
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.tiers import Tier

__all__ = ["FederatedOrchestrator", "FederationError", "Payload", "require_min_clients"]


class FederatedOrchestrator:
    """Drive Lightning Trainers as federated clients through HiLoRA's stage-wise schedule.

    Args:
        model: the shared :class:`HiLoRAViT` (frozen backbone; its tiers are overwritten per client).
        clients: the training clients: :class:`ClientData`, ``LightningDataModule``s (one per client) or
            ``(train, test)`` / ``(train, val, test)`` tuples of data sets (ids by position).
        config: schedule, sampling, local training and clustering settings.
        unseen: held-out clients, evaluated at the end by probe routing (generalization table).
        trainer_kwargs: passed to every local ``lightning.pytorch.Trainer`` (``precision``,
            ``accelerator``, ``devices``, ``logger``, ...); ``callbacks`` may be a list (each client
            fit gets deep copies) or a factory returning a fresh list.
        checkpoint_path: where the federation state is written atomically after every round.
        upload_hook: called with every received :class:`Payload` before validation (inspection,
            logging, privacy noise); may raise to reject it.
        progress: print a line per round.
        backend: where client work runs (default :class:`InProcessBackend`; the Flower ServerApp
            passes one that sends messages to ClientApps).
        loader: DataLoader options of every client loader (``num_workers``, ``pin_memory``,
            ``persistent_workers``, ``collate_fn``, ``image_key`` / ``label_key`` of dict samples).
        logger: a Lightning logger or a list of them (``CSVLogger``, ``TensorBoardLogger``, W&B,
            MLflow...): per-round ``fed/...`` metrics (step = round), ``k``/``ari`` at the transition,
            the settings as hyper-parameters once, and the final figures (see
            :mod:`hilora_lightning.federation.loggers`).
        raise_client_errors: re-raise the first client exception with its traceback instead of
            dropping the client (debugging your data; tests asserting inside a client callback).

    The state (``round``, ``stage``, ``root``, ``clusters``, ``assignment``...) reads the committed
    :class:`ServerState`, or the round in progress while one runs.
    """

    def __init__(
        self,
        model: HiLoRAViT,
        clients: Sequence[ClientData | Any],
        config: FederationConfig,
        unseen: Sequence[ClientData] = (),
        trainer_kwargs: Mapping[str, Any] | None = None,
        checkpoint_path: str | Path | None = None,
        upload_hook: Callable[[Payload], None] | None = None,
        progress: bool = True,
        backend: ClientBackend | None = None,
        loader: LoaderSpec | Mapping[str, Any] | None = None,
        logger: Any = None,
        raise_client_errors: bool = False,
    ) -> None:
        if not isinstance(model, HiLoRAViT):
            raise TypeError(f"model must be a HiLoRAViT, got {type(model).__name__}")
        clients, unseen = check_federation(clients, unseen, config.min_clients)
        self.model = model.cpu()
        self.clients = {c.client_id: c for c in clients}
        self.unseen = {c.client_id: c for c in unseen}
        self.config = config
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.strategy = HiLoRAStrategy(model, config, {c.client_id: c.group for c in clients},
                                       recluster_policy=lambda state: self.should_recluster(state.round + 1))
        self.runner, self.backend, self.runtime = in_process_runner(
            self.strategy, model, clients, unseen, config, backend, self.trainer_kwargs, loader, checkpoint_path,
            upload_hook, progress, logger, raise_client_errors)

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False, stop_after: int | None = None) -> FederatedResult:
        """Run (or, with ``resume``, continue from the checkpoint) until the round budget is spent.

        Args:
            resume: continue from ``checkpoint_path`` if a checkpoint exists there.
            stop_after: return after this many completed rounds in total (to split a run). A result
                returned before the budget is spent carries the records but not the final tables.
        """
        return self.runner.run(resume=resume, stop_after=stop_after)

    def select_clients(self, round_idx: int) -> list[int]:
        """Seeded sampling of ``max(min_clients, ceil(fraction_fit * n))`` clients."""
        return self.runner.select(round_idx)

    def should_recluster(self, round_idx: int) -> bool:
        """Whether to re-cluster after this cluster-stage round (override for another policy).

        Default: every ``clustering.recluster_every`` cluster-stage rounds, never if that is ``None``.
        """
        return self.strategy.default_recluster(self.state)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit for bit (tensors, numbers, strings, lists, dicts)."""
        return self.runner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; refuses a checkpoint of a different run."""
        self.runner.load_state_dict(state)

    # ------------------------------------------------------------------ state (read-only views)
    @property
    def state(self) -> ServerState:
        """The committed server state, or the round in progress while one runs."""
        return self.runner.current

    @property
    def checkpoint_path(self) -> Path | None:
        return self.runner.checkpoint_path

    @checkpoint_path.setter
    def checkpoint_path(self, path: str | Path | None) -> None:
        self.runner.checkpoint_path = Path(path) if path else None

    @property
    def progress(self) -> bool:
        return self.runner.progress

    @progress.setter
    def progress(self, on: bool) -> None:
        self.runner.progress = on

    @property
    def round(self) -> int:
        return self.state.round

    @property
    def stage(self) -> Tier:
        return self.state.stage

    @property
    def rounds_in_stage(self) -> int:
        return self.state.rounds_in_stage

    @property
    def root(self) -> dict[str, Tensor]:
        return self.state.root

    @property
    def global_head(self) -> dict[str, Tensor]:
        return self.state.global_head

    @property
    def clusters(self) -> dict[int, dict[str, Tensor]]:
        return self.state.clusters

    @property
    def cluster_heads(self) -> dict[int, dict[str, Tensor]]:
        return self.state.cluster_heads

    @property
    def assignment(self) -> dict[int, int]:
        return self.state.assignment

    @property
    def cluster_centers(self) -> dict[int, list[Tensor]]:
        return self.state.cluster_centers

    @property
    def num_clusters(self) -> int:
        return self.state.num_clusters

    @property
    def clustering_ari(self) -> float | None:
        return self.state.clustering_ari

    @property
    def client_states(self) -> dict[int, ClientState]:
        return self.state.clients

    @property
    def records(self) -> list[RoundRecord]:
        return self.state.records

    @property
    def has_final(self) -> dict[Tier, set[int]]:
        return self.state.has_final

    @property
    def last_clustering(self) -> tuple[list[int], Any] | None:
        """``(client ids, result)`` of the transition (for plots), if any: ``result`` has ``labels``, ``k`` and
        ``distances``; after a resume it is read back from the state."""
        if self.strategy.last_clustering is not None:
            return self.strategy.last_clustering
        saved = self.state.extra.get("lsac")
        if not saved:
            return None
        res = types.SimpleNamespace(labels=np.asarray(saved["labels"]), k=int(saved["k"]),
                                    distances=saved["distances"].numpy())
        return list(saved["ids"]), res

    def client_store(self, client_id: int) -> ClientStore:
        """What stays on client ``client_id`` (its leaf, personal head...): in process only."""
        if not isinstance(self.backend, HoldsStores):
            raise RuntimeError("client stores live on the clients with a remote backend; ask the client")
        return self.backend.store(client_id)

    # ------------------------------------------------------------------ deployment
    def client_model(self, client_id: int) -> tuple[dict[Tier, dict[str, Tensor]], dict[str, Tensor]]:
        """Client ``client_id``'s tiers (root, its cluster, its leaf as far as it has them) and head.

        Training clients use their assigned cluster; an unseen client, after :meth:`run`, the cluster
        it was routed to and its fine-tuned leaf and head. In process only (a remote client's leaf
        never reaches the server).
        """
        if client_id not in self.clients and client_id not in self.unseen:
            raise ValueError(f"no client {client_id}: training clients {sorted(self.clients)}, unseen "
                             f"{sorted(self.unseen)}")
        return self.strategy.client_model(self.state, client_id, self.client_store(client_id),
                                          unseen=client_id in self.unseen)

    def export_client(self, client_id: int, out_dir: str | Path, format: str = "timm") -> list[Path]:
        """Write client ``client_id``'s personalized model for deployment (``"timm"``, ``"peft"`` or
        ``"tiers"``; see :mod:`hilora_lightning.export`). Returns the written files."""
        from hilora_lightning.export import export_client_model

        tiers, head = self.client_model(client_id)
        return export_client_model(self.model, tiers, head, out_dir, format, client_id)

    # ------------------------------------------------------------------ evaluation
    def head_for(self, cid: int, tier: Tier) -> dict[str, Tensor]:
        """The server's head for client ``cid`` at ``tier`` (by the head policy)."""
        return self.strategy.head_for(self.state, cid, tier)

    def evaluate_clients(self, tiers: list[Tier], head_level: Tier | None = None) -> dict[int, float]:
        """Accuracy of every training client on its own test split with ``tiers`` active."""
        return self.runner.evaluate(self.strategy.evaluation_requests(self.state, tiers, head_level))
