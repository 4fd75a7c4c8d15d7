"""Shared test helpers (imported as ``from helpers import ...``)."""

from __future__ import annotations

import torch

from hilora_lightning.data import digits_federation
from hilora_lightning.layer import TieredLoRALinear
from hilora_lightning.tiers import Tier


def randomize_tiers(layer: TieredLoRALinear, seed: int = 0, scale: float = 0.1) -> None:
    """Give every tier non-zero random factors (a fresh tier has B = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tier in Tier:
            for param in (layer.lora_A[tier.value], layer.lora_B[tier.value]):
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def digits_tensors(n_clients: int = 4):
    """Per client: (x_train, y_train, x_test, y_test) from the embedded digits (32 px, 3 channels)."""
    out = []
    for c in digits_federation(n_clients, num_groups=2, val_fraction=0):
        out.append((c.train.tensors[0], c.train.tensors[1], c.test.tensors[0], c.test.tensors[1]))
    return out


def write_png_sites(root, data, classes=("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")):
    """Write each client's training images as ``root/site<i>/<class>/<n>.png`` (8-bit RGB)."""
    from PIL import Image

    for site, (x, y, _, _) in enumerate(data):
        for i, (img, label) in enumerate(zip(x, y)):
            folder = root / f"site{site}" / classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = ((img.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")


#: the smallest Flower federation config the deployment tests run (2 clients, the three stages)
TINY_FLOWER = """seed: 0
data: {name: digits, num_clients: 2, num_groups: 2, unseen_fraction: 0.0}
model: {backbone: hilora-digits-vit, num_classes: 10, lr: 0.003}
federation: {rounds: 3, root_rounds: [1, 1], cluster_rounds: [1, 1], local_steps: 2, batch_size: 16,
             finetune_epochs: 0, clustering: {k_min: 2, k_max: 2}}
trainer: {precision: 32-true, accelerator: cpu}
"""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
