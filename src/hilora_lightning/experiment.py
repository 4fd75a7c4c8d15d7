"""Experiments from plain config dicts (what the CLI reads from YAML): validate, build, run, save.

The library itself never reads files or argv; this module turns a nested mapping (for example an
omegaconf config) into the data, the :class:`HiLoRAViT`, the :class:`FederationConfig` and the
:class:`FederatedOrchestrator`, and writes the results (JSON, CSV, the resolved config, PNG plots).
Unknown or mistyped keys are an error that names the key and the closest valid one.

Example:
    >>> from hilora_lightning.experiment import validate_config
    >>> validate_config({"federation": {"round": 3}})
    Traceback (most recent call last):
    ...
    ValueError: unknown config key 'federation.round'; did you mean 'federation.rounds'?
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hilora_lightning.config import AdapterConfig, TierConfig
from hilora_lightning.config_data import DATA_KEYS, DATASETS, build_clients, hold_out
from hilora_lightning.federation import (
    ClientData,
    ClusteringConfig,
    FederatedOrchestrator,
    FederatedResult,
    FederationConfig,
)
from hilora_lightning.federation.config import PrivacyConfig, RobustConfig
from hilora_lightning.model import HiLoRAViT

__all__ = [
    "DATASETS",
    "build_clients",
    "build_experiment",
    "build_federation_config",
    "build_model",
    "hold_out",
    "model_options",
    "run_and_report",
    "run_experiment",
    "save_outputs",
    "validate_config",
    "write_config",
]

_LOADER_KEYS = ("num_workers", "pin_memory", "persistent_workers", "collate_fn", "image_key", "label_key")
_LOGGER_KEYS = ("name", "save_dir", "project", "experiment_name", "tracking_uri")
LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")


def build_logger(section: Mapping[str, Any] | None, out_dir: str | Path) -> Any:
    """The Lightning logger of the config's ``logger`` section (``name``: csv, tensorboard, wandb or
    mlflow; ``save_dir`` defaults to ``out_dir/logs``); ``None`` without one."""
    if not section:
        return None
    name = str(section.get("name", "csv"))
    save_dir = str(section.get("save_dir") or Path(out_dir) / "logs")
    from lightning.pytorch import loggers

    if name == "csv":
        return loggers.CSVLogger(save_dir, name="federation")
    if name == "tensorboard":
        return loggers.TensorBoardLogger(save_dir, name="federation", default_hp_metric=False)
    if name == "wandb":
        return loggers.WandbLogger(project=section.get("project", "hilora"), save_dir=save_dir)
    if name == "mlflow":
        return loggers.MLFlowLogger(experiment_name=section.get("experiment_name", "hilora"),
                                    tracking_uri=section.get("tracking_uri"), save_dir=save_dir)
    raise ValueError(f"logger.name must be one of {LOGGERS}, got {name!r}")


#: ``backend.name`` values: one Lightning fit per client, or a round's clients in one pass
BACKENDS = ("sequential", "batched")


def build_backend(section: Mapping[str, Any] | None) -> Any:
    """The client backend of the config's ``backend`` section (``name``: sequential, the default, or
    batched, with ``clients_per_pass``); ``None`` for the sequential default.

    Example:
        >>> type(build_backend({"name": "batched", "clients_per_pass": 8})).__name__
        'BatchedBackend'
        >>> build_backend({"name": "parallel"})
        Traceback (most recent call last):
        ...
        ValueError: backend.name must be one of ('sequential', 'batched'), got 'parallel'
    """
    name = str((section or {}).get("name", "sequential"))
    if name not in BACKENDS:
        raise ValueError(f"backend.name must be one of {BACKENDS}, got {name!r}")
    if name == "sequential":
        return None
    from hilora_lightning.federation.batched import BatchedBackend

    return BatchedBackend(clients_per_pass=(section or {}).get("clients_per_pass"))


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _model_keys() -> set[str]:
    return set(inspect.signature(HiLoRAViT.__init__).parameters) - {"self"}


def _schema() -> dict[str, Any]:
    tier = dict.fromkeys(_fields(TierConfig))
    adapter = {"targets": None, "root": tier, "cluster": tier, "leaf": tier}
    model = dict.fromkeys(_model_keys())
    model["adapter"] = adapter
    federation = dict.fromkeys(_fields(FederationConfig))
    federation["clustering"] = dict.fromkeys(_fields(ClusteringConfig))
    federation["robust"] = dict.fromkeys(_fields(RobustConfig))
    federation["privacy"] = dict.fromkeys(_fields(PrivacyConfig))
    return {"seed": None, "out_dir": None, "method": None, "data": dict.fromkeys(DATA_KEYS), "model": model,
            "federation": federation, "trainer": "*", "loader": dict.fromkeys(_LOADER_KEYS),
            "logger": dict.fromkeys(_LOGGER_KEYS), "backend": {"name": None, "clients_per_pass": None},
            "compare": {"methods": None, "seeds": None}}


def _check(node: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {sorted(schema)}"
            raise ValueError(f"unknown config key '{path}'{hint}")
        sub = schema[key]
        if isinstance(sub, dict) and isinstance(value, Mapping):
            _check(value, sub, path + ".")


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Reject unknown keys (naming the closest valid one), values of the wrong type (naming the dotted
    key, what was expected and what came) and unknown methods; ``trainer`` options are checked against
    Lightning's ``Trainer`` by :func:`check_trainer`."""
    from hilora_lightning.config_check import check_types

    _check(cfg, _schema(), "")
    check_types(cfg)
    method = cfg.get("method")
    if method is not None:
        from hilora_lightning.baselines.methods import BASELINES

        valid = ["hilora", *sorted(BASELINES)]
        if method not in valid:
            raise ValueError(f"unknown method {method!r} (config key 'method'); valid: {valid}")
    if cfg.get("loader") is not None:
        from hilora_lightning.federation.local import LoaderSpec

        LoaderSpec.from_dict(dict(cfg["loader"]))
    name = (cfg.get("logger") or {}).get("name")
    if name is not None and name not in LOGGERS:
        raise ValueError(f"logger.name must be one of {LOGGERS}, got {name!r}")
    backend = (cfg.get("backend") or {}).get("name")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend.name must be one of {BACKENDS}, got {backend!r}")
    per_pass = (cfg.get("backend") or {}).get("clients_per_pass")
    if per_pass is not None and per_pass < 1:
        raise ValueError(f"backend.clients_per_pass must be >= 1 or null, got {per_pass}")


