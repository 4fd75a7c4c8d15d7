"""``hilora-fl``: run federated HiLoRA experiments from YAML configs.

    hilora-fl run CONFIG [key=value ...] [--resume | --overwrite] [--check]   # e.g. federation.rounds=20
    hilora-fl compare CONFIG [methods=a,b] [seeds=0,1,2] [key=value ...] [--resume | --overwrite]   # vs the baselines
    hilora-fl export RUN_DIR --client N --format timm|peft|tiers --out DIR   # one client's model
    hilora-fl predict RUN_DIR IMAGES_OR_FOLDER --client N [--topk 5] [--json]
    hilora-fl demo [demo options]                     # the embedded-data demo (python -m hilora_lightning.demo)

``run`` merges the overrides into the YAML (omegaconf dot-list syntax), rejects unknown keys with the
closest valid one, runs the federation with a round-by-round progress display, prints the results
table, and writes ``result.json``, ``rounds.csv``, the resolved ``config.yaml`` and PNG plots into
``out_dir`` (``--resume`` continues from ``out_dir/federation.pt``, also with more
``federation.rounds`` to extend a finished run; an ``out_dir`` that holds a run is refused without
``--resume`` or ``--overwrite``). Ctrl-C (or SIGTERM) stops after the last finished round, exit code
130, and says how to continue. ``export`` and ``predict`` read the run folder alone (no data).
``compare`` runs the chosen methods (default: ``compare.methods`` of the config, else all) on the
same data and budget and writes one table, JSON, CSV and an accuracy-per-round plot into
``out_dir/compare``; ``--resume`` reads back the methods already finished there.

Example:
    >>> from hilora_lightning.cli import load_config
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
    >>> _ = p.write_text("federation:\\n  rounds: 5\\n")
    >>> load_config(p, ["federation.rounds=7", "seed=1"])["federation"]["rounds"]
    7
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_config", "load_run", "main"]

#: what marks ``out_dir/compare`` as holding a comparison (its table, or a finished method of one)
COMPARE_MARKERS = ("comparison.json", "*/result.json", "seed*/*/result.json")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML config, apply ``key=value`` overrides, return a plain resolved dict."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value (e.g. federation.rounds=20), got {bad}")
    from hilora_lightning.config_check import ConfigError

    if not path.read_text().strip():
        raise ConfigError(f"{str(path)!r} is empty; a config needs at least its data section (see examples/configs/)")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml's scanner/parser errors: not ValueError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{str(path)!r} is not valid YAML: {first}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{str(path)!r} must hold a mapping at the top level, got a {type(loaded).__name__}")
    if len(loaded) == 0:
        raise ConfigError(f"{str(path)!r} is empty; a config needs at least its data section (see examples/configs/)")
    try:
        cfg = OmegaConf.merge(loaded, OmegaConf.from_dotlist(list(overrides)))
        out = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # omegaconf's grammar / merge errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot apply the overrides {list(overrides)}: {first}") from exc
    if not isinstance(out, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping at the top level, got {type(out).__name__}")
    return out  # type: ignore[return-value]


def _run(args: argparse.Namespace) -> int:
    from hilora_lightning.experiment import build_experiment, run_and_report

    cfg = load_config(args.config, args.overrides)
    cfg["out_dir"] = str(cfg.get("out_dir", "runs/experiment"))
    if args.check:  # validate and build everything, train nothing
        runner = build_experiment(cfg)
        print(f"hilora-fl: {args.config}: config OK ({len(runner.clients)} training clients, {len(runner.unseen)} "
              f"unseen, method {cfg.get('method', 'hilora')}; {_data_line(cfg)})")
        return 0
    from hilora_lightning.interrupt import Interrupted, interrupt_signals

    print(f"hilora-fl: {args.config} -> {cfg['out_dir']}")  # run_experiment checks out_dir before building
    with interrupt_signals():
        try:
            run_and_report(cfg, resume=args.resume, raise_client_errors=args.fail_fast, overwrite=args.overwrite)
        except Interrupted as stop:
            return _interrupted(stop, cfg["out_dir"], ["hilora-fl", "run", args.config, *args.overrides, "--resume"])
    return 0


def _interrupted(stop: Any, out_dir: str | Path, again: list[str]) -> int:
    """Tell where an interrupted run stands and how to continue it; the exit code 130 (128 + SIGINT)."""
    import shlex

    from hilora_lightning.run_folder import saved_round

    done = saved_round(out_dir)
    if done is None:
        print(f"hilora-fl: interrupted ({stop.name}) before round 1 was saved; nothing to resume: run it again "
              "(with --overwrite if out_dir holds an older run)", file=sys.stderr)
    else:
        print(f"hilora-fl: interrupted ({stop.name}) after round {done}; continue with: {shlex.join(again)}",
              file=sys.stderr)
    return 130


def _compare(args: argparse.Namespace) -> int:
    from hilora_lightning.compare import parse_methods, parse_seeds, run_comparison, save_comparison

    special = {k: [o.split("=", 1)[1] for o in args.overrides if o.startswith(f"{k}=")] for k in ("methods", "seeds")}
    overrides = [o for o in args.overrides if not o.startswith(("methods=", "seeds="))]
    cfg = load_config(args.config, overrides)
    section = cfg.get("compare") or {}
    out = Path(str(cfg.get("out_dir", "runs/experiment"))) / "compare"
    chosen = parse_methods(special["methods"][-1] if special["methods"] else section.get("methods"))
    seeds = parse_seeds(special["seeds"][-1] if special["seeds"] else section.get("seeds"), int(cfg.get("seed", 0)))
    from hilora_lightning.interrupt import Interrupted, interrupt_signals
    from hilora_lightning.run_folder import check_out_dir

    check_out_dir(out, args.resume, args.overwrite, markers=COMPARE_MARKERS)
    if args.overwrite and out.is_dir():
        import shutil

        shutil.rmtree(out)  # the old comparison's folder (only hilora-fl compare writes there)
    print(f"hilora-fl compare: {args.config}: {len(chosen)} methods x seeds {seeds} -> {out}")
    with interrupt_signals():
        try:
            comp = run_comparison(cfg, chosen, out_dir=out, resume=args.resume, seeds=seeds,
                                  raise_client_errors=args.fail_fast)
        except Interrupted as stop:
            import shlex

            again = ["hilora-fl", "compare", args.config, *args.overrides, "--resume"]
            print(f"hilora-fl: interrupted ({stop.name}); the methods finished so far are in {out}; continue with: "
                  f"{shlex.join(again)}", file=sys.stderr)
            return 130
    print()
    print(comp.table())
    for path in save_comparison(comp, out):
        print(f"wrote {path}")
    return 0


def _data_line(cfg: dict[str, Any]) -> str:
    """Where the data comes from (the folder found, or the builder), for ``--check``."""
    data = cfg.get("data") or {}
    if "builder" in data:
        return f"data from builder {data['builder']}"
    if data.get("name") == "fashion-mnist":
        from hilora_lightning.data.fashion import find_fashion_mnist

        return f"Fashion-MNIST from {find_fashion_mnist(data.get('root'))}"
    name = data.get("name", "digits")
    return f"data {name}" + (f" from {data['root']}" if "root" in data else " (embedded)" if name == "digits" else "")


def load_run(run_dir: str | Path) -> Any:
    """The finished (or interrupted) HiLoRA run in ``run_dir`` as a
    :class:`~hilora_lightning.run_folder.SavedRun`, from its ``config.yaml`` and ``federation.pt``
    alone: the model is rebuilt from the config, no client data is read."""
    from hilora_lightning.run_folder import SavedRun

    return SavedRun.open(run_dir)


def _export(args: argparse.Namespace) -> int:
    run = load_run(args.run_dir)
    for path in run.export_client(args.client, args.out, args.format):
        print(f"wrote {path}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    import json

    from hilora_lightning.predict import image_paths, image_transform, predict_images

    run = load_run(args.run_dir)
    tiers, head = run.client_model(args.client)
    transform = image_transform(run.data_section, run.model)
    rows = predict_images(run.model, tiers, head, image_paths(args.images), transform, args.topk)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    from hilora_lightning.federation.result import format_rows

    print(f"client {args.client}: tiers {', '.join(t.value for t in tiers)}")
    print(format_rows(["image", "top classes", "probabilities"],
                      [[r["image"], " ".join(map(str, r["classes"])), " ".join(f"{p:.3f}" for p in r["probabilities"])]
                       for r in rows]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hilora-fl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from hilora_lightning.demo import main as demo_main
        from hilora_lightning.errors import HiLoraError

        try:
            demo_main(argv[1:])
        except (HiLoraError, ValueError, TypeError, OSError) as exc:  # e.g. its --out holds a run: exit 2
            return _report(exc)
        return 0
    parser = argparse.ArgumentParser(prog="hilora-fl", description="Federated HiLoRA experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the experiment a YAML config describes")
    run.add_argument("config", help="path of a YAML config (see examples/configs/)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. federation.rounds=20")
    run.add_argument("--resume", action="store_true", help="continue from out_dir/federation.pt")
    run.add_argument("--check", action="store_true", help="validate the config and build data and model; train nothing")
    run.add_argument("--overwrite", action="store_true", help="replace the run that out_dir holds")
    run.add_argument("--fail-fast", action="store_true",
                     help="re-raise the first client exception with its traceback (debugging your data)")
    comp = sub.add_parser("compare", help="run HiLoRA, its ablations and the baselines; print one table")
    comp.add_argument("config", help="path of a YAML config (see examples/configs/)")
    comp.add_argument("overrides", nargs="*", help="methods=a,b and key=value overrides")
    comp.add_argument("--resume", action="store_true", help="read back methods already finished in out_dir/compare")
    comp.add_argument("--overwrite", action="store_true", help="replace the comparison that out_dir/compare holds")
    comp.add_argument("--fail-fast", action="store_true", help="re-raise the first client exception with its traceback")
    exp = sub.add_parser("export", help="write one client's personalized model (timm folder, PEFT adapter, tiers)")
    exp.add_argument("run_dir", help="a run's out_dir (config.yaml and federation.pt)")
    exp.add_argument("--client", type=int, required=True, help="client id (training or unseen)")
    exp.add_argument("--format", choices=("timm", "peft", "tiers"), default="timm")
    exp.add_argument("--out", required=True, help="output folder")
    pred = sub.add_parser("predict", help="one client's class predictions on image files")
    pred.add_argument("run_dir", help="a run's out_dir (config.yaml and federation.pt)")
    pred.add_argument("images", help="an image file or a folder of images")
    pred.add_argument("--client", type=int, required=True, help="client id (training or unseen)")
    pred.add_argument("--topk", type=int, default=5)
    pred.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("demo", help="the embedded-data demo (its options: hilora-fl demo --help)")
    args = parser.parse_args(argv)
    from hilora_lightning.errors import HiLoraError

    try:
        commands = {"compare": _compare, "run": _run, "export": _export, "predict": _predict}
        return commands[args.command](args)
    except (HiLoraError, ValueError, TypeError, OSError) as exc:  # project and input errors: exit 2
        if getattr(args, "fail_fast", False):
            raise
        return _report(exc)


def _report(exc: BaseException) -> int:
    """A project or input error as ``hilora-fl: error: ...`` (a round's failures one client per line); exit 2."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    print(f"hilora-fl: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
