"""Per-round records and the result of a federated run, with JSON / CSV writers and a text table.

Example:
    >>> from hilora_lightning.federation.result import accuracy_summary
    >>> s = accuracy_summary([0.5, 0.9, 0.7, 0.8])
    >>> round(s["mean"], 3), round(s["min"], 3)
    (0.725, 0.5)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FederatedResult", "RoundRecord", "accuracy_summary", "format_rows"]


def accuracy_summary(accs: Sequence[float]) -> dict[str, float]:
    """Mean, 10th percentile (the paper's tail), min and std of per-client accuracies."""
    if not accs:
        return {"mean": float("nan"), "p10": float("nan"), "min": float("nan"), "std": float("nan")}
    a = np.asarray(accs, dtype=np.float64)
    return {"mean": float(a.mean()), "p10": float(np.percentile(a, 10)), "min": float(a.min()), "std": float(a.std())}


@dataclasses.dataclass
class RoundRecord:
    """What happened in one round."""

    round: int
    stage: str
    selected: list[int]
    succeeded: list[int]
    failed: dict[int, str]
    rho: float | None = None
    acc_mean: float | None = None
    acc_p10: float | None = None
    acc_min: float | None = None
    acc_std: float | None = None
    bytes_up_per_client: float = 0.0
    bytes_down_per_client: float = 0.0
    seconds: float = 0.0
    eval_failed: dict[int, str] = dataclasses.field(default_factory=dict)
    #: the client split the round's accuracy was measured on: ``"val"``, ``"test"`` (clients without a
    #: validation split, and records from before it existed) or ``"val+test"`` (some of each)
    split: str = "test"
    #: clients scored in this round's evaluation (``None``: records from before this was counted)
    evaluated: int | None = None
    #: clients that could not be scored this round; the accuracy figures take their last score
    carried: list[int] = dataclasses.field(default_factory=list)
    #: with ``federation.privacy``: the epsilon spent after this round (``None``: no privacy)
    epsilon: float | None = None

    def progress_line(self, rounds: int) -> str:
        """One line for the round counter: stage, clients, failures, rho, accuracy, seconds."""
        acc = "" if self.acc_mean is None else f" {self.split} acc mean {self.acc_mean:.3f} p10 {self.acc_p10:.3f}"
        if self.acc_mean is not None and self.eval_failed:  # taken over fewer fresh scores: say so
            acc += f" ({self.evaluated} scored, {len(self.carried)} carried from their last round)"
        rho = "" if self.rho is None or not math.isfinite(self.rho) else f" rho {self.rho:.3f}"
        fails = f" failed {sorted(self.failed)}" if self.failed else ""
        fails += f" not evaluated {sorted(self.eval_failed)}" if self.eval_failed else ""
        eps = "" if self.epsilon is None else f" epsilon {self.epsilon:.2f}"
        return (f"round {self.round}/{rounds} [{self.stage}] clients {len(self.succeeded)}/{len(self.selected)}"
                f"{fails}{rho}{acc}{eps} ({self.seconds:.1f}s)")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["failed"] = {str(k): v for k, v in self.failed.items()}
        out["eval_failed"] = {str(k): v for k, v in self.eval_failed.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        data = dict(data)
        data["failed"] = {int(k): v for k, v in data.get("failed", {}).items()}
        data["eval_failed"] = {int(k): v for k, v in data.get("eval_failed", {}).items()}
        return cls(**data)


def format_rows(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats are printed with three decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    lines = [" | ".join(f"{h:<{w}}" for h, w in zip(header, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(f"{c:<{w}}" for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


@dataclasses.dataclass
class FederatedResult:
    """The outcome of :meth:`FederatedOrchestrator.run`.

    Attributes:
        records: one :class:`RoundRecord` per round.
        client_accuracy: final personalized accuracy per client (all tiers of its path).
        tierwise: ``{"root": summary, "root+cluster": summary, "root+cluster+leaf": summary}``.
        assignment: client id -> cluster id.
        num_clusters: K found at the transition.
        clustering_ari: adjusted Rand index of the assignment against the known latent groups.
        generalization: unseen clients' ``{"root": summary, "zero_leaf": ..., "finetuned": ...}``.
        routing: unseen client id -> routed cluster id.
        seconds: wall time of the run.
        tierwise_fixed_head: the tier-wise table with every row on the client's final (personal) head,
            so each row differs from the one above only by a tier: the tier's own gain.
        lsac_study: with ``clustering.study``, LSAC re-run at the transition with every feature and
            kernel-width rule on the same root stage: ``{"<feature>/<sigma>[/k1]": {"k": K, "ari": ARI}}``.
        failures: per final step (``"final root"``, ``"probe"``, ``"unseen finetune"``...), the clients
            that failed it and why (they are left out of that step's table).
        splits: which client split each figure comes from: ``{"rounds": "val", "final": "test"}``
            (per-round records on validation, the tables above on test).
        privacy: with ``federation.privacy``, the ``epsilon`` spent at ``delta``, the
            ``noise_multiplier``, ``clip_norm``, ``noised_rounds`` (and ``target_epsilon``); else empty.
    """

    records: list[RoundRecord]
    client_accuracy: dict[int, float]
    tierwise: dict[str, dict[str, float]]
    assignment: dict[int, int]
    num_clusters: int
    clustering_ari: float | None = None
    generalization: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    routing: dict[int, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    failures: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict)
    tierwise_fixed_head: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    lsac_study: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    splits: dict[str, str] = dataclasses.field(default_factory=lambda: {"rounds": "test", "final": "test"})
    privacy: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["records"] = [r.to_dict() for r in self.records]
        for key in ("client_accuracy", "assignment", "routing"):
            out[key] = {str(k): v for k, v in getattr(self, key).items()}
        out["failures"] = {step: {str(k): v for k, v in by.items()} for step, by in self.failures.items()}
        return out

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the whole result as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the per-round records as CSV (one row per round)."""
        path = Path(path)
        rows = [r.to_dict() for r in self.records]
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["round"])
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
        return path

    def summary(self) -> str:
        """The paper-style tables: tier-wise personalization, generalization, communication."""
        parts = [
            format_rows(
                [f"evaluated with ({self.splits.get('final', 'test')})", "mean acc", "p10 acc", "min acc", "std"],
                [[k, v["mean"], v["p10"], v["min"], v["std"]] for k, v in self.tierwise.items()],
            )
        ]
        if self.tierwise_fixed_head:
            parts.append(
                format_rows(
                    ["on the final head", "mean acc", "p10 acc", "min acc", "std"],
                    [[k, v["mean"], v["p10"], v["min"], v["std"]] for k, v in self.tierwise_fixed_head.items()],
                )
            )
        if self.generalization:
            parts.append(
                format_rows(
                    [f"unseen clients ({self.splits.get('final', 'test')})", "mean acc", "p10 acc", "min acc", "std"],
                    [[k, v["mean"], v["p10"], v["min"], v["std"]] for k, v in self.generalization.items()],
                )
            )
        up = [r.bytes_up_per_client for r in self.records]
        down = [r.bytes_down_per_client for r in self.records]
        ari = "n/a" if self.clustering_ari is None else f"{self.clustering_ari:.3f}"
        parts.append(
            f"clusters found: {self.num_clusters} (ARI vs latent groups: {ari}); "
            f"mean bytes per client per round: up {np.mean(up) / 1024:.1f} KiB, down {np.mean(down) / 1024:.1f} KiB; "
            f"{len(self.records)} rounds in {self.seconds:.1f}s"
        )
        return "\n\n".join(parts)
