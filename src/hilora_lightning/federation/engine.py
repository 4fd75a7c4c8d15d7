"""One round engine for HiLoRA and the baselines: a strategy in Flower's Message-API shape, one runner.

A :class:`Strategy` decides and aggregates; it never trains. Per round it is asked, in Flower's
order, for the local plans of each fit phase (``configure_fit``), folds the validated replies in
(``aggregate_fit``), moves its schedule on (``end_of_round``: HiLoRA's stage change and clustering),
and names what to evaluate (``configure_evaluate``). The :class:`FederationRunner` owns the rest,
once for every strategy: the loop, seeded client selection, ``min_clients``, reply validation
against the model's expected shapes (heads included, :mod:`~hilora_lightning.federation.replies`),
records, evaluation cadence, atomic
checkpoints with resume, and the round counter. A round works on a copy of the
:class:`~hilora_lightning.federation.server_state.ServerState` and commits it once.

Example:
    >>> from hilora_lightning.federation.engine import Expected
    >>> Expected(factors=None, head=None).allows_upload
    False
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from hilora_lightning.data.clients import ClientData
from hilora_lightning.federation.backend import ClientBackend, ReportsProgress
from hilora_lightning.federation.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hilora_lightning.federation.client import select_clients
from hilora_lightning.federation.failures import failure_text
from hilora_lightning.federation.fingerprint import client_items, differences, lengthened
from hilora_lightning.federation.loggers import RoundLogger
from hilora_lightning.federation.plan import FitReply, LocalPlan, ScorePlan
from hilora_lightning.federation.progress import RoundProgress
from hilora_lightning.federation.replies import (
    Expected,
    FederationError,
    Payload,
    check_finite_state,
    check_reply,
    norm_outliers,
    require_min_clients,
)
from hilora_lightning.federation.result import FederatedResult, RoundRecord, accuracy_summary
from hilora_lightning.federation.server_state import ServerState
from hilora_lightning.tiers import Tier

__all__ = ["CHECKPOINT_VERSION", "Expected", "FederationError", "FederationRunner", "Payload", "RoundContext",
           "Strategy", "check_finite_state", "in_process_runner", "norm_outliers", "require_min_clients"]

CHECKPOINT_VERSION = 3


class RoundContext:
    """What a strategy may use between fits: the clients' metadata and the backend (probes, unseen clients)."""

    def __init__(self, backend: ClientBackend, clients: Mapping[int, ClientData], unseen: Mapping[int, ClientData],
                 raise_client_errors: bool = False):
        self.backend, self.clients, self.unseen = backend, clients, unseen
        #: re-raise the first client exception (with its traceback) instead of recording it
        self.raise_client_errors = raise_client_errors
        #: per step (``"probe"``, ``"final root"``, ``"unseen finetune"``...): client id -> why it failed
        self.failures: dict[str, dict[int, str]] = {}

    def _note(self, step: str, results: Mapping[int, Any]) -> None:
        for cid, value in results.items():
            if isinstance(value, Exception):
                if self.raise_client_errors:
                    raise value
                self.failures.setdefault(step, {})[cid] = failure_text(value)

    def fit(self, requests: Mapping[int, LocalPlan], step: str = "fit") -> dict[int, FitReply | Exception]:
        """Run fit requests (probes, fine-tunes) through the backend; failures are recorded under ``step``."""
        replies = self.backend.fit(requests) if requests else {}
        self._note(step, replies)
        return replies

    def evaluate(self, requests: Mapping[int, ScorePlan], step: str = "evaluate") -> dict[int, float | Exception]:
        results = self.backend.evaluate(requests) if requests else {}
        self._note(step, results)
        return results

    def scores(self, requests: Mapping[int, ScorePlan], step: str = "evaluate") -> dict[int, float]:
        """The scores of the clients that could be evaluated (a failing client is left out and recorded)."""
        return {cid: float(v) for cid, v in self.evaluate(requests, step).items() if not isinstance(v, Exception)}


