"""The data hook of configs: ``data: {builder: "my_pkg.my_data:build_clients", kwargs: {...}}``.

A builder is any importable callable that returns the training clients, and optionally the unseen
ones: a list, or a pair ``(clients, unseen)``, or a mapping ``{"clients": ..., "unseen": ...}``.
Each client may be a :class:`~hilora_lightning.data.clients.ClientData`, a ``LightningDataModule``
or a ``(train, test)`` / ``(train, val, test)`` tuple of data sets (client ids: their position).
A Flower node calls the same builder with ``partition_id`` and ``num_partitions`` when the builder
takes them (Flower's quickstart ``load_data`` hook) and keeps its own client.

Example:
    >>> load_callable("os.path:join", "data.builder")("a", "b")
    'a/b'
    >>> load_callable("os.path.nothere", "data.builder")
    Traceback (most recent call last):
    ...
    ValueError: data.builder must be 'package.module:function', got 'os.path.nothere'
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["BuilderError", "call_builder", "load_callable", "takes_partition"]


class BuilderError(ValueError):
    """A data builder that could not be loaded or returned something that is not clients."""


def load_callable(spec: str | Callable[..., Any], what: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:attribute"`` (a callable is returned as it is)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"{what} must be 'package.module:function', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
                         "is the package installed, or its folder on PYTHONPATH?") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def call_builder(spec: str | Callable[..., Any], kwargs: Mapping[str, Any] | None = None,
                 partition: tuple[int, int] | None = None) -> tuple[list[Any], list[Any]]:
    """Call a data builder and return ``(clients, unseen)`` as given (each still to be made clients).

    ``partition``: ``(partition_id, num_partitions)`` of a Flower node, passed when the builder
    accepts those keyword arguments (or ``**kwargs``).
    """
    fn = load_callable(spec, "data.builder")
    name = spec if isinstance(spec, str) else getattr(fn, "__qualname__", repr(fn))
    args = dict(kwargs or {})
    if partition is not None and takes_partition(fn):
        args.update(partition_id=partition[0], num_partitions=partition[1])
    try:
        out = fn(**args)
    except TypeError as exc:
        if not _signature_fits(fn, args):
            raise BuilderError(f"data builder {name!r} does not take the arguments {sorted(args)} "
                               f"(its signature: {_signature(fn)}); fix data.kwargs") from exc
        raise
    if isinstance(out, Mapping):
        unknown = sorted(set(out) - {"clients", "unseen"})
        if "clients" not in out or unknown:
            raise BuilderError(f"data builder {name!r} returned a mapping with keys {sorted(map(str, out))}; "
                               "expected {'clients': [...], 'unseen': [...]} (unseen optional)")
        clients, unseen = out["clients"], out.get("unseen") or []
    elif _is_pair(out):
        clients, unseen = out
    else:
        clients, unseen = out, []
    for label, value in (("clients", clients), ("unseen clients", unseen)):
        if not _is_list(value):
            raise BuilderError(f"data builder {name!r} returned {type(value).__name__} as its {label}; expected a "
                               "list of ClientData, LightningDataModules or (train, test) tuples, or "
                               "(clients, unseen), or {'clients': ..., 'unseen': ...}")
    if not clients:
        raise BuilderError(f"data builder {name!r} returned no training clients")
    return list(clients), list(unseen)


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _is_pair(out: Any) -> bool:
    """``(clients, unseen)``: two lists of clients (not two ``(train, test)`` splits of one client each)."""
    return (isinstance(out, tuple) and len(out) == 2 and all(_is_list(v) for v in out)
            and not any(_looks_like_split(v) for v in out if isinstance(v, tuple)))


def _looks_like_split(value: tuple[Any, ...]) -> bool:
    """A ``(train, test)`` / ``(train, val, test)`` tuple of data sets (not a list of clients)."""
    return 2 <= len(value) <= 3 and all(hasattr(v, "__getitem__") and hasattr(v, "__len__")
                                        and not isinstance(v, (list, tuple)) for v in value)


def takes_partition(spec: str | Callable[..., Any]) -> bool:
    """Whether a builder takes ``partition_id`` (by name or ``**kwargs``): a Flower node then calls it for its
    own client."""
    try:
        params = inspect.signature(load_callable(spec, "data.builder")).parameters
    except (TypeError, ValueError):
        return False
    return "partition_id" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _signature(fn: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(unknown)"


def _signature_fits(fn: Callable[..., Any], args: Mapping[str, Any]) -> bool:
    try:
        inspect.signature(fn).bind(**args)
    except TypeError:
        return False
    except ValueError:
        return True
    return True
