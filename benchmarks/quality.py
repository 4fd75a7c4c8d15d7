"""Can the method be ranked? HiLoRA against the baselines on a Fashion-MNIST federation.

The setting is a config under ``examples/configs/`` (default: the SC-Dir analogue
``fmnist_sc_dir.yaml``: 36 clients in 3 latent class groups, >= 150 test images each, 20% unseen),
run by the same code as ``hilora-fl compare``. Figures, each a mean over the seeds:

* ``hilora_minus_best_baseline_mean`` / ``_p10``: HiLoRA's mean (10th-percentile) personalized
  accuracy minus the best baseline's in that column (target >= 0).
* ``lsac_ari``: adjusted Rand index of LSAC's clusters against the latent groups (target >= 0.9).
* ``unseen_routing_accuracy``: share of unseen clients routed to the cluster that holds most of their
  latent group's training clients (target >= 0.9).
* ``zero_leaf_minus_root``: unseen clients' accuracy with root + routed cluster minus root only
  (target >= 0).
* ``tier_gain_cluster`` / ``tier_gain_leaf``: training clients' mean accuracy gained by adding the
  cluster tier to the root, and the leaf to root + cluster, every row on the client's final head so
  the gain is the tier's own (targets > 0); ``..._tier_heads``: the same with each row on its tier's
  head (global, cluster, personal), as the paper's tier-wise table.

With ``federation.clustering.study: true`` (the fmnist configs set it) HiLoRA's run also clusters its
root stage with every LSAC feature (``B``, ``A``, ``delta``) and sigma rule, and the figures gain
``lsac_study_<feature>_<sigma>[_k1]_{k,ari}`` and a table of them. ``--lsac-only`` runs just that:
HiLoRA's root stage per seed, then the study (about a third of a full run).

``--quick`` runs HiLoRA, PF2LoRA, FedALT, FedSA-LoRA and Local-LoRA with one seed (about 16 minutes on
2 cores); the full mode runs all 20 methods (9 baselines, HiLoRA and its 10 study variants) over seeds
0, 1, 2. Results go to ``--out`` as they finish and a rerun with the same arguments reads finished
methods back, so a long run can be split or resumed. Without a CUDA device the runs go side by side,
one child process per core (``--jobs``), which on this small model does more work per second than
threads inside one run; ``--jobs 1`` runs everything in this process.
The data must be installed (``apt-get install -y dataset-fashion-mnist``, or ``data.root=...``).

    python benchmarks/quality.py --quick [--json out.json]
    python benchmarks/quality.py [--seeds 0,1,2] [--config examples/configs/fmnist_domain.yaml] [--out DIR]
    python benchmarks/quality.py --report [--seeds ...] [--config ...] [--out DIR]   # tables of what finished
    python benchmarks/quality.py --lsac-only --config examples/configs/fmnist_domain.yaml [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hilora_lightning.baselines import BASELINES
from hilora_lightning.cli import load_config
from hilora_lightning.compare import (
    Comparison,
    SeedComparison,
    parse_methods,
    parse_seeds,
    run_comparison,
    saved_result_state,
)
from hilora_lightning.experiment import build_clients, build_federation_config, build_model, validate_config
from hilora_lightning.federation import FederatedOrchestrator, FederatedResult
from hilora_lightning.federation.result import format_rows
from hilora_lightning.tiers import Tier

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "configs" / "fmnist_sc_dir.yaml"
QUICK_METHODS = ("hilora", "pf2lora", "fedalt", "fedsa-lora", "local-lora")
SMOKE_CONFIG = ROOT / "examples" / "configs" / "compare_digits_cpu.yaml"
SMOKE_OVERRIDES = ("data.num_clients=6", "data.num_groups=2", "federation.rounds=4", "federation.root_rounds=[1,1]",
                   "federation.cluster_rounds=[1,1]", "federation.local_steps=2", "federation.finetune_epochs=1",
                   "federation.clustering.k_max=3")
KEYS = ("hilora_minus_best_baseline_mean", "hilora_minus_best_baseline_p10", "lsac_ari", "unseen_routing_accuracy",
        "zero_leaf_minus_root", "tier_gain_cluster", "tier_gain_leaf", "tier_gain_cluster_tier_heads",
        "tier_gain_leaf_tier_heads")


def routing_accuracy(result: FederatedResult, train_groups: Mapping[int, int], unseen_groups: Mapping[int, int]
                     ) -> float | None:
    """Share of unseen clients routed to the cluster holding most training clients of their latent group.

    Example:
        >>> from hilora_lightning.federation import FederatedResult
        >>> res = FederatedResult([], {}, {}, {0: 0, 1: 0, 2: 1}, 2, routing={7: 1, 8: 1})
        >>> routing_accuracy(res, {0: 5, 1: 5, 2: 6}, {7: 6, 8: 5})
        0.5
    """
    if not result.routing:
        return None
    home: dict[int, int] = {}
    for group in set(train_groups.values()):
        votes = Counter(result.assignment[c] for c, g in train_groups.items() if g == group and c in result.assignment)
        if votes:
            home[group] = min(votes, key=lambda k: (-votes[k], k))
    hits = [home.get(unseen_groups[c]) == k for c, k in result.routing.items() if c in unseen_groups]
    return float(np.mean(hits)) if hits else None


def method_figures(result: FederatedResult, train_groups: Mapping[int, int], unseen_groups: Mapping[int, int]
                   ) -> dict[str, float]:
    """One HiLoRA run's figures: clustering, routing, unseen gain, tier gains, rounds per stage."""
    out: dict[str, float] = {}
    if result.client_accuracy:
        accs = list(result.client_accuracy.values())
        out["mean"], out["p10"] = float(np.mean(accs)), float(np.percentile(accs, 10))
    if result.clustering_ari is not None:
        out["lsac_ari"] = result.clustering_ari
    out["clusters"] = float(result.num_clusters)
    routed = routing_accuracy(result, train_groups, unseen_groups)
    if routed is not None:
        out["unseen_routing_accuracy"] = routed
    gen = result.generalization
    if "zero_leaf" in gen and "root" in gen:
        out["zero_leaf_minus_root"] = gen["zero_leaf"]["mean"] - gen["root"]["mean"]
    views = ("root", "root+cluster", "root+cluster+leaf")
    for tiers, suffix in ((result.tierwise_fixed_head, ""), (result.tierwise, "_tier_heads")):
        if set(views) <= set(tiers):  # the headline gains hold the head fixed (the client's final head)
            out[f"tier_gain_cluster{suffix}"] = tiers[views[1]]["mean"] - tiers[views[0]]["mean"]
            out[f"tier_gain_leaf{suffix}"] = tiers[views[2]]["mean"] - tiers[views[1]]["mean"]
    for stage in ("root", "cluster"):
        out[f"{stage}_rounds"] = float(sum(r.stage == stage for r in result.records))
    return out


