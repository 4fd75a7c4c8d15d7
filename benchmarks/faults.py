"""Fault injection: bad configs, bad clients, bad files and killed runs against the federation.

Every case must either survive (the faulty part dropped and recorded, or the run resumed to the same
result) or stop with a clear one-line error. Counted per case:

* ``survived``: recorded-and-continued, a one-line error (CLI exit code 2), or an exact resume;
* ``tracebacks``: an exception escaped the CLI / API that is not a project error (a real bug);
* ``silent_accepts``: something invalid was taken as if it were fine (a NaN learning rate, a
  tampered checkpoint, a poisoned upload that moved the model).

Cases: >= 200 generated configs (seeded mutations of a valid one: wrong types, booleans as
numbers, NaN/Inf, truncating floats, negatives, empty strings, unknown keys), the client and file
faults of ``tests/test_faults.py`` and more, and SIGKILLs of a running ``hilora-fl run`` at random
times followed by ``--resume``, compared with an uninterrupted run.

    python benchmarks/faults.py [--configs 220] [--kills 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "digits_cpu.yaml"
SMALL = ["data.num_clients=5", "data.num_groups=2", "federation.rounds=3", "federation.root_rounds=[1,1]",
         "federation.cluster_rounds=[1,1]", "federation.local_steps=2", "federation.finetune_epochs=1"]

BAD = {
    "int": [6.7, True, False, "x", None, float("nan"), "1e3", [1]],
    "float": [float("nan"), float("inf"), float("-inf"), True, "x", None, [0.1]],
    "bool": [1, 0, "yes", None, 2.5],
    "str": [3, True, None, 1.5, [1]],
    "pair": [[1], [2.5, 3], "x", True, [1, 2, 3]],
}
GOOD = {"int": [1, 2, 3], "float": [0.5, 1.0], "bool": [True, False], "str": [], "pair": [[1, 1]]}


def _leaves() -> list[tuple[str, str, bool]]:
    """(dotted key, base type, whether null is allowed) of every typed config value."""
    from hilora_lightning.config_check import _schema

    out: list[tuple[str, str, bool]] = []

    def walk(node: Any, prefix: str) -> None:
        for key, spec in node.items():
            path = f"{prefix}{key}"
            if isinstance(spec, dict):
                walk(spec, path + ".")
            elif isinstance(spec, str):
                base = next((o.strip() for o in spec.split("|") if o.strip() != "None"), "any")
                kind = "pair" if base.startswith("tuple[int, int]") else base
                if kind in BAD:
                    out.append((path, kind, "None" in spec))

    walk(_schema(), "")
    return out


def _yaml(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    if value is None:
        return "null"
    return json.dumps(value)


def _cli(argv: list[str]) -> tuple[str, int | None, str]:
    """Run the CLI in process: ('ok'|'error'|'traceback', exit code, the error line)."""
    from hilora_lightning.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as exc:  # argparse
        return ("error" if exc.code == 2 else "traceback"), int(exc.code or 0), err.getvalue().strip()
    except BaseException as exc:  # noqa: BLE001 - this is what the benchmark counts
        return "traceback", None, f"{type(exc).__name__}: {exc}"
    lines = err.getvalue().strip().splitlines()
    if code == 2:
        return ("error" if len(lines) == 1 else "traceback"), code, lines[-1] if lines else ""
    return ("ok" if code == 0 else "traceback"), code, ""


def config_cases(n: int, seed: int, work: Path) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    leaves = _leaves()
    cases = []
    for i in range(n):
        key, kind, nullable = leaves[i % len(leaves)] if i < len(leaves) else rng.choice(leaves)
        invalid = rng.random() < 0.85 or not GOOD[kind]
        value = rng.choice(BAD[kind]) if invalid else rng.choice(GOOD[kind])
        if value is None and nullable:  # null is a valid setting here (an option switched off)
            invalid = False
        if rng.random() < 0.05:  # a mistyped key
            key, invalid, value = key + "x", True, 1
        outcome, code, line = _cli(["run", str(CONFIG), *SMALL, f"{key}={_yaml(value)}",
                                    f"out_dir={work / f'cfg{i}'}", "--check"])
        silent = outcome == "ok" and invalid and not (kind == "str" and key.endswith(("out_dir",)))
        cases.append({"case": f"config {key}={_yaml(value)}", "kind": "config", "outcome": outcome,
                      "silent": silent, "detail": line})
    return cases


#: how many more fault cases to run (``None``: all); ``--smoke`` runs the first few
FAULT_BUDGET: list[int | None] = [None]


def _case(name: str, fn: Callable[[], str]) -> dict[str, Any] | None:
    """``fn`` returns 'survived' or 'silent'; a project error counts as a clear stop, anything else a traceback.
    ``None`` (not run) once :data:`FAULT_BUDGET` is spent."""
    from hilora_lightning.errors import HiLoraError

    if FAULT_BUDGET[0] is not None:
        if FAULT_BUDGET[0] <= 0:
            return None
        FAULT_BUDGET[0] -= 1
    try:
        verdict = fn()
        return {"case": name, "kind": "fault", "outcome": "ok", "silent": verdict == "silent", "detail": verdict}
    except (HiLoraError, ValueError, FileNotFoundError) as exc:
        return {"case": name, "kind": "fault", "outcome": "error", "silent": False, "detail": str(exc)[:120]}
    except BaseException as exc:  # noqa: BLE001
        return {"case": name, "kind": "fault", "outcome": "traceback", "silent": False,
                "detail": f"{type(exc).__name__}: {exc}"[:200]}


def fault_cases(work: Path) -> list[dict[str, Any] | None]:
    import torch
    from torch.utils.data import Dataset, TensorDataset

    from hilora_lightning import HiLoRAViT
    from hilora_lightning.data import ClientData, digits_federation
    from hilora_lightning.federation import ClusteringConfig, FederatedOrchestrator, FederationConfig
    from hilora_lightning.federation.checkpoint import load_checkpoint, save_checkpoint

    given = ClusteringConfig(method="given", assignment={0: 0, 1: 1, 2: 0, 3: 1, 4: 0})
    cfg = FederationConfig(rounds=3, root_rounds=(1, 1), cluster_rounds=(1, 1), local_steps=2, batch_size=16,
                           clustering=given, min_clients=2)

    def orch(clients=None, config=cfg, model=None, **kw):
        return FederatedOrchestrator(model or HiLoRAViT(lr=3e-3), clients or digits_federation(5), config,
                                     progress=False, **kw)

    class Broken(Dataset):
        def __init__(self, base, when: Callable[[int], bool], exc: Exception) -> None:
            self.base, self.when, self.exc = base, when, exc

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            if self.when(i):
                raise self.exc
            return self.base[i]

    def with_client(i, train=None, test=None):
        clients = digits_federation(5)
        c = clients[i]
        clients[i] = ClientData(i, train or c.train, test or c.test, c.group, val=c.val)
        return clients

    def reply_fault(o, how):
        fit = o.backend.fit

        def wrapped(requests):
            replies = fit(requests)
            r = replies.get(3)
            if r is not None and not isinstance(r, Exception) and r.factors:
                replies[3] = how(r)
            return replies

        o.backend.fit = wrapped

    def recorded(result, cid=None) -> str:
        failed = any(r.failed or r.eval_failed for r in result.records) or result.failures
        return "survived" if failed else "silent"

    cases = []
    c = digits_federation(5)
    cases.append(_case("unreadable test image", lambda: recorded(orch(with_client(
        2, test=Broken(c[2].test, lambda i: i == 1, OSError("cannot identify image file")))).run())))
    cases.append(_case("unreadable training data", lambda: recorded(orch(with_client(
        2, train=Broken(c[2].train, lambda i: True, OSError("disk offline")))).run())))
    nan_train = TensorDataset(torch.full_like(c[3].train.tensors[0], float("nan")), c[3].train.tensors[1])
    cases.append(_case("NaN training data", lambda: recorded(orch(with_client(3, train=nan_train)).run())))
    for name, how in [
        ("factors x1e3", lambda r: type(r)({k: v * 1e3 for k, v in r.factors.items()}, r.head, r.num_samples)),
        ("head x1e3", lambda r: type(r)(r.factors, {k: v * 1e3 for k, v in r.head.items()}, r.num_samples)),
        ("factors NaN", lambda r: type(r)({k: v * float("nan") for k, v in r.factors.items()}, r.head, r.num_samples)),
        ("wrong shapes", lambda r: type(r)({k: v[:1] for k, v in r.factors.items()}, r.head, r.num_samples)),
        ("missing keys", lambda r: type(r)(dict(list(r.factors.items())[:2]), r.head, r.num_samples)),
        ("no head", lambda r: type(r)(r.factors, None, r.num_samples)),
        ("extra leaf-like keys", lambda r: type(r)({**r.factors, "x.lora_A": torch.ones(1)}, r.head, r.num_samples)),
    ]:
        def poisoned(how=how):
            o = orch()
            reply_fault(o, how)
            return recorded(o.run())
        cases.append(_case(f"upload {name}", poisoned))

    def overflow():
        o = orch(config=FederationConfig(**{**cfg.__dict__, "outlier_norm": None}))
        reply_fault(o, lambda r: type(r)({k: v * 1e21 for k, v in r.factors.items()}, r.head, r.num_samples))
        o.run()
        return "silent"  # must have raised FederationError

    cases.append(_case("aggregate overflow", overflow))
    ckpt = work / "fed.pt"
    orch(checkpoint_path=ckpt).run(stop_after=1)

    def resume_with(**kw):
        def fn():
            orch(checkpoint_path=ckpt, **kw).run(resume=True, stop_after=2)
            return "silent"
        return fn

    cases.append(_case("resume with another lr", resume_with(model=HiLoRAViT(lr=1e-2))))
    rank4 = HiLoRAViT(lr=3e-3, adapter={"root": {"rank": 4}})
    cases.append(_case("resume with another rank", resume_with(model=rank4)))
    cases.append(_case("resume with another precision", resume_with(trainer_kwargs={"precision": "bf16-mixed"})))
    perturbed = HiLoRAViT(lr=3e-3)
    with torch.no_grad():
        perturbed.model.blocks[0].mlp.fc1.weight.add_(1e-4)
    cases.append(_case("resume with perturbed backbone", resume_with(model=perturbed)))
    cases.append(_case("resume with another partition", resume_with(
        clients=digits_federation(5, train_fraction=0.7))))
    raw = bytearray(ckpt.read_bytes())
    for i, pos in enumerate((40, len(raw) // 3, len(raw) // 2, len(raw) - 5)):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x01
        path = work / f"flip{i}.pt"
        path.write_bytes(bytes(flipped))
        cases.append(_case(f"bit flip at byte {pos}", lambda path=path: (orch(checkpoint_path=path).run(
            resume=True, stop_after=2), "silent")[1]))
    for name, edit in [("round=99", lambda d: d["state"].__setitem__("round", 99)),
                       ("no clients key", lambda d: d["state"].pop("clients")),
                       ("no state", lambda d: d.pop("state")),
                       ("version 1", lambda d: d.__setitem__("version", 1))]:
        data = load_checkpoint(ckpt)
        edit(data)
        path = work / f"{name.replace(' ', '_')}.pt"
        save_checkpoint(data, path)
        cases.append(_case(f"tampered checkpoint: {name}", lambda path=path: (orch(checkpoint_path=path).run(
            resume=True, stop_after=2), "silent")[1]))
    return cases


def kill_cases(n: int, seed: int, work: Path) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    args = [*SMALL, "federation.rounds=4", "federation.cluster_rounds=[1,2]"]
    straight = work / "straight"
    subprocess.run([sys.executable, "-m", "hilora_lightning.cli", "run", str(CONFIG), *args,  # noqa: S603
                    f"out_dir={straight}"], check=True, capture_output=True)
    want = json.loads((straight / "result.json").read_text())
    cases = []
    for i in range(n):
        out = work / f"kill{i}"
        cmd = [sys.executable, "-m", "hilora_lightning.cli", "run", str(CONFIG), *args, f"out_dir={out}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        delay = rng.uniform(8.0, 25.0)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)  # noqa: S603
        if done.returncode != 0:
            cases.append({"case": f"SIGKILL after {delay:.1f}s", "kind": "kill", "outcome": "traceback",
                          "silent": False, "detail": done.stderr.strip().splitlines()[-1:]})
            continue
        got = json.loads((out / "result.json").read_text())
        same = got["client_accuracy"] == want["client_accuracy"] and len(got["records"]) == len(want["records"])
        cases.append({"case": f"SIGKILL after {delay:.1f}s", "kind": "kill", "outcome": "ok", "silent": not same,
                      "detail": "resumed to the same result" if same else "resumed to a different result"})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=220)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--smoke", action="store_true", help="2 config cases, the first 2 fault cases, no kill")
    args = parser.parse_args()
    if args.smoke:
        args.configs, args.kills, FAULT_BUDGET[0] = 2, 0, 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = config_cases(args.configs, args.seed, work) + [c for c in fault_cases(work) if c is not None]
        cases += kill_cases(args.kills, args.seed, work) if args.kills else []
    rows = []
    for kind in ("config", "fault", "kill"):
        group = [c for c in cases if c["kind"] == kind]
        rows.append((kind, len(group), sum(c["outcome"] != "traceback" and not c["silent"] for c in group),
                     sum(c["outcome"] == "traceback" for c in group), sum(bool(c["silent"]) for c in group)))
    print(f"{'cases':<8}{'count':>7}{'survived':>10}{'tracebacks':>12}{'silent accepts':>16}")
    for row in rows:
        print(f"{row[0]:<8}{row[1]:>7}{row[2]:>10}{row[3]:>12}{row[4]:>16}")
    for c in cases:
        if c["outcome"] == "traceback" or c["silent"]:
            print(f"  !! {c['case']}: {c['outcome']}{' (silent accept)' if c['silent'] else ''}: {c['detail']}")
    out = {"cases": float(len(cases)), "survived": float(sum(r[2] for r in rows)),
           "tracebacks": float(sum(r[3] for r in rows)), "silent_accepts": float(sum(r[4] for r in rows))}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
