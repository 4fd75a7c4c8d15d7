"""A logger passed in ``trainer_kwargs`` as the federation sees it: each client's fit under ``client/<id>/``.

Every client fit is its own Lightning ``Trainer`` whose step starts at 0, and the same logger
object serves them all. :class:`ClientLogger` wraps it per fit: metric names get the client's
prefix (``client/3/train_loss``), the step is the federation's (the plan's round, so a client's
curve is plotted against the rounds), the fit's own hyper-parameters are not logged again (the
federation logs its settings once), and the fit's ``finalize`` only saves (the run, not one
client's fit, ends the logger).

Example:
    >>> import tempfile
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> from hilora_lightning.federation.client_logger import ClientLogger
    >>> inner = CSVLogger(tempfile.mkdtemp(), name="fed")
    >>> log = ClientLogger(inner, client_id=3, step=7)
    >>> log.log_metrics({"train_loss": 0.5}, step=0)
    >>> inner.experiment.metrics
    [{'client/3/train_loss': 0.5, 'step': 7}]
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import Logger

__all__ = ["ClientLogger", "for_client"]


class ClientLogger(Logger):
    """``inner`` seen by one client's fit: ``client/<id>/`` names at the federation's ``step``."""

    def __init__(self, inner: Logger, client_id: int, step: int) -> None:
        super().__init__()
        self.inner, self.client_id, self.step = inner, client_id, step
        self.prefix = f"client/{client_id}/"

    @property
    def name(self) -> str | None:
        return self.inner.name

    @property
    def version(self) -> int | str | None:
        return self.inner.version

    @property
    def save_dir(self) -> str | None:
        return self.inner.save_dir

    @property
    def root_dir(self) -> str | None:
        return self.inner.root_dir

    @property
    def log_dir(self) -> str | None:
        return self.inner.log_dir

    @property
    def experiment(self) -> Any:
        return getattr(self.inner, "experiment", None)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.inner.log_metrics({f"{self.prefix}{k}": v for k, v in metrics.items() if k != "epoch"}, step=self.step)

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        return None  # the federation logs its settings once; a client fit's would overwrite them

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        return None

    def save(self) -> None:
        self.inner.save()

    def finalize(self, status: str) -> None:
        self.inner.save()  # one client's fit ended, not the run: keep the shared logger open


def for_client(trainer_kwargs: Mapping[str, Any], client_id: int, step: int) -> dict[str, Any]:
    """``trainer_kwargs`` with its logger(s) wrapped for client ``client_id`` at federation ``step``."""
    logger = trainer_kwargs.get("logger")
    if logger is None or isinstance(logger, bool):
        return dict(trainer_kwargs)
    loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
    wrapped = [ClientLogger(lg, client_id, step) if isinstance(lg, Logger) else lg for lg in loggers]
    return {**trainer_kwargs, "logger": wrapped if isinstance(logger, (list, tuple)) else wrapped[0]}
