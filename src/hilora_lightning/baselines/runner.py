"""``BaselineRunner``: one federated LoRA baseline on the same round engine as HiLoRA.

Same clients, same seeded client sampling per round, same seeds, same local optimizer and
Lightning Trainer per client update, same evaluation, unseen-client protocol, reply validation,
atomic checkpoints and resume as :class:`~hilora_lightning.federation.FederatedOrchestrator`: both
are a :class:`~hilora_lightning.federation.engine.FederationRunner` over a strategy; only the
strategy (a :class:`~hilora_lightning.baselines.strategy.BaselineStrategy` built from a
:class:`~hilora_lightning.baselines.methods.Method`) differs. Failing clients are dropped and
recorded; a round with fewer than ``min_clients`` successes raises
:class:`~hilora_lightning.federation.FederationError` and leaves the state of the last round.

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.baselines import BaselineRunner, FedIT
    >>> from hilora_lightning.data import digits_federation
    >>> from hilora_lightning.federation import FederationConfig
    >>> runner = BaselineRunner(FedIT(rounds=2), HiLoRAViT(), digits_federation(3),
    ...                         FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1),
    ...                                          local_steps=2), progress=False)
    >>> result = runner.run()  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from hilora_lightning.baselines.methods import Method
from hilora_lightning.baselines.strategy import BaselineStrategy
from hilora_lightning.data.clients import ClientData
from hilora_lightning.federation.backend import ClientBackend, HoldsStores
from hilora_lightning.federation.client import check_federation
from hilora_lightning.federation.config import FederationConfig
from hilora_lightning.federation.engine import Payload, in_process_runner
from hilora_lightning.federation.local import LoaderSpec
from hilora_lightning.federation.plan import ClientStore
from hilora_lightning.federation.result import FederatedResult, RoundRecord
from hilora_lightning.model import HiLoRAViT

__all__ = ["BaselineRunner", "prepare_baseline_model"]


def prepare_baseline_model(method: Method, model: HiLoRAViT) -> HiLoRAViT:
    """A copy of ``model`` set up for ``method``: no orthogonality penalty, the method's gates.

    The caller's model is never changed (a baseline run leaves it as it was handed in).
    """
    acfg = model.adapter_config
    if method.rule == "others" and acfg.cluster.rank != acfg.leaf.rank:
        raise ValueError(
            f"{method.name} keeps the rest-of-world LoRA (an average of individual LoRAs) in the cluster slot: "
            f"it needs cluster rank == leaf rank, got {acfg.cluster.rank} and {acfg.leaf.rank}"
        )
    own = copy.deepcopy(model).cpu()
    own.hparams["gamma_c"] = own.hparams["gamma_l"] = 0.0
    own.set_gates(method.gate_tiers if method.gate_mode else None, method.gate_mode or "input", method.gate_init)
    return own


class BaselineRunner:
    """Run ``method`` over ``clients`` with a copy of the shared model and the run's :class:`FederationConfig`.

    Uses ``config.rounds``, sampling (``fraction_fit``, ``min_clients``), ``local_steps`` /
    ``local_epochs``, ``batch_size``, ``head_policy``, ``eval_every``, ``finetune_epochs``,
    ``max_update_norm`` and ``seed``; the stage and clustering fields are HiLoRA's and ignored. The
    orthogonality penalty is off (no baseline has one). ``upload_hook`` sees every upload as a
    :class:`~hilora_lightning.federation.Payload` (tier: the slot uploaded) and may raise to reject it.
    With ``checkpoint_path`` the run checkpoints every round and ``run(resume=True)`` continues it.
    Clients and ``raise_client_errors`` as for :class:`~hilora_lightning.federation.FederatedOrchestrator`.
    """

    def __init__(
        self,
        method: Method,
        model: HiLoRAViT,
        clients: Sequence[ClientData | Any],
        config: FederationConfig,
        unseen: Sequence[ClientData] = (),
        trainer_kwargs: Mapping[str, Any] | None = None,
        upload_hook: Callable[[Payload], None] | None = None,
        progress: bool = True,
        checkpoint_path: str | Path | None = None,
        backend: ClientBackend | None = None,
        loader: LoaderSpec | Mapping[str, Any] | None = None,
        logger: Any = None,
        raise_client_errors: bool = False,
    ) -> None:
        if not isinstance(model, HiLoRAViT):
            raise TypeError(f"model must be a HiLoRAViT, got {type(model).__name__}")
        clients, unseen = check_federation(clients, unseen, config.min_clients)
        self.method, self.config = method, config
        self.model = prepare_baseline_model(method, model)
        self.clients = {c.client_id: c for c in clients}
        self.unseen = {c.client_id: c for c in unseen}
        self.strategy = BaselineStrategy(method, self.model, config)
        self.runner, self.backend, self.runtime = in_process_runner(
            self.strategy, self.model, clients, unseen, config, backend, trainer_kwargs, loader, checkpoint_path,
            upload_hook, progress, logger, raise_client_errors)

    def run(self, resume: bool = False, stop_after: int | None = None) -> FederatedResult:
        """Run every round, fuse (FDLoRA), evaluate the clients and the unseen clients."""
        return self.runner.run(resume=resume, stop_after=stop_after)

    @property
    def last_clustering(self) -> None:
        """Baselines do not cluster (for the experiment's plots, which ask every runner)."""
        return None

    @property
    def state(self) -> Any:
        """The committed server state, or the round in progress while one runs."""
        return self.runner.current

    @property
    def global_state(self) -> dict[str, Tensor]:
        """The global LoRA (the root slot's state)."""
        return self.runner.current.root

    @property
    def records(self) -> list[RoundRecord]:
        return self.runner.current.records

    @property
    def round(self) -> int:
        return self.runner.current.round

    def client_store(self, client_id: int) -> ClientStore:
        """What stays on client ``client_id`` (personal LoRA, local ``B``, gates, head): in process only."""
        if not isinstance(self.backend, HoldsStores):
            raise RuntimeError("client stores live on the clients with a remote backend")
        return self.backend.store(client_id)

    def evaluate_clients(self) -> dict[int, float]:
        """Personalized accuracy of every training client with the method's evaluation slots."""
        return self.runner.evaluate(self.strategy.configure_evaluate(self.runner.current))
