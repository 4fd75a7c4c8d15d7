"""Client-level differential privacy: the clipped mean against a dense numpy reference, the sensitivity
bound, the noise's variance in what is released (directly and through a real federation), the accountant's
composition, and the configuration's errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hilora_lightning.strategy.privacy import dp_aggregate, epsilon_spent, noise_multiplier_for

pytest.importorskip("opacus", reason="the accountant is Opacus's: pip install -e '.[privacy]'")

SHAPES = {"blocks.0.qkv": (10, 7), "blocks.1.fc": (6, 9)}
RANK = 2
FULL = 10  # >= every min(d_out, d_in): the truncation keeps the whole sum


def _state(gen, scale=1.0):
    return {k: v for name, (p, q) in SHAPES.items() for k, v in (
        (f"{name}.lora_A", torch.randn(RANK, q, generator=gen, dtype=torch.float64) * scale),
        (f"{name}.lora_B", torch.randn(p, RANK, generator=gen, dtype=torch.float64) * scale))}


def _prod(state, name):
    return state[f"{name}.lora_B"].double().numpy() @ state[f"{name}.lora_A"].double().numpy()


def _federation(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    start = _state(gen)
    ups = [{k: v + 0.4 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in start.items()}
           for _ in range(n)]
    return ups, start


def test_the_noiseless_release_is_the_clipped_equal_weight_mean_of_the_products() -> None:
    ups, start = _federation()
    dense = np.stack([np.concatenate([(_prod(u, n) - _prod(start, n)).ravel() for n in SHAPES]) for u in ups])
    norms = np.linalg.norm(dense, axis=1)
    clip = float(np.median(norms))
    new, _, got_norms = dp_aggregate(ups, start, FULL, clip, 0.0, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(got_norms, norms, rtol=1e-9)
    coef = np.minimum(1.0, clip / norms) / len(ups)
    offset = 0
    for name, (p, q) in SHAPES.items():
        want = _prod(start, name) + (coef[:, None] * dense[:, offset: offset + p * q]).sum(0).reshape(p, q)
        offset += p * q
        # float32 factors of O(1) products: ~1e-6 relative
        np.testing.assert_allclose(_prod(new, name), want, atol=1e-5 * np.abs(want).max())


def test_one_client_moves_the_noiseless_release_by_at_most_clip_over_m() -> None:
    """Add/remove adjacency with the fixed denominator: one client more or less, whatever its data, moves the
    release by at most S / m; with the upload count as denominator it could move it by ~2 S / m."""
    ups, start = _federation(n=4, seed=1)
    clip, m = 0.5, 4.0

    def release(states, expected):
        new, _, _ = dp_aggregate(states, start, FULL, clip, 0.0, torch.Generator(), expected=expected)
        return new

    def shift(a, b):
        return math.sqrt(sum(np.sum((_prod(a, n) - _prod(b, n)) ** 2) for n in SHAPES))

    without = release(ups[:3], m)
    for scale in (1.0, 50.0, -50.0):  # the added client's update, small, huge, reversed
        added = [*ups[:3], {k: start[k] + scale * (v - start[k]) for k, v in ups[3].items()}]
        assert shift(release(added, m), without) <= clip / m * (1 + 1e-5)
    gen = torch.Generator().manual_seed(7)  # updates linear in their B: U = dB A_0, so -50 dB is -50 U
    step = {k: (torch.randn(v.shape, generator=gen, dtype=torch.float64) if k.endswith("lora_B") else 0 * v)
            for k, v in start.items()}
    same = [{k: start[k] + 5 * step[k] for k in start}] * 3  # three equal updates (clipped to S) ...
    wild = {k: start[k] - 50 * step[k] for k in start}  # ... and a fourth exactly against them
    counted = shift(release([*same, wild], None), release(same, None))  # denominators 4 and 3
    assert counted == pytest.approx(2 * clip / m, rel=1e-4)  # why the denominator is fixed
    assert shift(release([*same, wild], m), release(same, m)) == pytest.approx(clip / m, rel=1e-4)
    with pytest.raises(ValueError, match="expected number of clients must be > 0"):
        release(ups, 0.0)


def test_the_released_noise_has_the_variance_of_the_mechanism() -> None:
    """Zero updates, full rank: the release minus the start is the noise itself, N(0, (z S / m)^2)."""
    _, start = _federation()
    head0 = {"w": torch.zeros(8, 5, dtype=torch.float64)}
    z, clip, m = 1.3, 0.7, 4
    entries, head_entries = [], []
    for trial in range(40):
        new, head, _ = dp_aggregate([start] * m, start, FULL, clip, z, torch.Generator().manual_seed(trial),
                                    heads=[head0] * m, head_start=head0)
        entries += [(_prod(new, n) - _prod(start, n)).ravel() for n in SHAPES]
        head_entries.append(head["w"].numpy().ravel())
    x, h = np.concatenate(entries), np.concatenate(head_entries)
    want = (z * clip / m) ** 2
    # a variance estimate of n Gaussian entries has relative std sqrt(2 / n): 2% (products), 3.5% (head);
    # 12% is more than 5 of those
    assert abs(x.var() / want - 1) < 0.12 and abs(x.mean()) < 5 * math.sqrt(want / x.size)
    assert abs(h.var() / want - 1) < 0.18


def test_the_accountant_composes_the_rounds_as_opacus_does() -> None:
    from opacus.accountants import RDPAccountant

    z = noise_multiplier_for(4.0, 1e-5, 0.5, 12)
    assert 3.9 <= epsilon_spent([(z, 0.5, 12)], 1e-5) <= 4.0  # Opacus's search stops within 0.01 below
    acc = RDPAccountant()
    acc.history = [(z, 0.5, 5)]
    assert epsilon_spent([(z, 0.5, 5)], 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert epsilon_spent([(z, 0.5, 5)], 1e-5) < epsilon_spent([(z, 0.5, 12)], 1e-5)
    assert epsilon_spent([], 1e-5) == 0.0


def test_privacy_config_errors_say_what_to_do() -> None:
    from hilora_lightning.federation.config import FederationConfig, PrivacyConfig, RobustConfig

    assert not PrivacyConfig().enabled
    with pytest.raises(ValueError, match="privacy needs clip_norm > 0.*not from this run's clients"):
        PrivacyConfig(epsilon=4.0)
    with pytest.raises(ValueError, match="a target epsilon or a noise_multiplier, not both"):
        PrivacyConfig(epsilon=4.0, noise_multiplier=1.0, clip_norm=1.0)
    with pytest.raises(ValueError, match="privacy.epsilon must be a finite number > 0"):
        PrivacyConfig(epsilon=float("inf"), clip_norm=1.0)
    with pytest.raises(ValueError, match="privacy.accountant must be one of"):
        PrivacyConfig(epsilon=1.0, clip_norm=1.0, accountant="moments")
    with pytest.raises(ValueError, match="privacy and robust.rule 'geomed' do not combine"):
        FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), robust=RobustConfig(rule="geomed"),
                         privacy=PrivacyConfig(epsilon=1.0, clip_norm=1.0))


def _private_run(tmp_path, hostile=None, **privacy):
    from hilora_lightning import HiLoRAViT
    from hilora_lightning.data.digits import digits_federation
    from hilora_lightning.federation import FederatedOrchestrator
    from hilora_lightning.federation.attacks import HostileBackend
    from hilora_lightning.federation.config import FederationConfig, PrivacyConfig

    cfg = FederationConfig(rounds=4, root_rounds=(2, 2), cluster_rounds=(1, 1), local_steps=2, finetune_epochs=0,
                           privacy=PrivacyConfig(**privacy))
    torch.manual_seed(0)
    orch = FederatedOrchestrator(HiLoRAViT(), digits_federation(4, num_groups=2), cfg, progress=False,
                                 backend=HostileBackend(None, hostile or {}))
    return orch


def test_a_private_run_logs_epsilon_per_round_and_in_its_result(tmp_path) -> None:
    orch = _private_run(tmp_path, epsilon=8.0, clip_norm=0.5, seed=3)
    result = orch.run()
    eps = [r.epsilon for r in result.records]
    assert [r.stage for r in result.records] == ["root", "root", "cluster", "leaf"]
    assert 0 < eps[0] < eps[1] < eps[2] == eps[3] <= 8.0  # the leaf stage releases nothing
    assert result.privacy["epsilon"] == pytest.approx(eps[-1])
    assert result.privacy["noised_rounds"] == 3 and result.privacy["target_epsilon"] == 8.0
    assert "epsilon" in result.records[0].progress_line(4)
    assert result.to_dict()["privacy"]["clip_norm"] == 0.5


def test_the_noise_reaches_the_released_tiers(tmp_path) -> None:
    """Every client free-rides (a zero update), so what the server releases after round 1 is the noise alone:
    the global head moves by N(0, (z S / m)^2) per entry, and the root's product is the rank-r truncation
    of a Gaussian matrix of that scale (its energy against a numpy Monte Carlo of the same truncation)."""
    from hilora_lightning.federation.attacks import Attack
    from hilora_lightning.strategy.aggregation import factor_pairs

    z, clip, m = 2.0, 0.3, 4
    orch = _private_run(tmp_path, {c: Attack("free_ride") for c in range(4)}, noise_multiplier=z, clip_norm=clip,
                        seed=1)
    head0 = {k: v.clone() for k, v in orch.global_head.items()}
    root0 = {k: v.clone() for k, v in orch.root.items()}
    orch.run(stop_after=1)
    sigma = z * clip / m
    moved = np.concatenate([(orch.global_head[k] - head0[k]).double().numpy().ravel() for k in head0])
    assert moved.size > 500 and abs(moved.var() / sigma ** 2 - 1) < 5 * math.sqrt(2 / moved.size)
    rng = np.random.default_rng(0)
    for prefix in factor_pairs(list(root0))[:3]:
        b, a = orch.root[f"{prefix}.lora_B"].double().numpy(), orch.root[f"{prefix}.lora_A"].double().numpy()
        b0, a0 = root0[f"{prefix}.lora_B"].double().numpy(), root0[f"{prefix}.lora_A"].double().numpy()
        assert np.abs(b0 @ a0).max() == 0  # the root starts at B = 0: the release is the noise's truncation
        r = b.shape[1]
        ref = [np.sum(np.linalg.svd(rng.normal(0, sigma, (b.shape[0], a.shape[1])), compute_uv=False)[:r] ** 2)
               for _ in range(20)]
        energy = np.sum((b @ a) ** 2)
        assert np.mean(ref) * 0.8 < energy < np.mean(ref) * 1.25, prefix


def test_the_privacy_section_of_a_config_reaches_the_strategy() -> None:
    from hilora_lightning.experiment import build_federation_config, validate_config
    from hilora_lightning.federation.config import PrivacyConfig
    from hilora_lightning.federation.fingerprint import config_items

    cfg = {"federation": {"rounds": 6, "root_rounds": [1, 2], "cluster_rounds": [1, 2],
                          "privacy": {"epsilon": 4, "clip_norm": 0.5, "tiers": ["root"]}}}
    validate_config(cfg)
    fed = build_federation_config(cfg)
    assert fed.privacy == PrivacyConfig(epsilon=4, clip_norm=0.5, tiers=("root",))
    assert config_items(fed)["federation.privacy.epsilon"] == "4"
    assert not [k for k in config_items(build_federation_config({})) if ".privacy." in k]  # old runs resume
    with pytest.raises(ValueError, match="did you mean 'federation.privacy.epsilon'"):
        validate_config({"federation": {"privacy": {"epsilonn": 4}}})


def test_a_resumed_private_run_goes_on_counting_epsilon(tmp_path) -> None:
    """The ledger lives in the checkpointed server state: a run stopped after round 1 and resumed from its
    checkpoint has spent, after each round, what the accountant gives for that many noised rounds."""
    first = _private_run(tmp_path, epsilon=6.0, clip_norm=0.5, seed=2)
    first.checkpoint_path = tmp_path / "fed.pt"
    first.run(stop_after=1)
    again = _private_run(tmp_path, epsilon=6.0, clip_norm=0.5, seed=2)
    again.checkpoint_path = tmp_path / "fed.pt"
    resumed = again.run(resume=True)
    z = resumed.privacy["noise_multiplier"]
    want = [epsilon_spent([(z, 1.0, k)], 1e-5) for k in (1, 2, 3, 3)]  # root, root, cluster, leaf (no release)
    assert [r.epsilon for r in resumed.records] == pytest.approx(want, rel=1e-12)
    assert resumed.privacy["noised_rounds"] == 3 and resumed.privacy["epsilon"] <= 6.0
