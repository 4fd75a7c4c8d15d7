"""The HiLoRA ``ClientApp``: a :class:`HiLoRAViT` and a Lightning ``Trainer`` on a Flower SuperNode.

Each node serves one client: ``node_config["partition-id"]`` indexes the training clients that
:func:`hilora_lightning.experiment.build_clients` makes from the experiment config, then its unseen
clients (the simulation engine sets it; a real SuperNode gets ``--node-config "partition-id=3"``).
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
from hilora_lightning.experiment import build_clients, build_federation_config, build_model
from hilora_lightning.federation.plan import LocalPlan, ScorePlan
from hilora_lightning.federation.runtime import ClientRuntime
from hilora_lightning.flower.codec import to_record
from hilora_lightning.flower.messages import decode_plan, load_store, save_store
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


def _client(cfg: Mapping[str, Any], context: Context) -> tuple[ClientData, bool]:
    """The client this node serves: ``partition-id`` indexes the training clients, then the unseen ones
    (or, for a data builder that takes ``partition_id``, the builder makes this node's client)."""
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=<index of its client>\"")
    index = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    if _takes_partition(cfg):
        if "num-partitions" not in context.node_config:
            raise ValueError("this config's data builder takes partition_id and num_partitions, but the node config "
                             "has no 'num-partitions'; start the SuperNode with --node-config "
                             "\"partition-id=<i> num-partitions=<n>\"")
        return _partition_client(cfg, index, int(context.node_config["num-partitions"]))  # type: ignore[arg-type]
    _, clients, _, unseen = _runtime(cfg)
    everyone = clients + unseen
    if not 0 <= index < len(everyone):
        raise ValueError(f"partition-id {index} is outside the {len(clients)} training and {len(unseen)} unseen "
                         "clients of this config")
    return everyone[index], index >= len(clients)


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
    config_root: str | Path | None = None, audit_dir: str | Path | None = None,
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

    @app.query()
    def info(msg: Message, context: Context) -> Message:
        cfg, _ = setup(context)
        client, unseen = _client(cfg, context)
        record = ConfigRecord({"client_id": client.client_id, "num_samples": client.num_samples,
                               "num_test": len(client.test),  # type: ignore[arg-type]
                               "num_val": 0 if client.val is None else len(client.val),  # type: ignore[arg-type]
                               "group": -1 if client.group is None else int(client.group), "unseen": unseen})
        return Message(RecordDict({"info": record}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, runtime = setup(context)
        client, _ = _client(cfg, context)
        req = decode_plan(msg.content)
        if not isinstance(req, LocalPlan):
            raise ValueError(f"a train message must carry a local plan, got a {req.kind.value} plan")
        if req.client_id != client.client_id:
            raise ValueError(f"this node serves client {client.client_id}, the request is for {req.client_id}")
        if fault is not None:
            fault(client.client_id, req.round, "train")
        reply, store = runtime.fit(req, client, load_store(context.state))
        save_store(context.state, store)  # only after the plan succeeded
        content = RecordDict({"metrics": MetricRecord({"num_samples": reply.num_samples})})
        if reply.factors is not None:
            content["factors"] = to_record(reply.factors)
        if reply.head is not None:
            content["head"] = to_record(reply.head)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        cfg, runtime = setup(context)
        client, _ = _client(cfg, context)
        req = decode_plan(msg.content)
        if not isinstance(req, ScorePlan):
            raise ValueError(f"an evaluate message must carry a score plan, got a {req.kind.value} plan")
        if fault is not None:
            fault(client.client_id, req.round, "evaluate")
        try:
            score = runtime.evaluate(req, client, load_store(context.state))
        finally:
            runtime.release()
        split = client.split(str(req.split))
        metrics = MetricRecord({"score": score, "num_examples": len(split)})  # type: ignore[arg-type]
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app
