"""Cost of the LSAC step at the paper's scale and beyond.

Inputs are per-client EMA factors ``B_bar`` of 24 adapted matrices (ViT-B q and v, d = 768, r = 8),
drawn from 5 hidden subspaces plus noise. Measured in one run:

* ``lsac_seconds_100``: the whole LSAC step for 100 clients (subspaces by thin QR + small SVD,
  all-pairs distances, Gaussian affinity, eigengap K, spectral clustering); target <= 0.5 s.
* ``lsac_over_gemm_floor_1000``: the same step for 1000 clients against the bare Gram-matrix
  product ``U_all^T U_all`` that exact pairwise distances need (one (n r) x (n r) GEMM per matrix,
  the floor); target <= 1.5x. (The step exploits the symmetry, so it can beat the floor.)
* ``speedup_vs_dense``: subspace extraction by QR + small SVD of ``B`` against a dense SVD of the
  768 x 768 update ``B A`` per client and matrix; target >= 50x. The dense variant is timed on
  ``--dense-clients`` clients and scaled linearly (it is per-matrix work).

    python benchmarks/clustering.py [--json out.json] [--quick] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sklearn.metrics import adjusted_rand_score

from hilora_lightning.strategy.clustering import cluster_distances
from hilora_lightning.strategy.subspace import left_subspace, pairwise_distances

MATRICES, D, R, GROUPS = 24, 768, 8, 5


def make_factors(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``B`` (n, 24, 768, 8) from 5 hidden subspaces + noise, matching ``A`` (n, 24, 8, 768), group labels."""
    gen = torch.Generator().manual_seed(seed)
    bases = torch.linalg.qr(torch.randn(GROUPS, MATRICES, D, R, generator=gen))[0]
    groups = [i % GROUPS for i in range(n)]
    mix = torch.randn(n, MATRICES, R, R, generator=gen)
    b = bases[groups] @ mix + 0.3 * torch.randn(n, MATRICES, D, R, generator=gen) / D**0.5
    a = torch.randn(n, MATRICES, R, D, generator=gen) / D**0.5
    return b, a, groups


def lsac_step(b: torch.Tensor) -> tuple[float, int, list[int]]:
    start = time.perf_counter()
    u = left_subspace(b, R)  # (n, L, p, r), batched thin QR + small SVD
    res = cluster_distances(pairwise_distances(u), k_min=2, k_max=10, seed=0)
    return time.perf_counter() - start, res.k, res.labels.tolist()


def gemm_floor(u: torch.Tensor) -> float:
    n = u.shape[0]
    start = time.perf_counter()
    for m in range(MATRICES):
        flat = u[:, m].permute(1, 0, 2).reshape(D, n * R)
        _ = flat.T @ flat
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense-clients", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="200 instead of 1000 clients in the floor comparison")
    parser.add_argument("--smoke", action="store_true", help="20 and 40 clients, one dense client (seconds)")
    args = parser.parse_args()
    n_small = 20 if args.smoke else 100
    torch.set_num_threads(args.threads)
    out: dict[str, float] = {}

    b100, a100, groups100 = make_factors(n_small)
    lsac_step(b100[:10])  # warm-up
    t100 = min(lsac_step(b100)[0] for _ in range(3))
    _, k100, labels100 = lsac_step(b100)
    out[f"lsac_seconds_{n_small}"] = t100
    out[f"k_found_{n_small}"] = float(k100)
    out[f"ari_{n_small}"] = float(adjusted_rand_score(groups100, labels100))

    n_big = 40 if args.smoke else 200 if args.quick else 1000
    b_big, _, groups_big = make_factors(n_big, seed=1)
    t_big, k_big, labels_big = lsac_step(b_big)
    floor = gemm_floor(left_subspace(b_big, R))
    out[f"lsac_seconds_{n_big}"] = t_big
    out[f"gemm_floor_seconds_{n_big}"] = floor
    out[f"lsac_over_gemm_floor_{n_big}"] = t_big / floor
    out[f"ari_{n_big}"] = float(adjusted_rand_score(groups_big, labels_big))

    nd = 1 if args.smoke else args.dense_clients
    start = time.perf_counter()
    left_subspace(b100, R)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(nd):
        for m in range(MATRICES):
            torch.linalg.svd(b100[i, m] @ a100[i, m], full_matrices=False)
    dense = (time.perf_counter() - start) * (n_small / nd)
    out[f"subspace_seconds_{n_small}"] = ours
    out[f"dense_svd_seconds_{n_small}_extrapolated"] = dense
    out["speedup_vs_dense"] = dense / ours

    print(f"LSAC step, {n_small} clients x 24 matrices (768 x 8): {t100:.3f} s (target <= 0.5 at 100), K={k100}, "
          f"ARI {out[f'ari_{n_small}']:.3f}")
    print(f"LSAC step, {n_big} clients: {t_big:.2f} s; bare Gram GEMM floor {floor:.2f} s -> "
          f"{t_big / floor:.2f}x (target <= 1.5), ARI {out[f'ari_{n_big}']:.3f}")
    print(f"subspaces for {n_small} clients: QR + small SVD {ours:.3f} s vs dense SVD of B A {dense:.1f} s "
          f"(from {nd} clients) -> {dense / ours:.0f}x (target >= 50)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
