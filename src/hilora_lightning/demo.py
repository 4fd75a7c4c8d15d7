"""The demo: a personalized HiLoRA federation on the embedded digits, offline, on the CPU.

Eight clients in four latent groups (each group sees its digits rotated by its own multiple of 90
degrees) and two held-out unseen clients share the embedded pretrained ViT (upright digits). The
federation runs the paper's stages: the root adapter is aggregated over all clients, LSAC clusters
the clients from their LoRA subspaces, each cluster trains its adapter on the frozen root, then
each client its private leaf. Unseen clients are routed to the cluster whose adapter fits their data best. It prints
the tier-wise table, the unseen-client table and the clusters found, and writes JSON/CSV results and
PNG plots (accuracy per round, the LSAC similarity heatmap, the per-client spread).

    python -m hilora_lightning.demo [--rounds 12] [--clients 8] [--groups 4] [--out runs/demo]

Example:
    >>> from hilora_lightning.demo import build_parser
    >>> build_parser().parse_args([]).rounds
    12
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl

from hilora_lightning.data.digits import digits_federation
from hilora_lightning.experiment import save_outputs
from hilora_lightning.federation import ClusteringConfig, FederatedOrchestrator, FederatedResult, FederationConfig
from hilora_lightning.model import HiLoRAViT

__all__ = ["build_parser", "main", "run_demo"]


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
    return parser


def run_demo(args: argparse.Namespace) -> tuple[FederatedOrchestrator, FederatedResult]:
    """Build the clients, the model and the orchestrator from ``args`` and run the federation."""
    pl.seed_everything(args.seed, verbose=False)
    everyone = digits_federation(args.clients + args.unseen, num_groups=args.groups, seed=args.seed)
    unseen = everyone[-args.unseen:] if args.unseen else []
    clients = everyone[: args.clients]
    third = max(1, args.rounds // 3)
    config = FederationConfig(
        rounds=args.rounds, root_rounds=(min(2, third), third), cluster_rounds=(1, third), local_steps=args.local_steps,
        batch_size=16, seed=args.seed, finetune_epochs=5, route_by=args.route_by,
        clustering=ClusteringConfig(feature=args.feature, k_min=2, k_max=min(6, max(2, args.clients - 1))),
    )
    model = HiLoRAViT(backbone="hilora-digits-vit", num_classes=10, lr=3e-3, seed=args.seed)
    orch = FederatedOrchestrator(model, clients, config, unseen=unseen, trainer_kwargs={"precision": args.precision})
    return orch, orch.run()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(f"HiLoRA demo: {args.clients} clients in {args.groups} rotation groups, {args.unseen} unseen, "
          f"{args.rounds} rounds of {args.local_steps} local steps (embedded digits, no network)")
    orch, result = run_demo(args)
    print()
    print(result.summary())
    print(f"clusters (client: cluster): {result.assignment}; unseen routed: {result.routing}")
    written = save_outputs(orch, result, {k: str(v) for k, v in vars(args).items()}, args.out)
    print(f"results and plots written to {args.out}/: {', '.join(p.name for p in written)}")
    first = sorted(orch.clients)[0]
    model_dir = args.out / f"client{first}_timm"
    orch.export_client(first, model_dir, "timm")
    print(f"client {first}'s personalized model, tiers merged, as a plain timm model: {model_dir}/ "
          f"(timm.create_model('local-dir:{model_dir}', pretrained=True))")
    print("next: hilora-fl run examples/configs/digits_cpu.yaml out_dir=runs/digits, then "
          "hilora-fl export runs/digits --client 0 --format peft --out runs/client0_peft and "
          "hilora-fl predict runs/digits IMAGES_OR_FOLDER --client 0")


if __name__ == "__main__":
    main()
