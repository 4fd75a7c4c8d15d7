"""Error types of hilora-lightning.

Bad arguments raise the built-in :class:`ValueError` / :class:`TypeError`; these classes mark errors
that come from the library's own state or from adapter payloads, so callers can catch them as one
family.

Example:
    >>> from hilora_lightning.errors import HiLoraError, TargetNotFoundError
    >>> issubclass(TargetNotFoundError, HiLoraError)
    True
"""

from __future__ import annotations

__all__ = ["AdapterStateError", "ClientDataCheckError", "HiLoraError", "NonFiniteError", "TargetNotFoundError"]


class HiLoraError(Exception):
    """Base class of every error raised by hilora-lightning itself."""


class TargetNotFoundError(HiLoraError, ValueError):
    """No module of the model matched the adapter's target patterns."""


class AdapterStateError(HiLoraError, ValueError):
    """An adapter state dict has missing/unexpected keys, wrong shapes, dtypes or values."""


class NonFiniteError(HiLoraError, RuntimeError):
    """A tensor that must be finite (a merge delta, an update) holds NaN or Inf."""


class ClientDataCheckError(HiLoraError, ValueError):
    """A client's data does not fit the model (label range, image size, sample format), found before round 1."""
