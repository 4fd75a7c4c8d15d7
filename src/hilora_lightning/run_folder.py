"""A run's folder (``out_dir``): what makes it a run, who may write into it, and reading a finished one back.

``hilora-fl run`` writes ``config.yaml`` (the resolved config, before round 1), ``federation.pt``
(after every round) and, at the end, ``result.json``, ``rounds.csv`` and the plots. A folder that
holds ``federation.pt`` or ``result.json`` holds a run: a new run into it is refused unless it
continues it (``--resume``) or replaces it (``--overwrite``, which removes the old run's files
first) — :func:`check_out_dir`.

:class:`SavedRun` reads a HiLoRA run back from ``config.yaml`` + ``federation.pt`` alone: it
rebuilds the model (the backbone from its name, as the run did; no client data is read) and the
strategy, checks both against the checkpoint's fingerprint (backbone SHA-256 included), and gives
each client's deployed tiers and head — what ``hilora-fl export`` and ``predict`` need.

Example:
    >>> import tempfile, pathlib
    >>> from hilora_lightning.run_folder import check_out_dir
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> check_out_dir(folder)  # empty: nothing to protect
    >>> _ = (folder / "federation.pt").write_bytes(b"...")
    >>> check_out_dir(folder)
    Traceback (most recent call last):
    ...
    hilora_lightning.run_folder.RunExistsError: ... already holds a run (federation.pt); continue it with --resume, ...
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hilora_lightning.errors import HiLoraError

__all__ = ["RUN_FILES", "RunExistsError", "SavedRun", "check_out_dir", "clear_run", "saved_round"]

#: what marks a folder as holding a run
RUN_MARKERS = ("federation.pt", "result.json")
#: every file a run writes (``--overwrite`` removes these, and nothing else)
RUN_FILES = (*RUN_MARKERS, "rounds.csv", "config.yaml", "accuracy_per_round.png", "client_similarity.png",
             "client_accuracy.png")


class RunExistsError(HiLoraError, FileExistsError):
    """``out_dir`` already holds a run and neither ``--resume`` nor ``--overwrite`` was given."""


def check_out_dir(out: str | Path, resume: bool = False, overwrite: bool = False,
                  markers: tuple[str, ...] = RUN_MARKERS,
                  flags: tuple[str, str, str] = ("--resume", "--overwrite", "out_dir=...")) -> None:
    """Refuse to start a new run into ``out`` when it holds one (unless it is continued or replaced).

    ``markers`` are glob patterns of the files that mark a run (``"*/result.json"`` for a comparison);
    ``flags`` how the caller's user resumes, overwrites and names another folder (the CLI's flags, or
    a Flower run config's keys).
    """
    resume_flag, overwrite_flag, other = flags
    if resume and overwrite:
        raise ValueError(f"{resume_flag} continues the run in out_dir, {overwrite_flag} replaces it; give one of them")
    found = sorted({str(p.relative_to(out)) for m in markers for p in Path(out).glob(m)}) if Path(out).is_dir() else []
    if len(found) > 3:
        found = [*found[:3], f"... {len(found) - 3} more"]
    if found and not resume and not overwrite:
        raise RunExistsError(f"{str(out)!r} already holds a run ({', '.join(found)}); continue it with {resume_flag}, "
                             f"replace it with {overwrite_flag}, or choose another {other}")


def clear_run(out: str | Path, files: tuple[str, ...] = RUN_FILES) -> list[Path]:
    """Remove a previous run's files from ``out`` (``--overwrite``); other files are left alone."""
    removed = []
    for name in files:
        path = Path(out) / name
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def saved_round(out: str | Path) -> int | None:
    """The last round checkpointed in ``out/federation.pt`` (``None``: no readable checkpoint)."""
    from hilora_lightning.federation.checkpoint import load_checkpoint

    try:
        return int(load_checkpoint(Path(out) / "federation.pt")["state"]["round"])
    except (OSError, HiLoraError, KeyError, TypeError, ValueError):
        return None


