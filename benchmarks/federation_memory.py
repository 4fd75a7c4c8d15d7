"""Peak memory of the in-process federation for 10, 100 and 1000 simulated clients.

One frozen backbone is shared by all clients; a client holds only its leaf factors and personal
head (as after the leaf stage, the largest per-client state). For ``vit_tiny_patch16_224`` @ 32 px
and ``vit_base_patch16_224`` (ViT-B/16) with rank-8 ``paper`` targets and a 100-class head, each
setting runs in a fresh process that builds the orchestrator, gives every client a leaf and a head,
and reports its peak RSS. The bytes per extra client ((RSS_1000 - RSS_10) / 990) are compared with
the leaf + head tensor bytes. No data is needed: every client shares one tiny placeholder dataset.

    python benchmarks/federation_memory.py [--json out.json] [--smoke]   # --smoke: vit_tiny, 4 and 20 clients
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

MODELS = {"vit_tiny": ("vit_tiny_patch16_224", 32), "vit_base": ("vit_base_patch16_224", 224)}
COUNTS = (10, 100, 1000)


def child(model_key: str, n: int) -> dict[str, float]:
    import torch
    from torch.utils.data import TensorDataset

    from hilora_lightning import HiLoRAViT, Tier
    from hilora_lightning.federation import ClientData, FederatedOrchestrator, FederationConfig
    from hilora_lightning.federation.client import state_bytes
    from hilora_lightning.federation.local import head_state
    from hilora_lightning.federation.plan import ClientStore
    from hilora_lightning.state import export_tier

    name, img = MODELS[model_key]
    model = HiLoRAViT(backbone=name, num_classes=100, backbone_kwargs={"img_size": img})
    ds = TensorDataset(torch.zeros(1, 3, img, img), torch.zeros(1, dtype=torch.long))
    clients = [ClientData(i, ds, ds, val_fraction=0) for i in range(n)]  # one placeholder sample: no validation
    orch = FederatedOrchestrator(model, clients, FederationConfig(rounds=3, root_rounds=(1, 1),
                                                                  cluster_rounds=(1, 1)), progress=False)
    for cid in orch.clients:  # each client's store holds its leaf and personal head, as after the leaf stage
        model.reset_tier(Tier.LEAF, cid)
        # fresh copies, as a trained leaf would be
        orch.backend.stores[cid] = ClientStore(kept={Tier.LEAF: export_tier(model, Tier.LEAF)}, head=head_state(model))
    store = orch.client_store(0)
    per_client = state_bytes(store.kept[Tier.LEAF]) + state_bytes(store.head)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"rss_bytes": float(rss), "state_bytes": float(per_client)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="vit_tiny only, 4 and 20 clients (seconds)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    out: dict[str, float] = {}
    print(f"{'model':<10}{'clients':>8}{'peak RSS GiB':>14}")
    ratios = []
    models, counts = (["vit_tiny"], (4, 20)) if args.smoke else (list(MODELS), COUNTS)
    for key in models:
        res = {}
        for n in counts:
            proc = subprocess.run([sys.executable, __file__, "--child", key, str(n)], capture_output=True,  # noqa: S603
                                  text=True, check=True)
            res[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            out[f"rss_gib_{key}_{n}"] = res[n]["rss_bytes"] / 2**30
            print(f"{key:<10}{n:>8}{out[f'rss_gib_{key}_{n}']:>14.3f}")
        per_client = (res[counts[-1]]["rss_bytes"] - res[counts[0]]["rss_bytes"]) / (counts[-1] - counts[0])
        ratio = per_client / res[counts[0]]["state_bytes"]
        ratios.append(ratio)
        out[f"{key}_bytes_per_client"] = per_client
        out[f"{key}_state_bytes"] = res[counts[0]]["state_bytes"]
        out[f"{key}_per_client_over_state"] = ratio
        print(f"{key}: {per_client / 1024:.1f} KiB per extra client vs {res[counts[0]]['state_bytes'] / 1024:.1f} KiB "
              f"leaf+head -> {ratio:.3f}x")
    out["per_client_over_state_max"] = max(ratios)
    print(f"per_client_over_state_max: {out['per_client_over_state_max']:.3f} (target <= 1.2)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
