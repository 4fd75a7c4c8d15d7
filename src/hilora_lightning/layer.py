"""``TieredLoRALinear``: a frozen ``nn.Linear`` plus root / cluster / leaf low-rank updates.

For a wrapped Linear with weight ``W0`` the output is
``W0 x + b + sum_{t active, not merged} s_t B_t A_t x`` with ``s_t = alpha_t / rank_t``.
A layer may adapt only some row *segments* of its output (the ``q`` and ``v`` thirds of timm's fused
``attn.qkv``); each segment then has its own factors per tier, exactly as if q and v were separate
Linear layers.

All active tiers are computed as one LoRA of the summed rank: their ``A`` factors are concatenated
into one down-projection and their (scaled) ``B`` factors into one up-projection, so three tiers of
rank 8 cost what one rank-24 LoRA costs. Tiers with different dropout rates are grouped per rate.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from hilora_lightning.config import AdapterConfig
    >>> from hilora_lightning.layer import TieredLoRALinear
    >>> layer = TieredLoRALinear(nn.Linear(12, 36), AdapterConfig(), segments=("q", "v"), seed=0)
    >>> layer.set_active(["root", "cluster"])
    >>> x = torch.randn(4, 12)
    >>> torch.equal(layer(x), layer.base_layer(x))  # fresh tiers are a no-op (B = 0)
    True
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from hilora_lightning.config import QKV_SLICES, AdapterConfig
from hilora_lightning.errors import NonFiniteError
from hilora_lightning.gates import TierGate
from hilora_lightning.tiers import Tier, parse_tiers

__all__ = ["TieredLoRALinear", "fresh_lora_a", "tier_seed"]

_PlanEntry = tuple[
    nn.Module | None, tuple[nn.Parameter, ...], tuple[nn.Parameter, ...], float | Tensor, Tensor | None
]


def tier_seed(seed: int, tier: Tier | str, path: str, segment: str = "") -> int:
    """A stable per-(tier, layer, segment) seed derived from ``seed``.

    Every client that initializes a shared tier with the same ``seed`` gets bitwise the same
    ``A`` factors (the paper's shared-seed initialization), independent of Python's hash salt.
    """
    key = f"{Tier.parse(tier).value}|{path}|{segment}".encode()
    return (int(seed) * 1_000_003 + zlib.crc32(key)) % (2**63 - 1)


def fresh_lora_a(shape: tuple[int, ...], seed: int, tier: Tier | str, path: str, segment: str = "",
                 init: str = "kaiming") -> Tensor:
    """A fresh ``A`` factor (``rank x in_features``) of one layer segment, drawn from :func:`tier_seed`.

    ``init="kaiming"``: ``kaiming_uniform_(a=sqrt(5))`` as ``nn.Linear`` and PEFT, ``U(+-1/sqrt(fan_in))``;
    otherwise Gaussian ``N(0, 1) / rank``. The one rule behind :meth:`TieredLoRALinear.reset_tier` and
    :meth:`~hilora_lightning.adapter_spec.AdapterSpec.fresh`.

    Example:
        >>> fresh_lora_a((2, 4), seed=0, tier="root", path="m").shape
        torch.Size([2, 4])
    """
    gen = torch.Generator(device="cpu").manual_seed(tier_seed(seed, tier, path, segment))
    if init == "kaiming":
        bound = 1.0 / math.sqrt(shape[-1])
        return torch.rand(shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
    return torch.randn(shape, generator=gen, dtype=torch.float32) / shape[0]


def _segment_rows(base: nn.Linear, segments: Sequence[str] | None) -> tuple[tuple[str, int, int], ...]:
    if not segments:
        return (("", 0, base.out_features),)
    if base.out_features % 3:
        raise ValueError(
            f"row slices {tuple(segments)} need a fused qkv Linear whose out_features is divisible by 3, "
            f"got out_features={base.out_features}; target the module without slices instead"
        )
    dim = base.out_features // 3
    return tuple((name, QKV_SLICES.index(name) * dim, (QKV_SLICES.index(name) + 1) * dim) for name in segments)


class TieredLoRALinear(nn.Module):
    """A base ``nn.Linear`` (kept as ``base_layer``) with per-tier LoRA factors.

    ``lora_A[tier]`` has shape ``(S, rank, in_features)`` and ``lora_B[tier]`` shape
    ``(S, segment_rows, rank)`` for ``S`` segments. Which tiers contribute (``active``) and which
    receive gradients (``trainable``) are separate switches; merging is explicit.

    Args:
        base: the Linear to wrap; its parameters are frozen.
        config: per-tier rank / alpha / dropout / init.
        segments: ``None`` to adapt all rows, or slice names of a fused qkv (``("q", "v")``).
        path: the module path, used to derive per-layer init seeds.
        seed: base seed for the initial ``A`` factors (see :func:`tier_seed`).
    """

    def __init__(
        self,
        base: nn.Linear,
        config: AdapterConfig,
        segments: Sequence[str] | None = None,
        path: str = "",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"TieredLoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.path = path
        self.config = config
        self.segments = _segment_rows(base, segments)
        seg_len = self.segments[0][2] - self.segments[0][1]
        n_seg = len(self.segments)
        device = base.weight.device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[Tier, float] = {}
        self.dropout = nn.ModuleDict()
        for tier in Tier:
            tcfg = config.tier(tier)
            a = torch.empty(n_seg, tcfg.rank, base.in_features, device=device, dtype=torch.float32)
            b = torch.zeros(n_seg, seg_len, tcfg.rank, device=device, dtype=torch.float32)
            self.lora_A[tier.value] = nn.Parameter(a, requires_grad=False)
            self.lora_B[tier.value] = nn.Parameter(b, requires_grad=False)
            self.scaling[tier] = tcfg.scaling
            self.dropout[tier.value] = nn.Dropout(tcfg.dropout) if tcfg.dropout > 0 else nn.Identity()
            self.reset_tier(tier, seed)
        self._full = self.segments[0][0] == ""  # one segment covering every output row
        self._plan: list[_PlanEntry] | None = None
        self._active: tuple[Tier, ...] = ()
        self._merged: tuple[Tier, ...] = ()
        self._weight_backup: Tensor | None = None
        self.tier_gate: TierGate | None = None
        #: set for a batched pass (:class:`~hilora_lightning.batched_lora.StackedDelta`): replaces the forward
        self.batched: Any = None

    @property
    def active(self) -> tuple[Tier, ...]:
        """Tiers that contribute to the output (merged ones through the base weight)."""
        return self._active

    @active.setter
    def active(self, tiers: tuple[Tier, ...]) -> None:
        self._active = tiers
        self._plan = None

    @property
    def merged(self) -> tuple[Tier, ...]:
        """Tiers currently merged into the base weight."""
        return self._merged

    @merged.setter
    def merged(self, tiers: tuple[Tier, ...]) -> None:
        self._merged = tiers
        self._plan = None

    # ------------------------------------------------------------------ switches
    def set_active(self, tiers: Iterable[Tier | str]) -> None:
        """Choose the tiers that contribute to the output (merged tiers are already in the weight)."""
        self.active = parse_tiers(list(tiers))

    def set_trainable(self, tiers: Iterable[Tier | str]) -> None:
        """Give exactly ``tiers`` gradients; the others are frozen (they may stay active)."""
        chosen = parse_tiers(list(tiers))
        bad = [t for t in chosen if t in self.merged]
        if bad:
            raise RuntimeError(
                f"{self.path or 'layer'}: tier(s) {[t.value for t in bad]} are merged into the base weight "
                "and cannot train; call unmerge() first"
            )
        for tier in Tier:
            self.lora_A[tier.value].requires_grad_(tier in chosen)
            self.lora_B[tier.value].requires_grad_(tier in chosen)

    @torch.no_grad()
    def reset_tier(self, tier: Tier | str, seed: int) -> None:
        """Re-initialize ``tier`` as a no-op: ``B = 0`` and ``A`` drawn from ``seed`` per segment."""
        tier = Tier.parse(tier)
        tcfg = self.config.tier(tier)
        a = self.lora_A[tier.value]
        for s, (name, _, _) in enumerate(self.segments):
            a[s].copy_(fresh_lora_a(tuple(a.shape[1:]), seed, tier, self.path, name, tcfg.init))
        self.lora_B[tier.value].zero_()

    def set_gate(self, gate: TierGate | None) -> None:
        """Mix the tiers with ``gate`` (see :mod:`hilora_lightning.gates`), or remove it with ``None``."""
        if gate is not None and self.merged:
            raise RuntimeError(f"{self.path or 'layer'}: unmerge() before adding a gate (merged tiers skip it)")
        self.tier_gate = gate
        self._plan = None

    # ------------------------------------------------------------------ factors
    def factors(self, tier: Tier | str) -> list[tuple[str, Tensor, Tensor]]:
        """``(segment_name, A, B)`` per segment, views of the parameters (``A``: r x in, ``B``: rows x r)."""
        tier = Tier.parse(tier)
        a, b = self.lora_A[tier.value], self.lora_B[tier.value]
        return [(name, a[s], b[s]) for s, (name, _, _) in enumerate(self.segments)]

    def delta_weight(self, tier: Tier | str) -> Tensor:
        """The dense ``s_t B_t A_t`` update of ``tier``, shaped like the base weight (zero off-segment)."""
        tier = Tier.parse(tier)
        w = self.base_layer.weight
        out = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        s = self.scaling[tier]
        for (_, start, stop), (_, a, b) in zip(self.segments, self.factors(tier)):
            out[start:stop] = s * (b.detach().float() @ a.detach().float())
        return out

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, tiers: Iterable[Tier | str]) -> None:
        """Add ``s_t B_t A_t`` of ``tiers`` into the base weight; their forward term is then skipped.

        The original weight is kept so that :meth:`unmerge` restores it bit for bit. All deltas are
        checked for NaN/Inf before anything is written.

        Raises:
            RuntimeError: a tier is already merged or is trainable.
            NonFiniteError: a delta holds NaN or Inf (the weight is left untouched).
        """
        chosen = parse_tiers(list(tiers))
        if self.tier_gate is not None and chosen:
            raise RuntimeError(
                f"{self.path or 'layer'}: a gated layer cannot merge (its tier weights depend on the input); "
                "remove the gate first (set_gate(None))"
            )
        for tier in chosen:
            if tier in self.merged:
                raise RuntimeError(f"{self.path or 'layer'}: tier {tier.value!r} is already merged")
            if self.lora_A[tier.value].requires_grad or self.lora_B[tier.value].requires_grad:
                raise RuntimeError(
                    f"{self.path or 'layer'}: tier {tier.value!r} is trainable; merging it would cut its "
                    "gradients. Freeze it first (set_trainable without it)"
                )
        deltas = [self.delta_weight(t) for t in chosen]
        for tier, d in zip(chosen, deltas):
            if not torch.isfinite(d).all():
                raise NonFiniteError(
                    f"{self.path or 'layer'}: tier {tier.value!r} has a non-finite update (NaN/Inf); "
                    "the base weight was not modified"
                )
        w = self.base_layer.weight
        if self._weight_backup is None:
            self._weight_backup = w.detach().clone()
        total = torch.stack(deltas).sum(0) if deltas else torch.zeros_like(w, dtype=torch.float32)
        w.copy_((w.float() + total).to(w.dtype))
        self.merged = parse_tiers([*self.merged, *chosen])

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact original base weight and stop skipping the merged tiers."""
        if self._weight_backup is not None:
            self.base_layer.weight.copy_(self._weight_backup)
        self._weight_backup = None
        self.merged = ()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.batched is not None:  # a batched pass: every client's own factors on its segment of x
            return self.batched(self, x)  # type: ignore[no-any-return]
        out = self.base_layer(x)
        plan = self._plan
        if plan is None:
            plan = self._plan = self._make_plan()
        gate = None
        if self.tier_gate is not None and plan:  # per-token weights of the gated tiers, 1 for the others
            g = self.tier_gate(x)
            gate = torch.cat([g, torch.ones_like(g[..., :1])], dim=-1)
        for dropout, a_params, b_params, scale, gate_cols in plan:
            xd = x if dropout is None else dropout(x)
            a_cat: Tensor
            b_cat: Tensor
            if len(a_params) == 1:
                a_cat, b_cat = a_params[0], b_params[0]
            else:  # one LoRA of the summed rank instead of one per tier
                a_cat, b_cat = torch.cat(a_params, dim=1), torch.cat(b_params, dim=2)
            n_seg, rank = a_cat.shape[0], a_cat.shape[1]
            h = F.linear(xd, a_cat.reshape(n_seg * rank, -1).to(xd.dtype))
            if isinstance(scale, Tensor):
                h = h * scale.to(device=h.device, dtype=h.dtype)
                scale = 1.0
            if gate is not None and gate_cols is not None:
                h = h * gate[..., gate_cols.to(h.device)].to(h.dtype)
            b_cat = b_cat.to(h.dtype)
            if self._full:  # the shared scale rides on the add for free
                out = torch.add(out, F.linear(h, b_cat[0]).to(out.dtype), alpha=scale)
                continue
            h = h.unflatten(-1, (n_seg, rank))
            for s, (_, start, stop) in enumerate(self.segments):
                out[..., start:stop].add_(F.linear(h[..., s, :], b_cat[s]).to(out.dtype), alpha=scale)
        return out

    def _make_plan(self) -> list[_PlanEntry]:
        """Group the active, unmerged tiers by dropout rate: one concatenated LoRA per group.

        Each entry is ``(dropout or None, A params, B params, scale, gate columns)`` where ``scale`` is
        a float when all tiers of the group share ``alpha / rank``, else a per-column vector over the
        concatenated rank, and ``gate columns`` maps each column to its gate weight (``None``: no gate).
        Parameters are held directly (they are updated in place, never replaced), so the hot
        path skips the ``ParameterDict`` look-ups; the plan is rebuilt when tiers change.
        """
        groups: dict[float, list[Tier]] = {}
        for t in self.active:
            if t not in self.merged:
                groups.setdefault(self.config.tier(t).dropout, []).append(t)
        plan: list[_PlanEntry] = []
        for rate, tiers in groups.items():
            scales = [self.scaling[t] for t in tiers]
            scale: float | Tensor = scales[0]
            if len(set(scales)) > 1:
                per_col = torch.cat([torch.full((self.config.tier(t).rank,), self.scaling[t]) for t in tiers])
                scale = per_col.repeat(len(self.segments))
            dropout = self.dropout[tiers[0].value] if rate > 0 else None
            a_params = tuple(self.lora_A[t.value] for t in tiers)
            b_params = tuple(self.lora_B[t.value] for t in tiers)
            gate_cols = None
            if self.tier_gate is not None:
                gated = self.tier_gate.tiers
                per_tier = [gated.index(t) if t in gated else len(gated) for t in tiers]
                cols = torch.cat([torch.full((self.config.tier(t).rank,), i) for t, i in zip(tiers, per_tier)])
                gate_cols = cols.repeat(len(self.segments))
            plan.append((dropout, a_params, b_params, scale, gate_cols))
        return plan

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._plan = None  # load_state_dict(assign=True) replaces parameter objects
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> TieredLoRALinear:
        self._plan = None  # .to()/.cuda() may swap parameter objects; rebuild the plan lazily
        return super()._apply(fn, recurse)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        segs = ",".join(n or "all" for n, _, _ in self.segments)
        ranks = ",".join(f"{t.value}={self.config.tier(t).rank}" for t in Tier)
        return f"segments=({segs}), ranks=({ranks}), active={[t.value for t in self.active]}"
