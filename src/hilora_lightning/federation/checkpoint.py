"""Atomic, checksummed federation checkpoints; loaded without unpickling code.

The state is a nested structure of dicts, lists, strings, numbers and tensors, serialized with
``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses arbitrary
pickled objects. The file is one header line (a magic string and the SHA-256 of the payload) and
the payload: a flipped bit anywhere is refused before anything is read from it (``torch.load``
alone does not check the zip CRC). Writing goes to a temp file, fsync, rename: a crash (even
SIGKILL) while writing leaves the previous checkpoint intact, and a temp file orphaned by a kill
is removed by the next save.

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

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from hilora_lightning.atomic import atomic_write
from hilora_lightning.errors import HiLoraError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(HiLoraError, RuntimeError):
    """A federation checkpoint is unreadable or belongs to a different run."""


MAGIC = b"HILORA-CKPT-1 sha256="


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` atomically to ``path`` with a SHA-256 header (the directory is created if needed)."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    if path.parent.is_dir():
        for orphan in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-save
            orphan.unlink(missing_ok=True)
    return atomic_write(path, lambda fh: (fh.write(header), fh.write(payload)))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no federation checkpoint at {str(path)!r}")
    raw = path.read_bytes()
    head, _, payload = raw.partition(b"\n")
    if not head.startswith(MAGIC):
        raise CheckpointError(f"{str(path)!r} is not a hilora-lightning federation checkpoint (no checksum header; "
                              "written by an older version or another program); start a new checkpoint path")
    if hashlib.sha256(payload).hexdigest().encode() != head[len(MAGIC):]:
        raise CheckpointError(f"{str(path)!r} is corrupted (its SHA-256 does not match its header); nothing was "
                              "read from it. Restore a backup or start a new checkpoint path")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable federation checkpoint: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, expected a federation state dict")
    return state
