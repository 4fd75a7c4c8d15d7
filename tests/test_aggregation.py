from __future__ import annotations

import numpy as np
import pytest
import torch

from hilora_lightning.strategy.aggregation import (
    factor_pairs,
    fedavg_states,
    product_space_aggregate,
    product_space_aggregate_states,
    relative_change,
    subspace_change,
)


def _dense_truncated(bs, as_, weights, rank):
    """The naive reference: form sum pi_i B_i A_i densely (numpy), then its rank-r truncated SVD."""
    pi = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    dense = sum(w * b.double().numpy() @ a.double().numpy() for w, b, a in zip(pi, bs, as_))
    u, s, vh = np.linalg.svd(dense, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize(("p", "q", "n", "r", "rank"), [(20, 15, 4, 3, 3), (30, 12, 7, 2, 4), (8, 40, 3, 5, 6)])
@pytest.mark.parametrize("split", ["left", "balanced"])
def test_product_space_equals_dense_reference(p, q, n, r, rank, split) -> None:
    gen = torch.Generator().manual_seed(p * q + n)
    bs = [torch.randn(p, r, generator=gen) for _ in range(n)]
    as_ = [torch.randn(r, q, generator=gen) for _ in range(n)]
    weights = torch.randint(1, 50, (n,), generator=gen).tolist()
    b, a = product_space_aggregate(bs, as_, weights, rank=rank, split=split)
    assert b.shape == (p, rank) and a.shape == (rank, q) and b.dtype == torch.float32
    np.testing.assert_allclose((b.double() @ a.double()).numpy(), _dense_truncated(bs, as_, weights, rank), atol=2e-5)
    if split == "left":  # the paper's split: B = U_r has orthonormal columns
        k = min(rank, n * r, p, q)
        torch.testing.assert_close(b[:, :k].T @ b[:, :k], torch.eye(k), atol=1e-5, rtol=0)


def test_rank_deficient_sum_is_exact_and_keeps_trainable_directions() -> None:
    b0, a0 = torch.randn(10, 2), torch.randn(2, 9)
    b, a = product_space_aggregate([b0, b0], [a0, a0], [1, 3], rank=4)
    torch.testing.assert_close(b @ a, b0 @ a0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)  # completion columns, alive
    assert a[2:].abs().max() < 1e-5  # ... with zero A rows, so the product is unchanged
    b1, a1 = product_space_aggregate([b0], [a0], [1], rank=3)  # only 2 directions exist at all
    assert torch.count_nonzero(b1[:, 2]) == 0 and torch.count_nonzero(a1[2]) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weights": [1, -1]}, r"aggregation weights must be finite, >= 0 and not all zero, got \[1.0, -1.0\]"),
        ({"weights": [0, 0]}, r"not all zero"),
        ({"weights": [1]}, r"got 1 weights for 2 participants"),
        ({"rank": 0}, r"rank must be positive, got 0"),
        ({"split": "right"}, r"split must be one of \('left', 'balanced'\), got 'right'"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    args = {"bs": [torch.randn(4, 2)] * 2, "as_": [torch.randn(2, 3)] * 2, "weights": [1, 1], "rank": 2}
    with pytest.raises(ValueError, match=match):
        product_space_aggregate(**{**args, **kwargs})


def test_shape_mismatch_names_the_participant() -> None:
    msg = r"participant 1: expected B \(p=4, r\) and A \(r, q=3\) with matching r, got B \(5, 2\)"
    with pytest.raises(ValueError, match=msg):
        product_space_aggregate([torch.randn(4, 2), torch.randn(5, 2)], [torch.randn(2, 3)] * 2, [1, 1], 2)


def _state(gen, prefixes=("blocks.0.attn.qkv.q", "blocks.0.attn.qkv.v")):
    return {k: v for p in prefixes for k, v in ((f"{p}.lora_A", torch.randn(2, 6, generator=gen)),
                                                  (f"{p}.lora_B", torch.randn(5, 2, generator=gen)))}


def test_state_aggregation_is_per_matrix_and_keeps_keys() -> None:
    gen = torch.Generator().manual_seed(0)
    states = [_state(gen) for _ in range(3)]
    out = product_space_aggregate_states(states, [1, 2, 3], rank=2)
    assert list(out) == list(states[0])
    for prefix in factor_pairs(out):
        bs, as_ = [s[f"{prefix}.lora_B"] for s in states], [s[f"{prefix}.lora_A"] for s in states]
        ref = _dense_truncated(bs, as_, [1, 2, 3], 2)
        np.testing.assert_allclose((out[f"{prefix}.lora_B"] @ out[f"{prefix}.lora_A"]).numpy(), ref, atol=1e-5)


def test_fedavg_is_the_weighted_mean() -> None:
    gen = torch.Generator().manual_seed(1)
    states = [_state(gen) for _ in range(2)]
    out = fedavg_states(states, [1, 3])
    for k in out:
        torch.testing.assert_close(out[k], 0.25 * states[0][k] + 0.75 * states[1][k])
    with pytest.raises(ValueError, match=r"participant 1 has different keys than participant 0"):
        fedavg_states([states[0], {"x.lora_A": torch.zeros(1)}], [1, 1])


def test_relative_change_matches_dense() -> None:
    gen = torch.Generator().manual_seed(2)
    prev, cur = _state(gen), _state(gen)
    dense = lambda st, p: st[f"{p}.lora_B"].double() @ st[f"{p}.lora_A"].double()  # noqa: E731
    prefixes = factor_pairs(prev)
    num = sum(((dense(cur, p) - dense(prev, p)) ** 2).sum() for p in prefixes).sqrt()
    den = sum((dense(prev, p) ** 2).sum() for p in prefixes).sqrt()
    assert relative_change(prev, cur, scaling=2.0) == pytest.approx(float(num / den), rel=1e-9)
    assert relative_change(prev, prev) == pytest.approx(0.0, abs=1e-6)
    zero = {k: torch.zeros_like(v) if k.endswith("lora_B") else v for k, v in prev.items()}
    assert relative_change(zero, cur) == float("inf") and relative_change(zero, zero) == 0.0


def test_subspace_change_matches_dense_and_ignores_growth() -> None:
    gen = torch.Generator().manual_seed(3)
    prev, cur = _state(gen), _state(gen)
    prefixes = factor_pairs(prev)

    def dense_cov(st: dict, p: str) -> np.ndarray:
        m = (st[f"{p}.lora_B"].double() @ st[f"{p}.lora_A"].double()).numpy()
        return m @ m.T

    expected = np.mean([1 - np.sum(dense_cov(prev, p) * dense_cov(cur, p))
                        / (np.linalg.norm(dense_cov(prev, p)) * np.linalg.norm(dense_cov(cur, p))) for p in prefixes])
    assert subspace_change(prev, cur) == pytest.approx(expected, rel=1e-9)
    grown = {k: 5 * v if k.endswith("lora_B") else v for k, v in prev.items()}
    assert subspace_change(prev, grown) == pytest.approx(0.0, abs=1e-12)  # the relative change would be 4
    assert relative_change(prev, grown) == pytest.approx(4.0, rel=1e-6)  # its eps=1e-12 denominator guard
    zero = {k: torch.zeros_like(v) if k.endswith("lora_B") else v for k, v in prev.items()}
    assert subspace_change(zero, cur) == float("inf") and subspace_change(zero, zero) == 0.0


def test_factor_pairs_errors() -> None:
    with pytest.raises(ValueError, match=r"key 'head.weight' is not a LoRA factor"):
        factor_pairs(["head.weight"])
    with pytest.raises(ValueError, match=r"LoRA factors without their partner: \['x'\]"):
        factor_pairs(["x.lora_A"])
