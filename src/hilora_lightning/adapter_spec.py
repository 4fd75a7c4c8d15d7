"""What a strategy may know about the model: an adapter spec (shapes, ranks, seeded fresh states, the initial
head and gates, the penalty settings, the fingerprint), never the live model.

Strategies decide and aggregate on the server; only the executor touches a model. A spec is a value
taken from the model once (:meth:`AdapterSpec.from_model`); its fresh states are bitwise the ones
:meth:`~hilora_lightning.model.HiLoRAViT.reset_tier` makes (one rule:
:func:`~hilora_lightning.layer.fresh_lora_a`). No Lightning, no timm here.

Example:
    >>> from hilora_lightning import HiLoRAViT
    >>> from hilora_lightning.adapter_spec import AdapterSpec
    >>> from hilora_lightning.state import export_tier
    >>> from hilora_lightning.tiers import Tier
    >>> model = HiLoRAViT()
    >>> spec = AdapterSpec.from_model(model)
    >>> model.reset_tier(Tier.ROOT, 3)
    >>> fresh, made = spec.fresh(Tier.ROOT, 3), export_tier(model, Tier.ROOT)
    >>> spec.rank(Tier.ROOT), all(bool((fresh[k] == made[k]).all()) for k in made)
    (8, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from hilora_lightning.layer import fresh_lora_a
from hilora_lightning.tiers import Tier

__all__ = ["AdapterSpec", "FactorLayout"]

State = dict[str, Tensor]


@dataclasses.dataclass(frozen=True)
class FactorLayout:
    """One adapted segment of one layer: its state keys and factor shapes, and what seeds its ``A``."""

    path: str
    segment: str
    key_a: str
    key_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The adapter side of a model, as a value.

    Attributes:
        layouts: per tier, every adapted segment.
        ranks, inits: per tier, the LoRA rank and the ``A`` initialization.
        head, gates: the model's initial head and gates (CPU float32).
        gammas: the penalty weights against a frozen root (``Tier.ROOT``: ``gamma_c``) and cluster (``gamma_l``).
        train_head: whether the head trains with a stage's tier.
        fingerprint: the model's hyper-parameters and backbone hash (resume checks).
        init_seed: the seed of the model's own initial factors (``HiLoRAViT(seed=...)``).
    """

    layouts: Mapping[Tier, tuple[FactorLayout, ...]]
    ranks: Mapping[Tier, int]
    inits: Mapping[Tier, str]
    head: State
    gates: State
    gammas: Mapping[Tier, float]
    train_head: bool
    fingerprint: Mapping[str, str]
    init_seed: int = 0

    @classmethod
    def from_model(cls, model: Any) -> AdapterSpec:
        """The spec of a :class:`~hilora_lightning.model.HiLoRAViT` (read once; the model is not kept)."""
        from hilora_lightning.federation.fingerprint import model_items
        from hilora_lightning.federation.local import head_state
        from hilora_lightning.state import _key

        acfg = model.adapter_config
        layouts: dict[Tier, tuple[FactorLayout, ...]] = {}
        for tier in Tier:
            rows = []
            for path, layer in model.state_layers().items():
                for seg, a, b in layer.factors(tier):
                    rows.append(FactorLayout(path, seg, _key(path, seg, "lora_A"), _key(path, seg, "lora_B"),
                                             tuple(a.shape), tuple(b.shape)))
            layouts[tier] = tuple(rows)
        hp = model.hparams
        return cls(layouts, {t: acfg.tier(t).rank for t in Tier}, {t: acfg.tier(t).init for t in Tier},
                   head_state(model), model.gate_state(),
                   {Tier.ROOT: float(hp["gamma_c"]), Tier.CLUSTER: float(hp["gamma_l"])}, bool(hp["train_head"]),
                   model_items(model), int(hp.get("seed", 0)))

    def rank(self, tier: Tier) -> int:
        """The LoRA rank of ``tier``."""
        return self.ranks[tier]

    def shapes(self, tier: Tier) -> dict[str, tuple[int, ...]]:
        """The keys and shapes of ``tier``'s state (what an upload of it must hold)."""
        out: dict[str, tuple[int, ...]] = {}
        for f in self.layouts[tier]:
            out[f.key_a], out[f.key_b] = f.shape_a, f.shape_b
        return out

    def fresh(self, tier: Tier, seed: int) -> State:
        """A fresh no-op state of ``tier``: ``B = 0``, ``A`` drawn from ``seed`` per segment."""
        out: State = {}
        for f in self.layouts[tier]:
            out[f.key_a] = fresh_lora_a(f.shape_a, seed, tier, f.path, f.segment, self.inits[tier])
            out[f.key_b] = torch.zeros(f.shape_b, dtype=torch.float32)
        return out

    def penalty(self, tier: Tier) -> tuple[tuple[Tier, float], ...]:
        """A stage's penalty: ``tier`` kept orthogonal to each frozen tier above it, with its weight."""
        return tuple((x, self.gammas[x]) for x in tier.frozen_above())
