"""The HiLoRA ``ClientApp``: a :class:`HiLoRAViT` and a Lightning ``Trainer`` on a Flower SuperNode.

Each node serves one training client: ``node_config["partition-id"]`` indexes the training clients
that :func:`hilora_lightning.experiment.build_clients` makes from the experiment config (the
simulation engine sets it; a real SuperNode gets ``--node-config "partition-id=3"``). The node
builds the same frozen model as the server (same config, same seed) once per process.

Messages (all tensors float32):

* ``query``: replies with the client id, its sample counts and latent group.
* ``train``: ``root`` (+ ``cluster``) and ``head`` records and a ``config`` record (tier, seeds,
  local-training settings). The client trains the tier; the **leaf and a personal head stay in
  ``context.state``** and never appear in a reply; it replies with the trained shared tier's
  ``factors``, the ``head`` when the head policy shares it, and ``metrics`` (``num_samples``).
* ``evaluate``: the tiers to activate; replies with ``accuracy`` and ``num_examples``.

Example:
    >>> from hilora_lightning.flower import make_client_app
    >>> app = make_client_app({"data": {"name": "digits", "num_clients": 4}})  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hilora_lightning.errors import AdapterStateError
from hilora_lightning.experiment import build_clients, build_model
from hilora_lightning.federation.client import ClientData
from hilora_lightning.federation.local import eval_device, evaluate, fit_client, head_state, load_view
from hilora_lightning.flower.codec import from_record, to_record
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.tiers import Tier

__all__ = ["config_from_run", "make_client_app"]

# per worker process, built once per config: the model, the training clients, the initial head
_RUNTIME: dict[str, tuple[HiLoRAViT, list[ClientData], dict[str, torch.Tensor]]] = {}


def _runtime(cfg: Mapping[str, Any]) -> tuple[HiLoRAViT, list[ClientData], dict[str, torch.Tensor]]:
    key = json.dumps({k: cfg.get(k) for k in ("seed", "data", "model")}, sort_keys=True, default=str)
    if key not in _RUNTIME:
        clients, _ = build_clients(cfg.get("data", {}), int(cfg.get("seed", 0)))
        model = build_model(cfg)
        _RUNTIME[key] = (model, sorted(clients, key=lambda c: c.client_id), head_state(model))
    return _RUNTIME[key]


def _client(cfg: Mapping[str, Any], context: Context) -> tuple[HiLoRAViT, ClientData]:
    model, clients, _ = _runtime(cfg)
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no 'partition-id' in its node config; start it with "
                         "--node-config \"partition-id=<index of its client>\"")
    index = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    if not 0 <= index < len(clients):
        raise ValueError(f"partition-id {index} is outside the {len(clients)} training clients of this config")
    return model, clients[index]


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


def _view(msg: Message, context: Context) -> dict[Tier, dict[str, torch.Tensor] | None]:
    """The shared tiers: from the message, or the frozen copies this client keeps (``cached``)."""
    conf = msg.content["config"]
    cached = [Tier.parse(str(t)) for t in conf.get("cached", [])]  # type: ignore[union-attr]
    final = [Tier.parse(str(t)) for t in conf.get("final", [])]  # type: ignore[union-attr]
    view: dict[Tier, dict[str, torch.Tensor] | None] = {}
    for tier, name in ((Tier.ROOT, "root"), (Tier.CLUSTER, "cluster")):
        if tier in cached:
            if f"frozen-{name}" not in context.state:
                raise RuntimeError(f"the server expects this client to hold the frozen {name} adapter, but it "
                                   "does not (the SuperNode restarted?)")
            view[tier] = from_record(context.state[f"frozen-{name}"])
        elif name in msg.content:
            view[tier] = from_record(msg.content[name])
            if tier in final:  # frozen from now on: keep it, the server will not send it again
                context.state[f"frozen-{name}"] = msg.content[name]  # type: ignore[assignment]
    if Tier.ROOT not in view:
        raise ValueError("malformed message: no root adapter and none cached")
    return view


def _head(cfg: Mapping[str, Any], msg: Message, context: Context, own: bool) -> dict[str, torch.Tensor]:
    """The client's own head (``own`` and it has one), else the server's, else the model's initial head."""
    if own and "head" in context.state:
        return from_record(context.state["head"])
    if "head" in msg.content:
        return from_record(msg.content["head"])
    return _runtime(cfg)[2]


