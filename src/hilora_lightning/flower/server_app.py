"""The HiLoRA ``ServerApp``: the in-process orchestrator's loop, with clients behind Flower's Grid.

Flower's stock ``Strategy.start`` is a fixed round loop around one global ``ArrayRecord``: it has no
hook to change stage, to send different adapters to different clients, or to cluster between
rounds. So the loop lives in the ServerApp's ``main``: it is the very round engine of the in-process
run (:class:`~hilora_lightning.federation.engine.FederationRunner` with HiLoRA's strategy: stage
schedule, the ``rho`` rule, product-space aggregation, LSAC, probes, unseen clients, evaluation,
atomic checkpoints and ``resume``), run with a :class:`FlowerBackend` that turns each batch of
client requests into Flower messages. A baseline runs the same way (``BaselineRunner(...,
backend=FlowerBackend(...))``).

Failures follow Flower's conventions: an error reply, a reply that does not arrive before the
timeout, or a malformed reply (missing records, wrong keys or shapes, NaN) drops that client from
the round and is recorded in the round's ``failed``; the round fails only below ``min_clients``.

Example:
    >>> from hilora_lightning.flower import make_server_app
    >>> app = make_server_app({"data": {"name": "digits", "num_clients": 4}})  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch.utils.data import Dataset

from hilora_lightning.data.clients import ClientData
from hilora_lightning.experiment import build_federation_config, build_runner, validate_config
from hilora_lightning.federation.checkpoint import load_checkpoint
from hilora_lightning.federation.plan import FitReply, LocalPlan, ScorePlan
from hilora_lightning.federation.result import FederatedResult
from hilora_lightning.flower.client_app import config_from_run
from hilora_lightning.flower.codec import from_record
from hilora_lightning.flower.messages import encode_plan, encode_plans, split_records

__all__ = ["DEFAULT_OUT_DIR", "FlowerBackend", "RemoteData", "flower_out_dir", "make_server_app", "run_federation"]

#: where a ``flwr run`` writes its results unless the run config's ``out-dir`` says otherwise
DEFAULT_OUT_DIR = "~/hilora-runs/flower"


def flower_out_dir(out_dir: str) -> Path:
    """The run config's ``out-dir`` as an absolute path (``~`` expanded); a relative one is refused.

    The ServerApp runs in the SuperLink's working folder (the local SuperLink that ``flwr run``
    starts stays in the folder it was first started from), so a relative path would land there.

    Example:
        >>> flower_out_dir("/tmp/runs/a").as_posix()
        '/tmp/runs/a'
        >>> flower_out_dir("runs/a")
        Traceback (most recent call last):
        ...
        ValueError: out-dir 'runs/a' is relative: the ServerApp runs in the SuperLink's folder, not yours; ...
    """
    path = Path(out_dir).expanduser()
    if not path.is_absolute():
        raise ValueError(f"out-dir {out_dir!r} is relative: the ServerApp runs in the SuperLink's folder, not yours; "
                         f"give an absolute path, e.g. --run-config \"out-dir='$PWD/{out_dir}'\" (or one starting "
                         "with ~)")
    return path

MessageHook = Callable[[str, Message], None]


class RemoteData(Dataset):  # type: ignore[type-arg]
    """The size of a client's data that lives on its SuperNode; reading it on the server is an error."""

    def __init__(self, size: int, client_id: int) -> None:
        self.size, self.client_id = size, client_id

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        raise RuntimeError(f"client {self.client_id}'s data lives on its Flower SuperNode, not on the server")


