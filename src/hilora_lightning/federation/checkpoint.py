"""Atomic federation checkpoints: write to a temp file, fsync, rename; load without unpickling code.

The state is a nested structure of dicts, lists, strings, numbers and tensors, saved with
``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses arbitrary
pickled objects. A crash (even SIGKILL) while writing leaves the previous checkpoint intact.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from hilora_lightning.federation.checkpoint import load_checkpoint, save_checkpoint
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = save_checkpoint({"round": 3, "root": {"x.lora_A": torch.ones(2)}}, d / "fed.pt")
    >>> load_checkpoint(d / "fed.pt")["round"]
    3
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hilora_lightning.atomic import atomic_write
from hilora_lightning.errors import HiLoraError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(HiLoraError, RuntimeError):
    """A federation checkpoint is unreadable or belongs to a different run."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` atomically to ``path`` (the directory is created if needed)."""
    return atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no federation checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable federation checkpoint: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, expected a federation state dict")
    return state
