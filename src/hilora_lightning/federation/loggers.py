"""Round metrics, hyper-parameters and figures of a federation in any Lightning logger.

The runner logs, after every committed round and with the round as the step, under ``fed/``:
``acc_mean``, ``acc_p10``, ``acc_min``, ``acc_std`` (evaluated rounds), ``rho``, ``bytes_up``,
``bytes_down``, ``clients_ok``, ``clients_failed``, ``seconds`` and ``stage`` (0 root, 1 cluster,
2 leaf; baselines 0); at the transition ``k`` and ``ari``; the run's settings once as
hyper-parameters; and figures (the LSAC similarity heatmap, accuracy per round) as images where the
logger takes images (TensorBoard ``add_figure``, W&B ``log_image``, MLflow ``log_figure``), as PNG
files in its folder otherwise.

Example:
    >>> import tempfile
    >>> from lightning.pytorch.loggers import CSVLogger
    >>> from hilora_lightning.federation.loggers import RoundLogger
    >>> log = RoundLogger(CSVLogger(tempfile.mkdtemp(), name="fed"))
    >>> log.metrics({"acc_mean": 0.5}, step=1)
    >>> log.finalize("success")
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hilora_lightning.federation.result import RoundRecord

__all__ = ["STAGE_INDEX", "RoundLogger", "as_loggers", "typed_value"]

#: ``fed/stage`` values.
STAGE_INDEX = {"root": 0, "cluster": 1, "leaf": 2, "federated": 0, "local": 0}


def typed_value(value: Any) -> Any:
    """A hyper-parameter as loggers take it: a fingerprint's JSON text read back (numbers, booleans, strings);
    lists and mappings stay JSON text (TensorBoard's hyper-parameters are scalars).

    Example:
        >>> typed_value("4"), typed_value("0.003"), typed_value('"lsac"'), typed_value("[2, 6]"), typed_value("null")
        (4, 0.003, 'lsac', '[2, 6]', 'None')
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if value is None:
        return "None"
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, sort_keys=True)


def as_loggers(logger: Any) -> list[Any]:
    """``None``/``False`` -> none, one logger -> ``[logger]``, a list stays a list."""
    if logger is None or logger is False:
        return []
    return list(logger) if isinstance(logger, (list, tuple)) else [logger]


class RoundLogger:
    """Sends a federation's numbers and figures to Lightning loggers (any ``lightning.pytorch.loggers.Logger``)."""

    def __init__(self, logger: Any = None, prefix: str = "fed/") -> None:
        self.loggers = as_loggers(logger)
        self.prefix = prefix
        for lg in self.loggers:
            if not callable(getattr(lg, "log_metrics", None)):
                raise TypeError(f"logger must be a Lightning Logger (with log_metrics), got {type(lg).__name__}")

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def metrics(self, values: Mapping[str, float | None], step: int) -> None:
        """Log the finite values under the prefix at ``step``."""
        clean = {f"{self.prefix}{k}": float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
        if clean:
            for lg in self.loggers:
                lg.log_metrics(clean, step=step)

    def hyperparams(self, params: Mapping[str, Any]) -> None:
        """The run's settings, with their types (a fingerprint's JSON text is read back: ``4``, not ``'4'``)."""
        typed = {k: typed_value(v) for k, v in params.items()}
        for lg in self.loggers:
            lg.log_hyperparams(typed)

    def results(self, result: Any, step: int) -> None:
        """The final tables as numbers at ``step``: ``fed/final/<tiers>/<mean|p10|min|std>`` (test, tier-wise),
        ``fed/unseen/<row>/...`` (unseen clients), ``fed/client/<id>/final_acc``; TensorBoard's
        ``hp_metric`` (its hyper-parameter view) becomes the personalized mean accuracy."""
        values: dict[str, float | None] = {}
        for table, rows in (("final", result.tierwise), ("unseen", result.generalization)):
            for row, summary in (rows or {}).items():
                values.update({f"{table}/{row}/{stat}": summary.get(stat) for stat in ("mean", "p10", "min", "std")})
        values.update({f"client/{cid}/final_acc": acc for cid, acc in (result.client_accuracy or {}).items()})
        self.metrics(values, step)
        headline = list((result.tierwise or {}).values())[-1].get("mean") if result.tierwise else None
        for lg in self.loggers:
            if type(lg).__name__ == "TensorBoardLogger" and headline is not None:
                lg.log_metrics({"hp_metric": float(headline)}, step=step)

    def round(self, record: RoundRecord) -> None:
        """One committed round's numbers, the round as the step."""
        self.metrics({
            "acc_mean": record.acc_mean, "acc_p10": record.acc_p10, "acc_min": record.acc_min,
            "acc_std": record.acc_std, "rho": record.rho, "bytes_up": record.bytes_up_per_client,
            "bytes_down": record.bytes_down_per_client, "clients_ok": float(len(record.succeeded)),
            "clients_failed": float(len(record.failed)), "seconds": record.seconds,
            "stage": float(STAGE_INDEX.get(record.stage, 0))}, step=record.round)

    def figure(self, name: str, fig: Any, step: int) -> list[Path]:
        """Send a matplotlib figure to every logger that takes images; the others get a PNG file."""
        written: list[Path] = []
        for lg in self.loggers:
            kind = type(lg).__name__
            experiment: Any = getattr(lg, "experiment", None)
            if kind == "TensorBoardLogger" and hasattr(experiment, "add_figure"):
                experiment.add_figure(f"{self.prefix}{name}", fig, global_step=step, close=False)
            elif kind == "WandbLogger" and callable(getattr(lg, "log_image", None)):
                lg.log_image(key=f"{self.prefix}{name}", images=[fig], step=step)
            elif kind == "MLFlowLogger" and hasattr(experiment, "log_figure"):
                experiment.log_figure(lg.run_id, fig, f"{name}.png")
            else:
                folder = Path(getattr(lg, "log_dir", None) or getattr(lg, "save_dir", None) or ".")
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{name.replace('/', '_')}_round{step}.png"
                fig.savefig(path, dpi=100)
                written.append(path)
        return written

    def figures(self, records: Sequence[RoundRecord], lsac: Mapping[str, Any] | None, step: int,
                result: Any = None) -> None:
        """The final plots: accuracy per round, after a clustering the LSAC similarity heatmap, and with a
        ``result`` the per-client accuracy spread; all at ``step`` (the last round)."""
        if not self.loggers:
            return
        try:
            import matplotlib.pyplot as plt

            from hilora_lightning.plots import accuracy_per_round, similarity_heatmap
        except ImportError:  # matplotlib missing: numbers still went out
            return
        fig = accuracy_per_round([r.round for r in records], {"mean client acc": [r.acc_mean for r in records],
                                                              "p10 client acc": [r.acc_p10 for r in records]})
        self.figure("accuracy_per_round", fig, step)
        plt.close(fig)
        if lsac:
            import numpy as np

            dist = lsac["distances"].numpy() if hasattr(lsac["distances"], "numpy") else np.asarray(lsac["distances"])
            fig = similarity_heatmap(1.0 - dist, [f"c{c}" for c in lsac["ids"]], np.asarray(lsac["labels"]),
                                     title=f"LSAC client similarity (K={lsac['k']})")
            self.figure("client_similarity", fig, step)
            plt.close(fig)
        if result is not None and result.client_accuracy:
            from hilora_lightning.plots import client_spread

            fig = client_spread(result)
            self.figure("client_accuracy", fig, step)
            plt.close(fig)

    def finalize(self, status: str) -> None:
        for lg in self.loggers:
            lg.finalize(status)