def figures(comp: Comparison, train_groups: Mapping[int, int], unseen_groups: Mapping[int, int]) -> dict[str, float]:
    """The headline figures of one seed's comparison (a key is missing where its run is)."""
    rows = {row[0]: row for row in comp.rows()}
    out: dict[str, float] = {}
    hilora = comp.results.get("hilora")
    baselines = [name for name in comp.results if name in BASELINES]
    if hilora is not None and baselines:
        for col, key in ((1, "mean"), (2, "p10")):
            out[f"hilora_minus_best_baseline_{key}"] = rows["hilora"][col] - max(rows[b][col] for b in baselines)
    if hilora is not None:
        out.update({k: v for k, v in method_figures(hilora, train_groups, unseen_groups).items() if k in KEYS})
        out.update(study_figures(hilora.lsac_study))
    return out


def study_figures(study: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The LSAC study's K and ARI per feature and sigma rule, flat: ``lsac_study_<feature>_<sigma>[_k1]_{k,ari}``.

    Example:
        >>> study_figures({"delta/local": {"k": 3.0, "ari": 1.0}})
        {'lsac_study_delta_local_k': 3.0, 'lsac_study_delta_local_ari': 1.0}
    """
    out: dict[str, float] = {}
    for combo, row in study.items():
        for name, value in row.items():
            out[f"lsac_study_{combo.replace('/', '_')}_{name}"] = float(value)
    return out


def lsac_study_table(per_seed: Mapping[int, Mapping[str, float]]) -> str | None:
    """LSAC with every feature and sigma rule on the same root stage: K and ARI as ``mean ± std``."""
    combos = sorted({k[len("lsac_study_"):].rsplit("_", 1)[0] for f in per_seed.values() for k in f
                     if k.startswith("lsac_study_")})
    if not combos:
        return None
    rows = []
    for combo in combos:
        cells: list[Any] = [combo.replace("_", "/", 1).replace("_k1", "/k1")]
        for stat in ("k", "ari"):
            vals = [f[f"lsac_study_{combo}_{stat}"] for f in per_seed.values() if f"lsac_study_{combo}_{stat}" in f]
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else "-")
        cells.append(sum(f"lsac_study_{combo}_k" in f for f in per_seed.values()))
        rows.append(cells)
    return format_rows(["feature/sigma (same root stage)", "K", "ARI", "seeds"], rows)


STUDY = ("mean", "p10", "lsac_ari", "clusters", "unseen_routing_accuracy", "zero_leaf_minus_root", "tier_gain_cluster",
         "tier_gain_leaf", "root_rounds", "cluster_rounds")


def study_table(runs: Mapping[int, Comparison], groups: Mapping[int, tuple[dict[int, int], dict[int, int]]]) -> str:
    """Every HiLoRA variant's figures as ``mean ± std`` over the seeds (the method study)."""
    names = [n for n in next(iter(runs.values())).results if n.startswith("hilora")]
    rows = []
    for name in names:
        per_seed = [method_figures(comp.results[name], *groups[s]) for s, comp in runs.items() if name in comp.results]
        cells = []
        for key in STUDY:
            vals = [f[key] for f in per_seed if key in f]
            cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if vals else "-")
        rows.append([name, *cells])
    return format_rows(["variant", *STUDY], rows)


