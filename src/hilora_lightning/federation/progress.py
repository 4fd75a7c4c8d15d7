"""A progress bar over a federation's rounds, built on tqdm (what Lightning's own bar uses).

It shows the round, the current round's clients (done / selected), the stage, the last evaluated
accuracy and the ETA; it stays quiet when the output is not a terminal (logs, CI) or when the run
has ``progress=False``. The one-line-per-round summary is printed either way (above the bar) so logs
keep it.

Example:
    >>> from hilora_lightning.federation.progress import RoundProgress
    >>> bar = RoundProgress(total=3, initial=0, enabled=False)
    >>> bar.active
    False
    >>> bar.close()
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["RoundProgress"]


class RoundProgress:
    """Rounds as a tqdm bar; ``enabled`` and a terminal on stderr are both needed to draw it."""

    def __init__(self, total: int, initial: int, enabled: bool, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.active = bool(enabled) and bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar: Any = None
        self.postfix: dict[str, Any] = {}
        if self.active:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="round", desc="federation", file=self.stream,
                            dynamic_ncols=True, leave=True)

    def start_round(self, t: int, stage: str, selected: int) -> None:
        self.postfix.update(round=t, stage=stage, clients=f"0/{selected}")
        self._show()

    def client_done(self, done: int, selected: int) -> None:
        self.postfix["clients"] = f"{done}/{selected}"
        self._show()

    def end_round(self, line: str, acc: float | None) -> None:
        if acc is not None:
            self.postfix["acc"] = f"{acc:.3f}"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
            self.bar.update(1)
            self._show()
        else:
            print(line, flush=True)

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
