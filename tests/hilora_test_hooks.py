"""Hooks a ``hilora-fl`` subprocess of the tests imports by name (``loader.collate_fn``).

``interrupt_after_checkpoint`` collates like PyTorch's default and, once the file named by
``HILORA_TEST_INTERRUPT_AT`` exists (the run's ``federation.pt``: a round has been saved), sends
this process one SIGINT, as a user's Ctrl-C in the middle of the next round's client fit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from torch.utils.data import default_collate

_SENT: list[int] = []


def interrupt_after_checkpoint(samples: list[Any]) -> Any:
    marker = os.environ.get("HILORA_TEST_INTERRUPT_AT")
    if marker and not _SENT and Path(marker).exists():
        _SENT.append(1)
        os.kill(os.getpid(), signal.SIGINT)
    return default_collate(samples)
