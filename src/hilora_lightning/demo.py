"""The demo: HiLoRA's three-stage cascade on one client of the embedded digits data.

Runs entirely offline on the CPU in about a minute: the embedded pretrained ViT (upright digits) is
frozen, the client's digits are rotated by 90 degrees (a shift the backbone has never seen), and the
root, cluster and leaf tiers train one stage after another, each frozen when its stage ends, with the
cross-tier orthogonality penalty on. The federated version (many clients, aggregation, clustering)
builds on exactly these pieces.

    python -m hilora_lightning.demo [--epochs-per-stage 5] [--quarter-turns 1] [--precision 32-true]

Example:
    >>> from hilora_lightning.demo import format_table
    >>> print(format_table([("root", 0.5)], header=("tiers", "acc")))
    tiers | acc
    ----- | -----
    root  | 0.500
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch

from hilora_lightning.data.digits import DigitsDataModule
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.tiers import Tier

__all__ = ["format_table", "main", "run_demo"]


def format_table(rows: Sequence[tuple[str, float]], header: tuple[str, str] = ("evaluated with", "accuracy")) -> str:
    """A plain-text two-column table with three-decimal numbers."""
    width = max(len(header[0]), *(len(r[0]) for r in rows))
    lines = [f"{header[0]:<{width}} | {header[1]}", f"{'-' * width} | -----"]
    lines += [f"{name:<{width}} | {value:.3f}" for name, value in rows]
    return "\n".join(lines)


@torch.no_grad()
def _accuracy(model: HiLoRAViT, dm: DigitsDataModule) -> float:
    was_training = model.training
    model.eval()
    x, y = dm.test_set.tensors
    acc = float((model(x).argmax(-1) == y).float().mean())
    model.train(was_training)
    return acc


def run_demo(
    epochs_per_stage: int = 5,
    quarter_turns: int = 1,
    precision: str = "32-true",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Train root, then cluster, then leaf on one rotated-digits client; return the accuracies."""
    if epochs_per_stage <= 0:
        raise ValueError(f"epochs_per_stage must be positive, got {epochs_per_stage!r}")
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(quarter_turns=quarter_turns, batch_size=32, seed=seed)
    dm.setup("fit")
    model = HiLoRAViT(backbone="hilora-digits-vit", num_classes=10, lr=3e-3, seed=seed)
    results: dict[str, float] = {}
    with model.using_tiers([]):
        results["frozen backbone (no adapters)"] = _accuracy(model, dm)
    start = time.perf_counter()
    for tier in Tier:
        model.set_stage(tier)
        print(f"\n== stage {tier.position + 1}/3: training the {tier.value} tier "
              f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters) ==")
        trainer = pl.Trainer(
            max_epochs=epochs_per_stage,
            precision=precision,  # type: ignore[arg-type]
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
        )
        trainer.fit(model, dm)
        results[f"ortho penalty after {tier.value} stage"] = float(model.orthogonality_loss().detach())
    results["train seconds"] = time.perf_counter() - start
    views = (("root", ["root"]), ("root + cluster", ["root", "cluster"]), ("root + cluster + leaf", list(Tier)))
    for label, tiers in views:
        with model.using_tiers(tiers):
            results[label] = _accuracy(model, dm)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="HiLoRA cascade on one embedded-digits client (offline, CPU).")
    parser.add_argument("--epochs-per-stage", type=int, default=5)
    parser.add_argument("--quarter-turns", type=int, default=1, help="client rotation in multiples of 90 degrees")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    res = run_demo(args.epochs_per_stage, args.quarter_turns, args.precision, args.seed, not args.no_progress)
    rows = [(k, v) for k, v in res.items() if "penalty" not in k and "seconds" not in k]
    print(f"\nClient: held-out digits rotated {90 * (args.quarter_turns % 4)} degrees; "
          f"{args.epochs_per_stage} epochs per stage; {res['train seconds']:.0f}s of training")
    print(format_table(rows, header=("evaluated with", "test accuracy")))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