def make_client_app(
    cfg: Mapping[str, Any] | None = None, fault: Callable[[int, int, str], None] | None = None,
    config_root: str | Path | None = None,
) -> ClientApp:
    """A ``ClientApp`` for the experiment config ``cfg`` (sections ``seed``, ``data``, ``model``, ``trainer``).

    Args:
        cfg: the experiment config (as for ``hilora-fl run``); ``trainer`` holds this node's Lightning
            options (``precision``, ``accelerator``...). ``None``: read it from the run config
            (:func:`config_from_run`, paths relative to ``config_root``) on the first message.
        fault: called as ``fault(client_id, round, message_type)`` before a request is served; raise in
            it to inject a failure (tests, chaos drills). The error goes back as a Flower error reply.
    """
    app = ClientApp()
    resolved: dict[str, Any] = {}

    def setup(context: Context) -> tuple[Mapping[str, Any], dict[str, Any]]:
        if "cfg" not in resolved:
            resolved["cfg"] = cfg if cfg is not None else config_from_run(context.run_config, config_root)
        return resolved["cfg"], dict(resolved["cfg"].get("trainer", {}) or {})

    @app.query()
    def info(msg: Message, context: Context) -> Message:
        cfg, _ = setup(context)
        _, client = _client(cfg, context)
        record = ConfigRecord({"client_id": client.client_id, "num_samples": client.num_samples,
                               "num_test": len(client.test),  # type: ignore[arg-type]
                               "group": -1 if client.group is None else int(client.group)})
        return Message(RecordDict({"info": record}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, trainer_kwargs = setup(context)
        model, client = _client(cfg, context)
        conf = msg.content["config"]
        tier = Tier.parse(str(conf["tier"]))
        if fault is not None:
            fault(client.client_id, int(conf["round"]), "train")  # type: ignore[arg-type]
        view = _view(msg, context)
        if tier is Tier.LEAF:
            if "leaf" in context.state:
                view[Tier.LEAF] = from_record(context.state["leaf"])
            else:
                model.reset_tier(Tier.LEAF, int(conf["leaf_seed"]))  # type: ignore[arg-type]
        load_view(model, view, _head(cfg, msg, context, bool(conf["own_head"])))
        steps = int(conf["local_steps"])  # type: ignore[arg-type]
        factors = fit_client(model, client.train, tier, int(conf["seed"]),  # type: ignore[arg-type]
                             int(conf["batch_size"]), int(conf["local_epochs"]),  # type: ignore[arg-type]
                             None if steps < 0 else steps, trainer_kwargs)
        head = head_state(model)
        if not all(torch.isfinite(v).all() for v in [*factors.values(), *head.values()]):
            raise AdapterStateError(f"client {client.client_id}: the {tier.value} update holds NaN or Inf values")
        content = RecordDict({"metrics": MetricRecord({"num_samples": client.num_samples})})
        personal_head = tier is Tier.LEAF or conf["head_policy"] == "local"
        if tier is Tier.LEAF:
            context.state["leaf"] = to_record(factors)  # the leaf never leaves the client
        else:
            content["factors"] = to_record(factors)
        if personal_head:
            context.state["head"] = to_record(head)
        else:
            content["head"] = to_record(head)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        cfg, trainer_kwargs = setup(context)
        model, client = _client(cfg, context)
        conf = msg.content["config"]
        tiers = [Tier.parse(str(t)) for t in conf["tiers"]]  # type: ignore[union-attr]
        if fault is not None:
            fault(client.client_id, int(conf.get("round", 0)), "evaluate")  # type: ignore[arg-type]
        view = _view(msg, context)
        if Tier.LEAF in tiers:
            if "leaf" in context.state:
                view[Tier.LEAF] = from_record(context.state["leaf"])
            else:
                model.reset_tier(Tier.LEAF, 0)  # no leaf yet: the zero (no-op) leaf
        load_view(model, view, _head(cfg, msg, context, bool(conf["own_head"])))
        acc = evaluate(model, client.test, tiers, device=eval_device(trainer_kwargs))
        metrics = MetricRecord({"accuracy": acc, "num_examples": len(client.test)})  # type: ignore[arg-type]
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app