class FlowerBackend:
    """Runs the orchestrator's client requests as Flower messages over ``grid``.

    A node that serves one client gets one plan per message (:func:`encode_plan`); a node that serves
    several (a site with several data sets) gets all of its clients' plans of a batch in one message
    (:func:`encode_plans`) and runs them together (batched, when its config says so), replying per client.

    Args:
        grid: the ServerApp's Grid.
        nodes: client id -> Flower node id (several clients may share a node).
        timeout: seconds to wait for the replies of one batch (``None``: wait for all).
        message_hook: called as ``hook("out" | "in", message)`` for every message (auditing, logs).
    """

    def __init__(self, grid: Grid, nodes: Mapping[int, int], timeout: float | None = None,
                 message_hook: MessageHook | None = None) -> None:
        self.grid, self.nodes, self.timeout, self.message_hook = grid, dict(nodes), timeout, message_hook
        self.silent: dict[int, str] = {}  # client id -> why its last message got no reply
        served: dict[int, int] = {}
        for node in self.nodes.values():
            served[node] = served.get(node, 0) + 1
        self.shared_nodes = {node for node, count in served.items() if count > 1}

    def _exchange(self, messages: dict[int, Message]) -> dict[int, Message]:
        """Send one message per node (keyed by node id) and return the replies that came, by node."""
        if self.message_hook is not None:
            for msg in messages.values():
                self.message_hook("out", msg)
        sent = list(messages.items())
        replies: dict[int, Message] = {}
        received = self.grid.send_and_receive([m for _, m in sent], timeout=self.timeout)
        by_id = {m.metadata.message_id: node for node, m in sent}  # ids are given when the Grid pushes them
        for reply in received:
            if self.message_hook is not None:
                self.message_hook("in", reply)
            # by the message it answers: the SuperLink's own error reply (a node that died) comes from it, not the node
            answered = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if answered in messages:
                replies[answered] = reply
        return replies

    def _why_silent(self, node: int, connected: set[int]) -> str:
        """Why a node sent no reply: the SuperLink's own view of it (``connected``), else the timeout."""
        if node not in connected:
            return f"its node {node} is no longer connected to the SuperLink"
        return f"none within the timeout of {self.timeout:.0f}s" if self.timeout is not None else \
            "the SuperLink returned none"

    def _send(self, requests: Mapping[int, LocalPlan | ScorePlan], kind: str, group_id: str
              ) -> dict[int, RecordDict | Exception | None]:
        """Each client's reply content (``None``: no reply, the reason in ``silent``; an exception: its error)."""
        by_node: dict[int, dict[int, LocalPlan | ScorePlan]] = {}
        for cid, req in requests.items():
            self.silent.pop(cid, None)
            if cid in self.nodes:
                by_node.setdefault(self.nodes[cid], {})[cid] = req
        messages = {node: Message(encode_plans(plans) if node in self.shared_nodes else
                                  encode_plan(next(iter(plans.values()))), node, kind, group_id=group_id)
                    for node, plans in by_node.items()}
        replies = self._exchange(messages)
        out: dict[int, RecordDict | Exception | None] = {}
        connected = set(self.grid.get_node_ids()) if len(replies) < len(by_node) else set()
        for node, plans in by_node.items():
            reply = replies.get(node)
            if reply is None:
                why = self._why_silent(node, connected)
                out.update(dict.fromkeys(plans))
                self.silent.update(dict.fromkeys(plans, why))
            elif reply.has_error():
                out.update(dict.fromkeys(plans, RuntimeError(f"client error {reply.error.code}: {reply.error.reason}")))
            elif node not in self.shared_nodes:
                out.update(dict.fromkeys(plans, reply.content))
            else:
                out.update(_per_client(reply.content, node, plans))
        for cid in requests:
            if cid not in self.nodes:
                out[cid] = RuntimeError(f"no SuperNode serves client {cid}")
        return out

    def fit(self, requests: Mapping[int, LocalPlan]) -> dict[int, FitReply | Exception]:
        first = next(iter(requests.values()), None)
        group = f"{first.kind.value}-{first.round}" if first is not None else "train"
        replies = self._send(requests, MessageType.TRAIN, group)
        out: dict[int, FitReply | Exception] = {}
        for cid, req in requests.items():
            try:
                content = replies[cid]
                if isinstance(content, Exception):
                    raise content
                out[cid] = self._fit_reply(content, req, self.silent.get(cid, ""))
            except Exception as exc:  # malformed or failed: dropped and recorded by the runner
                out[cid] = exc
        return out

    @staticmethod
    def _fit_reply(content: RecordDict | None, req: LocalPlan, why: str = "") -> FitReply:
        if content is None:
            raise TimeoutError(f"no reply from client {req.client_id} for its {req.kind.value} plan of round "
                               f"{req.round}" + (f" ({why})" if why else ""))
        if "leaf" in content:
            raise ValueError("the reply carries a leaf; leaves never leave the client")
        if "metrics" not in content:
            raise ValueError(f"malformed reply: no 'metrics' record (got {sorted(content)})")
        factors = from_record(content["factors"]) if "factors" in content else None
        head = from_record(content["head"]) if "head" in content else None
        num = content["metrics"].get("num_samples", 0)  # type: ignore[union-attr]
        return FitReply(factors, head, int(num))  # type: ignore[arg-type]

    def evaluate(self, requests: Mapping[int, ScorePlan]) -> dict[int, float | Exception]:
        first = next(iter(requests.values()), None)
        replies = self._send(requests, MessageType.EVALUATE, f"eval-{first.round if first else 0}")
        out: dict[int, float | Exception] = {}
        for cid, req in requests.items():
            content = replies[cid]
            if isinstance(content, Exception):
                out[cid] = content
            elif content is not None and "metrics" in content and "score" in content["metrics"]:  # type: ignore[operator]
                out[cid] = float(content["metrics"]["score"])  # type: ignore[index,arg-type]
            else:
                out[cid] = RuntimeError(f"no reply to its score plan of round {req.round}"
                                        + (f" ({self.silent[cid]})" if cid in self.silent else ""))
        return out  # clients that failed to evaluate are left out of the round's accuracy

    def reject(self, client_ids: Iterable[int]) -> None:
        """Nothing to undo here: a remote client keeps what it stored (its next request overrides it)."""

    def state_dict(self) -> dict[str, Any]:
        return {}  # the client stores live on the SuperNodes

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def _per_client(content: RecordDict, node: int, clients: Iterable[int]) -> dict[int, RecordDict | Exception]:
    """Each client's part of a reply from a node that serves several (its records, or the error it reported)."""
    try:
        parts = split_records(content)
    except ValueError as exc:
        return dict.fromkeys(clients, ValueError(f"malformed reply from node {node}: {exc}"))
    out: dict[int, RecordDict | Exception] = {}
    for cid in clients:
        part = parts.get(cid)
        if part is None:
            out[cid] = ValueError(f"malformed reply: node {node} sent nothing for client {cid}")
        elif "error" in part:
            out[cid] = RuntimeError(f"client error: {part['error'].get('message', '')!s}")  # type: ignore[union-attr]
        else:
            out[cid] = part
    return out