class Strategy(Protocol):
    """A federated method as the runner drives it (HiLoRA, or a baseline built from its ``Method``)."""

    name: str

    def initial_state(self, clients: Sequence[int]) -> ServerState: ...

    def fingerprint(self) -> dict[str, str]: ...

    def fit_phases(self, state: ServerState) -> Sequence[Tier]: ...

    def stage_name(self, state: ServerState) -> str: ...

    def configure_fit(self, state: ServerState, t: int, selected: Sequence[int], phase: Tier
                      ) -> dict[int, LocalPlan]: ...

    def download_bytes(self, state: ServerState, request: LocalPlan) -> int: ...

    def expected(self, state: ServerState, phase: Tier) -> Expected: ...

    def aggregate_fit(self, state: ServerState, t: int, phase: Tier, payloads: Mapping[int, Payload],
                      ok: Sequence[int]) -> float | None: ...

    def end_of_round(self, state: ServerState, t: int, rho: float | None, ctx: RoundContext) -> None: ...

    def configure_evaluate(self, state: ServerState) -> dict[int, ScorePlan]: ...

    def finish(self, state: ServerState, ctx: RoundContext) -> FederatedResult: ...


class FederationRunner:
    """Runs a :class:`Strategy` over clients behind a backend: the one loop of every method.

    Args:
        strategy: the method.
        clients, unseen: training and held-out clients (metadata; the data is the backend's).
        backend: where client work runs.
        rounds, fraction_fit, min_clients, eval_every, seed: the schedule the runner owns.
        checkpoint_path: where the state is written atomically after every round.
        upload_hook: sees every upload (a :class:`Payload`) before validation; may raise to reject it.
        progress: print a line per round.
        raise_client_errors: re-raise the first exception of a client (fit, probe, evaluation) with its
            traceback, instead of dropping and recording the client (debugging; tests that assert
            inside a client).
    """

    def __init__(self, strategy: Strategy, clients: Mapping[int, ClientData], unseen: Mapping[int, ClientData],
                 backend: ClientBackend, rounds: int, fraction_fit: float = 1.0, min_clients: int = 1,
                 eval_every: int = 1, seed: int = 0, checkpoint_path: str | Path | None = None,
                 upload_hook: Callable[[Payload], None] | None = None, progress: bool = True,
                 fingerprint: Mapping[str, str] | None = None, logger: Any = None,
                 raise_client_errors: bool = False) -> None:
        self.strategy, self.backend = strategy, backend
        self.clients, self.unseen = dict(clients), dict(unseen)
        self.rounds, self.fraction_fit, self.min_clients = rounds, fraction_fit, min_clients
        self.eval_every, self.seed = eval_every, seed
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.upload_hook, self.progress = upload_hook, progress
        self.extra_fingerprint = dict(fingerprint or {})
        self.logger = RoundLogger(logger)
        self.bar: RoundProgress | None = None
        self.state = strategy.initial_state(sorted(self.clients))
        self.working: ServerState | None = None  # the round in progress (None between rounds)
        #: what a resume lengthened (``["federation.rounds: 5 -> 7"]``); empty for a plain resume
        self.lengthened: list[str] = []
        self.ctx = RoundContext(backend, self.clients, self.unseen, raise_client_errors)

    @property
    def current(self) -> ServerState:
        """The round in progress while one runs, else the committed state."""
        return self.working if self.working is not None else self.state

    # ------------------------------------------------------------------ checkpoints
    def fingerprint(self) -> dict[str, str]:
        """Everything that shapes the result (strategy, model, partition, trainer, format), as flat text items."""
        return {"format": str(CHECKPOINT_VERSION), **self.strategy.fingerprint(),
                **client_items(list(self.clients.values()), list(self.unseen.values())), **self.extra_fingerprint}

    def state_dict(self) -> dict[str, Any]:
        return {"version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint(), "client_ids": sorted(self.clients),
                "state": self.state.to_dict(), "client_stores": self.backend.state_dict()}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore a checkpoint of *this* run; any difference in what shapes the result is refused, listed."""
        check_version(data)
        saved, current = dict(data.get("fingerprint", {})), self.fingerprint()
        grew, rest = lengthened(saved, current)
        diff = differences({k: saved[k] for k in rest if k in saved}, {k: current[k] for k in rest if k in current})
        if diff:
            raise CheckpointError("the checkpoint belongs to a different run; resume with the same settings, "
                                  "model and clients (more federation.rounds is the one change a resume takes: it "
                                  "extends the run), or start a new checkpoint path. Differences: " + "; ".join(diff))
        state, stores = read_state(data)
        if not 0 <= state.round <= self.rounds or len(state.records) != state.round:
            raise CheckpointError(f"the checkpoint says round {state.round} with {len(state.records)} records, "
                                  f"but this run has {self.rounds} rounds; start a new checkpoint path")
        if set(state.clients) != set(self.clients):
            raise CheckpointError("the checkpoint's client states do not match this run's clients")
        self.state = state
        self.backend.load_state_dict(stores)
        self.lengthened = grew  # a finished run extended: more rounds (the last stage runs on)

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False, stop_after: int | None = None) -> FederatedResult:
        """Run (or, with ``resume``, continue from the checkpoint) until the round budget is spent."""
        if resume:
            if self.checkpoint_path is None:
                raise ValueError("resume=True needs a checkpoint_path")
            if self.checkpoint_path.exists():
                self.load_state_dict(load_checkpoint(self.checkpoint_path))
        last = self.rounds if stop_after is None else min(self.rounds, stop_after)
        if self.lengthened and self.progress:
            print(f"resuming round {self.state.round} with a longer schedule: {'; '.join(self.lengthened)}", flush=True)
        if self.logger:
            self.logger.hyperparams(self.fingerprint())
        self.bar = RoundProgress(self.rounds, self.state.round, self.progress)
        try:
            while self.state.round < last:
                self.step()
        finally:
            self.bar.close()
            self.bar = None
        if self.state.round < self.rounds:  # stopped early: records only, no extra evaluation
            s = self.state
            return FederatedResult(list(s.records), {}, {}, dict(s.assignment), s.num_clusters, s.clustering_ari,
                                   {}, {}, s.elapsed)
        self.ctx.failures = {}
        result = self.strategy.finish(self.state, self.ctx)
        result.failures = dict(self.ctx.failures)
        result.splits = {"rounds": self.eval_split(), "final": "test"}
        if self.checkpoint_path is not None:  # the unseen clients' stores (their fine-tuned leaves) too
            save_checkpoint(self.state_dict(), self.checkpoint_path)
        if self.logger:
            self.logger.results(result, self.state.round)
            self.logger.figures(self.state.records, self.state.extra.get("lsac"), self.state.round, result)
            self.logger.finalize("success")
        return result

    def step(self) -> RoundRecord:
        """Run one round on a working copy and commit it; a failure leaves state and stores as they were."""
        t = self.state.round + 1
        stores = self.backend.state_dict()
        self.working = self.state.copy()
        start = time.perf_counter()
        try:
            record = self._round(self.working, t)
        except BaseException:
            self.backend.load_state_dict(stores)
            raise
        finally:
            work, self.working = self.working, None
        record.seconds = time.perf_counter() - start
        work.elapsed += record.seconds
        work.records.append(record)
        work.round = t
        clustered = work.num_clusters and not self.state.num_clusters
        self.state = work  # the commit
        if self.checkpoint_path is not None:
            save_checkpoint(self.state_dict(), self.checkpoint_path)
        if self.logger:
            self.logger.round(record)
            if clustered:
                self.logger.metrics({"k": float(work.num_clusters), "ari": work.clustering_ari}, step=t)
        if self.progress:
            line = record.progress_line(self.rounds)
            if self.bar is not None:
                self.bar.end_round(line, record.acc_mean)
            else:
                print(line, flush=True)
        return record

    def select(self, t: int) -> list[int]:
        """Seeded sampling of ``max(min_clients, ceil(fraction_fit * n))`` clients for round ``t``."""
        return select_clients(list(self.clients), self.fraction_fit, self.min_clients, self.seed, t)

    def _round(self, work: ServerState, t: int) -> RoundRecord:
        strategy = self.strategy
        stage = strategy.fit_phases(work)
        selected = self.select(t)
        if self.bar is not None:
            self.bar.start_round(t, strategy.stage_name(work), len(selected))
            if isinstance(self.backend, ReportsProgress):
                self.backend.on_client = lambda done: self.bar.client_done(done, len(selected)) if self.bar else None
        failed: dict[int, str] = {}
        up = down = 0
        rho: float | None = None
        for phase in stage:
            requests = strategy.configure_fit(work, t, selected, phase)
            downloads = {cid: strategy.download_bytes(work, req) for cid, req in requests.items()}
            replies = self.ctx.fit(requests)
            expected = strategy.expected(work, phase)
            payloads: dict[int, Payload] = {}
            phase_failed: dict[int, str] = {}
            for cid in requests:
                reply = replies.get(cid, RuntimeError("no reply from the client"))
                if isinstance(reply, Exception) and self.ctx.raise_client_errors:
                    raise reply
                try:
                    if isinstance(reply, Exception):
                        raise reply
                    if expected.allows_upload and reply.factors is not None and self.upload_hook is not None:
                        self.upload_hook(Payload(cid, t, phase, reply.factors, reply.head,
                                                 self.clients[cid].num_samples))
                    check_reply(reply, expected)
                    payloads[cid] = Payload(cid, t, phase, reply.factors or {}, reply.head,
                                            self.clients[cid].num_samples)
                except Exception as exc:  # a failing client is dropped and recorded, the round goes on
                    phase_failed[cid] = failure_text(exc)
            phase_failed.update(norm_outliers(payloads, expected.outlier_norm))
            self.backend.reject(phase_failed)
            failed.update(phase_failed)
            ok = [cid for cid in selected if cid not in failed and cid in payloads]
            require_min_clients(t, ok, selected, self.min_clients, phase_failed, note=" (checkpoint untouched)")
            rho_phase = strategy.aggregate_fit(work, t, phase, {c: payloads[c] for c in ok}, ok)
            check_finite_state(work, t, {c: payloads[c] for c in ok})
            rho = rho_phase if rho_phase is not None else rho
            up += sum(payloads[c].nbytes for c in ok)
            down += sum(downloads.get(c, 0) for c in ok)
        succeeded = [cid for cid in selected if cid not in failed]
        for cid in succeeded:
            work.clients[cid].rounds_trained += 1
        rho_kept = rho if rho is not None and math.isfinite(rho) else None  # JSON has no inf
        record = RoundRecord(t, strategy.stage_name(work), selected, succeeded, failed, rho_kept,
                             bytes_up_per_client=up / max(len(succeeded), 1),
                             bytes_down_per_client=down / max(len(succeeded), 1))
        work.round = t - 1  # end_of_round reads the rounds completed before this one
        strategy.end_of_round(work, t, rho, self.ctx)
        spent = work.extra.get("privacy", {}).get("epsilon")  # a private strategy's ledger (federation.privacy)
        record.epsilon = None if spent is None else float(spent)
        if t % self.eval_every == 0 or t == self.rounds:
            plans = {c: dataclasses.replace(p, split="val") for c, p in strategy.configure_evaluate(work).items()}
            record.split = self.eval_split(plans)
            results = self.ctx.evaluate(plans, f"round {t} evaluate")
            record.eval_failed = {c: failure_text(v) for c, v in results.items() if isinstance(v, Exception)}
            accs = {c: float(v) for c, v in results.items() if not isinstance(v, Exception)}
            for c, acc in accs.items():
                work.clients[c].last_score = acc
            # a client that could not be scored keeps its last score: one that drops out cannot lift the mean
            record.evaluated = len(accs)
            record.carried = sorted(c for c in record.eval_failed if work.clients[c].last_score is not None)
            accs.update({c: float(work.clients[c].last_score) for c in record.carried})  # type: ignore[arg-type]
            summary = accuracy_summary(list(accs.values()))
            record.acc_mean, record.acc_p10, record.acc_min, record.acc_std = (
                summary["mean"], summary["p10"], summary["min"], summary["std"])
        return record

    def evaluate(self, requests: Mapping[int, ScorePlan]) -> dict[int, float]:
        """Scores of the clients that could be evaluated (a failing client is left out)."""
        return self.ctx.scores(requests)

    def eval_split(self, plans: Mapping[int, ScorePlan] | None = None) -> str:
        """The split per-round figures come from: ``"val"``, ``"test"`` (no client has validation data)
        or ``"val+test"``."""
        ids = list(plans) if plans is not None else list(self.clients)
        splits = {self.clients[c].eval_split for c in ids if c in self.clients}
        return "val+test" if len(splits) > 1 else (splits.pop() if splits else "test")


def check_version(data: Mapping[str, Any]) -> None:
    """Refuse a checkpoint written in another format than this code reads."""
    if data.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint format version {data.get('version')!r}, this code reads "
                              f"{CHECKPOINT_VERSION}; start a new checkpoint path")


def read_state(data: Mapping[str, Any]) -> tuple[ServerState, Mapping[str, Any]]:
    """A checkpoint's server state and its (flat) client stores; a malformed one is refused."""
    try:
        state = ServerState.from_dict(data["state"])
        stores = data.get("client_stores", {})
        if not isinstance(stores, Mapping):
            raise TypeError("client_stores is not a mapping")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the checkpoint's state is malformed ({type(exc).__name__}: {exc}); "
                              "start a new checkpoint path") from exc
    return state, stores