@dataclass
class SavedRun:
    """A HiLoRA run read back from its folder: model, strategy, server state and client stores.

    Attributes:
        path: the run folder; ``cfg``: its resolved ``config.yaml``.
        model: the rebuilt :class:`~hilora_lightning.model.HiLoRAViT` (frozen backbone, initial adapters).
        strategy: the run's :class:`~hilora_lightning.federation.hilora.HiLoRAStrategy`.
        state: the checkpointed :class:`~hilora_lightning.federation.server_state.ServerState`.
        stores: client id -> its :class:`~hilora_lightning.federation.plan.ClientStore` (in-process runs).
        client_ids, unseen_ids: the run's training and unseen clients.
    """

    path: Path
    cfg: dict[str, Any]
    model: Any
    strategy: Any
    state: Any
    stores: dict[int, Any]
    client_ids: list[int]
    unseen_ids: list[int]

    @classmethod
    def open(cls, run_dir: str | Path) -> SavedRun:
        """Read ``run_dir/config.yaml`` and ``run_dir/federation.pt``; refuse a mismatch with what it names."""
        from hilora_lightning.cli import load_config
        from hilora_lightning.config_check import ConfigError
        from hilora_lightning.experiment import build_federation_config, build_model, validate_config
        from hilora_lightning.federation.backend import InProcessBackend
        from hilora_lightning.federation.checkpoint import CheckpointError, load_checkpoint
        from hilora_lightning.federation.engine import check_version, read_state
        from hilora_lightning.federation.fingerprint import differences
        from hilora_lightning.federation.hilora import HiLoRAStrategy

        run = Path(run_dir)
        for name in ("config.yaml", "federation.pt"):
            if not (run / name).is_file():
                raise FileNotFoundError(f"{str(run)!r} is not a run folder: it has no {name} (hilora-fl run writes "
                                        "both)")
        cfg = load_config(run / "config.yaml")
        if cfg.get("method", "hilora") != "hilora":
            raise ConfigError(f"{str(run)!r} holds a {cfg['method']} run; export and predict serve HiLoRA runs")
        validate_config(cfg)
        data = load_checkpoint(run / "federation.pt")
        check_version(data)  # before the model is built
        state, flat_stores = read_state(data)
        model = build_model(cfg)
        strategy = HiLoRAStrategy(model, build_federation_config(cfg))
        saved = {str(k): str(v) for k, v in dict(data.get("fingerprint", {})).items()}
        mine = strategy.fingerprint()  # method, federation settings, model and adapter settings, backbone SHA-256
        diff = differences({k: saved[k] for k in mine if k in saved}, mine)
        if diff:
            raise CheckpointError(f"{str(run / 'config.yaml')!r} does not describe {str(run / 'federation.pt')!r} "
                                  "(edited after the run, or another run's checkpoint); restore the run's own "
                                  "config.yaml. Differences: " + "; ".join(diff))
        held = InProcessBackend()  # its stores, as the run's in-process backend read them back
        try:
            held.load_state_dict(flat_stores)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{str(run / 'federation.pt')!r} holds a malformed client store "
                                  f"({type(exc).__name__}: {exc})") from exc
        unseen = [int(row[0]) for row in json.loads(saved.get("data.unseen", "[]"))]
        return cls(run, cfg, model, strategy, state, held.stores, sorted(int(c) for c in data.get("client_ids", [])),
                   sorted(unseen))

    def client_model(self, client_id: int) -> tuple[dict[Any, Any], dict[str, Any]]:
        """Client ``client_id``'s deployed tiers and head, as :meth:`FederatedOrchestrator.client_model` gives them."""
        from hilora_lightning.federation.plan import ClientStore

        if client_id not in self.client_ids and client_id not in self.unseen_ids:
            raise ValueError(f"no client {client_id} in {str(self.path)!r}: training clients {self.client_ids}, "
                             f"unseen {self.unseen_ids}")
        store = self.stores.get(client_id, ClientStore())
        return self.strategy.client_model(self.state, client_id, store, unseen=client_id in self.unseen_ids)

    def export_client(self, client_id: int, out_dir: str | Path, format: str = "timm") -> list[Path]:
        """Write client ``client_id``'s model (see :mod:`hilora_lightning.export`); returns the files."""
        from hilora_lightning.export import export_client_model

        tiers, head = self.client_model(client_id)
        return export_client_model(self.model, tiers, head, out_dir, format, client_id)

    @property
    def data_section(self) -> Mapping[str, Any]:
        """The config's ``data`` section (image size, transform: what ``predict`` prepares images with)."""
        return dict(self.cfg.get("data", {}) or {})
