"""The run's privacy ledger: the noise multiplier a target ``(epsilon, delta)`` needs, the noise source,
and the epsilon spent so far (kept in the server state, so a resumed run goes on counting).

:class:`PrivacyLedger` is what a strategy holds when ``federation.privacy`` is on; the math is in
:mod:`hilora_lightning.strategy.privacy`. The spent epsilon goes into ``state.extra["privacy"]``, from
where the runner puts it on every round's record and the strategy into ``result.json``.

Example:
    >>> from hilora_lightning.federation.config import FederationConfig, PrivacyConfig
    >>> cfg = FederationConfig(rounds=6, root_rounds=(1, 2), cluster_rounds=(1, 2),
    ...                        privacy=PrivacyConfig(epsilon=4.0, clip_norm=1.0, seed=0))
    >>> ledger = PrivacyLedger(cfg)
    >>> ledger.rounds, round(ledger.noise_multiplier, 1) > 0
    (4, True)
"""

from __future__ import annotations

import secrets
from typing import Any

import torch

from hilora_lightning.federation.client import client_seed
from hilora_lightning.federation.config import FederationConfig
from hilora_lightning.federation.server_state import ServerState
from hilora_lightning.strategy.privacy import epsilon_spent, noise_multiplier_for

__all__ = ["PrivacyLedger", "noised_rounds", "privacy_summary"]


def noised_rounds(config: FederationConfig) -> int:
    """The most releases of a private tier a client can take part in: the private stages' maximum
    lengths (stagewise; at most ``rounds - 1``, the leaf stage takes one), or every round once per
    private tier (``per_round``)."""
    tiers = config.privacy.tiers
    if config.schedule == "per_round":
        return config.rounds * len(tiers)
    root = config.root_rounds[1] if "root" in tiers else 0
    cluster = config.cluster_rounds[1] if "cluster" in tiers else 0
    return max(1, min(root + cluster, config.rounds - 1))


class PrivacyLedger:
    """Noise multiplier, noise generator and the epsilon spent, for one run's ``config.privacy``."""

    def __init__(self, config: FederationConfig) -> None:
        self.config = config.privacy
        self.sample_rate = float(config.fraction_fit)
        self.rounds = noised_rounds(config)
        cfg = self.config
        if cfg.noise_multiplier is not None:
            self.noise_multiplier = float(cfg.noise_multiplier)
        else:
            self.noise_multiplier = noise_multiplier_for(float(cfg.epsilon), cfg.delta, self.sample_rate,  # type: ignore
                                                         self.rounds, cfg.accountant)
        self.clip_norm = float(cfg.clip_norm)  # type: ignore[arg-type]

    def expected(self, members: int) -> float:
        """The fixed denominator of an aggregate over a group of ``members`` clients: the number a round
        selects of them, ``fraction_fit * members`` (at least one), fixed before the round."""
        return max(1.0, self.sample_rate * members)

    def applies(self, tier_name: str) -> bool:
        """Whether ``tier_name`` (``"root"``, ``"cluster"``) is released privately."""
        return tier_name in self.config.tiers

    def generator(self, t: int, group: int) -> torch.Generator:
        """The noise source of round ``t``'s aggregate of ``group`` (the root: ``-1``): seeded by
        ``privacy.seed`` for a reproducible study, else by the operating system's entropy."""
        if self.config.seed is None:
            return torch.Generator().manual_seed(secrets.randbits(63))
        return torch.Generator().manual_seed(client_seed(self.config.seed, t, group, "dp-noise"))

    def spend(self, state: ServerState, releases: int = 1) -> float:
        """Count ``releases`` more noised releases every client may be in; the epsilon spent so far."""
        book: dict[str, Any] = state.extra.setdefault("privacy", {})
        history = [list(h) for h in book.get("history", [])]
        step = [self.noise_multiplier, self.sample_rate]
        if history and history[-1][:2] == step:
            history[-1][2] += releases
        else:
            history.append([*step, releases])
        eps = epsilon_spent([tuple(h) for h in history], self.config.delta, self.config.accountant)  # type: ignore
        book.update({"history": history, "epsilon": eps, "delta": self.config.delta,
                     "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                     "target_epsilon": self.config.epsilon, "accountant": self.config.accountant,
                     "noised_rounds_planned": self.rounds})
        return eps


def privacy_summary(state: ServerState) -> dict[str, float]:
    """What ``result.json`` reports of the ledger: the epsilon spent, delta, noise multiplier, clip norm,
    the noised releases counted (and the target epsilon, when one was given); empty without privacy."""
    book = state.extra.get("privacy")
    if not book:
        return {}
    out = {k: float(book[k]) for k in ("epsilon", "delta", "noise_multiplier", "clip_norm") if k in book}
    out["noised_rounds"] = float(sum(h[2] for h in book.get("history", [])))
    if book.get("target_epsilon") is not None:
        out["target_epsilon"] = float(book["target_epsilon"])
    return out
