"""Validated configuration of a federated HiLoRA run (schedule, sampling, local training, clustering).

Example:
    >>> from hilora_lightning.federation.config import FederationConfig
    >>> cfg = FederationConfig(rounds=12, root_rounds=(2, 5), cluster_rounds=(2, 4))
    >>> cfg.local_epochs, cfg.aggregation
    (1, 'product')
    >>> FederationConfig(fraction_fit=0)
    Traceback (most recent call last):
    ...
    ValueError: fraction_fit must be in (0, 1], got 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["AGGREGATIONS", "CLUSTERINGS", "HEAD_POLICIES", "SCHEDULES", "ClusteringConfig", "FederationConfig",
           "PrivacyConfig", "RobustConfig"]

SCHEDULES = ("stagewise", "per_round")
AGGREGATIONS = ("product", "fedavg")
HEAD_POLICIES = ("tier", "local")
CLUSTERINGS = ("lsac", "given", "kmeans", "random")
FEATURES = ("A", "B", "delta")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_bounds(name: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a (min_rounds, max_rounds) pair, got {value!r}")
    lo, hi = value
    _check_int(f"{name}[0]", lo, 0)
    _check_int(f"{name}[1]", hi, 0)
    if lo > hi:
        raise ValueError(f"{name} must have min_rounds <= max_rounds, got {value!r}")
    return int(lo), int(hi)


@dataclasses.dataclass(frozen=True)
class ClusteringConfig:
    """How clients are grouped at the root-to-cluster transition.

    Attributes:
        method: ``"lsac"`` (the paper), ``"given"`` (use ``assignment``), ``"kmeans"`` (k-means with
            cosine on flattened root updates, the paper's ablation) or ``"random"`` (an ablation).
        assignment: client id -> cluster id, for ``"given"``.
        k_min: smallest K the eigengap may choose (1 allows a single cluster).
        k_max: largest K.
        ema_decay: ``lambda`` of the EMA of normalized ``B`` over the root stage.
        feature: ``"B"`` (EMA of the normalized local root ``B``, paper-literal: column spaces),
            ``"A"`` (the same for ``A^T``: row spaces) or ``"delta"`` (the local change of the root
            product, ``B_i A_i - B_r A_r``). Default ``"B"``, as in the paper. On the embedded
            digits (four rotation groups) ``B`` reliably merges 0/180 and 90/270 degrees; ``A``
            sometimes separates all four, not reliably yet (see the README).
        sigma: kernel width rule, ``"median"`` (paper) or ``"local"``.
        k: a fixed number of clusters for ``kmeans``/``random`` (default: what LSAC would choose).
        study: also keep every feature (``B``, ``A``, ``delta``) through the root stage and, at the
            transition, cluster with each under both sigma rules (and ``k_min = 1``), reporting K and
            ARI per combination in ``FederatedResult.lsac_study``; the run itself uses ``feature`` and
            ``sigma``. A controlled comparison: the root stage does not depend on the feature.
        recluster_every: re-run LSAC every this many cluster-stage rounds on the clients' cluster-tier
            features (``None``: cluster once, as the paper). New clusters keep the id of the old
            cluster they overlap most; split-off or new ones start from their members' product-space
            mean of their previous cluster adapters.
    """

    method: str = "lsac"
    assignment: Mapping[int, int] | None = None
    k_min: int = 2
    k_max: int = 10
    ema_decay: float = 0.9
    feature: str = "B"
    sigma: str = "median"
    k: int | None = None
    recluster_every: int | None = None
    study: bool = False

    def __post_init__(self) -> None:
        if self.method not in CLUSTERINGS:
            raise ValueError(f"clustering.method must be one of {CLUSTERINGS}, got {self.method!r}")
        if self.method == "given" and not self.assignment:
            raise ValueError("clustering.method='given' needs an assignment {client_id: cluster_id}")
        _check_int("clustering.k_min", self.k_min, 1)
        _check_int("clustering.k_max", self.k_max, self.k_min)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"clustering.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.feature not in FEATURES:
            raise ValueError(f"clustering.feature must be one of {FEATURES}, got {self.feature!r}")
        if self.sigma not in ("median", "local"):
            raise ValueError(f"clustering.sigma must be 'median' or 'local', got {self.sigma!r}")
        if self.k is not None:
            _check_int("clustering.k", self.k, 1)
        if self.recluster_every is not None:
            _check_int("clustering.recluster_every", self.recluster_every, 1)
        if not isinstance(self.study, bool):
            raise ValueError(f"clustering.study must be true or false, got {self.study!r}")


def _shared_tiers(name: str, tiers: Any) -> tuple[str, ...]:
    """``tiers`` as a tuple naming only shared tiers (``root``, ``cluster``)."""
    out = tuple(tiers)
    if not out or any(t not in ("root", "cluster") for t in out):
        raise ValueError(f"{name} must name shared tiers ('root', 'cluster'), got {list(out)}")
    return out


@dataclasses.dataclass(frozen=True)
class RobustConfig:
    """How a shared tier's uploads are combined when some clients may be hostile
    (:mod:`hilora_lightning.strategy.robust`; every rule works on the updates ``B_i A_i - B_0 A_0``).

    Attributes:
        rule: ``"none"`` (the sample-weighted product sum), ``"clip"`` (each update's norm bounded by
            ``clip_norm``, or by ``clip_factor`` times the round's median update norm), ``"trim"`` (the
            ``trim_fraction`` farthest from the geometric median dropped), ``"multi_krum"`` (``krum_m``
            of the lowest Krum scores, ``krum_f`` hostile assumed), ``"geomed"`` (the geometric median),
            or on the dense products, one adapted matrix at a time, ``"coord_median"`` /
            ``"coord_trimmed_mean"`` (Flower's ``FedMedian`` / ``FedTrimmedAvg`` in product space). A
            group too small for multi-Krum (fewer than ``krum_f + 3`` uploads, e.g. a cluster of two)
            takes the geometric median instead.
        tiers: the shared tiers it applies to (``root``, ``cluster``).

    A client's update is its whole upload: the tier's factors and, with ``head_policy: tier``, its
    head (``h_i - h_0`` joins the Gram matrix), so the rule's weights combine the heads too.
    """

    rule: str = "none"
    clip_norm: float | None = None
    clip_factor: float | None = None
    trim_fraction: float = 0.1
    krum_f: int = 1
    krum_m: int | None = None
    tiers: tuple[str, ...] = ("root", "cluster")

    def __post_init__(self) -> None:
        from hilora_lightning.strategy.robust import COORDINATE_RULES, ROBUST_RULES

        if self.rule not in (*ROBUST_RULES, *COORDINATE_RULES):
            raise ValueError(f"robust.rule must be one of {(*ROBUST_RULES, *COORDINATE_RULES)}, got {self.rule!r}")
        for name in ("clip_norm", "clip_factor"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"robust.{name} must be a number > 0, got {value!r}")
        if self.rule == "clip" and (self.clip_norm is None) == (self.clip_factor is None):
            raise ValueError("robust.rule 'clip' needs exactly one of robust.clip_norm > 0 (an absolute bound "
                             "on ||B A - B_0 A_0||_F) or robust.clip_factor > 0 (a multiple of the round's median "
                             f"update norm), got clip_norm={self.clip_norm!r}, clip_factor={self.clip_factor!r}")
        if not _is_number(self.trim_fraction) or not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"robust.trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        _check_int("robust.krum_f", self.krum_f, 0)
        if self.krum_m is not None:
            _check_int("robust.krum_m", self.krum_m, 1)
        object.__setattr__(self, "tiers", _shared_tiers("robust.tiers", self.tiers))

    def options(self) -> dict[str, Any]:
        """The rule's settings, as :func:`~hilora_lightning.strategy.robust.aggregate_uploads` takes them."""
        return {"clip_norm": self.clip_norm, "clip_factor": self.clip_factor, "trim_fraction": self.trim_fraction,
                "krum_f": self.krum_f, "krum_m": self.krum_m}


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy of the shared tiers (DP-FedAvg, trusted server;
    :mod:`hilora_lightning.strategy.privacy`). Off unless ``epsilon`` or ``noise_multiplier`` is set.

    Attributes:
        epsilon, delta: the target ``(epsilon, delta)`` over the run; the noise multiplier is chosen by
            the accountant for the most noised rounds the schedule allows (the stages' maximums) at the
            round's sampling rate ``fraction_fit``.
        noise_multiplier: ``z`` given directly instead of ``epsilon`` (the spent epsilon is still logged).
        clip_norm: the bound ``S`` on each client's update norm ``||B A - B_0 A_0||_F`` (with its head's
            ``||h - h_0||``, when heads are shared); required, and it must not be chosen from the
            private data of this run.
        accountant: Opacus's ``"rdp"`` or ``"prv"``.
        seed: seeds the noise for a reproducible study; ``None`` (the default) draws it from the
            operating system, as a deployment must (a known seed lets anyone subtract the noise).
        tiers: the shared tiers that are released privately (``root``, ``cluster``).
    """

    epsilon: float | None = None
    delta: float = 1e-5
    noise_multiplier: float | None = None
    clip_norm: float | None = None
    accountant: str = "rdp"
    seed: int | None = None
    tiers: tuple[str, ...] = ("root", "cluster")

    def __post_init__(self) -> None:
        if self.epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("privacy takes a target epsilon or a noise_multiplier, not both "
                             f"(got epsilon={self.epsilon!r}, noise_multiplier={self.noise_multiplier!r})")
        if self.epsilon is not None and not (_is_number(self.epsilon) and 0 < self.epsilon < math.inf):
            raise ValueError(f"privacy.epsilon must be a finite number > 0 (leave it unset for no privacy), "
                             f"got {self.epsilon!r}")
        if self.noise_multiplier is not None and not (_is_number(self.noise_multiplier) and
                                                      0 <= self.noise_multiplier < math.inf):
            raise ValueError(f"privacy.noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}")
        if not (_is_number(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta!r}")
        if self.enabled and not (_is_number(self.clip_norm) and math.isfinite(self.clip_norm)  # type: ignore
                                 and self.clip_norm > 0):  # type: ignore[operator]
            raise ValueError(f"privacy needs clip_norm > 0, the bound on each client's update norm "
                             f"||B A - B_0 A_0||_F (with its head's), got {self.clip_norm!r}; take it from a "
                             "non-private pilot run or public data, not from this run's clients")
        from hilora_lightning.strategy.privacy import ACCOUNTANTS

        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.seed is not None:
            _check_int("privacy.seed", self.seed, 0)
        object.__setattr__(self, "tiers", _shared_tiers("privacy.tiers", self.tiers))

    @property
    def enabled(self) -> bool:
        """Whether the shared tiers are released with noise."""
        return self.epsilon is not None or self.noise_multiplier is not None


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """Schedule, participation, local training and aggregation of a federated HiLoRA run.

    Attributes:
        rounds: total communication rounds (the paper: 50), split over the stages.
        root_rounds: ``(min, max)`` rounds of the root stage; it ends early once ``rho_t <= tau_rel``.
        cluster_rounds: ``(min, max)`` rounds of the cluster stage (same rule, mean rho over clusters);
            the leaf stage gets the rest of the budget. A stagewise run always gives the cluster and
            the leaf stage at least one round each, so ``rounds >= root_min + max(cluster_min, 1) + 1``
            is required and every minimum is honoured (a stage is cut short only at its maximum, by
            the rho rule past its minimum, or to keep the later stages' minimums).
        tau_rel: threshold of the stage rule's statistic ``rho_t``.
        rho_rule: the statistic: ``"relative"`` (the paper: ``||dW_{t+1} - dW_t|| / ||dW_t||``, which
            decays like ``1/t`` while a tier keeps growing) or ``"subspace"`` (how much the update's
            energy-weighted directions moved, blind to growth:
            :func:`~hilora_lightning.strategy.aggregation.subspace_change`).
        schedule: ``"stagewise"`` (the paper) or ``"per_round"`` (all three stages in every round).
        fraction_fit: share of the clients selected per round, in (0, 1].
        min_clients: fewest clients per round; a round with fewer successful clients fails.
        local_epochs: local epochs per round (ignored when ``local_steps`` is set).
        local_steps: local optimizer steps per round instead of epochs.
        batch_size: local batch size.
        aggregation: ``"product"`` (sum pi B A + SVD) or ``"fedavg"`` (factor averaging).
        head_policy: ``"tier"`` (head aggregated at the training tier's level) or ``"local"``.
        max_update_norm: reject uploaded factors whose Frobenius norm exceeds this (``None``: off).
        outlier_norm: reject an upload whose factor norm, or head norm, exceeds this many times the
            median of the round's uploads (needs at least 3 uploads; ``None``: off). On by default
            (10): honest clients' norms stay within a small factor of each other, a scaled or
            diverged update does not; the client is dropped from the round and recorded.
        eval_every: evaluate every n rounds (the final round is always evaluated).
        seed: seeds client sampling, tier initialization and local shuffling.
        clustering: a :class:`ClusteringConfig`.
        finetune_epochs: leaf fine-tuning epochs of unseen clients (the paper: 5).
        probe_steps: local steps of an unseen client's probe update.
        route_by: how unseen clients pick a cluster: ``"loss"`` (the default: lowest training loss of
            each cluster adapter with its head on the newcomer's training data) or ``"subspace"`` (the
            paper: largest mean cos^2 of principal angles between a probe update's and the cluster's
            subspaces). Chosen by the Fashion-MNIST method study (README): loss routing sends every
            newcomer of the domain setting to its domain's cluster where the probe finds 42%, and ties
            the probe on SC-Dir; it costs an evaluation pass per cluster instead of ``probe_steps`` steps.
        probe: the probe update behind ``route_by="subspace"`` (and behind clients that join at the
            transition without root-stage features): ``"cluster"`` (the paper's reading: a fresh LoRA in
            the cluster slot on the frozen root, from ``B = 0``, penalty on) or ``"root"`` (built like the
            training clients' features: the root slot trained from the final root, no penalty).
        robust: how the shared tiers' uploads are combined against hostile clients
            (:class:`RobustConfig`; default ``rule="none"``, the paper's sample-weighted sum).
        privacy: client-level differential privacy of the shared tiers (:class:`PrivacyConfig`; off by
            default). With it on, each update is clipped instead of the outlier rule rejecting it.
    """

    rounds: int = 50
    root_rounds: tuple[int, int] = (5, 20)
    cluster_rounds: tuple[int, int] = (5, 20)
    tau_rel: float = 0.01
    rho_rule: str = "relative"
    schedule: str = "stagewise"
    fraction_fit: float = 1.0
    min_clients: int = 1
    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 32
    aggregation: str = "product"
    head_policy: str = "tier"
    max_update_norm: float | None = None
    outlier_norm: float | None = 10.0
    eval_every: int = 1
    seed: int = 0
    clustering: ClusteringConfig = dataclasses.field(default_factory=ClusteringConfig)
    finetune_epochs: int = 5
    probe_steps: int = 20
    route_by: str = "loss"
    probe: str = "cluster"
    robust: RobustConfig = dataclasses.field(default_factory=RobustConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _check_int("rounds", self.rounds, 1)
        object.__setattr__(self, "root_rounds", _check_bounds("root_rounds", self.root_rounds))
        object.__setattr__(self, "cluster_rounds", _check_bounds("cluster_rounds", self.cluster_rounds))
        if self.root_rounds[0] < 1:
            raise ValueError(f"root_rounds[0] must be >= 1 (the root stage needs a round), got {self.root_rounds!r}")
        if self.schedule == "stagewise":
            if self.cluster_rounds[1] < 1:
                raise ValueError(
                    f"cluster_rounds={self.cluster_rounds!r}: a stagewise run always trains the cluster stage "
                    "(it starts when the root stage ends), so its maximum must be >= 1; give it at least one "
                    "round, e.g. cluster_rounds=(1, 1)"
                )
            need = self.root_rounds[0] + self._after_root()
            if need > self.rounds:
                raise ValueError(
                    f"rounds={self.rounds} cannot fit the minimum stage lengths: root {self.root_rounds[0]} + "
                    f"cluster {max(self.cluster_rounds[0], 1)} + leaf 1 = {need}; raise rounds to >= {need} "
                    "or lower the minimums"
                )
        if not isinstance(self.tau_rel, (int, float)) or not math.isfinite(self.tau_rel) or self.tau_rel < 0:
            raise ValueError(f"tau_rel must be a finite number >= 0, got {self.tau_rel!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.fraction_fit, (int, float)) or not 0.0 < self.fraction_fit <= 1.0:
            raise ValueError(f"fraction_fit must be in (0, 1], got {self.fraction_fit!r}")
        _check_int("min_clients", self.min_clients, 1)
        _check_int("local_epochs", self.local_epochs, 1)
        if self.local_steps is not None:
            _check_int("local_steps", self.local_steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.robust.rule != "none" and self.aggregation != "product":
            raise ValueError(f"robust.rule {self.robust.rule!r} aggregates in product space; set aggregation: product "
                             f"(got {self.aggregation!r})")
        if self.privacy.enabled and self.aggregation != "product":
            raise ValueError(f"privacy releases products (B A) with noise; set aggregation: product "
                             f"(got {self.aggregation!r})")
        if self.privacy.enabled and self.robust.rule != "none":
            raise ValueError(f"privacy and robust.rule {self.robust.rule!r} do not combine: privacy clips every "
                             "update already, and a rule's data-dependent weights would void the accounting; "
                             "drop one of them")
        if self.head_policy not in HEAD_POLICIES:
            raise ValueError(f"head_policy must be one of {HEAD_POLICIES}, got {self.head_policy!r}")
        if self.max_update_norm is not None and not (_is_number(self.max_update_norm) and
                                                     math.isfinite(self.max_update_norm) and self.max_update_norm > 0):
            raise ValueError(f"max_update_norm must be a finite number > 0 or None, got {self.max_update_norm!r}")
        if self.outlier_norm is not None and not (_is_number(self.outlier_norm) and math.isfinite(self.outlier_norm)
                                                  and self.outlier_norm > 1):
            raise ValueError(f"outlier_norm must be a finite number > 1 or None (off), got {self.outlier_norm!r}")
        _check_int("eval_every", self.eval_every, 1)
        _check_int("seed", self.seed, 0)
        if isinstance(self.clustering, Mapping):
            object.__setattr__(self, "clustering", ClusteringConfig(**self.clustering))
        if not isinstance(self.clustering, ClusteringConfig):
            raise TypeError(f"clustering must be a ClusteringConfig or a mapping, got {type(self.clustering).__name__}")
        _check_int("finetune_epochs", self.finetune_epochs, 0)
        _check_int("probe_steps", self.probe_steps, 1)
        if self.route_by not in ("subspace", "loss"):
            raise ValueError(f"route_by must be 'subspace' or 'loss', got {self.route_by!r}")
        if self.rho_rule not in ("relative", "subspace"):
            raise ValueError(f"rho_rule must be 'relative' or 'subspace', got {self.rho_rule!r}")
        if self.probe not in ("cluster", "root"):
            raise ValueError(f"probe must be 'cluster' or 'root', got {self.probe!r}")

    def stage_over(self, root: bool, rounds_in_stage: int, rounds_left: int, rho: float | None) -> bool:
        """Whether the root (``root=True``) or cluster stage ends after its ``rounds_in_stage``-th round.

        It ends at its maximum, once ``rho <= tau_rel`` past its minimum, or when only the later stages'
        minimums are left of the budget (``rounds_left``: rounds after this one). The construction
        check (``rounds >= root_min + max(cluster_min, 1) + 1``) makes the last case never cut a minimum.

        Example:
            >>> cfg = FederationConfig(rounds=7, root_rounds=(5, 5), cluster_rounds=(1, 20))
            >>> [cfg.stage_over(True, n, 7 - n, None) for n in (4, 5)]
            [False, True]
        """
        lo, hi = self.root_rounds if root else self.cluster_rounds
        reserve = self._after_root() if root else 1
        converged = rho is not None and math.isfinite(rho) and rho <= self.tau_rel
        return rounds_in_stage >= hi or rounds_left <= reserve or (rounds_in_stage >= lo and converged)

    def _after_root(self) -> int:
        """Rounds the later stages need at least: the cluster and leaf stages each run one once started."""
        return max(self.cluster_rounds[0], 1) + 1
