from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from helpers import randomize_tiers
from hilora_lightning.config import AdapterConfig, TierConfig
from hilora_lightning.errors import AdapterStateError
from hilora_lightning.inject import inject_tiers
from hilora_lightning.state import export_tier, import_tier, load_tier_file, save_tier_file


def _model(seed: int = 0, targets: str = "paper") -> torch.nn.Module:
    vit = timm.create_model("test_vit", num_classes=4)
    for layer in inject_tiers(vit, AdapterConfig(targets=targets), seed=seed).values():
        randomize_tiers(layer, seed=seed)
    return vit


def test_keys_are_tier_free_and_tensors_plain() -> None:
    state = export_tier(_model(), "cluster")
    assert len(state) == 6 * 2 * 2  # 6 blocks x (q, v) x (A, B)
    assert "blocks.0.attn.qkv.q.lora_A" in state and "blocks.5.attn.qkv.v.lora_B" in state
    assert not any(t in k for k in state for t in ("root", "cluster", "leaf"))
    assert state["blocks.0.attn.qkv.q.lora_A"].shape == (8, 64)
    assert state["blocks.0.attn.qkv.q.lora_B"].shape == (64, 8)
    assert all(v.dtype == torch.float32 and v.is_contiguous() and not v.requires_grad for v in state.values())


def test_cluster_adapter_moves_into_another_clients_slot() -> None:
    sender, receiver = _model(seed=1), _model(seed=2)
    state = export_tier(sender, "cluster")
    import_tier(receiver, "cluster", state)
    assert all(torch.equal(a, b) for a, b in zip(export_tier(receiver, "cluster").values(), state.values()))
    # the other tiers of the receiver are untouched
    assert not torch.equal(export_tier(receiver, "leaf")["blocks.0.attn.qkv.q.lora_A"],
                           export_tier(sender, "leaf")["blocks.0.attn.qkv.q.lora_A"])


def test_file_round_trip_is_exact(tmp_path: Path) -> None:
    state = export_tier(_model(), "root")
    path = save_tier_file(state, tmp_path / "root.safetensors")
    loaded = load_tier_file(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert [p.name for p in tmp_path.iterdir()] == ["root.safetensors"]  # no temp file left


def test_loading_never_unpickles(tmp_path: Path) -> None:
    evil = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, evil)  # a pickle archive in disguise
    with pytest.raises(AdapterStateError, match=r"is not a valid safetensors adapter file"):
        load_tier_file(evil)
    with pytest.raises(FileNotFoundError, match=r"adapter file '.*missing.safetensors' does not exist"):
        load_tier_file(tmp_path / "missing.safetensors")


def _bad(state: dict, key: str, value: object) -> dict:
    out = dict(state)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: _bad(s, "blocks.0.attn.qkv.q.lora_A", None), r"missing \['blocks.0.attn.qkv.q.lora_A'\] \(1\)"),
        (lambda s: {**s, "extra": torch.zeros(1)}, r"unexpected \['extra'\] \(1\)"),
        (lambda s: _bad(s, "blocks.0.attn.qkv.q.lora_A", torch.zeros(4, 64)),
         r"blocks.0.attn.qkv.q.lora_A: expected shape \(8, 64\), got \(4, 64\)"),
        (lambda s: _bad(s, "blocks.0.attn.qkv.q.lora_B", torch.zeros(64, 8, dtype=torch.int64)),
         r"blocks.0.attn.qkv.q.lora_B: expected a floating-point tensor, got dtype torch.int64"),
        (lambda s: _bad(s, "blocks.1.attn.qkv.v.lora_B", torch.full((64, 8), float("inf"))),
         r"blocks.1.attn.qkv.v.lora_B: holds NaN or Inf values"),
        (lambda s: _bad(s, "blocks.1.attn.qkv.v.lora_B", [1.0]), r"expected a torch.Tensor, got list"),
    ],
)
def test_bad_state_is_rejected_and_changes_nothing(mutate, match: str) -> None:
    model = _model(seed=3)
    before = export_tier(model, "root")
    with pytest.raises(AdapterStateError, match=match):
        import_tier(model, "root", mutate(export_tier(_model(seed=4), "root")))
    after = export_tier(model, "root")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rank_mismatch_between_tiers_is_reported() -> None:
    vit = timm.create_model("test_vit", num_classes=4)
    inject_tiers(vit, AdapterConfig(leaf=TierConfig(rank=2)))
    with pytest.raises(AdapterStateError, match=r"expected shape \(2, 64\), got \(8, 64\); the tier ranks"):
        import_tier(vit, "leaf", export_tier(vit, "root"))
