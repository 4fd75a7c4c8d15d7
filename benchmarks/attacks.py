"""Hostile clients against HiLoRA: what one attacker and 10% colluding attackers cost the honest clients.

The federation is the Fashion-MNIST SC-Dir analogue (``examples/configs/fmnist_sc_dir.yaml``) cut to fit
about 20 minutes on 2 cores: 16 clients (13 training, 3 unseen) of 400 images (at least 100 test images
each), 10 rounds (root and cluster stages of 2-3 rounds each), 8 local steps of batch 32, one fine-tune
epoch for the unseen clients, no LSAC study. Each attacked run is compared with the clean run of the
same seed and defence; the hostile clients are drawn per seed from the training clients (1, and
``ceil(10%)`` = 2 colluding).

Attacks (:mod:`hilora_lightning.federation.attacks`): ``sign_flip``, ``scale`` (x5, under the default
outlier bound), ``noise`` (of the honest update's norm), ``label_flip``, ``free_ride`` and the targeted
``backdoor`` (model replacement with a pixel trigger, boosted x5). Figures per run: the honest clients'
mean and p10 final accuracy, the ARI of their LSAC clusters against the clean run's, the unseen clients'
fine-tuned accuracy, and for the backdoor its success rate on the honest clients' triggered test images.

Defences: ``default`` (the library's defaults), and each robust rule of ``federation.robust``
(``clip`` at 2x the round's median norm, ``trim`` 20%, ``multi_krum`` with f = 2, ``geomed``,
``coord_median``, ``coord_trimmed_mean`` 20%). Over ``--seeds`` (default 0, 1, 2) every attack runs
against the default and the recommended rule (``--robust``); ``--sweep`` adds every rule against 10%
colluders on the first seed.

JSON (``--json``), flat: ``drop_one_default_<attack>``, ``drop_10pct_default_<attack>``,
``drop_10pct_robust_<attack>`` (the honest clients' mean accuracy lost against the clean run, seed
mean; positive = worse), ``ari_*``, ``unseen_drop_*``, ``backdoor_asr_*``, ``clean_default_mean``,
``clean_robust_mean``, ``clean_seed_std``, ``clean_robust_minus_default``, ``sweep_<rule>_<attack>``.

    python benchmarks/attacks.py [--seeds 0,1,2] [--robust multi_krum] [--sweep] [--jobs 2] [--json out.json]
    python benchmarks/attacks.py --smoke            # digits, a few clients and rounds (seconds per run)

Runs are cached in ``--out`` (one JSON per run), so an interrupted benchmark resumes where it stopped.
The data must be installed (``apt-get install -y dataset-fashion-mnist``, or ``--set data.root=...``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "fmnist_sc_dir.yaml"
REDUCED = ["data.num_clients=16", "data.per_client=400", "federation.rounds=10", "federation.root_rounds=[2,3]",
           "federation.cluster_rounds=[2,3]", "federation.local_steps=8", "federation.eval_every=100",
           "federation.finetune_epochs=1", "federation.clustering.study=false"]
SMOKE_CONFIG = ROOT / "examples" / "configs" / "digits_cpu.yaml"
SMOKE = ["data.num_clients=6", "data.num_groups=2", "federation.rounds=3", "federation.root_rounds=[1,1]",
         "federation.cluster_rounds=[1,1]", "federation.local_steps=1", "federation.finetune_epochs=1",
         "federation.eval_every=100"]
ATTACK_NAMES = ("sign_flip", "scale", "noise", "label_flip", "free_ride", "backdoor")
DEFENCES: dict[str, dict[str, Any]] = {
    "default": {},
    "clip": {"rule": "clip", "clip_factor": 2.0},
    "trim": {"rule": "trim", "trim_fraction": 0.2},
    "multi_krum": {"rule": "multi_krum", "krum_f": 2},
    "geomed": {"rule": "geomed"},
    "coord_median": {"rule": "coord_median"},
    "coord_trimmed_mean": {"rule": "coord_trimmed_mean", "trim_fraction": 0.2},
}


def hostile_ids(train_ids: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` training clients drawn by ``seed`` (the same ones for every attack and defence)."""
    rng = np.random.default_rng(10_000 + seed)
    return sorted(int(c) for c in rng.choice(sorted(train_ids), size=count, replace=False))


