"""HiLoRA on CIFAR-100 with the paper's partitions (GL-Dir(0.3), SC-Dir(3), Patho(10)).

    python examples/cifar100.py --root /data/cifar --partition sc-dir            # paper setting, GPU
    python examples/cifar100.py --root /data/cifar --partition sc-dir --cpu      # small CPU variant
    python examples/cifar100.py --root /data/cifar --download -- federation.rounds=20

Reads ``examples/configs/cifar100_<partition>[_cpu].yaml``, applies the overrides after ``--``, runs the
federation and writes the tables, JSON/CSV and plots to the config's ``out_dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hilora_lightning.cli import load_config
from hilora_lightning.experiment import run_and_report

CONFIGS = Path(__file__).resolve().parent / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder that holds (or will hold) cifar-100-python/")
    parser.add_argument("--partition", choices=["gl-dir", "sc-dir", "patho"], default="gl-dir")
    parser.add_argument("--cpu", action="store_true", help="use the small CPU variant of the config")
    parser.add_argument("--download", action="store_true", help="download CIFAR-100 with torchvision if missing")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir (or extend it)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run that out_dir holds")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()
    name = f"cifar100_{args.partition.replace('-', '_')}{'_cpu' if args.cpu else ''}.yaml"
    cfg = load_config(CONFIGS / name, [f"data.root={args.root}", f"data.download={args.download}", *args.overrides])
    run_and_report(cfg, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
