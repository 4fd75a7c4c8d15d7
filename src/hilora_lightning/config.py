"""Validated configuration dataclasses for the tiered adapters.

The library never reads argv or files: examples and the CLI build these (for instance from an
omegaconf YAML) and hand them in. Every field is checked in ``__post_init__``.

Example:
    >>> from hilora_lightning.config import AdapterConfig, TierConfig
    >>> cfg = AdapterConfig(targets="paper", root=TierConfig(rank=8, alpha=16))
    >>> cfg.tier("root").scaling
    2.0
    >>> [t.pattern for t in cfg.target_specs()]
    ['attn.qkv']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from hilora_lightning.tiers import Tier

__all__ = ["INIT_SCHEMES", "TARGET_PRESETS", "AdapterConfig", "TargetSpec", "TierConfig"]

#: How a fresh tier's ``A`` is drawn (``B`` always starts at zero, so a fresh tier is a no-op).
INIT_SCHEMES = ("kaiming", "gaussian")

#: Row-slice names of timm's fused ``attn.qkv`` Linear (``out_features = 3 * dim``).
QKV_SLICES = ("q", "k", "v")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """Which Linear modules to adapt, and optionally which row slices of them.

    Attributes:
        pattern: a module-path suffix (``"attn.qkv"`` matches ``blocks.3.attn.qkv``) or, prefixed
            with ``"re:"``, a regular expression that must match the whole path.
        slices: for a fused ``qkv`` Linear, the row slices to adapt (``("q", "v")``); each slice gets
            its own low-rank factors. ``None`` adapts all output rows with one pair of factors.
    """

    pattern: str
    slices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern.strip():
            raise ValueError(f"TargetSpec.pattern must be a non-empty string, got {self.pattern!r}")
        if self.slices is not None:
            slices = tuple(self.slices)
            bad = [s for s in slices if s not in QKV_SLICES]
            if not slices or bad or len(set(slices)) != len(slices):
                raise ValueError(
                    f"TargetSpec.slices must be distinct names from {QKV_SLICES}, got {self.slices!r}"
                )
            object.__setattr__(self, "slices", tuple(sorted(slices, key=QKV_SLICES.index)))


#: Named target presets. ``paper``: the query and value rows of every block's fused ``attn.qkv``
#: (the paper adapts q and v only; k stays untouched). ``all_linear``: every Linear in the blocks.
TARGET_PRESETS: dict[str, tuple[TargetSpec, ...]] = {
    "paper": (TargetSpec("attn.qkv", ("q", "v")),),
    "all_linear": tuple(TargetSpec(p) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")),
}

TargetsLike = str | Sequence[str | TargetSpec | Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class TierConfig:
    """Hyper-parameters of one tier's LoRA factors.

    Attributes:
        rank: LoRA rank ``r`` (> 0).
        alpha: scale numerator; the update is ``(alpha / rank) * B @ A``.
        dropout: dropout on the tier's input, in ``[0, 1)``.
        init: how ``A`` is drawn: ``"kaiming"`` (PEFT's default, uniform) or ``"gaussian"``
            (``N(0, 1/rank)``). ``B`` starts at zero.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "kaiming"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"TierConfig.rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"TierConfig.alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TierConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"TierConfig.init must be one of {INIT_SCHEMES}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        """``alpha / rank``, the factor ``s`` in ``s * B @ A``."""
        return float(self.alpha) / self.rank


def _parse_target(item: str | TargetSpec | Mapping[str, Any]) -> TargetSpec:
    if isinstance(item, TargetSpec):
        return item
    if isinstance(item, str):
        return TargetSpec(item)
    if isinstance(item, Mapping):
        slices = item.get("slices")
        return TargetSpec(str(item.get("pattern", "")), tuple(slices) if slices is not None else None)
    raise TypeError(
        f"a target must be a pattern string, a TargetSpec or a mapping, got {type(item).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Per-tier LoRA settings and the modules they adapt.

    Attributes:
        targets: a preset name (``"paper"``, ``"all_linear"``), one pattern (``"mlp.fc1"``) or a list
            of patterns / :class:`TargetSpec` / ``{"pattern": ..., "slices": [...]}`` mappings.
        root: settings of the root tier.
        cluster: settings of the cluster tier.
        leaf: settings of the leaf tier.
    """

    targets: TargetsLike = "paper"
    root: TierConfig = dataclasses.field(default_factory=TierConfig)
    cluster: TierConfig = dataclasses.field(default_factory=TierConfig)
    leaf: TierConfig = dataclasses.field(default_factory=TierConfig)

    def __post_init__(self) -> None:
        for name in ("root", "cluster", "leaf"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                value = TierConfig(**value)
                object.__setattr__(self, name, value)
            if not isinstance(value, TierConfig):
                raise TypeError(
                    f"AdapterConfig.{name} must be a TierConfig or a mapping, got {type(value).__name__}"
                )
        if isinstance(self.targets, str) and self.targets not in TARGET_PRESETS:
            import difflib

            close = difflib.get_close_matches(self.targets, list(TARGET_PRESETS), n=1, cutoff=0.75)
            if close and not any(c in self.targets for c in ".*?["):
                raise ValueError(f"unknown target preset {self.targets!r} (did you mean {close[0]!r}?): expected "
                                 f"one of {sorted(TARGET_PRESETS)}, a module pattern or a list of them")
            object.__setattr__(self, "targets", (self.targets,))  # one pattern, e.g. "mlp.fc1"
        if not isinstance(self.targets, str):
            specs = tuple(_parse_target(t) for t in self.targets)
            if not specs:
                raise ValueError("AdapterConfig.targets is empty: give a preset name or at least one pattern")
            object.__setattr__(self, "targets", specs)

    def tier(self, tier: Tier | str) -> TierConfig:
        """The :class:`TierConfig` of ``tier``."""
        return getattr(self, Tier.parse(tier).value)  # type: ignore[no-any-return]

    def target_specs(self) -> tuple[TargetSpec, ...]:
        """The targets as :class:`TargetSpec` objects (presets expanded)."""
        if isinstance(self.targets, str):
            return TARGET_PRESETS[self.targets]
        return tuple(self.targets)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML/JSON-friendly dict that :meth:`from_dict` turns back into this config."""
        targets: Any = (
            self.targets
            if isinstance(self.targets, str)
            else [{"pattern": t.pattern, "slices": list(t.slices) if t.slices else None} for t in self.target_specs()]
        )
        out: dict[str, Any] = {"targets": targets}
        for tier in Tier:
            out[tier.value] = dataclasses.asdict(self.tier(tier))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Build from a mapping such as :meth:`to_dict` gives; unknown keys are an error."""
        allowed = {"targets", "root", "cluster", "leaf"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"unknown AdapterConfig keys {unknown}: expected some of {sorted(allowed)}")
        kwargs: dict[str, Any] = {}
        for key in allowed & set(data):
            value = data[key]
            kwargs[key] = TierConfig(**value) if key != "targets" and isinstance(value, Mapping) else value
        return cls(**kwargs)
