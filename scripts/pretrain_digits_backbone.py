"""Reproduce the embedded backbone ``src/hilora_lightning/assets/digits_vit.safetensors``.

Trains the tiny timm ViT of :data:`hilora_lightning.backbone.EMBEDDED_VIT_KWARGS` from scratch on the
900-image *source* split of scikit-learn's digits (upright only), with random +-2 px shifts, and
writes its full state dict (backbone and a 10-class head) as safetensors. The adapters later train
on the disjoint *target* split, rotated per latent group. Takes about a minute on 2 CPU cores.

    python scripts/pretrain_digits_backbone.py [--epochs 40] [--out PATH]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from _pretrain import accuracy, train_epoch  # scripts/ is on sys.path when a script runs
from hilora_lightning.backbone import EMBEDDED_ARCH, EMBEDDED_VIT_KWARGS, embedded_weights_path
from hilora_lightning.data.digits import digits_split, load_digits_tensors, rotate
from hilora_lightning.state import save_tier_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(embedded_weights_path()))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = load_digits_tensors(EMBEDDED_VIT_KWARGS["img_size"])
    source, target = digits_split()
    xs, ys = x[source], y[source]
    model = timm.create_model(EMBEDDED_ARCH, pretrained=False, num_classes=10, **EMBEDDED_VIT_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    steps = args.epochs * ((len(xs) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        loss = train_epoch(model, xs, ys, args.batch_size, gen, opt, sched)
        if (epoch + 1) % 10 == 0:
            acc = accuracy(model, x[target], y[target])
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.3f}  held-out acc {acc:.3f}")
    print(f"trained in {time.perf_counter() - start:.1f}s")
    for k in range(4):
        acc = accuracy(model, rotate(x[target], k), y[target])
        print(f"held-out digits rotated {90 * k:3d} deg: accuracy {acc:.3f}")
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    print(f"parameters: {sum(v.numel() for v in state.values()) / 1e6:.2f}M -> {save_tier_file(state, args.out)}")


if __name__ == "__main__":
    main()
