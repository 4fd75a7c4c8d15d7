"""One round of N clients: the sequential backend, the batched backend and the floor, side by side.

Each client runs the root stage's plan: 20 AdamW steps of batch 32 (rank 8, ``paper`` targets) from
the same starting state. The **sequential** backend runs one Lightning fit per client (the library's
default); the **batched** backend runs the round's plans in one pass over the frozen backbone; the
**floor** is one model with one LoRA doing 20 steps on the same samples as ``N x 32``-sample batches
(what one pass of the round's data costs, with nothing per client). Methods are interleaved within
each repetition and the median is reported, on ``hilora-mnist-vit`` (32 px, 16 tokens) and on timm's
``vit_tiny_patch16_224`` at 32 px (random weights; speed only).

    python benchmarks/simulation_throughput.py [--clients 8,30] [--reps 3] [--json out.json]
    python benchmarks/simulation_throughput.py --smoke          # seconds: what the test suite runs
    python benchmarks/simulation_throughput.py --device cuda --precision bf16-mixed --models vit_base@224

A second table runs the library's default budget, one local epoch, over clients of uneven sizes
(``--epoch-sizes``, default 20-200 samples: each client its own number of batches, the last one short),
sequential vs batched on the first model.

JSON (flat): ``batched_speedup_<N>`` (sequential / batched), ``batched_over_floor_<N>`` (batched /
floor), ``epochs_batched_speedup_<N>`` (the uneven epoch), the wall times per model and N, and the
peak memory (``peak_rss_mib`` on the CPU, ``peak_cuda_mib_<method>_<N>`` on a GPU). Keys without a
model prefix are the first model's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from hilora_lightning import HiLoRAViT, Tier
from hilora_lightning.data import ClientData
from hilora_lightning.federation import FederationConfig
from hilora_lightning.federation.backend import InProcessBackend
from hilora_lightning.federation.batched import BatchedBackend
from hilora_lightning.federation.hilora import HiLoRAStrategy
from hilora_lightning.federation.local import StepSampler
from hilora_lightning.federation.runtime import ClientRuntime

MODELS = {
    "mnist": ("hilora-mnist-vit", 32, 10, {}),
    "vit_tiny": ("vit_tiny_patch16_224", 32, 10, {"img_size": 32}),
    "vit_base@224": ("vit_base_patch16_224", 224, 100, {}),
}


def _model(key: str) -> HiLoRAViT:
    name, _, classes, kwargs = MODELS[key]
    return HiLoRAViT(backbone=name, num_classes=classes, backbone_kwargs=kwargs, lr=1e-3)


def _clients(key: str, n: int, per_client: int | list[int]) -> list[ClientData]:
    _, img, classes, _ = MODELS[key]
    g = torch.Generator().manual_seed(0)
    out = []
    for cid in range(n):
        size = per_client[cid] if isinstance(per_client, list) else per_client
        x = torch.randn(size, 1 if key == "mnist" else 3, img, img, generator=g)
        if key == "mnist":
            x = x.expand(-1, 3, -1, -1).clone()
        y = torch.randint(0, classes, (size,), generator=g)
        out.append(ClientData(cid, TensorDataset(x, y), TensorDataset(x[:8], y[:8])))
    return out


def _timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def floor_round(model: HiLoRAViT, clients: list[ClientData], steps: int, batch: int, device: str,
                precision: str) -> None:
    """One model, one LoRA: ``steps`` AdamW steps, each on every client's next batch concatenated."""
    model.to(device)
    model.set_stage(Tier.ROOT)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    orders = [list(StepSampler(len(c.train), steps * batch, torch.Generator().manual_seed(c.client_id)))  # type: ignore[arg-type]
              for c in clients]
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    for k in range(steps):
        xs, ys = zip(*[c.train[order[k * batch:(k + 1) * batch]] for c, order in zip(clients, orders)])
        x, y = torch.cat(xs).to(device), torch.cat(ys).to(device)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.cpu()


def _root_round(model: HiLoRAViT, clients: list[ClientData], cfg: FederationConfig, device: str, precision: str
                ) -> tuple[dict[int, Any], dict[str, Any]]:
    """The root stage's first-round plans of every client, and both backends bound to the clients."""
    strategy = HiLoRAStrategy(model, cfg)
    state = strategy.initial_state([c.client_id for c in clients])
    plans = strategy.configure_fit(state, 1, [c.client_id for c in clients], Tier.ROOT)
    trainer = {"accelerator": "gpu" if device == "cuda" else "cpu", "precision": precision}
    backends: dict[str, Any] = {"sequential": InProcessBackend(), "batched": BatchedBackend()}
    for backend in backends.values():
        backend.bind(ClientRuntime(model, trainer), clients)
    return plans, backends


