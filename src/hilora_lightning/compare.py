"""``hilora-fl compare``: HiLoRA, its ablations and the nine baselines on one config, one table.

Every method gets the same clients (partition, unseen hold-out), seeds, client sampling, round
budget, local steps, optimizer, head policy and Lightning Trainer options; each starts from a
freshly built model. The table has the paper's columns: mean and 10th-percentile personalized
accuracy, unseen clients as they arrive (zero-leaf) and after the ``finetune_epochs`` fine-tune,
bytes uploaded per client per round, and wall time.

HiLoRA rows: ``hilora`` (the config as given), the paper's cumulative ablation
(``hilora-kmeans-noortho``: k-means on cosine of flattened root updates with LSAC's K and no
penalty; ``hilora-lsac-noortho``: LSAC, no penalty; ``hilora`` = + orthogonality), and two extras
(``hilora-random``: random clusters; ``hilora-per-round``: all stages every round), and the method
study's options: the penalty on scaled factors (``hilora-scaled``) or energy-weighted
(``hilora-energy``, see :mod:`hilora_lightning.orthogonality`), unseen clients routed by the paper's
probe subspaces (``hilora-probe-routing``; ``hilora`` routes by loss, the default) or by a root-slot
probe (``hilora-root-probe``), stages ended by the subspace
statistic at 0.05 (``hilora-subspace-rho``), and the true latent groups as clusters (``hilora-oracle``,
the bound LSAC is measured against; skipped where the partition has none). The tier-wise
rows (``hilora: root only``, ``hilora: root+cluster``) come from the ``hilora`` run itself.

Example:
    >>> from hilora_lightning.compare import METHODS, parse_methods
    >>> parse_methods("fedit, hilora")
    ['fedit', 'hilora']
    >>> len(METHODS)
    20
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hilora_lightning.baselines import BASELINES, BaselineRunner
from hilora_lightning.baselines.methods import make_method
from hilora_lightning.comparison import HEADER, Comparison, SeedComparison
from hilora_lightning.experiment import (
    build_backend,
    build_clients,
    build_federation_config,
    build_model,
    model_options,
    validate_config,
)
from hilora_lightning.federation import FederatedOrchestrator, FederatedResult, FederationConfig
from hilora_lightning.federation.result import RoundRecord

__all__ = [
    "HILORA_VARIANTS",
    "METHODS",
    "Comparison",
    "SeedComparison",
    "config_stamp",
    "method_settings",
    "parse_methods",
    "parse_seeds",
    "run_comparison",
    "save_comparison",
    "saved_result_state",
    "settings_changes",
]

#: HiLoRA runs of the comparison: (model overrides, federation-config changes).
HILORA_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "hilora-kmeans-noortho": ({"gamma_c": 0.0, "gamma_l": 0.0}, {"clustering.method": "kmeans"}),
    "hilora-lsac-noortho": ({"gamma_c": 0.0, "gamma_l": 0.0}, {}),
    "hilora": ({}, {}),
    "hilora-random": ({}, {"clustering.method": "random"}),
    "hilora-per-round": ({}, {"schedule": "per_round"}),
    "hilora-scaled": ({"ortho_form": "scaled"}, {}),
    "hilora-energy": ({"ortho_form": "energy"}, {}),
    # unseen clients routed by the paper's probe subspaces (the default routes by loss, see FederationConfig)
    "hilora-probe-routing": ({}, {"route_by": "subspace"}),
    "hilora-root-probe": ({}, {"probe": "root", "route_by": "subspace"}),
    "hilora-subspace-rho": ({}, {"rho_rule": "subspace", "tau_rel": 0.05}),
    # clusters = the data's latent groups (what LSAC should find): the bound LSAC is measured against
    "hilora-oracle": ({}, {"clustering.method": "given"}),
}

#: Every method name ``compare`` knows, in table order.
METHODS: tuple[str, ...] = (*BASELINES, *HILORA_VARIANTS)

#: options that only add reports to a result and never change training: left out of the stamp that
#: decides whether a saved result is read back (``clustering.study`` re-clusters on the side)
REPORT_ONLY = (("federation", "clustering", "study"),)


def config_stamp(cfg: Mapping[str, Any]) -> str:
    """The identity of a run's config for ``resume``: everything but ``compare``, ``out_dir`` and the
    report-only options (:data:`REPORT_ONLY`).

    Example:
        >>> a = {"seed": 0, "federation": {"rounds": 4, "clustering": {"study": True}}}
        >>> b = {"seed": 0, "federation": {"rounds": 4, "clustering": {}}, "out_dir": "x"}
        >>> config_stamp(a) == config_stamp(b), config_stamp(a) == config_stamp({**b, "seed": 1})
        (True, False)
    """
    def strip(node: Any, at: tuple[str, ...]) -> Any:
        if not isinstance(node, Mapping):
            return node
        return {k: strip(v, (*at, str(k))) for k, v in node.items() if (*at, str(k)) not in REPORT_ONLY}

    work = {k: strip(v, (str(k),)) for k, v in cfg.items() if k not in ("compare", "out_dir")}
    return json.dumps(work, sort_keys=True, default=str)




def parse_methods(value: str | Sequence[str] | None) -> list[str]:
    """Method names from ``"a,b"`` or a list (``None``/``"all"``: every method), validated."""
    if value is None or value == "all" or value == ["all"]:
        return list(METHODS)
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or names}: choose from {', '.join(METHODS)} (or 'all')")
    return list(dict.fromkeys(names))


def parse_seeds(value: str | int | Sequence[int] | None, default: int) -> list[int]:
    """Seeds from ``"0,1,2"``, an int or a list (``None``: ``[default]``), validated."""
    if value is None:
        return [default]
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else list(value)
    try:
        seeds = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"seeds must be non-negative ints like 0,1,2, got {value!r}") from None
    if not seeds or any(v < 0 for v in seeds):
        raise ValueError(f"seeds must be non-negative ints like 0,1,2, got {value!r}")
    return list(dict.fromkeys(seeds))


def _variant_config(config: FederationConfig, changes: Mapping[str, Any]) -> FederationConfig:
    nested = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("clustering.")}
    top = {k: v for k, v in changes.items() if not k.startswith("clustering.")}
    return dataclasses.replace(config, clustering=dataclasses.replace(config.clustering, **nested), **top)


def _needs_groups(name: str) -> bool:
    """Whether ``name`` clusters by the data's latent groups (``hilora-oracle``)."""
    return HILORA_VARIANTS.get(name, ({}, {}))[1].get("clustering.method") == "given"


