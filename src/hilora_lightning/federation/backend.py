"""Where client work runs: in this process (the default) or on remote nodes (the Flower backend).

The runner decides *what* every client does (a batch of :class:`LocalPlan` / :class:`ScorePlan`)
and aggregates; a backend *executes* the batch. Both backends run the same
:class:`~hilora_lightning.federation.runtime.ClientRuntime`: :class:`InProcessBackend` keeps one
store per client in a dict, the Flower ClientApp keeps it in ``context.state``. Requests go out as
a batch, so a remote backend runs the clients in parallel.

Example:
    >>> from hilora_lightning.federation.backend import InProcessBackend
    >>> backend = InProcessBackend()
    >>> backend.state_dict()
    {}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from hilora_lightning.data.clients import ClientData
from hilora_lightning.federation.plan import ClientStore, FitReply, LocalPlan, ScorePlan
from hilora_lightning.federation.runtime import ClientRuntime

__all__ = ["ClientBackend", "FitReply", "HoldsStores", "InProcessBackend", "LocalPlan", "ReportsProgress", "RunsHere",
           "ScorePlan"]


@runtime_checkable
class ClientBackend(Protocol):
    """Executes batches of client requests; a failed client maps to the exception it raised.

    ``reject`` undoes what rejected clients stored in this round, ``state_dict`` / ``load_state_dict``
    snapshot the client-side stores the backend holds (nothing for a remote backend), so a failed
    round leaves them as they were and a checkpoint resumes them.
    """

    def fit(self, requests: Mapping[int, LocalPlan]) -> dict[int, FitReply | Exception]:
        ...

    def evaluate(self, requests: Mapping[int, ScorePlan]) -> dict[int, float | Exception]:
        ...

    def reject(self, client_ids: Iterable[int]) -> None:
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ...


@runtime_checkable
class RunsHere(Protocol):
    """A backend that runs clients on a model in this process: the runner binds it to the client runtime."""

    def bind(self, runtime: ClientRuntime, data: Iterable[ClientData]) -> None:
        ...


@runtime_checkable
class HoldsStores(Protocol):
    """A backend that holds the client stores (so a client's leaf and head can be read back, in process)."""

    def store(self, client_id: int) -> ClientStore:
        ...


@runtime_checkable
class ReportsProgress(Protocol):
    """A backend that calls ``on_client(done)`` after each client of a fit batch (the progress bar)."""

    on_client: Callable[[int], None] | None


class InProcessBackend:
    """Every client in turn on one shared model, each with its own store (the default backend).

    The orchestrator binds it to its runtime and clients (:meth:`bind`); the stores are part of the
    federation checkpoint (frozen tiers excepted: in process the server always sends them).
    """

    def __init__(self) -> None:
        self.runtime: ClientRuntime | None = None
        self.data: dict[int, ClientData] = {}
        self.stores: dict[int, ClientStore] = {}
        self._before: dict[int, ClientStore] = {}
        #: called with the number of clients done after each client of a fit batch (the progress bar)
        self.on_client: Callable[[int], None] | None = None

    def bind(self, runtime: ClientRuntime, data: Iterable[ClientData]) -> None:
        """Serve ``data``'s clients with ``runtime``."""
        self.runtime = runtime
        self.data = {c.client_id: c for c in data}

    def store(self, client_id: int) -> ClientStore:
        """What stays on client ``client_id`` (empty before its first plan)."""
        return self.stores.get(client_id, ClientStore())

    def _runtime(self) -> ClientRuntime:
        if self.runtime is None:
            raise RuntimeError("InProcessBackend is not bound to a runtime; the orchestrator binds it (bind())")
        return self.runtime

    def fit(self, requests: Mapping[int, LocalPlan]) -> dict[int, FitReply | Exception]:
        runtime = self._runtime()
        out: dict[int, FitReply | Exception] = {}
        self._before = {}
        for cid, plan in requests.items():
            store = self.store(cid)
            self._before[cid] = store
            try:
                out[cid], self.stores[cid] = runtime.fit(plan, self.data[cid], store)
            except Exception as exc:  # reported per client (its store unchanged); the runner drops and records it
                out[cid] = exc
            if self.on_client is not None:
                self.on_client(len(out))
        return out

    def evaluate(self, requests: Mapping[int, ScorePlan]) -> dict[int, float | Exception]:
        runtime = self._runtime()
        out: dict[int, float | Exception] = {}
        try:
            for cid, req in requests.items():
                try:
                    out[cid] = runtime.evaluate(req, self.data[cid], self.store(cid))
                except Exception as exc:
                    out[cid] = exc
        finally:
            runtime.release()  # the model stayed on its device for the whole batch
        return out

    def reject(self, client_ids: Iterable[int]) -> None:
        for cid in client_ids:
            if cid in self._before:
                self.stores[cid] = self._before[cid]

    def state_dict(self) -> dict[str, Any]:
        flat = {cid: store.to_dict(frozen=False) for cid, store in sorted(self.stores.items())}
        return {str(cid): d for cid, d in flat.items() if d}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stores = {int(cid): ClientStore.from_dict(store) for cid, store in state.items()}