def measure(key: str, n: int, steps: int, batch: int, reps: int, device: str, precision: str) -> dict[str, float]:
    model = _model(key)
    clients = _clients(key, n, per_client=max(batch * 2, 64))
    cfg = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_steps=steps, batch_size=batch)
    plans, backends = _root_round(model, clients, cfg, device, precision)
    runs: dict[str, Callable[[], object]] = {
        "sequential": lambda: backends["sequential"].fit(plans),
        "batched": lambda: backends["batched"].fit(plans),
        "floor": lambda: floor_round(model, clients, steps, batch, device, precision),
    }
    times: dict[str, list[float]] = {m: [] for m in runs}
    peak: dict[str, float] = {}
    runs["batched"]()  # warm-up (Fabric, allocator); not timed
    for rep in range(reps):
        order = list(runs)[rep % 3:] + list(runs)[:rep % 3]  # interleaved, the order rotating
        for name in order:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times[name].append(_timed(runs[name], device))
            if device == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {f"seconds_{m}_{n}": t for m, t in med.items()}
    out[f"batched_speedup_{n}"] = med["sequential"] / med["batched"]
    out[f"batched_over_floor_{n}"] = med["batched"] / med["floor"]
    out[f"sequential_over_floor_{n}"] = med["sequential"] / med["floor"]
    out.update({f"peak_cuda_mib_{m}_{n}": v for m, v in peak.items()})
    return out


def measure_epochs(key: str, n: int, batch: int, reps: int, device: str, precision: str,
                   sizes: tuple[int, int]) -> dict[str, float]:
    """One local epoch (the library's default budget) over clients of uneven sizes, drawn in ``sizes``:
    each client its own number of batches and a short last one; sequential vs batched, interleaved."""
    model = _model(key)
    g = torch.Generator().manual_seed(1)
    per_client = torch.randint(sizes[0], sizes[1] + 1, (n,), generator=g).tolist()
    clients = _clients(key, n, per_client)
    cfg = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_epochs=1, batch_size=batch)
    plans, backends = _root_round(model, clients, cfg, device, precision)
    backends["batched"].fit(plans)  # warm-up; not timed
    times: dict[str, list[float]] = {m: [] for m in backends}
    for rep in range(reps):
        for name in list(backends)[rep % 2:] + list(backends)[:rep % 2]:
            times[name].append(_timed(lambda b=backends[name]: b.fit(plans), device))  # type: ignore[misc]
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {f"epochs_seconds_{m}_{n}": t for m, t in med.items()}
    out[f"epochs_batched_speedup_{n}"] = med["sequential"] / med["batched"]
    out[f"epochs_batches_{n}"] = float(sum(-(-k // batch) for k in per_client))
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="8,30", help="client counts, comma-separated")
    parser.add_argument("--models", default="mnist,vit_tiny", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--epoch-sizes", default="20,200",
                        help="the uneven-epoch rows (first model): client sizes drawn in this range")
    parser.add_argument("--smoke", action="store_true", help="2 clients, 2 steps, 1 repetition, mnist only")
    parser.add_argument("--json", help="write the headline figures here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.models, args.steps, args.batch, args.reps, args.epoch_sizes = "2", "mnist", 2, 4, 1, "5,11"
    warnings.filterwarnings("ignore")
    counts = [int(n) for n in str(args.clients).split(",")]
    models = str(args.models).split(",")
    results: dict[str, float] = {}
    print(f"{'model':<14}{'N':>4}{'sequential s':>14}{'batched s':>11}{'floor s':>9}{'seq/batched':>13}"
          f"{'batched/floor':>15}")
    for i, key in enumerate(models):
        for n in counts:
            r = measure(key, n, args.steps, args.batch, args.reps, args.device, args.precision)
            print(f"{key:<14}{n:>4}{r[f'seconds_sequential_{n}']:>14.2f}{r[f'seconds_batched_{n}']:>11.2f}"
                  f"{r[f'seconds_floor_{n}']:>9.2f}{r[f'batched_speedup_{n}']:>13.2f}"
                  f"{r[f'batched_over_floor_{n}']:>15.2f}", flush=True)
            results.update({f"{key}_{k}": v for k, v in r.items()})
            if i == 0:
                results.update(r)
    lo, hi = (int(v) for v in str(args.epoch_sizes).split(","))
    print(f"\none local epoch, batch {args.batch}, clients of {lo}-{hi} samples ({models[0]}):")
    print(f"{'N':>4}{'batches':>9}{'sequential s':>14}{'batched s':>11}{'seq/batched':>13}")
    for n in counts:
        r = measure_epochs(models[0], n, args.batch, args.reps, args.device, args.precision, (lo, hi))
        print(f"{n:>4}{r[f'epochs_batches_{n}']:>9.0f}{r[f'epochs_seconds_sequential_{n}']:>14.2f}"
              f"{r[f'epochs_seconds_batched_{n}']:>11.2f}{r[f'epochs_batched_speedup_{n}']:>13.2f}", flush=True)
        results.update(r)
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, sort_keys=True)
    return results


if __name__ == "__main__":
    main()
