"""The demo: a personalized HiLoRA federation on the embedded digits, offline, on the CPU.

Eight clients in four latent groups (each group sees its digits rotated by its own multiple of 90
degrees) and two held-out unseen clients share the embedded pretrained ViT (upright digits). The
federation runs the paper's stages: the root adapter is aggregated over all clients, LSAC clusters
the clients from their LoRA subspaces, each cluster trains its adapter on the frozen root, then
each client its private leaf. Unseen clients are routed to the cluster whose adapter fits their data best. It prints
the tier-wise table, the unseen-client table and the clusters found, and writes JSON/CSV results and
PNG plots (accuracy per round, the LSAC similarity heatmap, the per-client spread).

    python -m hilora_lightning.demo [--rounds 12] [--clients 8] [--groups 4] [--out runs/demo] [--overwrite]

It runs through the same path as ``hilora-fl run`` (its config is written to ``OUT/config.yaml``,
the checkpoint to ``OUT/federation.pt``), so ``hilora-fl export OUT``, ``predict`` and ``run
OUT/config.yaml ... --resume`` work on its folder.

Example:
    >>> from hilora_lightning.demo import build_parser
    >>> build_parser().parse_args([]).rounds
    12
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from hilora_lightning.experiment import run_experiment, save_outputs
from hilora_lightning.federation import FederatedOrchestrator, FederatedResult

__all__ = ["build_parser", "demo_config", "main", "run_demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="HiLoRA federation on the embedded digits (offline, CPU).")
    parser.add_argument("--clients", type=int, default=8, help="training clients")
    parser.add_argument("--unseen", type=int, default=2, help="held-out clients for the generalization table")
    parser.add_argument("--groups", type=int, default=4, help="latent groups (rotations of 0/90/180/270 degrees)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--feature", default="B", choices=["A", "B", "delta"], help="LSAC feature")
    parser.add_argument("--route-by", default="loss", choices=["loss", "subspace"],
                        help="how unseen clients pick a cluster (subspace: the paper's probe)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="results are written here")
    parser.add_argument("--overwrite", action="store_true", help="replace the demo run that --out holds")
    return parser


def demo_config(args: argparse.Namespace) -> dict[str, Any]:
    """The demo as a ``hilora-fl run`` config (written to ``OUT/config.yaml``; ``hilora-fl run`` accepts it).

    Example:
        >>> cfg = demo_config(build_parser().parse_args(["--rounds", "6"]))
        >>> cfg["data"]["unseen"], cfg["federation"]["root_rounds"], cfg["federation"]["cluster_rounds"]
        ([8, 9], [2, 2], [1, 2])
    """
    third = max(1, args.rounds // 3)
    return {
        "seed": args.seed,
        "out_dir": str(args.out),
        # the last `unseen` clients are held out
        "data": {"name": "digits", "num_clients": args.clients + args.unseen, "num_groups": args.groups,
                 "unseen": list(range(args.clients, args.clients + args.unseen))},
        "model": {"backbone": "hilora-digits-vit", "num_classes": 10, "lr": 3e-3},
        "federation": {"rounds": args.rounds, "root_rounds": [min(2, third), third], "cluster_rounds": [1, third],
                       "local_steps": args.local_steps, "batch_size": 16, "finetune_epochs": 5,
                       "route_by": args.route_by,
                       "clustering": {"feature": args.feature, "k_min": 2,
                                      "k_max": min(6, max(2, args.clients - 1))}},
        "trainer": {"precision": args.precision},
    }


def run_demo(args: argparse.Namespace) -> tuple[FederatedOrchestrator, FederatedResult]:
    """Run the demo's federation (:func:`demo_config`) through the same path as ``hilora-fl run``: the
    config, then ``federation.pt`` after every round, into ``args.out``."""
    pl.seed_everything(args.seed, verbose=False)
    return run_experiment(demo_config(args), overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = demo_config(args)
    print(f"HiLoRA demo: {args.clients} clients in {args.groups} rotation groups, {args.unseen} unseen, "
          f"{args.rounds} rounds of {args.local_steps} local steps (embedded digits, no network)")
    orch, result = run_demo(args)
    print()
    print(result.summary())
    print(f"clusters (client: cluster): {result.assignment}; unseen routed: {result.routing}")
    written = save_outputs(orch, result, cfg, args.out)
    print(f"results and plots written to {args.out}/: {', '.join(p.name for p in written)}, federation.pt")
    first = sorted(orch.clients)[0]
    model_dir = args.out / f"client{first}_timm"
    orch.export_client(first, model_dir, "timm")
    print(f"client {first}'s personalized model, tiers merged, as a plain timm model: {model_dir}/ "
          f"(timm.create_model('local-dir:{model_dir}', pretrained=True))")
    out = shlex.quote(str(args.out))
    print(f"next: hilora-fl export {out} --client {first} --format peft --out {out}/client{first}_peft, "
          f"hilora-fl predict {out} IMAGES_OR_FOLDER --client {first}, or train longer: "
          f"hilora-fl run {out}/config.yaml federation.rounds={args.rounds + 6} --resume")


if __name__ == "__main__":
    main()
