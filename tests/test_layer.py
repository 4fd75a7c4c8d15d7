from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import randomize_tiers
from hilora_lightning.config import AdapterConfig, TierConfig
from hilora_lightning.errors import NonFiniteError
from hilora_lightning.layer import TieredLoRALinear, tier_seed
from hilora_lightning.tiers import Tier

CFG = AdapterConfig(
    root=TierConfig(rank=4, alpha=8), cluster=TierConfig(rank=3, alpha=3), leaf=TierConfig(rank=2, alpha=1)
)


def dense_reference(layer: TieredLoRALinear, x: torch.Tensor, tiers: list[Tier]) -> torch.Tensor:
    """Hand-written ``W0 x + b + sum_t s_t B_t A_t x`` with the dense update built row by row."""
    w = layer.base_layer.weight.detach().clone()
    for tier in tiers:
        s = layer.config.tier(tier).scaling
        for seg_idx, (_, start, stop) in enumerate(layer.segments):
            a = layer.lora_A[tier.value][seg_idx].detach()
            b = layer.lora_B[tier.value][seg_idx].detach()
            w[start:stop] += s * b @ a
    return x @ w.T + layer.base_layer.bias.detach()


@pytest.mark.parametrize("segments", [None, ("q", "v"), ("k",), ("q", "k", "v")])
@pytest.mark.parametrize("tiers", [[Tier.ROOT], [Tier.ROOT, Tier.CLUSTER], list(Tier), [Tier.LEAF]])
def test_forward_equals_dense_reference(segments: tuple[str, ...] | None, tiers: list[Tier]) -> None:
    layer = TieredLoRALinear(nn.Linear(16, 48), CFG, segments=segments)
    randomize_tiers(layer)
    layer.set_active(tiers)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), dense_reference(layer, x, tiers), rtol=1e-5, atol=1e-5)


def test_paper_slices_change_only_q_and_v_rows() -> None:
    layer = TieredLoRALinear(nn.Linear(16, 48), CFG, segments=("q", "v"))
    randomize_tiers(layer)
    layer.set_active(list(Tier))
    x = torch.randn(5, 16)
    out, base = layer(x), layer.base_layer(x)
    assert torch.equal(out[:, 16:32], base[:, 16:32])  # k untouched, bit for bit
    assert (out[:, :16] - base[:, :16]).abs().min() > 0
    assert (out[:, 32:] - base[:, 32:]).abs().min() > 0


def test_fresh_tiers_are_a_no_op() -> None:
    layer = TieredLoRALinear(nn.Linear(16, 48), CFG, segments=("q", "v"), seed=3)
    layer.set_active(list(Tier))
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert all(layer.lora_A[t.value].abs().sum() > 0 for t in Tier)


def test_same_seed_same_shared_init_different_seed_differs() -> None:
    base = nn.Linear(16, 48)
    one = TieredLoRALinear(base, CFG, path="blocks.0.attn.qkv", seed=7)
    two = TieredLoRALinear(nn.Linear(16, 48), CFG, path="blocks.0.attn.qkv", seed=7)
    three = TieredLoRALinear(nn.Linear(16, 48), CFG, path="blocks.0.attn.qkv", seed=8)
    assert torch.equal(one.lora_A["root"], two.lora_A["root"])
    assert not torch.equal(one.lora_A["root"], three.lora_A["root"])
    assert tier_seed(7, "root", "p") != tier_seed(7, "cluster", "p")
    bound = 1 / 16**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in = 16
    assert one.lora_A["root"].abs().max() <= bound


def test_separate_active_and_trainable_switches() -> None:
    layer = TieredLoRALinear(nn.Linear(8, 8), CFG)
    layer.set_active(["root", "cluster"])
    layer.set_trainable(["cluster"])
    assert not layer.lora_A["root"].requires_grad and layer.lora_A["cluster"].requires_grad
    randomize_tiers(layer)
    layer(torch.randn(2, 8)).sum().backward()
    assert layer.lora_B["root"].grad is None and layer.lora_B["cluster"].grad is not None
    assert layer.base_layer.weight.grad is None


