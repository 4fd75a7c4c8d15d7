"""Ctrl-C and ``kill`` as a clean stop: the round in progress is dropped, what was committed stays.

Inside :func:`interrupt_signals` a SIGINT or SIGTERM raises :class:`Interrupted`, a
``BaseException`` that no client guard catches and that Lightning passes on after tearing its
``Trainer`` down (a plain ``KeyboardInterrupt`` inside ``Trainer.fit`` becomes ``sys.exit(1)``).
The round engine never commits a round it did not finish and writes its checkpoint atomically,
so the folder holds the last finished round and ``--resume`` continues from it bit for bit.

Example:
    >>> import os, signal
    >>> from hilora_lightning.interrupt import Interrupted, interrupt_signals
    >>> with interrupt_signals():
    ...     try:
    ...         os.kill(os.getpid(), signal.SIGTERM)
    ...     except Interrupted as stop:
    ...         print(stop.name)
    SIGTERM
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Interrupted", "interrupt_signals"]


class Interrupted(BaseException):
    """A SIGINT/SIGTERM arrived while a run was in progress (raised by :func:`interrupt_signals`)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")


@contextmanager
def interrupt_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Raise :class:`Interrupted` on ``signums`` inside the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