def run_one(name: str, cfg: Mapping[str, Any], seed: int, attack: str | None, count: int, defence: str,
            threads: int) -> dict[str, Any]:
    """One federation; the honest clients' figures (in a child process: ``threads`` torch threads)."""
    import torch

    torch.set_num_threads(threads)
    from hilora_lightning.experiment import build_backend, build_clients, build_runner, validate_config
    from hilora_lightning.federation.attacks import Attack, HostileBackend, triggered_test
    from hilora_lightning.tiers import Tier

    run_cfg = json.loads(json.dumps(dict(cfg)))
    run_cfg["seed"] = seed
    if DEFENCES[defence]:
        run_cfg.setdefault("federation", {})["robust"] = dict(DEFENCES[defence])
    validate_config(run_cfg)
    clients, unseen = build_clients(run_cfg["data"], seed)
    bad = hostile_ids([c.client_id for c in clients], count, seed) if attack else []
    num_classes = int(run_cfg.get("model", {}).get("num_classes", 10))
    spec = Attack(attack, num_classes=num_classes, seed=seed) if attack else None
    backend = HostileBackend(build_backend(run_cfg.get("backend")), dict.fromkeys(bad, spec))
    start = time.perf_counter()
    orch = build_runner(run_cfg, clients, unseen, backend=backend, progress=False)
    result = orch.run()
    honest = {c: a for c, a in result.client_accuracy.items() if c not in bad}
    out: dict[str, Any] = {
        "name": name, "seed": seed, "attack": attack, "count": count, "defence": defence, "hostile": bad,
        "honest": {str(c): float(a) for c, a in honest.items()},
        "assignment": {str(c): int(k) for c, k in result.assignment.items() if c not in bad},
        "unseen": float(result.generalization.get("finetuned", {}).get("mean", float("nan"))),
        "seconds": time.perf_counter() - start,
    }
    if attack == "backdoor":  # its success on the honest clients' own models, triggered test images
        inner = backend.backend
        for c in clients:
            if c.client_id not in bad:
                inner.data[c.client_id] = triggered_test(c, spec)  # type: ignore[arg-type]
        asr = orch.evaluate_clients(list(Tier))
        out["asr"] = float(np.mean([v for c, v in asr.items() if c not in bad]))
        if not bad:
            out["asr"] = float("nan")
    return out


def _ari(a: Mapping[str, int], b: Mapping[str, int]) -> float:
    from sklearn.metrics import adjusted_rand_score

    ids = sorted(set(a) & set(b))
    return float(adjusted_rand_score([a[i] for i in ids], [b[i] for i in ids]))


def plan_runs(seeds: Sequence[int], attacks: Sequence[str], robust: str, sweep: bool, n_train: int
              ) -> list[tuple[str, int, str | None, int, str]]:
    """``(name, seed, attack, count, defence)`` of every run, clean runs first."""
    ten = max(1, math.ceil(0.1 * n_train))
    runs: list[tuple[str, int, str | None, int, str]] = []
    for seed in seeds:
        for defence in ("default", robust):
            runs.append((f"s{seed}_clean_{defence}", seed, None, 0, defence))
    for seed in seeds:
        for attack in attacks:
            runs.append((f"s{seed}_{attack}_one_default", seed, attack, 1, "default"))
            if ten > 1:  # else the 10% run is the one-attacker run (figures() reads it for both)
                runs.append((f"s{seed}_{attack}_10pct_default", seed, attack, ten, "default"))
            runs.append((f"s{seed}_{attack}_10pct_{robust}", seed, attack, ten, robust))
    if sweep:
        for defence in DEFENCES:
            if defence not in ("default", robust):
                runs.append((f"s{seeds[0]}_clean_{defence}", seeds[0], None, 0, defence))
                runs += [(f"s{seeds[0]}_{a}_10pct_{defence}", seeds[0], a, ten, defence) for a in attacks]
    return list(dict.fromkeys(runs))


