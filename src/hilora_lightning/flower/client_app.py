"""The HiLoRA ``ClientApp``: a :class:`HiLoRAViT` and a Lightning ``Trainer`` on a Flower SuperNode.

Each node serves one client: ``node_config["partition-id"]`` indexes the training clients that
:func:`hilora_lightning.experiment.build_clients` makes from the experiment config, then its unseen
clients (the simulation engine sets it; a real SuperNode gets ``--node-config "partition-id=3"``).
A node may serve several (a site with several data sets): ``--node-config "partition-ids='3,7,9'"``, or
``clients-per-node = k`` (node or run config; node ``p`` serves ``p k .. p k + k - 1``). Its clients' plans
then come in one message and run together through the config's ``backend`` (batched: one pass), each
client's store under its own id in ``context.state`` and each reply part under ``"<client id>/"``.
The node builds the same frozen model as the server (same config, same seed) once per process and
runs the same :class:`~hilora_lightning.federation.runtime.ClientRuntime` as the in-process
backend, with ``context.state`` as the client's store.

Messages (all tensors float32, see :mod:`hilora_lightning.flower.messages`):

* ``query``: replies with the client id, its sample counts, latent group and whether it is unseen.
* ``train``: a local plan (HiLoRA's stage, a probe, an unseen client's fine-tune, or a baseline's
  local update). The **leaf and a personal head stay in ``context.state``** and never appear in a
  reply; it replies with the uploaded ``factors``, the ``head`` when it is shared, and ``metrics``.
* ``evaluate``: a score plan; replies with ``score`` (accuracy, or the training loss for routing) and ``num_examples``.

Example:
    >>> from hilora_lightning.flower import make_client_app
    >>> app = make_client_app({"data": {"name": "digits", "num_clients": 4}})  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hilora_lightning.baselines.methods import make_method
from hilora_lightning.baselines.runner import prepare_baseline_model
from hilora_lightning.data.clients import ClientData
from hilora_lightning.experiment import build_backend, build_clients, build_federation_config, build_model
from hilora_lightning.federation.backend import InProcessBackend
from hilora_lightning.federation.plan import FitReply, LocalPlan, ScorePlan
from hilora_lightning.federation.runtime import ClientRuntime
from hilora_lightning.flower.codec import to_record
from hilora_lightning.flower.messages import decode_plans, load_store, save_store
from hilora_lightning.model import HiLoRAViT

__all__ = ["config_from_run", "make_client_app"]

# per worker process, built once per config: the model, the training clients, the unseen clients
_RUNTIME: dict[str, tuple[HiLoRAViT, list[ClientData], Any, list[ClientData]]] = {}


_MODEL: dict[str, HiLoRAViT] = {}


def _model(cfg: Mapping[str, Any]) -> HiLoRAViT:
    """The node's model (built once per config): a baseline's gates and no penalty, as the server sets up."""
    key = json.dumps({k: cfg.get(k) for k in ("seed", "model", "method", "federation")}, sort_keys=True, default=str)
    if key not in _MODEL:
        model = build_model(cfg)
        method = str(cfg.get("method", "hilora") or "hilora")
        if method != "hilora":  # a baseline: no penalty, its gates (as the server's BaselineRunner sets up)
            model = prepare_baseline_model(make_method(method, build_federation_config(cfg)), model)
        _MODEL[key] = model
    return _MODEL[key]


def _runtime(cfg: Mapping[str, Any]) -> tuple[HiLoRAViT, list[ClientData], Any, list[ClientData]]:
    key = json.dumps({k: cfg.get(k) for k in ("seed", "data", "model", "method", "federation")}, sort_keys=True,
                     default=str)
    if key not in _RUNTIME:
        clients, unseen = build_clients(cfg.get("data", {}), int(cfg.get("seed", 0)))
        _RUNTIME[key] = (_model(cfg), sorted(clients, key=lambda c: c.client_id), None,
                         sorted(unseen, key=lambda c: c.client_id))
    return _RUNTIME[key]


_NODE_CLIENT: dict[tuple[str, int, int], tuple[ClientData, bool]] = {}


def _partition_client(cfg: Mapping[str, Any], index: int, count: int) -> tuple[ClientData, bool]:
    """This node's own client from a ``data.builder`` that takes ``partition_id`` / ``num_partitions``
    (Flower's ``load_data`` hook): one client, training or (``unseen``) held out; cached per process."""
    key = (json.dumps(cfg.get("data"), sort_keys=True, default=str), index, count)
    if key not in _NODE_CLIENT:
        clients, unseen = build_clients(cfg.get("data", {}), int(cfg.get("seed", 0)), partition=(index, count))
        mine = [(c, False) for c in clients] + [(c, True) for c in unseen]
        if len(mine) != 1:
            raise ValueError(f"data builder {cfg['data']['builder']!r} returned {len(mine)} clients for partition "
                             f"{index} of {count}; with partition_id it must return this node's one client")
        _NODE_CLIENT[key] = mine[0]
    return _NODE_CLIENT[key]


def _takes_partition(cfg: Mapping[str, Any]) -> bool:
    from hilora_lightning.data.hook import takes_partition

    data = cfg.get("data") or {}
    return "builder" in data and takes_partition(data["builder"])


def _partition_ids(context: Context, per_node: int | None = None) -> list[int]:
    """The partitions this node serves: ``partition-ids`` (``"3,7,9"``) in its node config, else
    ``partition-id`` ``p`` times ``clients-per-node`` ``k`` (node or run config, default 1): ``p k .. p k + k - 1``."""
    node = context.node_config
    if "partition-ids" in node:
        raw = str(node["partition-ids"]).replace(",", " ").split()
        if not raw or not all(r.isdigit() for r in raw):
            raise ValueError(f"partition-ids must list client indices like \"3,7,9\", got {node['partition-ids']!r}")
        return [int(r) for r in raw]
    if "partition-id" not in node:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=<index of its client>\" (or \"partition-ids='3,7'\" for "
                         "several clients)")
    if per_node is None:
        per_node = int(node.get("clients-per-node", context.run_config.get("clients-per-node", 1)))  # type: ignore[arg-type]
    if per_node < 1:
        raise ValueError(f"clients-per-node must be >= 1, got {per_node}")
    first = int(node["partition-id"]) * per_node  # type: ignore[arg-type]
    return list(range(first, first + per_node))


