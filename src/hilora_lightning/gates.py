"""``TierGate``: learned weights that mix a layer's LoRA tiers (FedALT's mixer, FDLoRA's fusion).

A :class:`~hilora_lightning.layer.TieredLoRALinear` with a gate computes
``W0 x + sum_t g_t(x) s_t B_t A_t x`` over its active tiers, where ``g`` comes from the gate:

* ``"input"``: ``g(x) = softmax(W x + b)`` per token, a mixture-of-experts router over the gated
  tiers (FedALT's adaptive mixer between the individual and the rest-of-world LoRA). ``W`` and ``b``
  start at zero, so the first forward weighs every gated tier ``1/n``.
* ``"scalar"``: ``g`` is a learned vector, independent of the input (FDLoRA's adaptive fusion
  weights of the global and the personal LoRA), starting at ``init``.

Active tiers the gate does not name keep weight 1. Gates are personal state: they never travel.

Example:
    >>> import torch
    >>> from hilora_lightning.gates import TierGate
    >>> gate = TierGate(8, ("cluster", "leaf"), mode="input")
    >>> gate(torch.randn(3, 8)).tolist()[0]
    [0.5, 0.5]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hilora_lightning.tiers import Tier, parse_tiers

__all__ = ["GATE_MODES", "TierGate"]

GATE_MODES = ("input", "scalar")


class TierGate(nn.Module):
    """Weights of the tiers ``tiers`` for one layer, from its input or learned constants.

    Args:
        in_features: the layer's input width (used by ``"input"`` gates).
        tiers: the tiers it weighs (at least two for ``"input"``).
        mode: ``"input"`` (softmax router on the input) or ``"scalar"`` (learned constants).
        init: ``"scalar"`` only: the starting weights (default ``1/n`` each).
    """

    def __init__(
        self, in_features: int, tiers: Sequence[Tier | str], mode: str = "input", init: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        self.tiers = parse_tiers(list(tiers))
        n = len(self.tiers)
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
        if n < 1 or (mode == "input" and n < 2):
            raise ValueError(f"an {mode!r} gate needs {'two' if mode == 'input' else 'one'} or more tiers, got {n}")
        if init is not None and (mode != "scalar" or len(init) != n):
            raise ValueError(f"init gives {len(init)} weights for a {mode!r} gate over {n} tiers; "
                             "init is for scalar gates, one weight per tier")
        self.mode = mode
        if mode == "input":
            self.proj: nn.Linear | None = nn.Linear(in_features, n)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
            self.weights: nn.Parameter | None = None
        else:
            self.proj = None
            start = torch.full((n,), 1.0 / n) if init is None else torch.tensor([float(v) for v in init])
            self.weights = nn.Parameter(start)

    def forward(self, x: Tensor) -> Tensor:
        """The weights ``(..., n)`` of the gated tiers for input ``x`` (``(..., in_features)``)."""
        if self.proj is not None:
            return torch.softmax(self.proj(x.to(self.proj.weight.dtype)), dim=-1)
        assert self.weights is not None
        return self.weights.expand(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, tiers={[t.value for t in self.tiers]}"
