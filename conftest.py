"""Root conftest: without the optional ``flower`` extra, skip collecting the Flower modules' doctests."""

from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("flwr") else ["src/hilora_lightning/flower/*"]
