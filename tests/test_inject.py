from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from helpers import randomize_tiers
from hilora_lightning.config import AdapterConfig, TargetSpec
from hilora_lightning.errors import TargetNotFoundError
from hilora_lightning.inject import find_tiered_layers, inject_tiers, set_active, unload
from hilora_lightning.layer import TieredLoRALinear


@pytest.mark.parametrize(
    ("name", "kwargs", "depth"),
    [("test_vit", {}, 6), ("vit_tiny_patch16_224", {"img_size": 32}, 12)],
)
@pytest.mark.parametrize(("targets", "per_block"), [("paper", 1), ("all_linear", 4)])
def test_inject_and_unload_restore_the_model(name: str, kwargs: dict, depth: int, targets: str, per_block: int) -> None:
    vit = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    img = vit.patch_embed.img_size
    x = torch.randn(2, 3, *img)
    originals = {n: m for n, m in vit.named_modules() if isinstance(m, nn.Linear)}
    expected = vit(x)
    layers = inject_tiers(vit, AdapterConfig(targets=targets))
    assert len(layers) == depth * per_block
    assert all(isinstance(m, TieredLoRALinear) for m in find_tiered_layers(vit).values())
    assert "head" not in layers
    if targets == "paper":
        assert all([s for s, _, _ in layer.segments] == ["q", "v"] for layer in layers.values())
    set_active(vit, ["root", "cluster", "leaf"])
    assert torch.equal(vit(x), expected)  # fresh tiers: a no-op
    for layer in layers.values():
        randomize_tiers(layer)
    assert not torch.allclose(vit(x), expected)
    restored = unload(vit)
    assert set(restored) == set(layers)
    assert all(restored[n] is originals[n] for n in restored)
    assert not find_tiered_layers(vit)
    assert torch.equal(vit(x), expected)


def test_only_linear_modules_match(test_vit: nn.Module) -> None:
    layers = inject_tiers(test_vit, AdapterConfig(targets=["re:blocks\\.0\\..*"]))
    assert sorted(layers) == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


def test_suffix_matching_respects_dot_boundaries(test_vit: nn.Module) -> None:
    layers = inject_tiers(test_vit, AdapterConfig(targets=[TargetSpec("fc1")]))
    assert len(layers) == 6 and all(n.endswith(".mlp.fc1") for n in layers)
    unload(test_vit)
    with pytest.raises(TargetNotFoundError):
        inject_tiers(test_vit, AdapterConfig(targets=["c1"]))


def test_no_match_names_model_and_candidates(test_vit: nn.Module) -> None:
    with pytest.raises(
        TargetNotFoundError,
        match=r"no nn.Linear in VisionTransformer\(test_vit\) matched targets \['query'\]; candidate Linear "
        r"paths: \['blocks.\*.attn.qkv', 'blocks.\*.attn.proj', 'blocks.\*.mlp.fc1', 'blocks.\*.mlp.fc2', 'head'\]",
    ):
        inject_tiers(test_vit, AdapterConfig(targets=["query"]))
    assert not find_tiered_layers(test_vit)


def test_double_injection_is_refused(test_vit: nn.Module) -> None:
    inject_tiers(test_vit, AdapterConfig())
    with pytest.raises(RuntimeError, match=r"already has tiered adapters injected; call unload\(model\)"):
        inject_tiers(test_vit, AdapterConfig())


def test_unload_unmerges_first(test_vit: nn.Module) -> None:
    w0 = test_vit.blocks[0].attn.qkv.weight.detach().clone()
    layers = inject_tiers(test_vit, AdapterConfig())
    layer = layers["blocks.0.attn.qkv"]
    randomize_tiers(layer)
    layer.merge(["root"])
    assert not torch.equal(layer.base_layer.weight, w0)
    unload(test_vit)
    assert torch.equal(test_vit.blocks[0].attn.qkv.weight, w0)
