"""Robust product-space aggregation against dense numpy references: Gram matrix, clipping, geometric median,
multi-Krum, trimming, coordinate-wise median / trimmed mean; a hostile update loses its influence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hilora_lightning.strategy.aggregation import product_space_aggregate_states
from hilora_lightning.strategy.robust import (
    coordinate_aggregate_states,
    geometric_median_weights,
    multi_krum_weights,
    robust_weights,
    trimmed_weights,
    update_gram,
    update_norms,
)

SHAPES = {"blocks.0.qkv": (12, 9), "blocks.1.fc": (7, 12)}  # (d_out, d_in) of two adapted matrices
RANK = 3


def _state(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    out = {}
    for name, (p, q) in SHAPES.items():
        out[f"{name}.lora_A"] = torch.randn(RANK, q, generator=gen, dtype=torch.float64) * scale
        out[f"{name}.lora_B"] = torch.randn(p, RANK, generator=gen, dtype=torch.float64) * scale
    return out


def _federation(n: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    start = _state(gen)
    states = [{k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in start.items()}
              for _ in range(n)]
    return states, start


def _dense_updates(states, start) -> np.ndarray:
    """Each client's update, every adapted matrix's ``B A - B_0 A_0`` flattened and concatenated (numpy)."""
    rows = []
    for st in states:
        parts = []
        for name in SHAPES:
            b, a = st[f"{name}.lora_B"].numpy(), st[f"{name}.lora_A"].numpy()
            b0, a0 = start[f"{name}.lora_B"].numpy(), start[f"{name}.lora_A"].numpy()
            parts.append((b @ a - b0 @ a0).ravel())
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def _dense_product(state, name) -> np.ndarray:
    return state[f"{name}.lora_B"].double().numpy() @ state[f"{name}.lora_A"].double().numpy()


def test_the_gram_matrix_of_factored_updates_equals_the_dense_one() -> None:
    states, start = _federation()
    flat = _dense_updates(states, start)
    gram = update_gram(states, start).numpy()
    want = flat @ flat.T
    # float64 sums of ~200 products of O(1) terms: relative error ~1e-15, far below 1e-10
    np.testing.assert_allclose(gram, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    np.testing.assert_allclose(update_norms(torch.as_tensor(gram)).numpy(), np.linalg.norm(flat, axis=1), rtol=1e-10)


def test_clipping_bounds_every_update_and_keeps_the_small_ones() -> None:
    states, start = _federation()
    flat = _dense_updates(states, start)
    norms = np.linalg.norm(flat, axis=1)
    clip = float(np.median(norms))
    w, w0 = robust_weights("clip", update_gram(states, start), [1] * len(states), clip_norm=clip)
    full = max(min(shape) for shape in SHAPES.values())  # a rank no adapted matrix exceeds: the sum kept whole
    agg = product_space_aggregate_states([*states, start], [*w.tolist(), w0], rank=full)
    scale = np.minimum(1.0, clip / norms)
    want = (flat * scale[:, None]).mean(axis=0)  # the mean of the clipped updates
    got = np.concatenate([(_dense_product(agg, n) - _dense_product(start, n)).ravel() for n in SHAPES])
    # the full-rank re-factoring is exact up to float32 factors: |got| ~ 1, float32 ~ 1e-7 relative
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    assert float(w.sum() + w0) == pytest.approx(1.0, abs=1e-12) and w0 > 0


def _weiszfeld(points: np.ndarray, pi: np.ndarray, iters: int = 2000) -> np.ndarray:
    z = (pi[:, None] * points).sum(0)
    for _ in range(iters):
        d = np.maximum(np.linalg.norm(points - z, axis=1), 1e-15)
        z = ((pi / d)[:, None] * points).sum(0) / (pi / d).sum()
    return z


def test_the_geometric_median_matches_weiszfeld_on_dense_vectors() -> None:
    states, start = _federation(n=6, seed=1)
    flat = _dense_updates(states, start)
    pi = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 2.0])
    pi /= pi.sum()
    w = geometric_median_weights(update_gram(states, start), torch.as_tensor(pi))
    got = (w.numpy()[:, None] * flat).sum(0)
    want = _weiszfeld(flat, pi)
    assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want)  # both converge to the same point

    def cost(z):
        return float((pi * np.linalg.norm(flat - z, axis=1)).sum())

    assert cost(got) <= cost((pi[:, None] * flat).sum(0))  # no worse than the mean


def _krum_reference(flat: np.ndarray, f: int, m: int) -> list[int]:
    n = len(flat)
    d = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    scores = []
    for i in range(n):
        others = np.sort(np.delete(d[i], i))[: n - f - 2]
        scores.append(others.sum())
    return sorted(np.argsort(scores, kind="stable")[:m].tolist())


@pytest.mark.parametrize(("f", "m"), [(1, 1), (1, 4), (2, 3)])
def test_multi_krum_selects_what_the_dense_reference_selects(f: int, m: int) -> None:
    states, start = _federation(n=7, seed=2)
    states[5] = {k: v * (1 if k.endswith("lora_A") else -4) for k, v in states[5].items()}  # a hostile one
    w = multi_krum_weights(update_gram(states, start), torch.full((7,), 1 / 7, dtype=torch.float64), f, m)
    kept = sorted(torch.nonzero(w).flatten().tolist())
    assert kept == _krum_reference(_dense_updates(states, start), f, m) and 5 not in kept
    assert float(w.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs n >= f \\+ 3 updates"):
        multi_krum_weights(update_gram(states[:3], start), torch.full((3,), 1 / 3, dtype=torch.float64), 1)


def test_trimming_drops_the_farthest_from_the_median() -> None:
    states, start = _federation(n=10, seed=3)
    states[2] = {k: v * 6 for k, v in states[2].items()}  # far away
    pi = torch.full((10,), 0.1, dtype=torch.float64)
    w = trimmed_weights(update_gram(states, start), pi, 0.1)
    assert float(w[2]) == 0 and int((w > 0).sum()) == 9 and float(w.sum()) == pytest.approx(1.0)
    assert torch.equal(trimmed_weights(update_gram(states, start), pi, 0.0), pi)


def test_a_sign_flipped_scaled_update_loses_its_influence_under_each_rule() -> None:
    """One of eight clients sends -5x the honest direction (under a 10x-median norm bound): the plain mean
    moves far from the honest mean, each robust rule keeps the aggregate close to it."""
    gen = torch.Generator().manual_seed(4)
    start = _state(gen)
    direction = _state(gen, 0.2)
    honest = [{k: start[k] + direction[k] + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
               for k, v in start.items()} for _ in range(7)]
    hostile = {k: start[k] - 5 * direction[k] for k in start}
    states = [*honest, hostile]
    flat = _dense_updates(states, start)
    target = flat[:7].mean(0)
    gram = update_gram(states, start)

    def error(w: torch.Tensor) -> float:
        return float(np.linalg.norm((w.numpy()[:, None] * flat).sum(0) - target) / np.linalg.norm(target))

    assert error(robust_weights("none", gram, [1] * 8)[0]) > 0.5
    honest_norm = float(np.median(np.linalg.norm(flat, axis=1)))
    for rule, opts in [("geomed", {}), ("multi_krum", {"krum_f": 1}), ("trim", {"trim_fraction": 0.125}),
                       ("clip", {"clip_norm": honest_norm})]:
        w, _ = robust_weights(rule, gram, [1] * 8, **opts)
        assert error(w) < (0.45 if rule == "clip" else 0.15), rule  # clipping bounds the harm, does not remove it


def test_coordinate_rules_match_numpy_and_refactor_to_the_rank() -> None:
    states, start = _federation(n=6, seed=5)
    for rule, reduce in (("coord_median", lambda u: np.median(u, axis=0)),
                         ("coord_trimmed_mean", lambda u: np.sort(u, axis=0)[1:5].mean(axis=0))):
        agg = coordinate_aggregate_states(states, start, rule, rank=2 * RANK, trim_fraction=0.2)
        for name in SHAPES:
            base = _dense_product(start, name)
            updates = np.stack([_dense_product(st, name) - base for st in states])
            want = base + reduce(updates)
            u, s, vh = np.linalg.svd(want)
            want_r = (u[:, : 2 * RANK] * s[: 2 * RANK]) @ vh[: 2 * RANK]  # the rank-2r truncation
            np.testing.assert_allclose(_dense_product(agg, name), want_r, atol=1e-5 * np.abs(want).max())
            assert agg[f"{name}.lora_B"].shape == (SHAPES[name][0], 2 * RANK)
    with pytest.raises(ValueError, match="coordinate rule must be one of"):
        coordinate_aggregate_states(states, start, "median", rank=RANK)


def test_rule_errors_say_what_is_expected() -> None:
    states, start = _federation(n=4)
    gram = update_gram(states, start)
    with pytest.raises(ValueError, match="the clip rule needs clip_norm .* or clip_factor"):
        robust_weights("clip", gram, [1] * 4)
    with pytest.raises(ValueError, match="robust rule must be one of"):
        robust_weights("krum", gram, [1] * 4)
    with pytest.raises(ValueError, match="got 3 weights for 4 updates"):
        robust_weights("none", gram, [1] * 3)


def test_robust_config_is_validated_and_reaches_the_strategy() -> None:
    from hilora_lightning.experiment import build_federation_config, validate_config
    from hilora_lightning.federation.config import FederationConfig, RobustConfig

    cfg = {"federation": {"robust": {"rule": "multi_krum", "krum_f": 1, "tiers": ["root"]}}}
    validate_config(cfg)
    fed = build_federation_config(cfg)
    assert fed.robust == RobustConfig(rule="multi_krum", krum_f=1, tiers=("root",))
    with pytest.raises(ValueError, match="robust.rule must be one of"):
        RobustConfig(rule="krum")
    with pytest.raises(ValueError, match="robust.rule 'clip' needs exactly one of robust.clip_norm > 0"):
        RobustConfig(rule="clip")
    with pytest.raises(ValueError, match="needs exactly one of .* got clip_norm=1.0, clip_factor=2.0"):
        RobustConfig(rule="clip", clip_norm=1.0, clip_factor=2.0)
    with pytest.raises(ValueError, match="robust.clip_factor must be a number > 0, got nan"):
        RobustConfig(rule="clip", clip_factor=float("nan"))
    with pytest.raises(ValueError, match="robust.tiers must name shared tiers"):
        RobustConfig(tiers=("leaf",))
    with pytest.raises(ValueError, match="aggregates in product space; set aggregation: product"):
        FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), aggregation="fedavg",
                         robust=RobustConfig(rule="geomed"))
    with pytest.raises(ValueError, match="did you mean 'federation.robust.clip_norm'"):
        validate_config({"federation": {"robust": {"clip_nrom": 1.0}}})


def _payloads(model, n_honest: int = 5, seed: int = 0):
    """Root uploads of ``n_honest`` honest clients (a shared direction plus noise) and one sign-flipped x5."""
    from hilora_lightning.federation.replies import Payload
    from hilora_lightning.state import export_tier
    from hilora_lightning.tiers import Tier

    gen = torch.Generator().manual_seed(seed)
    start = export_tier(model, Tier.ROOT)
    direction = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    honest = [{k: start[k] + direction[k] + 0.005 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
              for _ in range(n_honest)]
    hostile = {k: start[k] - 5 * direction[k] for k in start}
    states = [*honest, hostile]
    return start, [Payload(i, 1, Tier.ROOT, st, None, 10) for i, st in enumerate(states)]


@pytest.mark.parametrize("rule", ["geomed", "multi_krum", "trim", "coord_median"])
def test_hilora_aggregates_the_root_robustly(rule: str) -> None:
    from hilora_lightning import HiLoRAViT
    from hilora_lightning.federation.config import FederationConfig, RobustConfig
    from hilora_lightning.federation.hilora import HiLoRAStrategy
    from hilora_lightning.tiers import Tier

    model = HiLoRAViT()
    start, payloads = _payloads(model)
    base = dict(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1))
    robust = HiLoRAStrategy(model, FederationConfig(**base, robust=RobustConfig(rule=rule, trim_fraction=0.2)))
    plain = HiLoRAStrategy(model, FederationConfig(**base))
    honest_mean, _ = plain._aggregate_group(payloads[:-1], Tier.ROOT, start, None)

    def gap(state) -> float:  # relative distance of the aggregated products to the honest clients' aggregate
        num = den = 0.0
        for prefix in {k.rsplit(".", 1)[0] for k in start}:
            want = honest_mean[f"{prefix}.lora_B"].double() @ honest_mean[f"{prefix}.lora_A"].double()
            got = state[f"{prefix}.lora_B"].double() @ state[f"{prefix}.lora_A"].double()
            num += float((got - want).norm() ** 2)
            den += float(want.norm() ** 2)
        return (num / den) ** 0.5

    assert gap(plain._aggregate_group(payloads, Tier.ROOT, start, None)[0]) > 0.5  # the default follows the attacker
    assert gap(robust._aggregate_group(payloads, Tier.ROOT, start, None)[0]) < 0.2, rule


def test_clip_factor_clips_at_a_multiple_of_the_median_norm() -> None:
    states, start = _federation(n=5, seed=3)
    states[4] = {k: start[k] + 4 * (v - start[k]) for k, v in states[4].items()}  # one update far larger
    norms = np.linalg.norm(_dense_updates(states, start), axis=1)
    gram = update_gram(states, start)
    w, w0 = robust_weights("clip", gram, [1] * 5, clip_factor=1.5)
    want_scale = np.minimum(1.0, 1.5 * np.median(norms) / norms)  # numpy reference of the bound
    np.testing.assert_allclose(w.numpy(), want_scale / 5, rtol=1e-9)
    assert w0 == pytest.approx(1 - want_scale.sum() / 5, rel=1e-9)
    assert want_scale[4] < 1 and (want_scale[:4] == 1).sum() >= 2  # the large one is clipped, most are not


def test_heads_join_the_update_so_a_hostile_head_is_dropped_with_its_factors() -> None:
    """The whole upload is the update: the Gram matrix gains the heads' inner products (numpy reference),
    the rule's weights combine the heads, and a client whose head alone is hostile is caught."""
    from hilora_lightning.strategy.robust import aggregate_uploads, dense_gram

    states, start = _federation(n=7, seed=4)
    gen = torch.Generator().manual_seed(9)
    head0 = {"weight": torch.randn(3, 4, generator=gen, dtype=torch.float64),
             "bias": torch.zeros(3, dtype=torch.float64)}
    heads = [{k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in head0.items()}
             for _ in range(7)]
    heads[6] = {k: v - 400 * (heads[0][k] - v) for k, v in head0.items()}  # only the head is hostile
    flat = np.stack([np.concatenate([(h[k] - head0[k]).numpy().ravel() for k in head0]) for h in heads])
    np.testing.assert_allclose(dense_gram(heads, head0).numpy(), flat @ flat.T, rtol=1e-12)
    _, plain_head = aggregate_uploads(states, [1] * 7, start, RANK, "none", heads, head0)
    new, head = aggregate_uploads(states, [1] * 7, start, RANK, "multi_krum", heads, head0, {"krum_f": 1})
    honest = {k: np.mean([h[k].numpy() for h in heads[:6]], axis=0) for k in head0}
    for k in head0:
        assert np.abs(plain_head[k].numpy() - honest[k]).max() > 1.0  # the mean follows the hostile head
    # multi-Krum keeps n - f = 6 updates: exactly the honest ones, equally weighted
    for k in head0:
        np.testing.assert_allclose(head[k].numpy(), honest[k], rtol=1e-9, atol=1e-12)
    med = aggregate_uploads(states, [1] * 7, start, RANK, "coord_median", heads, head0)[1]
    for k in head0:
        np.testing.assert_allclose(med[k].numpy(), np.median(np.stack([h[k].numpy() for h in heads]), axis=0))


def test_a_run_with_a_robust_rule_end_to_end_and_the_default_fingerprint_unchanged(tmp_path) -> None:
    from pathlib import Path

    from hilora_lightning.cli import load_config, main
    from hilora_lightning.federation.config import FederationConfig, RobustConfig
    from hilora_lightning.federation.fingerprint import config_items

    assert not [k for k in config_items(FederationConfig()) if ".robust." in k]  # older checkpoints still resume
    assert config_items(FederationConfig(robust=RobustConfig(rule="geomed")))["federation.robust.rule"] == '"geomed"'
    config = Path(__file__).resolve().parents[1] / "examples" / "configs" / "digits_cpu.yaml"
    out = tmp_path / "run"
    assert main(["run", str(config), "data.num_clients=6", "data.num_groups=2", "federation.rounds=3",
                 "federation.root_rounds=[1,1]", "federation.cluster_rounds=[1,1]", "federation.local_steps=2",
                 "federation.robust.rule=multi_krum", "federation.robust.krum_f=1", f"out_dir={out}"]) == 0
    assert load_config(out / "config.yaml")["federation"]["robust"] == {"rule": "multi_krum", "krum_f": 1}
