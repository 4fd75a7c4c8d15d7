"""Wall time of a federated round against a plain PyTorch loop doing the same local steps.

8 clients x 20 local steps (batch 16) of the root stage on ``vit_tiny_patch16_224`` @ 32 px
(``paper`` targets, rank 8) with the embedded digits. The orchestrator's round includes everything
it does (one Lightning ``Trainer.fit`` per client, loading and exporting tiers, validating uploads,
product-space aggregation, the checkpoint-free bookkeeping); the floor is a hand-written loop over
the same clients doing the same optimizer steps on the same model (AdamW, fresh state per client,
the same 20 full batches per client), with the same loading and exporting of the trained tier but
no aggregation. Rounds are interleaved
and the median is reported.

    python benchmarks/federation_overhead.py [--rounds 3] [--json out.json] [--smoke]   # --smoke: 2 clients x 2 steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from hilora_lightning import HiLoRAViT, Tier
from hilora_lightning.data import digits_federation
from hilora_lightning.federation import FederatedOrchestrator, FederationConfig
from hilora_lightning.federation.local import StepSampler, head_state, load_view
from hilora_lightning.state import export_tier

CLIENTS, STEPS, BATCH = 8, 20, 16


def _model() -> HiLoRAViT:
    return HiLoRAViT(backbone="vit_tiny_patch16_224", num_classes=10, backbone_kwargs={"img_size": 32}, lr=1e-3)


def plain_round(model: HiLoRAViT, clients: list, root: dict, head: dict, round_idx: int, steps: int = STEPS) -> float:
    """The floor: the same local steps in a bare PyTorch loop."""
    start = time.perf_counter()
    for c in clients:
        load_view(model, {Tier.ROOT: root}, head)
        model.set_stage(Tier.ROOT)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        gen = torch.Generator().manual_seed(round_idx * 1000 + c.client_id)
        sampler = StepSampler(len(c.train), steps * BATCH, gen)  # the same full batches the clients see
        for x, y in DataLoader(c.train, batch_size=BATCH, sampler=sampler):
            loss = F.cross_entropy(model(x), y) + model.orthogonality_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        export_tier(model, Tier.ROOT)
        head_state(model)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="2 clients x 2 steps, 1 round (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    n_clients, steps = (2, 2) if args.smoke else (CLIENTS, STEPS)
    if args.smoke:
        args.rounds = 1
    clients = digits_federation(n_clients)
    # the measured rounds all in the root stage (a warm-up round first); the later stages' minimums fit after
    cfg = FederationConfig(rounds=args.rounds + 3, root_rounds=(args.rounds + 1, args.rounds + 1),
                           cluster_rounds=(1, 1), local_steps=steps, batch_size=BATCH, eval_every=10_000)
    orch = FederatedOrchestrator(_model(), clients, cfg, progress=False)
    floor_model = _model()
    plain_round(floor_model, clients, orch.root, orch.global_head, 0, steps)  # warm-up both
    orch.run(stop_after=1)
    fed, plain = [], []
    for r in range(args.rounds):
        plain.append(plain_round(floor_model, clients, orch.root, orch.global_head, r + 1, steps))
        t0 = time.perf_counter()
        orch.run(stop_after=orch.round + 1)
        fed.append(time.perf_counter() - t0)
    fed_s, plain_s = statistics.median(fed), statistics.median(plain)
    out = {"round_seconds": fed_s, "plain_loop_seconds": plain_s, "overhead_ratio": fed_s / plain_s,
           "clients": float(n_clients), "local_steps": float(steps)}
    print(f"{'':28}{'seconds/round':>14}")
    print(f"{'FederatedOrchestrator':28}{fed_s:14.3f}")
    print(f"{'plain PyTorch loop (floor)':28}{plain_s:14.3f}")
    print(f"overhead ratio: {out['overhead_ratio']:.3f} (target <= 1.10)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