def results_of(fn: Callable[..., dict[str, Any]], tasks: Sequence[tuple[Any, ...]], jobs: int
               ) -> Iterator[dict[str, Any]]:
    """``fn(*task)`` of every task as it finishes: ``jobs`` child processes at a time, or in this process
    one after another with ``jobs=1`` (no child to start: what ``--smoke`` uses)."""
    if jobs <= 1:
        for task in tasks:
            yield fn(*task)
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for fut in concurrent.futures.as_completed([pool.submit(fn, *task) for task in tasks]):
            yield fut.result()


def execute(runs: Sequence[tuple[str, int, str | None, int, str]], cfg: Mapping[str, Any], out: Path, jobs: int
            ) -> dict[str, dict[str, Any]]:
    """Run what is not cached in ``out``, ``jobs`` at a time; every run's figures by name."""
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    todo = []
    for run in runs:
        path = out / f"{run[0]}.json"
        if path.exists():
            done[run[0]] = json.loads(path.read_text())
        else:
            todo.append(run)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    print(f"{len(runs)} runs, {len(done)} cached, {len(todo)} to go ({jobs} at a time, {threads} threads each)",
          flush=True)
    tasks = [(run[0], cfg, run[1], run[2], run[3], run[4], threads) for run in todo]
    for i, res in enumerate(results_of(run_one, tasks, jobs), 1):
        (out / f"{res['name']}.json").write_text(json.dumps(res))
        done[res["name"]] = res
        mean = np.mean(list(res["honest"].values()))
        print(f"[{i}/{len(todo)}] {res['name']}: honest mean {mean:.3f} ({res['seconds']:.0f} s)", flush=True)
    return done


def figures(done: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], attacks: Sequence[str], robust: str,
            sweep: bool) -> dict[str, float]:
    """The flat headline figures (seed means)."""
    def mean_acc(run: Mapping[str, Any], ids: Sequence[str] | None = None) -> float:
        h = run["honest"]
        return float(np.mean([h[i] for i in (ids or h)]))

    def drop(name: str, seed: int, defence: str) -> tuple[float, float, float, float]:
        if name not in done and name.endswith("_10pct_default"):  # 10% of the clients is one client
            name = name.replace("_10pct_default", "_one_default")
        run, clean = done[name], done[f"s{seed}_clean_{defence}"]
        ids = list(run["honest"])  # the same honest clients in both
        acc = np.array([run["honest"][i] for i in ids])
        ref = np.array([clean["honest"][i] for i in ids])
        return (float(ref.mean() - acc.mean()), float(np.percentile(ref, 10) - np.percentile(acc, 10)),
                _ari(run["assignment"], clean["assignment"]), clean["unseen"] - run["unseen"])

    out: dict[str, float] = {}
    for cell, defence, label in (("one_default", "default", "one_default"), ("10pct_default", "default",
                                 "10pct_default"), (f"10pct_{robust}", robust, "10pct_robust")):
        for attack in attacks:
            rows = np.array([drop(f"s{s}_{attack}_{cell}", s, defence) for s in seeds])
            out[f"drop_{label}_{attack}"] = float(rows[:, 0].mean())
            out[f"drop_p10_{label}_{attack}"] = float(rows[:, 1].mean())
            out[f"ari_{label}_{attack}"] = float(rows[:, 2].mean())
            out[f"unseen_drop_{label}_{attack}"] = float(rows[:, 3].mean())
            if attack == "backdoor":
                names = [f"s{s}_{attack}_{cell}" for s in seeds]
                names = [n if n in done else n.replace("_10pct_default", "_one_default") for n in names]
                out[f"backdoor_asr_{label}"] = float(np.mean([done[n]["asr"] for n in names]))
    clean_d = np.array([mean_acc(done[f"s{s}_clean_default"]) for s in seeds])
    clean_r = np.array([mean_acc(done[f"s{s}_clean_{robust}"]) for s in seeds])
    out["clean_default_mean"] = float(clean_d.mean())
    out["clean_robust_mean"] = float(clean_r.mean())
    if len(seeds) > 1:
        out["clean_seed_std"] = float(clean_d.std(ddof=1))
    out["clean_robust_minus_default"] = float((clean_r - clean_d).mean())
    if sweep:
        s = seeds[0]
        for defence in DEFENCES:
            d = "default" if defence == "default" else defence
            if f"s{s}_clean_{d}" not in done:
                continue
            out[f"sweep_{defence}_clean"] = mean_acc(done[f"s{s}_clean_{d}"])
            for attack in attacks:
                name = f"s{s}_{attack}_10pct_{d}"
                if name in done:  # against the default's clean run (the same honest clients): cost and gain in all
                    honest = list(done[name]["honest"])
                    out[f"sweep_{defence}_{attack}"] = (mean_acc(done[f"s{s}_clean_default"], honest)
                                                        - mean_acc(done[name]))
    out["seconds"] = float(sum(r["seconds"] for r in done.values()))
    return out


