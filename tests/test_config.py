from __future__ import annotations

import pytest

from hilora_lightning.config import AdapterConfig, TargetSpec, TierConfig
from hilora_lightning.tiers import Tier, parse_tiers


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"TierConfig.rank must be a positive int, got 0"),
        ({"rank": 2.5}, r"TierConfig.rank must be a positive int, got 2.5"),
        ({"rank": True}, r"TierConfig.rank must be a positive int, got True"),
        ({"alpha": 0}, r"TierConfig.alpha must be a finite number > 0, got 0"),
        ({"alpha": float("nan")}, r"TierConfig.alpha must be a finite number > 0, got nan"),
        ({"dropout": 1.0}, r"TierConfig.dropout must be in \[0, 1\), got 1.0"),
        ({"init": "xavier"}, r"TierConfig.init must be one of \('kaiming', 'gaussian'\), got 'xavier'"),
    ],
)
def test_tier_config_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TierConfig(**kwargs)


def test_scaling_is_alpha_over_rank() -> None:
    assert TierConfig(rank=4, alpha=6).scaling == 1.5


def test_presets_and_user_targets() -> None:
    paper = AdapterConfig(targets="paper").target_specs()
    assert paper == (TargetSpec("attn.qkv", ("q", "v")),)
    all_linear = [t.pattern for t in AdapterConfig(targets="all_linear").target_specs()]
    assert all_linear == ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert AdapterConfig(targets="mlp.fc1").target_specs() == AdapterConfig(targets=["mlp.fc1"]).target_specs()
    user = AdapterConfig(targets=["mlp.fc1", {"pattern": "attn.qkv", "slices": ["v", "q"]}]).target_specs()
    assert user == (TargetSpec("mlp.fc1"), TargetSpec("attn.qkv", ("q", "v")))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"targets": "papr"}, ValueError, r"unknown target preset 'papr' \(did you mean 'paper'\?\): expected one "
                                          r"of \['all_linear', 'paper'\], a module pattern or a list of them"),
        ({"targets": []}, ValueError, r"AdapterConfig.targets is empty"),
        ({"targets": [3]}, TypeError, r"a target must be a pattern string, a TargetSpec or a mapping, got int"),
        ({"root": 5}, TypeError, r"AdapterConfig.root must be a TierConfig or a mapping, got int"),
    ],
)
def test_adapter_config_rejects_bad_values(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        AdapterConfig(**kwargs)


def test_target_spec_errors() -> None:
    with pytest.raises(ValueError, match=r"TargetSpec.pattern must be a non-empty string, got ''"):
        TargetSpec("")
    with pytest.raises(ValueError, match=r"TargetSpec.slices must be distinct names from \('q', 'k', 'v'\)"):
        TargetSpec("attn.qkv", ("q", "x"))


def test_dict_round_trip_and_unknown_keys() -> None:
    cfg = AdapterConfig(targets=["attn.proj"], root=TierConfig(rank=4), leaf=TierConfig(rank=2, dropout=0.1))
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
    assert AdapterConfig.from_dict(AdapterConfig().to_dict()) == AdapterConfig()
    with pytest.raises(ValueError, match=r"unknown AdapterConfig keys \['rnak'\]"):
        AdapterConfig.from_dict({"rnak": 3})


def test_tier_parsing() -> None:
    assert Tier.parse(" LEAF ") is Tier.LEAF
    assert [t.position for t in Tier] == [0, 1, 2]
    assert Tier.CLUSTER.frozen_above() == (Tier.ROOT,)
    assert parse_tiers("cluster") == (Tier.CLUSTER,)
    with pytest.raises(ValueError, match=r"unknown tier 'branch': expected one of root, cluster, leaf"):
        Tier.parse("branch")
