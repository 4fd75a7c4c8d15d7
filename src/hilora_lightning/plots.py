"""Plots people can read: client similarity heatmaps, accuracy per round per tier, per-client spread.

matplotlib is imported lazily (with the non-interactive Agg backend), so the rest of the library
works without a display.

Example:
    >>> import numpy as np
    >>> from hilora_lightning.plots import similarity_heatmap
    >>> fig = similarity_heatmap(np.eye(3), ["a", "b", "c"], np.array([0, 1, 1]))
    >>> fig.axes[0].get_title()
    'client similarity'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["accuracy_per_round", "client_spread", "similarity_heatmap"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def similarity_heatmap(
    similarity: np.ndarray, names: Sequence[Any], labels: np.ndarray | Sequence[int], title: str = "client similarity"
) -> Any:
    """A heatmap of ``similarity`` with members sorted by cluster and cluster borders drawn."""
    plt = _plt()
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    sim = np.asarray(similarity)[np.ix_(order, order)]
    size = max(4.0, min(12.0, 0.35 * len(order) + 2))
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(sim, cmap="viridis", vmin=0.0, vmax=1.0)
    ticks = [f"{names[i]} ({labels[i]})" for i in order]
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), ticks, rotation=90, fontsize=7)
        ax.set_yticks(range(len(order)), ticks, fontsize=7)
    for b in np.flatnonzero(np.diff(labels[order])) + 0.5:
        ax.axhline(b, color="white", lw=1.5)
        ax.axvline(b, color="white", lw=1.5)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="1 - subspace distance")
    fig.tight_layout()
    return fig


def accuracy_per_round(rounds: Sequence[float], series: Mapping[str, Sequence[float | None]], title: str = "",
                       xlabel: str = "round") -> Any:
    """Lines of accuracy per round, or per any ``xlabel`` (one per name in ``series``; ``None`` points skipped)."""
    plt = _plt()
    many = len(series) > 6  # a method comparison: legend outside, line styles beyond the 10 colors
    fig, ax = plt.subplots(figsize=(10, 5) if many else (7, 4))
    for i, (name, values) in enumerate(series.items()):
        pts = [(r, v) for r, v in zip(rounds, values) if v is not None]
        if pts:
            style = ("-", "--", ":")[(i // 10) % 3]
            ax.plot(*zip(*pts), marker="o", ms=3, ls=style, lw=2.2 if name == "hilora" else 1.2, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    else:
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    return fig


def client_spread(result: Any) -> Any:
    """Per-client accuracy per tier view (root, root+cluster, all): a strip plot of the spread."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = list(result.tierwise.items())
    for i, (name, summary) in enumerate(rows):
        ax.errorbar(i, summary["mean"], yerr=summary["std"], fmt="o", capsize=4, label=f"{name} (mean ± std)")
        ax.scatter([i], [summary["p10"]], marker="v", color="k")
    accs = list(result.client_accuracy.values())
    ax.scatter([len(rows) - 1 + 0.15] * len(accs), accs, s=12, alpha=0.6, label="clients (all tiers)")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (▼ = 10th percentile)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