def _clients(cfg: Mapping[str, Any], context: Context, per_node: int | None = None) -> list[tuple[ClientData, bool]]:
    """The clients this node serves: each partition index picks a training client, then the unseen ones
    (or, for a data builder that takes ``partition_id``, the builder makes each partition's client)."""
    ids = _partition_ids(context, per_node)
    if _takes_partition(cfg):
        if "num-partitions" not in context.node_config:
            raise ValueError("this config's data builder takes partition_id and num_partitions, but the node config "
                             "has no 'num-partitions'; start the SuperNode with --node-config "
                             "\"partition-id=<i> num-partitions=<n>\"")
        count = int(context.node_config["num-partitions"])  # type: ignore[arg-type]
        if "partition-ids" not in context.node_config:
            count *= len(ids)  # num-partitions counts nodes; each serves clients-per-node partitions
        return [_partition_client(cfg, index, count) for index in ids]
    _, clients, _, unseen = _runtime(cfg)
    everyone = clients + unseen
    if "partition-ids" not in context.node_config and len(ids) > 1:
        ids = [i for i in ids if i < len(everyone)] or ids  # the last node of a simulation may serve fewer
    for index in ids:
        if not 0 <= index < len(everyone):
            raise ValueError(f"partition-id {index} is outside the {len(clients)} training and {len(unseen)} unseen "
                             "clients of this config")
    return [(everyone[i], i >= len(clients)) for i in ids]


def config_from_run(run_config: Mapping[str, Any], root: str | Path | None = None) -> dict[str, Any]:
    """The experiment config a Flower run config names: ``config`` (a YAML path, relative to ``root``)
    plus ``overrides`` (``"key=value key=value"``)."""
    from hilora_lightning.cli import load_config

    if "config" not in run_config:
        raise ValueError("the Flower run config has no 'config' entry naming the experiment YAML "
                         "([tool.flwr.app.config] config = \"flower_digits.yaml\")")
    path = Path(str(run_config["config"]))
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    return load_config(path, str(run_config.get("overrides", "")).split())


