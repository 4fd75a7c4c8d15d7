"""Lazy package namespaces (PEP 562): a public name imports its module on first attribute access.

Pure-math modules (``hilora_lightning.strategy``) and data types import without Lightning or timm,
and ``import hilora_lightning`` stays fast.

Example:
    >>> import types
    >>> mod = types.ModuleType("demo")
    >>> getattr_, dir_ = lazy_exports("json", {"dumps": ""}, vars(mod))
    >>> getattr_("dumps")([1])
    '[1]'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str], namespace: MutableMapping[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose ``exports`` map a name to its submodule
    (``""``: the package itself). A resolved name is cached in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = f"{package}.{exports[name]}" if exports[name] else package
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
