"""Use HiLoRA's pieces in an ordinary Lightning project (no federation).

Subclasses :class:`HiLoRAViT` to change the loss, trains the three tiers as a cascade in *one*
``trainer.fit`` with the :class:`~hilora_lightning.callbacks.TierCascade` callback (root, then
cluster, then leaf by epoch; a checkpoint resumes mid-cascade) on the embedded digits (rotated 180
degrees), prints the tier-wise accuracy and exports each tier as a ``.safetensors`` file that any
other client can load into the same slot.

    python examples/plug_into_your_lightning_project.py [--epochs 3] [--out runs/plugin]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.nn import functional as F

from hilora_lightning import HiLoRAViT, Tier, export_tier, save_tier_file
from hilora_lightning.callbacks import TierCascade
from hilora_lightning.data import DigitsDataModule


class SmoothedHiLoRA(HiLoRAViT):
    """Override point: the task loss (the orthogonality term is still added by the step)."""

    def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/plugin"))
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    args.out.mkdir(parents=True, exist_ok=True)
    dm = DigitsDataModule(quarter_turns=2, batch_size=32)
    model = SmoothedHiLoRA(backbone="hilora-digits-vit", num_classes=10, lr=3e-3)
    cascade = TierCascade({tier: args.epochs for tier in Tier})  # each tier trains, then freezes
    trainer = pl.Trainer(max_epochs=3 * args.epochs, logger=False, enable_model_summary=False,
                         default_root_dir=args.out, callbacks=[cascade])
    trainer.fit(model, dm)  # pass ckpt_path=... to resume mid-cascade at the right tier
    print(f"cascade done: val acc {trainer.callback_metrics['val/acc']:.3f}")
    for tier in Tier:
        path = save_tier_file(export_tier(model, tier), args.out / f"{tier.value}.safetensors")
        print(f"{tier.value}: saved {path}")
    for tiers in (["root"], ["root", "cluster"], list(Tier)):
        with model.using_tiers(tiers):
            acc = pl.Trainer(logger=False, enable_progress_bar=False).test(model, dm, verbose=False)[0]["test/acc"]
        print(f"{' + '.join(str(t) for t in tiers):<22} test acc {acc:.3f}")


if __name__ == "__main__":
    main()
