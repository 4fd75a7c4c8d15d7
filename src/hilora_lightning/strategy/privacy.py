"""Client-level differential privacy of a shared tier (DP-FedAvg with a trusted server), in product space.

Each client's update is its whole upload against what the round started from: the tier's products
``U_i = B_i A_i - B_0 A_0`` (every adapted matrix) and its head ``h_i - h_0``. The server clips each
update to norm ``S`` (one joint Frobenius norm, from the ``2r x 2r`` Gram blocks of
:func:`~hilora_lightning.strategy.robust.update_gram`), averages the clipped updates with equal weights
with the fixed denominator ``m`` (the number of clients expected in the aggregate, set before the
round: DP-FedAvg's fixed-denominator estimator), and adds Gaussian noise of standard deviation
``z S / m`` to every coordinate of the dense aggregate, one adapted matrix at a time:

    P = B_0 A_0 + (1/m) sum_i c_i U_i + N(0, (z S / m)^2),   c_i = min(1, S / ||U_i||)

then releases the rank-``r`` truncated SVD of ``P`` (post-processing: the guarantee holds for the
factors). Adding or removing one client changes the sum by at most ``S``, so the average by at most
``S / m`` whatever the others do (a denominator that counted the uploads would move with the client
and double that), so each round is a Gaussian mechanism of noise multiplier ``z`` for it, and over
the rounds the accountant (Opacus's RDP or PRV, with the round's client sampling rate) gives the
``(epsilon, delta)`` spent. Equal weights, not sample counts: a client's weight would otherwise
scale its sensitivity.

The noise is drawn from ``generator``; a deployment seeds it from the operating system (a known seed
lets anyone subtract the noise), a test or a reproducible study from a fixed seed.

Example:
    >>> import torch
    >>> start = {"m.lora_A": torch.randn(2, 5), "m.lora_B": torch.zeros(6, 2)}
    >>> ups = [{"m.lora_A": start["m.lora_A"], "m.lora_B": torch.randn(6, 2)} for _ in range(4)]
    >>> new, head, norms = dp_aggregate(ups, start, rank=2, clip_norm=1.0, noise_multiplier=1.0,
    ...                                 generator=torch.Generator().manual_seed(0))
    >>> tuple(new["m.lora_B"].shape), head is None, len(norms)
    ((6, 2), True, 4)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.strategy.aggregation import factor_pairs
from hilora_lightning.strategy.robust import combine_dense, dense_factors, dense_gram, update_gram, update_norms

__all__ = ["ACCOUNTANTS", "dp_aggregate", "epsilon_spent", "noise_multiplier_for"]

#: Opacus accountants that can carry the run's composition
ACCOUNTANTS = ("rdp", "prv")

State = Mapping[str, Tensor]


def dp_aggregate(states: Sequence[State], start: State, rank: int, clip_norm: float, noise_multiplier: float,
                 generator: torch.Generator, heads: Sequence[State] | None = None, head_start: State | None = None,
                 expected: float | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, list[float]]:
    """The released tier (rank ``rank``), head (``None`` without ``heads``) and each update's norm before clipping.

    ``expected``: the fixed denominator ``m``, the number of clients expected in this aggregate, decided
    before the round (``None``: the number of uploads, right only when every expected client uploaded).

    Raises:
        ValueError: no uploads, ``clip_norm <= 0``, ``noise_multiplier < 0`` or ``expected <= 0``.
    """
    if not states:
        raise ValueError("dp_aggregate needs at least one upload")
    if expected is not None and not expected > 0:
        raise ValueError(f"the expected number of clients must be > 0, got {expected!r}")
    if not clip_norm > 0 or not noise_multiplier >= 0:
        raise ValueError(f"clip_norm must be > 0 and noise_multiplier >= 0, got {clip_norm!r}, {noise_multiplier!r}")
    if heads is not None and head_start is None:
        raise ValueError("a private head needs the head the round began from (head_start)")
    gram = update_gram(states, start)
    if heads is not None:
        gram = gram + dense_gram(heads, head_start)  # type: ignore[arg-type]
    norms = update_norms(gram)
    m = float(len(states) if expected is None else expected)
    coef = torch.clamp(clip_norm / norms.clamp_min(1e-300), max=1.0) / m  # c_i / m
    std = noise_multiplier * clip_norm / m
    out: dict[str, Tensor] = {}
    for prefix in factor_pairs(list(start)):
        b0, a0 = start[f"{prefix}.lora_B"].double(), start[f"{prefix}.lora_A"].double()
        base = b0 @ a0
        agg = base.clone()
        for c, st in zip(coef.tolist(), states):
            agg += c * (st[f"{prefix}.lora_B"].double() @ st[f"{prefix}.lora_A"].double() - base)
        agg += std * torch.randn(agg.shape, generator=generator, dtype=torch.float64)
        out[f"{prefix}.lora_B"], out[f"{prefix}.lora_A"] = dense_factors(agg, rank)
    head = None
    if heads is not None:  # h_0 + sum_i (c_i / m) (h_i - h_0) + noise
        mean = combine_dense(heads, head_start, coef, 1.0 - float(coef.sum()))  # type: ignore[arg-type]
        head = {key: (x.double() + std * torch.randn(x.shape, generator=generator, dtype=torch.float64)
                      ).to(x.dtype) for key, x in mean.items()}
    return {k: out[k] for k in start}, head, norms.tolist()


def _opacus() -> Any:
    try:
        from opacus.accountants import create_accountant
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError as exc:  # pragma: no cover - the privacy extra is missing
        raise ImportError("differential privacy needs Opacus's accountants: pip install 'hilora-lightning[privacy]' "
                          "(opacus)") from exc
    return create_accountant, get_noise_multiplier


def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str = "rdp"
                         ) -> float:
    """The noise multiplier ``z`` that spends ``(epsilon, delta)`` over ``rounds`` noised rounds, each
    client taking part with probability ``sample_rate`` (Opacus's search, to 0.01 in epsilon).

    Example:
        >>> z = noise_multiplier_for(8.0, 1e-5, 1.0, 10)
        >>> 1.0 < z < 3.0, epsilon_spent([(z, 1.0, 10)], 1e-5) <= 8.0
        (True, True)
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    _, get_noise_multiplier = _opacus()
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=rounds, accountant=accountant))


def epsilon_spent(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """The epsilon spent by ``history``, ``(noise multiplier, sample rate, rounds)`` entries, at ``delta``."""
    if not history:
        return 0.0
    create_accountant, _ = _opacus()
    acc = create_accountant(accountant)
    acc.history = [(float(z), float(q), int(n)) for z, q, n in history]
    return float(acc.get_epsilon(delta))
