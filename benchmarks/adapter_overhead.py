"""Train-step cost of HiLoRA's three tiers against one PEFT LoRA of the summed rank.

For each setting (``vit_tiny_patch16_224`` @ 32 px batch 64, ``vit_small_patch16_224`` @ 224 px
batch 8) it times a full train step (forward, backward, AdamW step) of:

* ``hilora_leaf``  - HiLoRAViT in the leaf stage: root, cluster and leaf (rank 8 each) active on the
  ``all_linear`` targets, the leaf and head training, the orthogonality penalty on (what HiLoRA runs);
* ``hilora_all``   - the same three tiers with all of them trainable (the worst case);
* ``peft_r24``     - PEFT LoRA, one adapter of rank 24 on the same modules, head trainable;
* ``head_only``    - the frozen backbone with only the head training (the floor).

Methods are interleaved over several rounds and the median step time is reported, so background
noise hits them alike. Prints a table of milliseconds and ratios.

    python benchmarks/adapter_overhead.py [--rounds 5] [--steps 5] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import nn
from torch.nn import functional as F

from hilora_lightning import AdapterConfig, HiLoRAViT, TierConfig

TARGET_REGEX = r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SETTINGS = {
    "tiny32": ("vit_tiny_patch16_224", 32, 64),
    "small224": ("vit_small_patch16_224", 224, 8),
}


def _hilora(name: str, img: int, stage: str, all_trainable: bool) -> tuple[nn.Module, LossFn]:
    cfg = AdapterConfig(targets="all_linear", root=TierConfig(8, 16), cluster=TierConfig(8, 16), leaf=TierConfig(8, 16))
    model = HiLoRAViT(backbone=name, num_classes=100, adapter=cfg, stage=stage, backbone_kwargs={"img_size": img})
    with torch.no_grad():  # non-zero frozen tiers, as after their stages
        for layer in model.tiered_layers.values():
            for t in ("root", "cluster"):
                layer.lora_B[t].normal_(0, 0.02)
    if all_trainable:
        for layer in model.tiered_layers.values():
            layer.set_trainable(["root", "cluster", "leaf"])

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y) + model.orthogonality_loss()

    return model, loss_fn


def _peft(name: str, img: int) -> tuple[nn.Module, LossFn]:
    from peft import LoraConfig, get_peft_model

    base = timm.create_model(name, pretrained=False, num_classes=100, img_size=img)
    cfg = LoraConfig(r=24, lora_alpha=48, lora_dropout=0.0, target_modules=TARGET_REGEX, modules_to_save=["head"])
    model = get_peft_model(base, cfg)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    return model, loss_fn


def _head_only(name: str, img: int) -> tuple[nn.Module, LossFn]:
    model = timm.create_model(name, pretrained=False, num_classes=100, img_size=img)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    return model, loss_fn


def _stepper(model: nn.Module, loss_fn: LossFn) -> Callable[[torch.Tensor, torch.Tensor], None]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(x, y).backward()
        opt.step()

    return step


def bench_setting(key: str, rounds: int, steps: int) -> dict[str, float]:
    name, img, batch = SETTINGS[key]
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, img, img), torch.randint(0, 100, (batch,))
    builders = {
        "hilora_leaf": lambda: _hilora(name, img, "leaf", False),
        "hilora_all": lambda: _hilora(name, img, "leaf", True),
        "peft_r24": lambda: _peft(name, img),
        "head_only": lambda: _head_only(name, img),
    }
    steppers = {k: _stepper(*b()) for k, b in builders.items()}
    for step in steppers.values():  # warm-up
        step(x, y)
        step(x, y)
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for _ in range(rounds):
        for k, step in steppers.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step(x, y)
            times[k].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", "--smoke", action="store_true", help="tiny32 only, 2 rounds x 2 steps (a smoke run)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the headline figures here as a flat JSON object")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keys = ["tiny32"] if args.quick else args.settings
    rounds, steps = (2, 2) if args.quick else (args.rounds, args.steps)
    out: dict[str, float] = {}
    print(f"{'setting':<10} {'method':<12} {'ms/step':>9} {'/peft_r24':>10} {'/head_only':>11}")
    for key in keys:
        res = bench_setting(key, rounds, steps)
        for k, v in res.items():
            print(f"{key:<10} {k:<12} {1e3 * v:9.2f} {v / res['peft_r24']:10.3f} {v / res['head_only']:11.3f}")
            out[f"{key}_{k}_ms"] = 1e3 * v
        out[f"{key}_hilora_over_peft"] = res["hilora_leaf"] / res["peft_r24"]
        out[f"{key}_hilora_all_trainable_over_peft"] = res["hilora_all"] / res["peft_r24"]
        out[f"{key}_hilora_over_head_only"] = res["hilora_leaf"] / res["head_only"]
    out["hilora_over_peft_max"] = max(out[f"{k}_hilora_over_peft"] for k in keys)
    out["hilora_all_trainable_over_peft_max"] = max(out[f"{k}_hilora_all_trainable_over_peft"] for k in keys)
    print(f"\nHiLoRA (leaf stage) / PEFT r24, worst setting: {out['hilora_over_peft_max']:.3f} (target <= 1.00)")
    print(f"HiLoRA (all tiers trainable) / PEFT r24, worst setting: {out['hilora_all_trainable_over_peft_max']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