def discover_clients(grid: Grid, min_nodes: int = 1, timeout: float | None = None, wait_s: float = 120.0,
                     report_every: float = 5.0, min_clients: int = 1
                     ) -> tuple[list[ClientData], list[ClientData], dict[int, int]]:
    """Wait for ``min_nodes`` SuperNodes serving at least ``min_clients`` training clients between them
    (saying so every ``report_every`` seconds, giving up after ``wait_s``); each node is asked which
    clients it serves (one, or several: a site with several data sets; training or unseen).

    The server keeps the clients' sizes and groups, never their data.
    """
    start = time.monotonic()
    said = -report_every
    clients: list[ClientData] = []
    unseen: list[ClientData] = []
    mapping: dict[int, int] = {}
    asked: set[int] = set()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            new = [node for node in nodes if node not in asked]
            asked.update(new)
            _ask(grid, new, timeout, clients, unseen, mapping)
            if len(clients) >= min_clients:
                break
        waited = time.monotonic() - start
        if waited > wait_s:
            if len(nodes) < min_nodes:
                raise RuntimeError(
                    f"only {len(nodes)} of the {min_nodes} SuperNodes that min-nodes asks for connected within "
                    f"{wait_s:.0f}s. In a simulation, start as many: flwr run . --federation-config "
                    f"\"num-supernodes={min_nodes}\"; in a deployment, start more flower-supernode processes; "
                    "or lower min-nodes")
            raise RuntimeError(f"the {len(nodes)} SuperNodes connected within {wait_s:.0f}s serve {len(clients)} "
                               f"training clients; the federation needs min_clients={min_clients}. Start more "
                               "SuperNodes (or give them more partition-ids), or lower federation.min_clients")
        if waited - said >= report_every:
            print(f"hilora: waiting for {min_nodes} SuperNodes, {len(nodes)} connected (serving {len(clients)} of the "
                  f"{min_clients} training clients needed; giving up in {wait_s - waited:.0f}s)", flush=True)
            said = waited
        time.sleep(0.5)
    if not clients:
        raise RuntimeError(f"none of the {len(asked)} SuperNodes answered the client query as a training client")
    return sorted(clients, key=lambda c: c.client_id), sorted(unseen, key=lambda c: c.client_id), mapping


def _ask(grid: Grid, nodes: list[int], timeout: float | None, clients: list[ClientData], unseen: list[ClientData],
         mapping: dict[int, int]) -> None:
    """Ask ``nodes`` which clients they serve; add them to ``clients`` / ``unseen`` and ``mapping``."""
    if not nodes:
        return
    queries = [Message(RecordDict({"config": ConfigRecord({})}), node, MessageType.QUERY) for node in nodes]
    for reply in grid.send_and_receive(queries, timeout=timeout):
        if reply.has_error():
            continue  # a node that cannot describe itself does not take part
        if "info" in reply.content:  # a node serving one client
            infos = [reply.content["info"]]
        else:  # a node serving several: "<client id>/info" each
            try:
                infos = [part["info"] for part in split_records(reply.content).values() if "info" in part]
            except ValueError:
                continue
        for info in infos:
            cid = int(info["client_id"])  # type: ignore[arg-type]
            if cid in mapping:
                raise ValueError(f"two SuperNodes serve client {cid}; give each a distinct partition-id "
                                 "(or distinct partition-ids)")
            group = int(info["group"])  # type: ignore[arg-type]
            mapping[cid] = reply.metadata.src_node_id
            num_val = int(info.get("num_val", 0))  # type: ignore[arg-type]
            data = ClientData(cid, RemoteData(int(info["num_samples"]), cid),  # type: ignore[arg-type]
                              RemoteData(int(info["num_test"]), cid),  # type: ignore[arg-type]
                              None if group < 0 else group,
                              RemoteData(num_val, cid) if num_val else None, val_fraction=0.0)  # type: ignore[arg-type]
            (unseen if bool(info.get("unseen", False)) else clients).append(data)


