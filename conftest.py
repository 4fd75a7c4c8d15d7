"""Root conftest: without an optional extra (``flower``, ``hf``), skip collecting its modules' doctests."""

from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("flwr") else ["src/hilora_lightning/flower/*"]
if not (importlib.util.find_spec("datasets") and importlib.util.find_spec("flwr_datasets")):
    collect_ignore_glob.append("src/hilora_lightning/data/hf.py")