def test_dropout_groups_match_reference_in_eval() -> None:
    cfg = AdapterConfig(root=TierConfig(dropout=0.5), cluster=TierConfig(dropout=0.1), leaf=TierConfig())
    layer = TieredLoRALinear(nn.Linear(8, 12), cfg).eval()
    randomize_tiers(layer)
    layer.set_active(list(Tier))
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), dense_reference(layer, x, list(Tier)))
    layer.train()
    assert not torch.equal(layer(x), dense_reference(layer, x, list(Tier)))


def test_merge_then_unmerge_restores_weight_exactly() -> None:
    layer = TieredLoRALinear(nn.Linear(16, 48), CFG, segments=("q", "v"))
    randomize_tiers(layer)
    layer.set_active(list(Tier))
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 16)
    expected = layer(x)
    layer.merge(["root", "cluster"])
    assert layer.merged == (Tier.ROOT, Tier.CLUSTER)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge(["leaf"])
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    assert torch.equal(layer(x), expected)


def test_train_and_eval_never_merge() -> None:
    layer = TieredLoRALinear(nn.Linear(8, 8), CFG)
    randomize_tiers(layer)
    before = layer.base_layer.weight.detach().clone()
    layer.eval()
    layer.train()
    assert layer.merged == () and torch.equal(layer.base_layer.weight, before)


def test_merge_errors_leave_weight_untouched() -> None:
    layer = TieredLoRALinear(nn.Linear(8, 8), CFG, path="blocks.1.attn.qkv")
    randomize_tiers(layer)
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["leaf"][0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"blocks.1.attn.qkv: tier 'leaf' has a non-finite update"):
        layer.merge(["root", "leaf"])
    assert torch.equal(layer.base_layer.weight, before) and layer.merged == ()
    layer.set_trainable(["root"])
    with pytest.raises(RuntimeError, match=r"tier 'root' is trainable; merging it would cut its gradients"):
        layer.merge(["root"])
    layer.set_trainable([])
    layer.merge(["root"])
    with pytest.raises(RuntimeError, match=r"tier 'root' is already merged"):
        layer.merge(["root"])
    with pytest.raises(RuntimeError, match=r"are merged into the base weight and cannot train"):
        layer.set_trainable(["root"])


def test_construction_errors() -> None:
    with pytest.raises(TypeError, match=r"TieredLoRALinear wraps nn.Linear, got Conv1d"):
        TieredLoRALinear(nn.Conv1d(2, 2, 1), CFG)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"out_features is divisible by 3, got out_features=8"):
        TieredLoRALinear(nn.Linear(8, 8), CFG, segments=("q",))


def test_bf16_autocast_forward_close_to_fp32() -> None:
    layer = TieredLoRALinear(nn.Linear(16, 48), CFG, segments=("q", "v"))
    randomize_tiers(layer)
    layer.set_active(list(Tier))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_reference(layer, x, list(Tier)), rtol=3e-2, atol=3e-2)


def test_plan_follows_dtype_moves_and_assigned_state() -> None:
    layer = TieredLoRALinear(nn.Linear(16, 48), CFG, segments=("q", "v"))
    randomize_tiers(layer)
    layer.set_active(list(Tier))
    x = torch.randn(3, 16)
    layer(x)  # builds the plan
    layer.double()
    torch.testing.assert_close(layer(x.double()), dense_reference(layer, x.double(), list(Tier)))
    other = TieredLoRALinear(nn.Linear(16, 48), CFG, segments=("q", "v")).double()
    randomize_tiers(other, seed=5)
    layer.load_state_dict(other.state_dict(), assign=True)
    torch.testing.assert_close(layer(x.double()), dense_reference(layer, x.double(), list(Tier)))