def summarize(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Mean and standard deviation over the seeds of every figure, flat (``<key>``, ``<key>_std``)."""
    out: dict[str, float] = {}
    study = sorted({k for f in per_seed.values() for k in f if k.startswith("lsac_study_")})
    for key in (*KEYS, *study):
        values = [f[key] for f in per_seed.values() if key in f]
        if values:
            out[key], out[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    out["seeds"] = float(len(per_seed))
    return out


def run(config: Path, methods: Sequence[str], seeds: Sequence[int], out: Path, overrides: Sequence[str] = (),
        progress: bool = True) -> tuple[Comparison | SeedComparison, dict[int, dict[str, float]]]:
    """Run (or read back) the comparison and compute the figures per seed."""
    cfg = load_config(config, overrides)
    # one seed writes to out/seed<s>/ too, so a quick run and a full run share finished methods
    out_dir = out / f"seed{seeds[0]}" if len(seeds) == 1 else out
    comp = run_comparison(cfg, methods, progress=progress, out_dir=out_dir, resume=True, seeds=seeds)
    runs = comp.runs if isinstance(comp, SeedComparison) else {seeds[0]: comp}
    groups = {s: (c.groups, c.unseen_groups) for s, c in runs.items()}
    per_seed = {s: figures(c, *groups[s]) for s, c in runs.items()}
    if progress:
        print()
        print(study_table(runs, groups))
        lsac = lsac_study_table(per_seed)
        if lsac:
            print()
            print(lsac)
    return comp, per_seed


def finished(config: Path, methods: Sequence[str], seeds: Sequence[int], out: Path, overrides: Sequence[str] = ()
             ) -> list[str]:
    """The methods whose result for this config is saved under ``out`` in every seed (``--report``).

    Raises ``SystemExit`` naming what is missing when nothing is finished in every seed.
    """
    cfg = load_config(config, overrides)
    done, missing = [], []
    for name in methods:
        lacking, stale = [], []
        for seed in seeds:
            state, why = saved_result_state(out / f"seed{seed}" / name / "result.json", name, dict(cfg, seed=seed))
            if state == "stale":
                stale.append(f"seed {seed}: run with other settings: {'; '.join(why[:2])}")
            elif state != "current":
                lacking.append(seed)
        if lacking or stale:
            missing.append(f"{name} ({'; '.join([f'seeds {lacking}'] * bool(lacking) + stale[:1])})")
        else:
            done.append(name)
    if missing:
        print(f"--report: not finished in every seed, left out: {', '.join(missing)}", flush=True)
    if not done:
        raise SystemExit(f"--report: no method has a saved result for this config in every seed {list(seeds)} "
                         f"under {out}; run without --report first")
    return done


def pending_runs(config: Path, methods: Sequence[str], seeds: Sequence[int], out: Path,
                 overrides: Sequence[str] = ()) -> list[tuple[str, int]]:
    """The ``(method, seed)`` runs without a current result under ``out``, seed by seed."""
    cfg = load_config(config, overrides)
    return [(name, seed) for seed in seeds for name in methods
            if saved_result_state(out / f"seed{seed}" / name / "result.json", name, dict(cfg, seed=seed))[0]
            != "current"]


def run_parallel(config: Path, methods: Sequence[str], seeds: Sequence[int], out: Path, overrides: Sequence[str] = (),
                 jobs: int = 2, cores: int | None = None, poll: float = 2.0) -> list[str]:
    """Run every pending ``(method, seed)`` in its own process of this script, ``jobs`` at a time.

    Small models on a CPU gain more from runs side by side than from threads inside one run, so each
    child gets ``cores // jobs`` threads; a run started when fewer than ``jobs`` runs are left to
    start gets the cores the others will leave (the last run gets them all, even while an earlier
    one is finishing: a short overlap costs less than a core idle for a whole run). Each child
    writes its result as it would alone (atomically) and its output to ``out/seed<s>/<method>.log``;
    the caller reads the results back. Returns one line per failed run (with the end of its log);
    Ctrl-C stops the children, finished results stay.
    """
    import os
    import subprocess
    import time

    todo = pending_runs(config, methods, seeds, out, overrides)
    cores = cores or os.cpu_count() or 1
    total, started, failures = len(todo), 0, []
    running: list[tuple[Any, str, int, float, Any, Path]] = []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                name, seed = todo.pop(0)
                threads = child_threads(cores, jobs, len(todo) + 1)
                log = out / f"seed{seed}" / f"{name}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--config", str(config), "--methods", name,
                       "--seeds", str(seed), "--out", str(out), "--jobs", "1", *overrides]
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                fh = log.open("w")
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)  # noqa: S603 (this script)
                running.append((proc, name, seed, time.perf_counter(), fh, log))
                started += 1
                print(f"[{started}/{total}] {name}, seed {seed}: started ({threads} thread(s); log {log})", flush=True)
            time.sleep(poll)
            for item in list(running):
                proc, name, seed, t0, fh, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                fh.close()
                took = time.perf_counter() - t0
                if proc.returncode == 0:
                    print(f"  {name}, seed {seed}: done in {took:.0f} s", flush=True)
                else:
                    tail = " | ".join(log.read_text().strip().splitlines()[-3:])
                    failures.append(f"{name}, seed {seed}: exit {proc.returncode} after {took:.0f} s ({log}: {tail})")
                    print(f"  {failures[-1]}", flush=True)
    finally:
        for proc, *_rest, fh, _log in running:  # interrupted: stop the children (results are written atomically)
            proc.terminate()
            proc.wait()
            fh.close()
    return failures


def child_threads(cores: int, jobs: int, to_start: int) -> int:
    """Threads for a child started when ``to_start`` runs (itself included) are still to start.

    >>> [child_threads(2, 2, n) for n in (5, 2, 1)]
    [1, 1, 2]
    >>> child_threads(16, 3, 2), child_threads(1, 4, 9)
    (8, 1)
    """
    return max(1, cores // max(1, min(jobs, to_start)))


def default_jobs() -> int:
    """Runs side by side by default: one per CPU core without a CUDA device, else one."""
    import os

    import torch

    return 1 if torch.cuda.is_available() else max(1, os.cpu_count() or 1)


def lsac_only(config: Path, seeds: Sequence[int], overrides: Sequence[str] = (), progress: bool = True
              ) -> dict[int, dict[str, float]]:
    """HiLoRA's root stage alone per seed, then LSAC with every feature and sigma rule on it.

    The root stage does not depend on the clustering feature, so this is the LSAC study at about a
    third of a full run's cost (no cluster or leaf stage, no final evaluation).
    """
    cfg = load_config(config, overrides)
    per_seed: dict[int, dict[str, float]] = {}
    for seed in seeds:
        run_cfg = dict(cfg, seed=seed)
        validate_config(run_cfg)
        fed = build_federation_config(run_cfg)
        fed = dataclasses.replace(fed, clustering=dataclasses.replace(fed.clustering, study=True))
        clients, _ = build_clients(run_cfg.get("data", {}), seed)
        orch = FederatedOrchestrator(build_model(run_cfg), clients, fed, trainer_kwargs=dict(cfg.get("trainer", {})),
                                     progress=progress)
        for t in range(1, fed.root_rounds[1] + 1):  # round by round: stop as soon as the clusters are formed
            orch.run(stop_after=t)
            if orch.stage is not Tier.ROOT:
                break
        per_seed[seed] = study_figures(orch.state.extra.get("lsac_study", {}))
        if progress:
            print(f"seed {seed}: root stage of {t} rounds, K={orch.num_clusters}, ARI={orch.clustering_ari}",
                  flush=True)
    return per_seed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="HiLoRA and 4 baselines, one seed (~16 min on 2 cores)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--methods", default=None, help="comma-separated (default: all, or the quick five)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default: 0 with --quick, else 0,1,2)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default runs/quality/<config>)")
    parser.add_argument("--json", default=None, help="write the headline figures here")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: tables of the methods finished (same config) in every seed under --out")
    parser.add_argument("--lsac-only", action="store_true",
                        help="HiLoRA's root stage only, then LSAC with every feature and sigma rule (no methods)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs side by side in child processes (default: one per CPU core, 1 with CUDA; "
                             "1: every run in this process, one after another)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, anywhere: HiLoRA and FedIT on 6 embedded-digits clients, 4 short rounds")
    parser.add_argument("overrides", nargs="*", help="config overrides like federation.rounds=20")
    args = parser.parse_args(argv)
    if args.smoke:  # the same code path on a setting that needs no data download and runs in seconds
        args.config, args.methods, args.seeds, args.jobs = SMOKE_CONFIG, "hilora,fedit", "0", 1
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
        args.out = args.out or Path(tempfile.mkdtemp(prefix="quality-smoke-"))
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.lsac_only:
        per_seed = lsac_only(args.config, parse_seeds(args.seeds or "0,1,2", 0), args.overrides)
        print()
        print(lsac_study_table(per_seed) or "no LSAC study (every client failed the root stage?)")
        if args.json:
            Path(args.json).write_text(json.dumps(summarize(per_seed), indent=1, sort_keys=True))
            print(f"wrote {args.json}")
        return 0
    methods = parse_methods(args.methods or (",".join(QUICK_METHODS) if args.quick else "all"))
    seeds = parse_seeds(args.seeds or ("0" if args.quick else "0,1,2"), 0)
    out = args.out or ROOT / "runs" / "quality" / args.config.stem
    if args.report:
        methods = finished(args.config, methods, seeds, out, args.overrides)
    elif (jobs := args.jobs or default_jobs()) > 1 and len(methods) * len(seeds) > 1:
        failures = run_parallel(args.config, methods, seeds, out, args.overrides, jobs=jobs)
        if failures:
            print(f"{len(failures)} run(s) failed; the others are saved under {out} and a rerun reads them back:",
                  *failures, sep="\n")
            return 1
    comp, per_seed = run(args.config, methods, seeds, out, args.overrides)
    print()
    print(comp.table())
    print()
    names = [k for k in KEYS if any(k in f for f in per_seed.values())]
    print(format_rows(["seed", *names], [[s, *[f.get(k, "-") for k in names]] for s, f in per_seed.items()]))
    headline = summarize(per_seed)
    headline.update({k: v for k, v in comp.headline().items() if not k.endswith("_seconds")})
    print()
    print(format_rows(["figure", "mean over seeds", "std"],
                      [[k, headline[k], headline[f"{k}_std"]] for k in KEYS if k in headline]))
    if args.json:
        Path(args.json).write_text(json.dumps(headline, indent=1, sort_keys=True))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