def make_client_app(
    cfg: Mapping[str, Any] | None = None, fault: Callable[[int, int, str], None] | None = None,
    config_root: str | Path | None = None, audit_dir: str | Path | None = None, clients_per_node: int | None = None,
) -> ClientApp:
    """A ``ClientApp`` for the experiment config ``cfg`` (sections ``seed``, ``data``, ``model``, ``trainer``).

    Args:
        cfg: the experiment config (as for ``hilora-fl run``); ``trainer`` holds this node's Lightning
            options (``precision``, ``accelerator``...). ``None``: read it from the run config
            (:func:`config_from_run`, paths relative to ``config_root``) on the first message.
        fault: called as ``fault(client_id, round, message_type)`` before a request is served; raise in
            it to inject a failure (tests, chaos drills). The error goes back as a Flower error reply.
        audit_dir: audit every message this node receives and sends (:mod:`hilora_lightning.flower.audit`:
            no leaf, personal head or raw data may travel), one JSON line per message into this folder.
        clients_per_node: how many clients each node serves (node ``p`` serves partitions ``p k`` to
            ``p k + k - 1``; ``None``: the node config's ``clients-per-node`` or the run config's, default 1;
            a node config's ``partition-ids`` lists them instead). A node serving several runs a batch's plans
            for them together through the config's ``backend`` (``name: batched``: in one pass).
    """
    resolved: dict[str, Any] = {}
    mods = []
    if audit_dir is not None:
        from hilora_lightning.adapter_spec import AdapterSpec
        from hilora_lightning.flower.audit import audit_mod, shared_shapes

        def shapes(context: Context) -> Any:
            if "shapes" not in resolved:
                resolved["shapes"] = shared_shapes(AdapterSpec.from_model(setup(context)[1].model))
            return resolved["shapes"]

        mods.append(audit_mod(audit_dir, shapes))
    app = ClientApp(mods=mods)

    def setup(context: Context) -> tuple[Mapping[str, Any], ClientRuntime]:
        if "cfg" not in resolved:
            resolved["cfg"] = cfg if cfg is not None else config_from_run(context.run_config, config_root)
            run_cfg = resolved["cfg"]
            model = _model(run_cfg)
            resolved["runtime"] = ClientRuntime(model, dict(run_cfg.get("trainer", {}) or {}), run_cfg.get("loader"))
        return resolved["cfg"], resolved["runtime"]

    def node(context: Context) -> tuple[Mapping[str, Any], ClientRuntime, dict[int, ClientData]]:
        cfg, runtime = setup(context)
        return cfg, runtime, {c.client_id: c for c, _ in _clients(cfg, context, clients_per_node)}

    def serve(msg: Message, context: Context, kind: str) -> Message:
        """Run a message's plans for this node's clients: one plan (a node serving one client), or each of its
        clients' plans together through the node's backend (batched when the config's ``backend`` says so)."""
        cfg, runtime, mine = node(context)
        plans = decode_plans(msg.content)
        wrong = sorted(set(plans) - set(mine))
        if wrong:
            raise ValueError(f"this node serves clients {sorted(mine)}, the request is for {wrong}")
        want = LocalPlan if kind == "train" else ScorePlan
        for plan in plans.values():
            if not isinstance(plan, want):
                raise ValueError(f"a {kind} message must carry {'local' if kind == 'train' else 'score'} plans, "
                                 f"got a {plan.kind.value} plan")
        if "config" in msg.content:  # one plan, as a node serving one client gets it: errors are the reply's
            (plan,) = plans.values()
            client = mine[plan.client_id]
            if fault is not None:
                fault(client.client_id, plan.round, kind)
            return Message(_one(runtime, plan, client, context), reply_to=msg)
        content = RecordDict()
        results: dict[int, Any] = {}
        for cid, plan in plans.items():
            try:
                if fault is not None:
                    fault(cid, plan.round, kind)
            except Exception as exc:
                results[cid] = exc
        todo = {cid: plan for cid, plan in plans.items() if cid not in results}
        if "backend" not in resolved:
            resolved["backend"] = build_backend(cfg.get("backend")) or InProcessBackend()
        backend = resolved["backend"]
        backend.bind(runtime, [mine[cid] for cid in todo])
        backend.stores = {cid: load_store(context.state, cid) for cid in todo}
        results.update(backend.fit(todo) if kind == "train" else backend.evaluate(todo))  # type: ignore[arg-type]
        for cid, result in results.items():
            if isinstance(result, Exception):
                content[f"{cid}/error"] = ConfigRecord({"message": f"{type(result).__name__}: {result}"})
                continue
            if kind == "train":
                save_store(context.state, backend.store(cid), cid)  # only after its plan succeeded
            records = _reply_records(result, plans[cid], mine[cid])
            for name, record in records.items():
                content[f"{cid}/{name}"] = record
        return Message(content, reply_to=msg)

    @app.query()
    def info(msg: Message, context: Context) -> Message:
        cfg, _ = setup(context)
        served = _clients(cfg, context, clients_per_node)
        content = RecordDict()
        for client, unseen in served:
            content["info" if len(served) == 1 else f"{client.client_id}/info"] = _info(client, unseen)
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return serve(msg, context, "train")

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return serve(msg, context, "evaluate")

    return app


def _info(client: ClientData, unseen: bool) -> ConfigRecord:
    return ConfigRecord({"client_id": client.client_id, "num_samples": client.num_samples,
                         "num_test": len(client.test),  # type: ignore[arg-type]
                         "num_val": 0 if client.val is None else len(client.val),  # type: ignore[arg-type]
                         "group": -1 if client.group is None else int(client.group), "unseen": unseen})


def _reply_records(result: FitReply | float, plan: LocalPlan | ScorePlan, client: ClientData) -> dict[str, Any]:
    """The records that answer one plan: a fit's metrics, uploaded factors and shared head; a score."""
    if isinstance(plan, ScorePlan):
        split = client.split(str(plan.split))
        return {"metrics": MetricRecord({"score": float(result), "num_examples": len(split)})}  # type: ignore[arg-type]
    assert isinstance(result, FitReply)
    records: dict[str, Any] = {"metrics": MetricRecord({"num_samples": result.num_samples})}
    if result.factors is not None:
        records["factors"] = to_record(result.factors)
    if result.head is not None:
        records["head"] = to_record(result.head)
    return records


def _one(runtime: ClientRuntime, plan: LocalPlan | ScorePlan, client: ClientData, context: Context) -> RecordDict:
    """Run the one plan of a node serving one client, its store in ``context.state``."""
    store = load_store(context.state)
    if isinstance(plan, LocalPlan):
        reply, new = runtime.fit(plan, client, store)
        save_store(context.state, new)  # only after the plan succeeded
        return RecordDict(_reply_records(reply, plan, client))
    try:
        score = runtime.evaluate(plan, client, store)
    finally:
        runtime.release()
    return RecordDict(_reply_records(score, plan, client))