def table(fig: Mapping[str, float], attacks: Sequence[str], robust: str) -> str:
    """The README's table: honest clients' mean (p10) accuracy lost, cluster ARI, unseen accuracy lost."""
    lines = ["| attack | 1 hostile, defaults | 10% colluding, defaults | 10% colluding, " + robust + " |",
             "|---|---|---|---|"]
    for a in attacks:
        cells = []
        for label in ("one_default", "10pct_default", "10pct_robust"):
            cell = (f"{fig[f'drop_{label}_{a}']:+.3f} ({fig[f'drop_p10_{label}_{a}']:+.3f}), "
                    f"ARI {fig[f'ari_{label}_{a}']:.2f}, unseen {fig[f'unseen_drop_{label}_{a}']:+.3f}")
            if a == "backdoor":
                cell += f", ASR {fig[f'backdoor_asr_{label}']:.2f}"
            cells.append(cell)
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    std = fig.get("clean_seed_std", float("nan"))
    lines.append(f"| clean | {fig['clean_default_mean']:.3f} (seed std {std:.3f}) | | "
                 f"{fig['clean_robust_mean']:.3f} ({fig['clean_robust_minus_default']:+.3f}) |")
    sweep = sorted({k.split("_", 1)[1].rsplit("_", 1)[0] for k in fig if k.startswith("sweep_")
                    and k.endswith("_clean")})
    if sweep:
        lines += ["", "| rule (10% colluding, seed " + "0) | clean | " + " | ".join(attacks) + " |",
                  "|---|---|" + "---|" * len(attacks)]
        for d in sweep:
            lines.append(f"| {d} | {fig[f'sweep_{d}_clean']:.3f} | " + " | ".join(
                f"{fig.get(f'sweep_{d}_{a}', float('nan')):+.3f}" for a in attacks) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], help="a config override key=value (repeatable)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --smoke: 0)")
    parser.add_argument("--attacks", default=",".join(ATTACK_NAMES))
    parser.add_argument("--robust", default="multi_krum", choices=[d for d in DEFENCES if d != "default"])
    parser.add_argument("--sweep", action="store_true", help="every robust rule against 10%% colluders, first seed")
    parser.add_argument("--jobs", type=int, default=None, help="runs side by side (default 2; --smoke: 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "attacks")
    parser.add_argument("--smoke", action="store_true", help="digits, 6 clients, 3 rounds: a check that it runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from hilora_lightning.cli import load_config
    from hilora_lightning.experiment import build_clients

    attacks = [a for a in args.attacks.split(",") if a]
    unknown = sorted(set(attacks) - set(ATTACK_NAMES))
    if unknown:
        parser.error(f"unknown attacks {unknown}; choose from {list(ATTACK_NAMES)}")
    seeds = [int(s) for s in (args.seeds or ("0" if args.smoke else "0,1,2")).split(",")]
    if args.smoke:
        cfg = load_config(args.config or SMOKE_CONFIG, [*SMOKE, *args.set])
        out = args.out.with_name(args.out.name + "_smoke")
    else:
        cfg = load_config(args.config or CONFIG, [*REDUCED, *args.set])
        out = args.out
    n_train = len(build_clients(cfg["data"], seeds[0])[0])
    runs = plan_runs(seeds, attacks, args.robust, args.sweep, n_train)
    start = time.perf_counter()
    done = execute(runs, cfg, out, args.jobs or (1 if args.smoke else min(2, os.cpu_count() or 1)))
    fig = figures(done, seeds, attacks, args.robust, args.sweep)
    fig["wall_seconds"] = time.perf_counter() - start
    print()
    print(f"honest clients' accuracy lost against the clean run (mean over seeds {seeds}; p10 in brackets):")
    print(table(fig, attacks, args.robust))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
