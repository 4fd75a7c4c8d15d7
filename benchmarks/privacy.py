"""What client-level differential privacy costs: accuracy against epsilon (inf, 8, 4, 1) on Fashion-MNIST.

The federation is the SC-Dir analogue (``examples/configs/fmnist_sc_dir.yaml``) at its full 36 clients
(28 training, 8 unseen) of 400 images, cut to 10 rounds (root and cluster stages of 2-3 rounds each) and
8 local steps so that the whole curve fits on 2 cores. ``federation.privacy`` releases the root and the
cluster tiers (and their heads) with DP-FedAvg: each client's whole update clipped to ``S``, equal
weights, Gaussian noise ``z S / m`` on the aggregate, ``z`` chosen by Opacus's RDP accountant for the
target epsilon over the most noised rounds the schedule allows (6) at ``delta = 1e-3`` (< 1 / 36).

``S`` comes from a pilot run on another seed (a different partition and initialization): the median
norm of the honest updates ``||B A - B_0 A_0||`` (with the head's) there. Rows: no privacy at all (the
library's default aggregation), epsilon = inf (the same clipping and equal weights, no noise), 8, 4, 1.
Figures per row, seed means: the training clients' final personalized accuracy (root + cluster + their
own leaf, which never leaves them and carries no noise), their accuracy with the released tiers alone
(root + cluster, the cluster's head), the unseen clients' fine-tuned accuracy, and the epsilon spent.

JSON (``--json``), flat: ``acc_<row>``, ``shared_acc_<row>``, ``unseen_acc_<row>``, ``epsilon_spent_<row>``,
``noise_multiplier_<row>`` (rows ``no_dp``, ``eps_inf``, ``eps_8``, ``eps_4``, ``eps_1``), ``clip_norm``;
``--plot PATH`` draws the curve.

    python benchmarks/privacy.py [--seeds 0,1,2] [--jobs 2] [--json out.json] [--plot curve.png]
    python benchmarks/privacy.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attacks import SMOKE, SMOKE_CONFIG, results_of  # the sibling benchmark's smoke federation and runner

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "fmnist_sc_dir.yaml"
REDUCED = ["data.per_client=400", "federation.rounds=10", "federation.root_rounds=[2,3]",
           "federation.cluster_rounds=[2,3]", "federation.local_steps=8", "federation.eval_every=100",
           "federation.finetune_epochs=1", "federation.clustering.study=false"]
ROWS: dict[str, float | None] = {"no_dp": None, "eps_inf": float("inf"), "eps_8": 8.0, "eps_4": 4.0, "eps_1": 1.0}
DELTA = 1e-3
PILOT_SEED = 100


def _privacy(epsilon: float | None, clip: float) -> dict[str, Any] | None:
    if epsilon is None:
        return None
    base = {"clip_norm": clip, "delta": DELTA}
    return {**base, "noise_multiplier": 0.0} if epsilon == float("inf") else {**base, "epsilon": epsilon}


def pilot_clip_norm(cfg: Mapping[str, Any], threads: int) -> float:
    """The median norm of the shared-tier updates (factors and head) of a non-private run on :data:`PILOT_SEED`."""
    import torch

    torch.set_num_threads(threads)
    from hilora_lightning.experiment import build_clients, build_runner, validate_config
    from hilora_lightning.strategy.robust import dense_gram, update_gram
    from hilora_lightning.tiers import Tier

    run_cfg = json.loads(json.dumps(dict(cfg)))
    run_cfg["seed"] = PILOT_SEED
    validate_config(run_cfg)
    clients, unseen = build_clients(run_cfg["data"], PILOT_SEED)
    norms: list[float] = []
    holder: dict[str, Any] = {}

    def hook(p: Any) -> None:
        orch = holder["orch"]
        if p.tier is Tier.ROOT:
            start, head0 = orch.root, orch.global_head
        else:
            j = orch.assignment[p.client_id]
            start, head0 = orch.clusters[j], orch.cluster_heads[j]
        sq = float(update_gram([p.factors], start)[0, 0]) + float(dense_gram([p.head], head0)[0, 0])
        norms.append(sq ** 0.5)

    orch = build_runner(run_cfg, clients, unseen, progress=False)
    orch.runner.upload_hook = hook
    holder["orch"] = orch
    orch.run()
    return float(np.median(norms))


def run_one(cfg: Mapping[str, Any], seed: int, row: str, clip: float, threads: int) -> dict[str, Any]:
    """One federation at ``row``'s privacy (a child process with ``threads`` torch threads)."""
    import torch

    torch.set_num_threads(threads)
    from hilora_lightning.experiment import build_clients, build_runner, validate_config
    from hilora_lightning.tiers import Tier

    run_cfg = json.loads(json.dumps(dict(cfg)))
    run_cfg["seed"] = seed
    privacy = _privacy(ROWS[row], clip)
    if privacy is not None:
        run_cfg.setdefault("federation", {})["privacy"] = {**privacy, "seed": seed}
    validate_config(run_cfg)
    clients, unseen = build_clients(run_cfg["data"], seed)
    start = time.perf_counter()
    orch = build_runner(run_cfg, clients, unseen, progress=False)
    result = orch.run()
    shared = orch.evaluate_clients([Tier.ROOT, Tier.CLUSTER], head_level=Tier.CLUSTER)
    return {"seed": seed, "row": row, "acc": float(np.mean(list(result.client_accuracy.values()))),
            "shared_acc": float(np.mean(list(shared.values()))),
            "unseen_acc": float(result.generalization.get("finetuned", {}).get("mean", float("nan"))),
            "epsilon_spent": float(result.privacy.get("epsilon", float("inf") if privacy is None or
                                                       privacy.get("noise_multiplier") == 0 else float("nan"))),
            "noise_multiplier": float(result.privacy.get("noise_multiplier", 0.0)),
            "seconds": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --smoke: 0)")
    parser.add_argument("--jobs", type=int, default=None, help="runs side by side (default 2; --smoke: 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "privacy")
    parser.add_argument("--smoke", action="store_true", help="digits, 6 clients, 3 rounds: a check that it runs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="write the accuracy-against-epsilon curve here")
    args = parser.parse_args(argv)

    from hilora_lightning.cli import load_config

    seeds = [int(s) for s in (args.seeds or ("0" if args.smoke else "0,1,2")).split(",")]
    cfg = load_config(SMOKE_CONFIG, SMOKE) if args.smoke else load_config(CONFIG, REDUCED)
    out = args.out.with_name(args.out.name + "_smoke") if args.smoke else args.out
    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs or (1 if args.smoke else min(2, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    start = time.perf_counter()
    pilot = out / "pilot.json"
    if pilot.exists():
        clip = json.loads(pilot.read_text())["clip_norm"]
    else:
        clip = pilot_clip_norm(cfg, os.cpu_count() or 1)
        pilot.write_text(json.dumps({"clip_norm": clip}))
    print(f"clip norm S = {clip:.4g} (median update norm of a non-private pilot run, seed {PILOT_SEED})", flush=True)
    done: dict[tuple[int, str], dict[str, Any]] = {}
    todo = []
    for seed in seeds:
        for row in ROWS:
            path = out / f"s{seed}_{row}.json"
            if path.exists():
                done[(seed, row)] = json.loads(path.read_text())
            else:
                todo.append((seed, row))
    tasks = [(cfg, seed, row, clip, threads) for seed, row in todo]
    for i, res in enumerate(results_of(run_one, tasks, jobs), 1):
        (out / f"s{res['seed']}_{res['row']}.json").write_text(json.dumps(res))
        done[(res["seed"], res["row"])] = res
        print(f"[{i}/{len(todo)}] seed {res['seed']} {res['row']}: acc {res['acc']:.3f}, shared "
              f"{res['shared_acc']:.3f}, epsilon {res['epsilon_spent']:.2f} ({res['seconds']:.0f} s)", flush=True)
    fig: dict[str, float] = {"clip_norm": clip}
    print(f"\naccuracy against epsilon (delta = {DELTA}, mean over seeds {seeds}):")
    print("| privacy | personalized acc | released tiers acc | unseen acc | epsilon spent | noise multiplier |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        runs = [done[(s, row)] for s in seeds]
        for key in ("acc", "shared_acc", "unseen_acc", "epsilon_spent", "noise_multiplier"):
            fig[f"{key}_{row}"] = float(np.mean([r[key] for r in runs]))
        names = {"no_dp": "none (default aggregation)", "eps_inf": "epsilon = inf (clipping only)"}
        name = names[row] if row in names else f"epsilon = {ROWS[row]:g}"
        std = np.std([r["acc"] for r in runs], ddof=1) if len(runs) > 1 else float("nan")
        print(f"| {name} | {fig[f'acc_{row}']:.3f} (std {std:.3f}) | {fig[f'shared_acc_{row}']:.3f} | "
              f"{fig[f'unseen_acc_{row}']:.3f} | {fig[f'epsilon_spent_{row}']:.2f} | "
              f"{fig[f'noise_multiplier_{row}']:.2f} |")
    fig["seconds"] = time.perf_counter() - start
    if args.plot:
        from hilora_lightning.plots import accuracy_per_round

        xs = [1, 4, 8, 16]  # epsilon 1, 4, 8, and inf drawn at 16
        rows = ["eps_1", "eps_4", "eps_8", "eps_inf"]
        plot = accuracy_per_round(xs, {"personalized (root+cluster+leaf)": [fig[f"acc_{r}"] for r in rows],
                                       "released tiers only (root+cluster)": [fig[f"shared_acc_{r}"] for r in rows],
                                       "unseen clients (fine-tuned)": [fig[f"unseen_acc_{r}"] for r in rows]},
                                  title=f"accuracy against epsilon (delta={DELTA}; 16 = inf, no noise)",
                                  xlabel="epsilon")
        plot.savefig(args.plot, dpi=120, bbox_inches="tight")
        print(f"wrote {args.plot}")
    finite = {k: v for k, v in fig.items() if np.isfinite(v)}
    if args.json:
        args.json.write_text(json.dumps(finite, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