#: FederationConfig fields only HiLoRA reads (routing and clustering): a baseline's settings leave them
#: out, so changing one of their defaults does not invalidate the baselines' saved results
HILORA_ONLY_FIELDS = ("route_by", "probe", "probe_steps", "clustering")


def _method_changes(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model overrides and federation-config changes ``name`` runs with."""
    if name in BASELINES:
        return {"gamma_c": 0.0, "gamma_l": 0.0}, {}
    model_over, fed_changes = HILORA_VARIANTS[name]
    return dict(model_over), dict(fed_changes)


def method_settings(name: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Every option ``name`` runs with on ``cfg``, library defaults resolved: the federation config
    (less the report-only ``clustering.study``, and for baselines less :data:`HILORA_ONLY_FIELDS`)
    and the model's options. Saved with each result; ``resume`` reads a result back only when these
    still match, so a changed library default re-runs what it changes instead of mislabelling it.

    Example:
        >>> cfg = {"seed": 0, "federation": {"rounds": 4, "root_rounds": [1, 1], "cluster_rounds": [1, 1]}}
        >>> s = method_settings("hilora-probe-routing", cfg)
        >>> s["federation"]["route_by"], method_settings("hilora", cfg)["federation"]["route_by"]
        ('subspace', 'loss')
        >>> "route_by" in method_settings("fedit", cfg)["federation"], method_settings("fedit", cfg)["model"]["gamma_c"]
        (False, 0.0)
    """
    model_over, fed_changes = _method_changes(name)
    fed = dataclasses.asdict(build_federation_config(cfg))
    for key, value in fed_changes.items():  # on the dict: the oracle's assignment comes from the data
        *parents, leaf = key.split(".")
        node = fed
        for part in parents:
            node = node[part]
        node[leaf] = value
    fed["clustering"].pop("study", None)
    if name in BASELINES:
        fed = {k: v for k, v in fed.items() if k not in HILORA_ONLY_FIELDS}
    settings = {"federation": fed, "model": model_options(cfg, **model_over)}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def settings_changes(saved: Mapping[str, Any] | None, current: Mapping[str, Any], at: str = "") -> list[str]:
    """``"key: saved -> current"`` for every option that differs (``saved=None``: a result saved
    before settings were recorded).

    Example:
        >>> settings_changes({"federation": {"route_by": "subspace"}}, {"federation": {"route_by": "loss"}})
        ["federation.route_by: 'subspace' -> 'loss'"]
    """
    if saved is None:
        return ["no settings saved (a result from before they were recorded)"]
    out: list[str] = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += settings_changes(a, b, f"{at}{key}.")
        elif a != b:
            out.append(f"{at}{key}: {a!r} -> {b!r}")
    return out


def saved_result_state(path: Path, name: str, cfg: Mapping[str, Any]) -> tuple[str, list[str]]:
    """Whether ``path`` holds ``name``'s result for ``cfg``: ``("current", [])``, ``("other-config",
    [])`` (another config or seed), ``("stale", changes)`` (same config, other resolved settings, e.g.
    a library default changed since), ``("missing", [])`` or ``("unreadable", [reason])``."""
    state, why, _saved = _saved_result(path, name, cfg)
    return state, why


def _saved_result(path: Path, name: str, cfg: Mapping[str, Any]
                  ) -> tuple[str, list[str], tuple[FederatedResult, float] | None]:
    """:func:`saved_result_state` plus, when current, the result and its wall seconds (one read)."""
    if not path.exists():
        return "missing", [], None
    try:
        saved = json.loads(path.read_text())
        if saved.get("config") != config_stamp(cfg):
            return "other-config", [], None
        changes = settings_changes(saved.get("settings"), method_settings(name, cfg))
        if changes:
            return "stale", changes, None
        return "current", [], (_result_from_dict(saved["result"]), float(saved["wall_seconds"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return "unreadable", [f"{type(exc).__name__}: {exc}"], None


def run_method(name: str, cfg: Mapping[str, Any], clients: Sequence[Any], unseen: Sequence[Any],
               progress: bool = True, raise_client_errors: bool = False) -> FederatedResult:
    """Build a fresh model for ``name`` from ``cfg`` and run it on the given clients."""
    config = build_federation_config(cfg)
    model_over, fed_changes = _method_changes(name)
    trainer = dict(cfg.get("trainer", {}))
    common: dict[str, Any] = {"progress": progress, "backend": build_backend(cfg.get("backend")),
                              "loader": cfg.get("loader"), "raise_client_errors": raise_client_errors}
    if name in BASELINES:
        model = build_model(cfg, **model_over)
        return BaselineRunner(make_method(name, config), model, clients, config, unseen, trainer, **common).run()
    if _needs_groups(name):  # the oracle: every training client's latent group
        missing = [c.client_id for c in clients if c.group is None]
        if missing:
            raise ValueError(f"{name} clusters clients by their latent groups, but clients {missing[:5]} have none "
                             "(this partition has no latent groups); run it on one that has (sc_dir, domain, digits)")
        fed_changes["clustering.assignment"] = {c.client_id: int(c.group) for c in clients}
    orch = FederatedOrchestrator(build_model(cfg, **model_over), clients, _variant_config(config, fed_changes),
                                 unseen=unseen, trainer_kwargs=trainer, **common)
    return orch.run()


def run_comparison(
    cfg: Mapping[str, Any],
    methods: Sequence[str] | None = None,
    progress: bool = True,
    out_dir: str | Path | None = None,
    resume: bool = False,
    seeds: Sequence[int] | None = None,
    raise_client_errors: bool = False,
) -> Comparison | SeedComparison:
    """Run ``methods`` (default: ``cfg["compare"]["methods"]`` or all) on the config's data.

    With ``out_dir`` every method's result is written to ``out_dir/<method>/result.json`` as soon
    as it finishes; with ``resume`` methods whose result is already there (for the same config) are
    read back instead of run again. With several ``seeds`` (default ``cfg["compare"]["seeds"]``,
    else the config's seed) the whole comparison runs once per seed (data partition, sampling and
    initialization all follow the seed), results go to ``out_dir/seed<s>/``, and a
    :class:`SeedComparison` of mean ± std comes back. ``raise_client_errors`` re-raises the first client
    exception (``--fail-fast``).
    """
    validate_config(cfg)
    section = cfg.get("compare") or {}
    names = parse_methods(methods if methods is not None else section.get("methods"))
    chosen = parse_seeds(seeds if seeds is not None else section.get("seeds"), int(cfg.get("seed", 0)))
    if len(chosen) == 1:
        return _run_one(dict(cfg, seed=chosen[0]), names, progress, out_dir, resume, raise_client_errors)
    runs = {}
    for s in chosen:
        if progress:
            print(f"== seed {s} ==", flush=True)
        sub = Path(out_dir) / f"seed{s}" if out_dir is not None else None
        runs[s] = _run_one(dict(cfg, seed=s), names, progress, sub, resume, raise_client_errors)
    return SeedComparison(runs)


def _run_one(cfg: Mapping[str, Any], names: Sequence[str], progress: bool, out_dir: str | Path | None,
             resume: bool, raise_client_errors: bool = False) -> Comparison:
    seed = int(cfg.get("seed", 0))
    clients, unseen = build_clients(cfg.get("data", {}), seed)
    stamp = config_stamp(cfg)
    results: dict[str, FederatedResult] = {}
    seconds: dict[str, float] = {}
    for i, name in enumerate(names, start=1):
        if _needs_groups(name) and any(c.group is None for c in clients):  # e.g. "all" on gl-dir or patho
            print(f"[{i}/{len(names)}] {name}: skipped, this partition has no latent groups to give as clusters",
                  flush=True)
            continue
        path = Path(out_dir) / name / "result.json" if out_dir is not None else None
        if resume and path is not None:
            state, why, saved = _saved_result(path, name, cfg)
            if saved is not None:
                results[name], seconds[name] = saved
                if progress:
                    print(f"[{i}/{len(names)}] {name}: read back from {path}", flush=True)
                continue
            if state == "stale":  # same config, but run under other defaults: its numbers mean something else
                print(f"[{i}/{len(names)}] {name}: {path} was run with other settings ({'; '.join(why[:3])}"
                      f"{'; ...' if len(why) > 3 else ''}); running the method again", flush=True)
            elif state == "unreadable":  # corrupt or from another version: run it again
                print(f"[{i}/{len(names)}] {name}: {path} is unreadable ({why[0]}); running the method again",
                      flush=True)
        if progress:
            print(f"[{i}/{len(names)}] {name}", flush=True)
        start = time.perf_counter()
        results[name] = run_method(name, cfg, clients, unseen, progress=progress,
                                   raise_client_errors=raise_client_errors)
        seconds[name] = time.perf_counter() - start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"config": stamp, "settings": method_settings(name, cfg),
                                       "wall_seconds": seconds[name], "result": results[name].to_dict()}, indent=1))
            tmp.replace(path)  # a killed run never leaves a half-written result behind
    return Comparison(results, seconds, {c.client_id: c.group for c in clients if c.group is not None},
                      {c.client_id: c.group for c in unseen if c.group is not None})


def _result_from_dict(data: Mapping[str, Any]) -> FederatedResult:
    d = dict(data)
    d["records"] = [RoundRecord.from_dict(r) for r in d["records"]]
    for key in ("client_accuracy", "assignment", "routing"):
        d[key] = {int(k): v for k, v in d[key].items()}
    return FederatedResult(**d)


def save_comparison(comp: Comparison | SeedComparison, out: str | Path) -> list[Path]:
    """Write ``comparison.txt`` (the table), ``comparison.json``, ``comparison.csv`` and the accuracy plot."""
    import csv

    from hilora_lightning.plots import accuracy_per_round

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "comparison.txt", out / "comparison.json", out / "comparison.csv", out / "accuracy_per_method.png"]
    paths[0].write_text(comp.table() + "\n")
    payload: dict[str, Any] = {"rows": [dict(zip(HEADER, r)) for r in comp.rows()], "headline": comp.headline()}
    if isinstance(comp, SeedComparison):
        payload["std"] = [dict(zip(HEADER, r)) for r in comp.std_rows()]
        payload["seeds"] = sorted(comp.runs)
    paths[1].write_text(json.dumps(payload, indent=1))
    with paths[2].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows([["" if v is None else v for v in row] for row in comp.rows()])
    rounds, series = comp.curves()
    seeds = f" (mean over seeds {sorted(comp.runs)})" if isinstance(comp, SeedComparison) else ""
    fig = accuracy_per_round(rounds, series, title=f"mean personalized accuracy per round{seeds}")
    fig.savefig(paths[3], dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths
