"""Strict, typed checks of an experiment config (what the CLI reads from YAML), before any work starts.

Every value is checked where it is read, against the type the library declares for it: an ``int``
is an integer (``6.7`` and ``true`` are refused, nothing is truncated or coerced), a ``float`` is a
finite number (``nan``, ``inf`` and booleans are refused), a ``bool`` is ``true``/``false``. Each
error names the dotted key, what was expected and what came.

Example:
    >>> from hilora_lightning.config_check import check_types
    >>> check_types({"model": {"lr": float("nan")}})
    Traceback (most recent call last):
    ...
    hilora_lightning.config_check.ConfigError: model.lr: expected a finite number, got nan
    >>> check_types({"data": {"num_clients": 6.7}})
    Traceback (most recent call last):
    ...
    hilora_lightning.config_check.ConfigError: data.num_clients: expected an integer, got 6.7 (a float)
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hilora_lightning.data.clients import ClientData
from hilora_lightning.errors import HiLoraError

__all__ = ["ConfigError", "check_experiment", "check_trainer", "check_types", "prefixed"]


class ConfigError(HiLoraError, ValueError):
    """A config value has the wrong type or range; the message names its dotted key."""


_DATA = {"name": "str", "num_clients": "int", "num_groups": "int", "unseen_fraction": "float",
         "train_fraction": "float", "img_size": "int", "root": "str", "download": "bool", "verify": "bool",
         "partition": "str", "alpha": "float | None", "classes_per_client": "int", "clients_per_domain": "int",
         "test_fraction": "float", "domains": "list[str]", "per_client": "int", "val_fraction": "float",
         "layout": "str", "builder": "str", "kwargs": "dict", "transform": "str"}
_MODEL = {"backbone": "str", "num_classes": "int", "stage": "str", "pretrained": "bool",
          "pretrained_file": "str | None", "backbone_kwargs": "dict | None", "lr": "float", "weight_decay": "float",
          "gamma_c": "float", "gamma_l": "float", "ortho_side": "str", "ortho_form": "str", "train_head": "bool",
          "seed": "int"}
_LOADER = {"num_workers": "int", "pin_memory": "bool", "persistent_workers": "bool", "collate_fn": "str | None",
           "image_key": "str | None", "label_key": "str | None"}
_LOGGER = {"name": "str", "save_dir": "str", "project": "str", "experiment_name": "str", "tracking_uri": "str"}
_TOP = {"seed": "int", "out_dir": "str", "method": "str"}
_BACKEND = {"name": "str", "clients_per_pass": "int | None"}


def _dataclass_types(cls: type) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def _schema() -> dict[str, Any]:
    from hilora_lightning.config import TierConfig
    from hilora_lightning.federation.config import ClusteringConfig, FederationConfig, PrivacyConfig, RobustConfig

    tier = _dataclass_types(TierConfig)
    federation: dict[str, Any] = _dataclass_types(FederationConfig)
    federation["clustering"] = _dataclass_types(ClusteringConfig)
    federation["robust"] = _dataclass_types(RobustConfig)
    federation["privacy"] = _dataclass_types(PrivacyConfig)
    model: dict[str, Any] = dict(_MODEL)
    model["adapter"] = {"targets": "any", "root": tier, "cluster": tier, "leaf": tier}
    return {**_TOP, "data": _DATA, "model": model, "federation": federation, "loader": _LOADER, "logger": _LOGGER,
            "backend": _BACKEND, "trainer": "dict", "compare": {"methods": "any", "seeds": "any"}}


def _describe(value: Any) -> str:
    kind = "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"
    return f"{value!r} ({kind})"


def _check(key: str, value: Any, spec: str) -> None:
    options = [s.strip() for s in spec.split("|")]
    if value is None:
        if "None" in options:
            return
        raise ConfigError(f"{key}: expected a value ({spec.replace(' | None', '')}), got null")
    base = next((o for o in options if o != "None"), "any")
    if base == "any" or base.startswith(("Mapping[int", "ClusteringConfig", "RobustConfig", "PrivacyConfig",
                                         "TargetsLike")):
        return
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
    elif base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
    elif base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
    elif base.startswith("tuple[int, int]"):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{key}: expected a [min, max] pair of integers, got {_describe(value)}")
        for i, v in enumerate(value):
            _check(f"{key}[{i}]", v, "int")
    elif base.startswith(("list", "tuple[str")):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {_describe(value)}")
    elif base.startswith(("dict", "Mapping")) and not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")


def check_types(cfg: Mapping[str, Any], schema: Mapping[str, Any] | None = None, prefix: str = "") -> None:
    """Check every known value of ``cfg`` against its declared type (unknown keys: see ``validate_config``)."""
    for key, value in cfg.items():
        spec = (schema if schema is not None else _schema()).get(key)
        path = f"{prefix}{key}"
        if isinstance(spec, Mapping):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: expected a section (a mapping of keys), got {_describe(value)}")
            check_types(value, spec, path + ".")
        elif isinstance(spec, str):
            _check(path, value, spec)


_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*) (must|needs|has|cannot)")


def prefixed(section: str, exc: Exception) -> ConfigError:
    """A library error about a field (``"lr must be > 0"``) as a config error naming ``section.lr``."""
    msg = str(exc)
    m = _FIELD.match(msg)
    if m and not m.group(1).startswith(section + "."):
        msg = f"{section}.{msg}"
    elif not m:
        msg = f"{section}: {msg}"
    return ConfigError(msg)


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """Unknown ``trainer`` options (naming the closest) and values Lightning refuses, before any work starts."""
    import lightning.pytorch as pl

    from hilora_lightning.federation.local import quiet_lightning, trainer_for

    valid = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    for key in trainer:
        if key not in valid:
            close = difflib.get_close_matches(str(key), sorted(valid), n=1)
            hint = f"; did you mean 'trainer.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key 'trainer.{key}' (not a lightning Trainer option){hint}")
    try:
        with quiet_lightning():
            trainer_for(1, 1, trainer)
    except Exception as exc:
        raise ConfigError(f"trainer: Lightning refuses these options: {type(exc).__name__}: {exc}") from exc


def check_experiment(cfg: Mapping[str, Any], clients: Sequence[ClientData], unseen: Sequence[ClientData]) -> None:
    """What can only be checked once the data is built: labels vs ``num_classes``, a ``given``
    assignment covering every client, ``k_min`` vs the client count, a writable ``out_dir``."""

    num_classes = int((cfg.get("model") or {}).get("num_classes", 10))
    top = max((m for c in [*clients, *unseen] for m in (_max_label(c.train), _max_label(c.test)) if m is not None),
              default=None)
    if top is not None and top >= num_classes:
        raise ConfigError(f"model.num_classes: the data has labels up to {top}, so num_classes must be at least "
                          f"{top + 1}, got {num_classes}")
    clustering = ((cfg.get("federation") or {}).get("clustering") or {})
    if clustering.get("method") == "given":
        given = {int(k) for k in (clustering.get("assignment") or {})}
        missing = sorted(c.client_id for c in clients if c.client_id not in given)
        if missing:
            raise ConfigError(f"federation.clustering.assignment: no cluster for clients {missing}; give every "
                              f"training client one ({len(clients)} clients)")
    k_min = clustering.get("k_min", 2)
    if clustering.get("method", "lsac") in ("lsac", "kmeans") and isinstance(k_min, int) and k_min > len(clients):
        raise ConfigError(f"federation.clustering.k_min: {k_min} clusters need at least {k_min} training clients, "
                          f"got {len(clients)}")
    out = Path(str(cfg.get("out_dir", "runs/experiment")))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir: {str(out)!r} exists and is not a folder; choose another out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".hilora-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"out_dir: {str(out)!r} is not writable ({exc}); choose another out_dir") from exc


def _max_label(dataset: Any) -> int | None:
    """The largest label of a data set that exposes its labels cheaply (tensors or a label array), else None."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1 and len(dataset.tensors[1]):
        return int(dataset.tensors[1].max())
    if isinstance(dataset, Subset):
        inner = getattr(dataset.dataset, "labels", getattr(dataset.dataset, "targets", None))
        return int(max(inner[i] for i in dataset.indices)) if inner is not None and len(dataset.indices) else None
    labels = getattr(dataset, "labels", getattr(dataset, "targets", None))
    indices = getattr(dataset, "indices", None)
    if labels is None or not len(labels):
        return None
    return int(max(labels[i] for i in indices)) if indices is not None and len(indices) else int(max(labels))
