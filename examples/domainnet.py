"""HiLoRA on DomainNet (6 domains x 15 clients, Dirichlet(0.6) label skew, 10 classes) from local files.

    python examples/domainnet.py --root /data/domainnet          # paper setting, GPU
    python examples/domainnet.py --root /data/domainnet --cpu    # small CPU variant

``--root`` holds the official ``<domain>/`` image folders and ``<domain>_train.txt`` split files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hilora_lightning.cli import load_config
from hilora_lightning.experiment import run_and_report

CONFIGS = Path(__file__).resolve().parent / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--cpu", action="store_true", help="use the small CPU variant of the config")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir (or extend it)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run that out_dir holds")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args()
    cfg = load_config(CONFIGS / ("domainnet_cpu.yaml" if args.cpu else "domainnet.yaml"),
                      [f"data.root={args.root}", *args.overrides])
    run_and_report(cfg, resume=args.resume, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