def in_process_runner(strategy: Strategy, model: Any, clients: Sequence[ClientData], unseen: Sequence[ClientData],
                      config: Any, backend: ClientBackend | None, trainer_kwargs: Mapping[str, Any] | None,
                      loader: Any, checkpoint_path: str | Path | None, upload_hook: Callable[[Payload], None] | None,
                      progress: bool, logger: Any, raise_client_errors: bool = False
                      ) -> tuple[FederationRunner, ClientBackend, Any]:
    """The runner of a :class:`FederationConfig` run, its backend and (in process) the client runtime.

    Shared by :class:`~hilora_lightning.federation.FederatedOrchestrator` and
    :class:`~hilora_lightning.baselines.BaselineRunner`: the default backend runs every client on
    ``model`` in this process; a given backend (Flower) runs them where it runs them.
    """
    from hilora_lightning.federation.backend import InProcessBackend, RunsHere
    from hilora_lightning.federation.local import trainer_precision
    from hilora_lightning.federation.runtime import ClientRuntime

    backend = backend or InProcessBackend()
    runtime = None
    if isinstance(backend, RunsHere):
        from hilora_lightning.federation.preflight import check_clients

        runtime = ClientRuntime(model, trainer_kwargs, loader)
        check_clients(model, [*clients, *unseen], runtime.loader)
        backend.bind(runtime, [*clients, *unseen])
    runner = FederationRunner(strategy, {c.client_id: c for c in clients}, {c.client_id: c for c in unseen}, backend,
                              config.rounds, config.fraction_fit, config.min_clients, config.eval_every, config.seed,
                              checkpoint_path, upload_hook, progress,
                              fingerprint={"trainer.precision": trainer_precision(trainer_kwargs)}, logger=logger,
                              raise_client_errors=raise_client_errors)
    return runner, backend, runtime
