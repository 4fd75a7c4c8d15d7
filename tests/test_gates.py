from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import randomize_tiers
from hilora_lightning import HiLoRAViT, Tier
from hilora_lightning.config import AdapterConfig
from hilora_lightning.gates import TierGate
from hilora_lightning.layer import TieredLoRALinear


def _manual(layer: TieredLoRALinear, x: torch.Tensor, weights: dict[Tier, torch.Tensor]) -> torch.Tensor:
    """Hand-written gated LoRA: W0 x + b + sum_t g_t(x) s_t B_t A_t x over q and v row slices."""
    out = x @ layer.base_layer.weight.T + layer.base_layer.bias
    for tier, g in weights.items():
        for (_, start, stop), (_, a, b) in zip(layer.segments, layer.factors(tier)):
            out[..., start:stop] += g[..., None] * layer.scaling[tier] * (x @ a.T @ b.T)
    return out


def test_input_gate_mixes_tiers_like_a_hand_written_mixture() -> None:
    layer = TieredLoRALinear(nn.Linear(12, 36), AdapterConfig(), segments=("q", "v"), seed=0)
    randomize_tiers(layer)
    gate = TierGate(12, ("cluster", "leaf"), mode="input")
    with torch.no_grad():
        gate.proj.weight.normal_()  # type: ignore[union-attr]
    layer.set_gate(gate)
    layer.set_active(list(Tier))
    x = torch.randn(5, 12)
    g = torch.softmax(x @ gate.proj.weight.T + gate.proj.bias, dim=-1)  # type: ignore[union-attr]
    # root is not gated: weight 1; cluster and leaf get the router's per-input weights
    want = _manual(layer, x, {Tier.ROOT: torch.ones(5), Tier.CLUSTER: g[:, 0], Tier.LEAF: g[:, 1]})
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_scalar_gate_scales_each_tier_and_gets_gradients() -> None:
    layer = TieredLoRALinear(nn.Linear(8, 8), AdapterConfig(), seed=0)
    randomize_tiers(layer)
    gate = TierGate(8, ("root", "leaf"), mode="scalar", init=(0.25, 2.0))
    layer.set_gate(gate)
    layer.set_active(["root", "leaf"])
    x = torch.randn(3, 8)
    want = _manual(layer, x, {Tier.ROOT: torch.full((3,), 0.25), Tier.LEAF: torch.full((3,), 2.0)})
    out = layer(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert gate.weights is not None and gate.weights.grad is not None and gate.weights.grad.abs().sum() > 0


def test_fresh_input_gate_weighs_tiers_equally() -> None:
    assert TierGate(4, ("cluster", "leaf"))(torch.randn(2, 7, 4)).eq(0.5).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"tiers": ("leaf",), "mode": "input"}, "needs two or more tiers, got 1"),
    ({"tiers": ("root", "leaf"), "mode": "soft"}, "gate mode must be one of"),
    ({"tiers": ("root", "leaf"), "mode": "scalar", "init": (1.0,)}, "init gives 1 weights for a 'scalar' gate over 2"),
    ({"tiers": ("root", "leaf"), "mode": "input", "init": (1.0, 1.0)}, "init is for scalar gates"),
])
def test_gate_arguments_are_validated(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        TierGate(4, **kwargs)


def test_gated_layers_refuse_to_merge_and_merged_layers_refuse_gates() -> None:
    layer = TieredLoRALinear(nn.Linear(8, 8), AdapterConfig(), seed=0)
    layer.set_gate(TierGate(8, ("root", "leaf")))
    with pytest.raises(RuntimeError, match="a gated layer cannot merge"):
        layer.merge(["root"])
    layer.set_gate(None)
    layer.merge(["root"])
    with pytest.raises(RuntimeError, match="unmerge\\(\\) before adding a gate"):
        layer.set_gate(TierGate(8, ("root", "leaf")))


def test_model_gate_state_round_trip_and_switches() -> None:
    model = HiLoRAViT()
    fingerprint = model.backbone_fingerprint()
    model.set_gates(["cluster", "leaf"], mode="input")
    state = model.gate_state()
    assert state and all(".tier_gate.proj." in k for k in state)
    changed = {k: v + 1.0 for k, v in state.items()}
    model.load_gate_state(changed)
    assert all(torch.equal(model.gate_state()[k], changed[k]) for k in state)
    assert {f"model.{k}" for k in state} <= set(model.adapter_state_dict())  # checkpoints keep the gates
    model._fingerprint = None
    assert model.backbone_fingerprint() == fingerprint  # gates are adapter state, not backbone
    model.set_tiers(["cluster", "leaf"], ["leaf"], head=False, gates=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".tier_gate." in n for n in trainable) and any("lora_B.leaf" in n for n in trainable)
    assert not any("lora_B.cluster" in n or ".head." in n for n in trainable)
    with pytest.raises(ValueError, match="gate state has keys"):
        model.load_gate_state({"x": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"trainable tiers \['root'\] must also be active"):
        model.set_tiers(["leaf"], ["root"])
    model.set_gates(None)
    assert model.gate_state() == {}
