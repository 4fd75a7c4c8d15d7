"""Atomic file writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader sees either the old file or the complete new one, never a half-written file, even if the
process is killed (SIGKILL) mid-write; the temp file is removed when the writer raises.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from hilora_lightning.atomic import atomic_write
    >>> p = Path(tempfile.mkdtemp()) / "x.bin"
    >>> _ = atomic_write(p, lambda fh: fh.write(b"hello"))
    >>> p.read_bytes()
    b'hello'
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], mode: int = 0o644) -> Path:
    """Call ``write(fh)`` on a temp file beside ``path``, make it durable, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)  # mkstemp creates 0600; these files are ordinary data
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