def run_federation(
    grid: Grid,
    cfg: Mapping[str, Any],
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    timeout: float | None = None,
    message_hook: MessageHook | None = None,
    progress: bool = True,
    min_nodes: int = 1,
    stop_after: int | None = None,
    wait_s: float = 120.0,
) -> tuple[Any, FederatedResult]:
    """Run the experiment ``cfg`` over the clients connected to ``grid`` (the ServerApp's main body).

    The server builds the same model as the clients (for shapes and the shared-seed initialization;
    it never trains) and the :class:`FederationConfig` of ``cfg``. SuperNodes that serve unseen
    clients (``partition-id`` past the training clients) are routed, probed and fine-tuned at the end,
    as in process.

    With ``resume`` the run continues from ``checkpoint_path``. SuperNodes keep their leaf, personal
    head and frozen tiers only in memory (``context.state``), so after a restart the frozen tiers are
    sent again once, and a client that lost its leaf starts a fresh one.
    """
    validate_config(cfg)
    config = build_federation_config(cfg)
    clients, unseen, nodes = discover_clients(grid, min_nodes, timeout, wait_s, min_clients=config.min_clients)
    backend = FlowerBackend(grid, nodes, timeout, message_hook)
    orch = build_runner(cfg, clients, unseen, checkpoint_path=checkpoint_path, backend=backend, progress=progress)
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        orch.load_state_dict(load_checkpoint(Path(checkpoint_path)))
        orch.runner.state.has_final = {t: set() for t in orch.runner.state.has_final}  # nodes may have restarted
    return orch, orch.run(stop_after=stop_after)


def make_server_app(
    cfg: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    timeout: float | None = None,
    on_result: Callable[[Any, FederatedResult], None] | None = None,
    message_hook: MessageHook | None = None,
    min_nodes: int = 1,
    config_root: str | Path | None = None,
    stop_after: int | None = None,
    overwrite: bool = False,
) -> ServerApp:
    """A ``ServerApp`` running the experiment ``cfg`` (``None``: read ``context.run_config``).

    With ``cfg=None`` (``flwr run`` of the example app) the run config names the YAML file
    (``config``), its ``overrides``, the output folder (``out-dir``: absolute, or starting with
    ``~``, since the ServerApp runs in the SuperLink's folder, not the user's; see
    :func:`flower_out_dir`), ``resume`` / ``overwrite`` (as ``hilora-fl run``'s flags), ``min-nodes``
    (how many SuperNodes to wait for) and ``wait-s`` (how long). ``out_dir`` gets ``config.yaml``
    first, the checkpoint ``federation.pt`` after every round, and ``result.json``, ``rounds.csv``
    and the plots at the end, as ``hilora-fl run`` writes them.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg, out, again, wait_for, replace, wait = cfg, out_dir, resume, min_nodes, overwrite, 120.0
        if run_cfg is None:
            rc = context.run_config
            run_cfg = config_from_run(rc, config_root)
            out = flower_out_dir(str(rc.get("out-dir", DEFAULT_OUT_DIR)))
            again, replace = bool(rc.get("resume", False)), bool(rc.get("overwrite", False))
            wait_for = int(rc.get("min-nodes", min_nodes))  # type: ignore[arg-type]
            wait = float(rc.get("wait-s", wait))  # type: ignore[arg-type]
        path = Path(out) if out is not None else None
        if path is not None:
            from hilora_lightning.experiment import write_config
            from hilora_lightning.run_folder import check_out_dir, clear_run

            check_out_dir(path, resume=again, overwrite=replace, flags=(
                '--run-config "resume=true"', '--run-config "overwrite=true"', "out-dir"))
            if replace:
                clear_run(path)
            if not (again and (path / "federation.pt").exists()):  # a resume keeps the run's config until accepted
                write_config({**run_cfg, "out_dir": str(path)}, path)
            print(f"hilora: results go to {path}", flush=True)
        orch, result = run_federation(grid, run_cfg, path / "federation.pt" if path else None, again, timeout,
                                      message_hook, min_nodes=wait_for, stop_after=stop_after, wait_s=wait)
        print(result.summary(), flush=True)
        if path is not None:
            from hilora_lightning.experiment import save_outputs

            written = save_outputs(orch, result, {**run_cfg, "out_dir": str(path)}, path)
            print(f"hilora: wrote {', '.join(p.name for p in written)} and federation.pt to {path}", flush=True)
        if on_result is not None:
            on_result(orch, result)

    return app
