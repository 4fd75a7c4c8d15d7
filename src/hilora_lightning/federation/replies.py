"""What comes back from clients, and the checks it passes before it is aggregated.

A :class:`Payload` is one validated upload; :class:`Expected` says what a fit phase's replies must
hold. :func:`check_reply` (keys, shapes, finiteness, the norm bound), :func:`norm_outliers` (the
round's median rule) and :func:`check_finite_state` (the aggregate) are the runner's gates between
the backend and the strategy. No Lightning, no timm here.

Example:
    >>> from hilora_lightning.federation.replies import Expected
    >>> Expected(factors=None, head=None).allows_upload
    False
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from hilora_lightning.errors import AdapterStateError, HiLoraError
from hilora_lightning.federation.client import state_bytes
from hilora_lightning.federation.failures import describe_failures
from hilora_lightning.federation.plan import FitReply
from hilora_lightning.federation.server_state import ServerState
from hilora_lightning.state import validate_tier_state
from hilora_lightning.tiers import Tier

__all__ = ["Expected", "FederationError", "Payload", "check_finite_state", "check_reply", "norm_outliers",
           "require_min_clients"]


class FederationError(HiLoraError, RuntimeError):
    """A round could not complete (too few clients succeeded); the last good state is kept."""


def require_min_clients(t: int, ok: Sequence[int], selected: Sequence[int], min_clients: int,
                        failed: Mapping[int, str], note: str = "") -> None:
    """Fail round ``t`` (keeping the previous state) when fewer than ``min_clients`` clients succeeded."""
    if len(ok) < min_clients:
        raise FederationError(
            f"round {t}: only {len(ok)} of {len(selected)} clients succeeded, fewer than min_clients={min_clients}. "
            f"The state after round {t - 1} is kept{note}. Failures (raise_client_errors=True, or --fail-fast, "
            f"re-raises the first with its traceback):\n{describe_failures(failed)}"
        )


@dataclasses.dataclass(frozen=True)
class Payload:
    """One client's upload: the trained shared slot's factors, maybe the head, and its sample count."""

    client_id: int
    round: int
    tier: Tier
    factors: dict[str, Tensor]
    head: dict[str, Tensor] | None
    num_samples: int

    @property
    def nbytes(self) -> int:
        return state_bytes(self.factors) + state_bytes(self.head)


@dataclasses.dataclass(frozen=True)
class Expected:
    """What a reply of one fit phase must hold: factor keys/shapes and head keys/shapes (``None``: nothing)."""

    factors: Mapping[str, tuple[int, ...]] | None
    head: Mapping[str, tuple[int, ...]] | None
    max_norm: float | None = None
    outlier_norm: float | None = None

    @property
    def allows_upload(self) -> bool:
        return self.factors is not None or self.head is not None


def check_reply(reply: FitReply, expected: Expected) -> None:
    """Keys, shapes, dtypes, finiteness (and the norm bound) of a reply's factors and head, on receipt."""
    if expected.factors is None and reply.factors is not None:
        raise AdapterStateError("the reply carries factors, but this round's factors stay on the client")
    if expected.head is None and reply.head is not None:
        raise AdapterStateError("the reply carries a head, but this round's head stays on the client")
    if expected.factors is not None:
        if reply.factors is None:
            raise AdapterStateError("the client replied without the trained factors")
        validate_tier_state(reply.factors, expected.factors, expected.max_norm)
    if expected.head is not None:
        if reply.head is None:
            raise AdapterStateError("the client replied without its head (the head policy shares it)")
        got = {k: tuple(v.shape) for k, v in reply.head.items()}
        if got != dict(expected.head):
            raise AdapterStateError(f"head update has keys/shapes {sorted(got.items())}, expected "
                                    f"{sorted(dict(expected.head).items())}")
        if not all(torch.isfinite(v).all() for v in reply.head.values()):
            raise AdapterStateError("head update holds NaN or Inf values")


def _norm(state: Mapping[str, Tensor] | None) -> float:
    if not state:
        return 0.0
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in state.values())))  # type: ignore[arg-type]


def norm_outliers(payloads: Mapping[int, Payload], factor: float | None) -> dict[int, str]:
    """Uploads whose factor norm or head norm exceeds ``factor`` times the round's median (needs 3 uploads).

    Example:
        >>> import torch
        >>> up = {c: Payload(c, 1, Tier.ROOT, {"a": torch.ones(2) * s}, None, 1) for c, s in enumerate([1, 1.2, 1e3])}
        >>> list(norm_outliers(up, 10.0))
        [2]
    """
    if factor is None or len(payloads) < 3:
        return {}
    out: dict[int, str] = {}
    for part in ("factors", "head"):
        norms = {cid: _norm(getattr(p, part)) for cid, p in payloads.items() if getattr(p, part)}
        if len(norms) < 3:
            continue
        median = float(torch.tensor(sorted(norms.values()), dtype=torch.float64).median())
        for cid, n in sorted(norms.items()):
            if n > factor * median and cid not in out:
                out[cid] = (f"OutlierUpload: {part} norm {n:.4g} exceeds outlier_norm={factor:g} x the round's "
                            f"median {median:.4g}; update rejected")
    return out


def check_finite_state(state: ServerState, t: int, payloads: Mapping[int, Payload]) -> None:
    """Refuse to commit an aggregate holding NaN or Inf (finite uploads can still overflow together)."""
    tensors = [*state.root.values(), *state.global_head.values()]
    for group in (*state.clusters.values(), *state.cluster_heads.values()):
        tensors.extend(group.values())
    if all(bool(torch.isfinite(v).all()) for v in tensors):
        return
    largest = sorted(payloads, key=lambda c: -_norm(payloads[c].factors))[:3]
    raise FederationError(f"round {t}: the aggregate holds NaN or Inf values (finite uploads overflowed); the "
                          f"largest uploads came from clients {largest}. The state after round {t - 1} is kept; "
                          "lower outlier_norm or set max_update_norm")
