"""The tables of a comparison: one run per method (:class:`Comparison`) and runs over seeds
(:class:`SeedComparison`), as rows, a plain-text table, flat headline numbers and per-round curves.

Example:
    >>> from hilora_lightning.comparison import HEADER
    >>> HEADER[:3]
    ['method', 'mean acc', 'p10 acc']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from hilora_lightning.federation.result import FederatedResult, RoundRecord, format_rows

__all__ = ["HEADER", "Comparison", "SeedComparison"]

#: The table's columns.
HEADER = ["method", "mean acc", "p10 acc", "unseen zero-leaf", "unseen fine-tuned", "up KiB/client/round", "wall s"]


@dataclasses.dataclass
class Comparison:
    """Results of :func:`run_comparison`: one :class:`FederatedResult` and wall time per method.

    ``groups`` / ``unseen_groups``: the training (unseen) clients' latent groups where the data has
    them, to score clustering and routing against.
    """

    results: dict[str, FederatedResult]
    seconds: dict[str, float]
    groups: dict[int, int] = dataclasses.field(default_factory=dict)
    unseen_groups: dict[int, int] = dataclasses.field(default_factory=dict)

    def rows(self) -> list[list[Any]]:
        """The table rows (``None`` where a column does not apply)."""
        rows: list[list[Any]] = []
        for name, res in self.results.items():
            accs = list(res.client_accuracy.values())
            gen = res.generalization
            up = float(np.mean([r.bytes_up_per_client for r in res.records])) / 1024 if res.records else 0.0
            rows.append([name, _mean(accs), _p10(accs), gen.get("zero_leaf", {}).get("mean"),
                         gen.get("finetuned", {}).get("mean"), up, self.seconds.get(name, res.seconds)])
            if name == "hilora":
                for view, label in (("root", "root only"), ("root+cluster", "root+cluster")):
                    if view in res.tierwise:
                        s = res.tierwise[view]
                        rows.append([f"  hilora: {label}", s["mean"], s["p10"], None, None, None, None])
        return rows

    def table(self) -> str:
        """The comparison as a plain-text table."""
        return format_rows(HEADER, [[("-" if v is None else v) for v in row] for row in self.rows()])

    def headline(self) -> dict[str, float]:
        """A flat ``{"<method>_<column>": number}`` object (for JSON consumers)."""
        keys = ["mean", "p10", "zero_leaf", "finetuned", "up_kib", "seconds"]
        out: dict[str, float] = {}
        for row in self.rows():
            name = row[0].strip().replace("hilora: ", "hilora_").replace(" ", "_").replace("+", "_")
            out.update({f"{name}_{k}": float(v) for k, v in zip(keys, row[1:]) if v is not None})
        return out

    def curves(self) -> tuple[list[int], dict[str, list[float | None]]]:
        """Mean personalized accuracy per round per method (for the plot)."""
        rounds = sorted({r.round for res in self.results.values() for r in res.records})
        series = {name: _by_round(res.records, rounds) for name, res in self.results.items()}
        return rounds, series


@dataclasses.dataclass
class SeedComparison:
    """The comparison repeated over seeds (the paper reports 3): each cell is the mean ± std over seeds.

    Example:
        >>> from hilora_lightning.federation import FederatedResult
        >>> runs = {s: Comparison({"fedit": FederatedResult([], {0: a}, {}, {}, 0)}, {"fedit": 1.0})
        ...         for s, a in ((0, 0.5), (1, 0.7))}
        >>> print(SeedComparison(runs).table().splitlines()[2])
        fedit  | 0.600 ± 0.100 | 0.600 ± 0.100 | -                | -                 | 0.0 ± 0.0           | 1.0 ± 0.0
    """

    runs: dict[int, Comparison]

    def _stack(self) -> list[list[list[Any]]]:
        return [comp.rows() for comp in self.runs.values()]

    def rows(self) -> list[list[Any]]:
        """Per-cell means over the seeds (``None`` where a column does not apply)."""
        return [[cells[0][0], *[_cell(cells, i, np.mean) for i in range(1, len(HEADER))]]
                for cells in zip(*self._stack())]

    def std_rows(self) -> list[list[Any]]:
        """Per-cell standard deviations over the seeds."""
        return [[cells[0][0], *[_cell(cells, i, np.std) for i in range(1, len(HEADER))]]
                for cells in zip(*self._stack())]

    def table(self) -> str:
        """The comparison as a plain-text table of ``mean ± std`` cells."""
        out = []
        for mean, std in zip(self.rows(), self.std_rows()):
            row = [mean[0]]
            for i, (m, sd) in enumerate(zip(mean[1:], std[1:]), start=1):
                digits = 1 if HEADER[i] in ("up KiB/client/round", "wall s") else 3
                row.append("-" if m is None else f"{m:.{digits}f} ± {sd:.{digits}f}")
            out.append(row)
        return format_rows(HEADER, out)

    def headline(self) -> dict[str, float]:
        """Flat numbers: ``<method>_<column>`` means and ``<method>_<column>_std``."""
        heads = [comp.headline() for comp in self.runs.values()]
        out: dict[str, float] = {}
        for key in heads[0]:
            nums = [h[key] for h in heads if key in h]
            out[key], out[f"{key}_std"] = float(np.mean(nums)), float(np.std(nums))
        return out

    def curves(self) -> tuple[list[int], dict[str, list[float | None]]]:
        """Mean personalized accuracy per round per method, averaged over the seeds."""
        all_curves = [comp.curves() for comp in self.runs.values()]
        rounds = all_curves[0][0]
        series: dict[str, list[float | None]] = {}
        for name in all_curves[0][1]:
            per_round = zip(*[c[1][name] for c in all_curves])
            series[name] = [None if any(v is None for v in vs) else float(np.mean(vs)) for vs in per_round]
        return rounds, series


def _cell(cells: Sequence[Sequence[Any]], i: int, fn: Any) -> float | None:
    values = [row[i] for row in cells if row[i] is not None]
    return float(fn(values)) if values else None


def _mean(v: Sequence[float]) -> float | None:
    return float(np.mean(v)) if v else None


def _p10(v: Sequence[float]) -> float | None:
    return float(np.percentile(v, 10)) if v else None


def _by_round(records: Sequence[RoundRecord], rounds: Sequence[int]) -> list[float | None]:
    acc = {r.round: r.acc_mean for r in records}
    return [acc.get(t) for t in rounds]