def model_options(cfg: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Every :class:`HiLoRAViT` option ``build_model(cfg, **overrides)`` would use, the library's
    defaults filled in and the adapter resolved (a plain, JSON-ready dict): what a saved result was
    trained with, so a changed default is noticed (``compare``'s resume).

    Example:
        >>> opts = model_options({"model": {"gamma_c": 0.0}}, gamma_l=0.5)
        >>> opts["gamma_c"], opts["gamma_l"], opts["ortho_form"], opts["adapter"]["root"]["rank"]
        (0.0, 0.5, 'raw', 8)
    """
    model_cfg = dict(cfg.get("model", {}) or {})
    adapter = AdapterConfig.from_dict(model_cfg.pop("adapter", {}) or {})
    params = inspect.signature(HiLoRAViT.__init__).parameters
    opts = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    opts.update({"seed": int(cfg.get("seed", 0)), **model_cfg, **overrides, "adapter": adapter.to_dict()})
    return json.loads(json.dumps(opts, default=str))


def build_model(cfg: Mapping[str, Any], **overrides: Any) -> HiLoRAViT:
    """The :class:`HiLoRAViT` of the ``model`` section (``overrides`` win, e.g. ``gamma_c=0``)."""
    from hilora_lightning.config_check import ConfigError, prefixed

    model_cfg = dict(cfg.get("model", {}) or {})
    try:
        adapter = AdapterConfig.from_dict(model_cfg.pop("adapter", {}) or {})
    except (ValueError, TypeError) as exc:
        raise prefixed("model.adapter", exc) from exc
    try:
        return HiLoRAViT(adapter=adapter, **{"seed": int(cfg.get("seed", 0)), **model_cfg, **overrides})
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "unknown" in str(exc).lower() and "backbone" in str(exc).lower():
            raise ConfigError(f"model.backbone: {exc}; use a timm model name (timm.list_models()) or "
                              "'hilora-digits-vit'") from exc
        raise
    except (ValueError, TypeError) as exc:
        raise prefixed("model", exc) from exc


def build_federation_config(cfg: Mapping[str, Any]) -> FederationConfig:
    """The :class:`FederationConfig` of the ``federation`` section (seeded by the top-level ``seed``)."""
    from hilora_lightning.config_check import prefixed

    fed = dict(cfg.get("federation", {}) or {})
    try:
        for key in ("root_rounds", "cluster_rounds"):
            if key in fed:
                fed[key] = tuple(fed[key])
        if "clustering" in fed:
            fed["clustering"] = ClusteringConfig(**dict(fed["clustering"] or {}))
        for key, cls in (("robust", RobustConfig), ("privacy", PrivacyConfig)):
            if key in fed:
                section = dict(fed[key] or {})
                if "tiers" in section:
                    section["tiers"] = tuple(section["tiers"])
                fed[key] = cls(**section)
        return FederationConfig(**{"seed": int(cfg.get("seed", 0)), **fed})
    except (ValueError, TypeError) as exc:
        raise prefixed("federation", exc) from exc


def build_runner(cfg: Mapping[str, Any], clients: Sequence[ClientData], unseen: Sequence[ClientData] = (),
                 checkpoint_path: str | Path | None = None, backend: Any = None, progress: bool = True,
                 raise_client_errors: bool = False) -> Any:
    """The runner of ``cfg``'s ``method``: a :class:`FederatedOrchestrator` for ``"hilora"`` (the
    default), a :class:`~hilora_lightning.baselines.BaselineRunner` for a baseline's name. Shared by
    the CLI and the Flower ServerApp."""
    method = str(cfg.get("method", "hilora") or "hilora")
    config = build_federation_config(cfg)
    common: dict[str, Any] = {"trainer_kwargs": dict(cfg.get("trainer", {}) or {}), "checkpoint_path": checkpoint_path,
                              "progress": progress, "backend": backend or build_backend(cfg.get("backend")),
                              "loader": cfg.get("loader"),
                              "logger": build_logger(cfg.get("logger"), cfg.get("out_dir", "runs/experiment")),
                              "raise_client_errors": raise_client_errors}
    if method == "hilora":
        return FederatedOrchestrator(build_model(cfg), clients, config, unseen=unseen, **common)
    from hilora_lightning.baselines import BaselineRunner
    from hilora_lightning.baselines.methods import make_method

    return BaselineRunner(make_method(method, config), build_model(cfg), clients, config, unseen, **common)


def build_experiment(cfg: Mapping[str, Any], raise_client_errors: bool = False) -> Any:
    """Validate ``cfg`` and build the runner it describes (nothing runs yet); ``raise_client_errors``
    re-raises the first client exception with its traceback (``--fail-fast``)."""
    from hilora_lightning.config_check import check_experiment, check_trainer, prefixed

    validate_config(cfg)
    check_trainer(dict(cfg.get("trainer", {}) or {}))  # config_check: Lightning's Trainer refuses nothing later
    try:
        clients, unseen = build_clients(cfg.get("data", {}) or {}, int(cfg.get("seed", 0)))
    except (ValueError, TypeError) as exc:
        raise prefixed("data", exc) from exc
    check_experiment(cfg, clients, unseen)
    out = Path(cfg.get("out_dir", "runs/experiment"))
    return build_runner(cfg, clients, unseen, checkpoint_path=out / "federation.pt",
                        raise_client_errors=raise_client_errors)


def save_outputs(orch: Any, result: FederatedResult, cfg: Mapping[str, Any], out: Path) -> list[Path]:
    """Write result.json, rounds.csv, the resolved config.yaml and PNG plots into ``out``."""
    import numpy as np

    from hilora_lightning.plots import accuracy_per_round, client_spread, similarity_heatmap

    out.mkdir(parents=True, exist_ok=True)
    paths = [result.to_json(out / "result.json"), result.to_csv(out / "rounds.csv")]
    paths.append(write_config(cfg, out))
    rounds = [r.round for r in result.records]
    fig = accuracy_per_round(rounds, {"mean client acc": [r.acc_mean for r in result.records],
                                      "p10 client acc": [r.acc_p10 for r in result.records]},
                             title="personalized accuracy per round (stage: " +
                                   ", ".join(dict.fromkeys(r.stage for r in result.records)) + ")")
    paths.append(_save(fig, out / "accuracy_per_round.png"))
    if getattr(orch, "last_clustering", None) is not None:
        ids, res = orch.last_clustering
        groups = [orch.clients[c].group for c in ids]
        names = [f"c{c}/g{g}" if g is not None else f"c{c}" for c, g in zip(ids, groups)]
        fig = similarity_heatmap(1.0 - res.distances, names, np.asarray(res.labels),
                                 title=f"LSAC client similarity (K={res.k})")
        paths.append(_save(fig, out / "client_similarity.png"))
    if result.client_accuracy:
        paths.append(_save(client_spread(result), out / "client_accuracy.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_config(cfg: Mapping[str, Any], out: Path) -> Path:
    """Write the resolved ``cfg`` as ``out/config.yaml`` (atomically: never half a file)."""
    from hilora_lightning.atomic import atomic_write

    text = _to_yaml(cfg).encode()
    return atomic_write(out / "config.yaml", lambda fh: fh.write(text))


def _to_yaml(cfg: Mapping[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(cfg, default=list))))


def run_experiment(cfg: Mapping[str, Any], resume: bool = False, raise_client_errors: bool = False,
                   overwrite: bool = False) -> tuple[Any, FederatedResult]:
    """Build and run; with ``resume`` continue from ``out_dir/federation.pt`` if it exists.

    ``out_dir`` gets the resolved ``config.yaml`` before round 1 (after a resume was accepted), so
    the folder describes its checkpoint from the first round on (``hilora-fl export`` reads both).
    A folder that holds a run is refused unless ``resume`` continues it or ``overwrite`` replaces
    it (:func:`~hilora_lightning.run_folder.check_out_dir`; ``overwrite`` removes the old run's
    files once the new run is built).
    """
    from hilora_lightning.federation.checkpoint import load_checkpoint
    from hilora_lightning.run_folder import check_out_dir, clear_run

    out = Path(cfg.get("out_dir", "runs/experiment"))
    check_out_dir(out, resume=resume, overwrite=overwrite)
    orch = build_experiment(cfg, raise_client_errors)
    if overwrite:
        clear_run(out)
    ckpt = orch.runner.checkpoint_path  # the one round engine of HiLoRA and the baselines
    if resume and ckpt is not None and ckpt.exists():
        orch.runner.load_state_dict(load_checkpoint(ckpt))  # a different run is refused before anything is written
    write_config(cfg, out)
    return orch, orch.run()


def run_and_report(cfg: Mapping[str, Any], resume: bool = False, raise_client_errors: bool = False,
                   overwrite: bool = False) -> FederatedResult:
    """Run, print the results tables, write the outputs into ``out_dir`` and list them (CLI and examples)."""
    orch, result = run_experiment(cfg, resume=resume, raise_client_errors=raise_client_errors, overwrite=overwrite)
    print()
    print(result.summary())
    for path in save_outputs(orch, result, cfg, Path(cfg.get("out_dir", "runs/experiment"))):
        print(f"wrote {path}")
    return result
