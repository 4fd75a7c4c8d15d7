"""Per-tier adapter state with tier-free keys, saved and loaded without pickle.

A tier's state is a flat ``dict[str, Tensor]`` whose keys name the layer and segment but not the
tier (``blocks.0.attn.qkv.q.lora_A``), so a cluster adapter exported from one client loads into any
client's cluster slot, and a root adapter into a root slot. Files are written with ``safetensors``
(plain tensors, no code) and atomically (temp file, fsync, rename).

Example:
    >>> import timm
    >>> from hilora_lightning.config import AdapterConfig
    >>> from hilora_lightning.inject import inject_tiers
    >>> from hilora_lightning.state import export_tier, import_tier
    >>> vit = timm.create_model("test_vit", num_classes=4)
    >>> _ = inject_tiers(vit, AdapterConfig())
    >>> state = export_tier(vit, "cluster")
    >>> next(iter(state))
    'blocks.0.attn.qkv.q.lora_A'
    >>> import_tier(vit, "leaf", state)  # cluster factors into the leaf slot (same ranks)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hilora_lightning.atomic import atomic_write
from hilora_lightning.errors import AdapterStateError
from hilora_lightning.inject import find_tiered_layers
from hilora_lightning.tiers import Tier

__all__ = [
    "expected_shapes",
    "export_tier",
    "import_tier",
    "load_tier_file",
    "save_tier_file",
    "validate_tier_state",
]


def _layers(model: nn.Module) -> dict[str, Any]:
    """The tiered layers by path; models that cache them (``HiLoRAViT``) skip the module walk."""
    cached = getattr(model, "state_layers", None)
    return cached() if callable(cached) else find_tiered_layers(model)


def _key(path: str, segment: str, factor: str) -> str:
    return ".".join(p for p in (path, segment, factor) if p)


def export_tier(model: nn.Module, tier: Tier | str) -> dict[str, Tensor]:
    """Detached, contiguous CPU float32 copies of ``tier``'s factors, keyed without the tier name."""
    tier = Tier.parse(tier)
    out: dict[str, Tensor] = {}
    for path, layer in _layers(model).items():
        for seg, a, b in layer.factors(tier):
            out[_key(path, seg, "lora_A")] = a.detach().to("cpu", torch.float32).contiguous().clone()
            out[_key(path, seg, "lora_B")] = b.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def expected_shapes(model: nn.Module, tier: Tier | str) -> dict[str, tuple[int, ...]]:
    """The keys and shapes that :func:`import_tier` accepts for ``tier`` on ``model``."""
    tier = Tier.parse(tier)
    return {
        _key(path, seg, name): tuple(t.shape)
        for path, layer in _layers(model).items()
        for seg, a, b in layer.factors(tier)
        for name, t in (("lora_A", a), ("lora_B", b))
    }


def validate_tier_state(
    state: Mapping[str, Tensor],
    expected: Mapping[str, tuple[int, ...]],
    max_norm: float | None = None,
) -> None:
    """Check keys, shapes, floating dtype and finiteness (and an optional Frobenius-norm bound).

    Raises:
        AdapterStateError: naming the first problems found and what was expected.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterStateError(
            f"adapter state keys do not match the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}); export the state from a model "
            "with the same targets"
        )
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise AdapterStateError(f"{key}: expected a torch.Tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(shape):
            raise AdapterStateError(
                f"{key}: expected shape {tuple(shape)}, got {tuple(value.shape)}; the tier ranks or "
                "targets differ between exporter and importer"
            )
        if not value.is_floating_point():
            raise AdapterStateError(f"{key}: expected a floating-point tensor, got dtype {value.dtype}")
        if not torch.isfinite(value).all():
            raise AdapterStateError(f"{key}: holds NaN or Inf values")
        if max_norm is not None and float(value.float().norm()) > max_norm:
            raise AdapterStateError(
                f"{key}: Frobenius norm {float(value.float().norm()):.4g} exceeds the bound {max_norm:.4g}"
            )


@torch.no_grad()
def import_tier(model: nn.Module, tier: Tier | str, state: Mapping[str, Tensor]) -> None:
    """Load ``state`` (tier-free keys) into ``tier``'s slot of every tiered layer.

    The whole state is validated first, so a bad state changes nothing.

    Raises:
        AdapterStateError: wrong keys, shapes, dtypes or non-finite values.
    """
    tier = Tier.parse(tier)
    validate_tier_state(state, expected_shapes(model, tier))
    for path, layer in _layers(model).items():
        a_param, b_param = layer.lora_A[tier.value], layer.lora_B[tier.value]
        for s, (seg, _, _) in enumerate(layer.segments):
            a_param[s].copy_(state[_key(path, seg, "lora_A")])
            b_param[s].copy_(state[_key(path, seg, "lora_B")])


def save_tier_file(state: Mapping[str, Tensor], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` as a ``.safetensors`` file atomically (temp file, fsync, rename)."""
    from safetensors.torch import save

    path = Path(path)
    data = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    return atomic_write(path, lambda fh: fh.write(data))


def load_tier_file(path: str | os.PathLike[str], model: Any = None) -> dict[str, Tensor]:
    """Read a ``.safetensors`` tier file (no pickle is ever executed).

    With ``model`` (a :class:`~hilora_lightning.model.HiLoRAViT`), a file exported for another frozen
    backbone (its header's ``backbone_sha256``, see :mod:`hilora_lightning.export`) is refused.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist")
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError on corrupt files
        raise AdapterStateError(f"{str(path)!r} is not a valid safetensors adapter file: {exc}") from exc
    fingerprint = getattr(model, "backbone_fingerprint", None)
    if callable(fingerprint) and meta.get("backbone_sha256") not in (None, fingerprint()):
        raise AdapterStateError(
            f"{str(path)!r} was exported for another frozen backbone ({meta.get('backbone')!r}, fingerprint "
            f"{meta['backbone_sha256'][:12]}...), this model's is {fingerprint()[:12]}...; load it into the "
            "backbone it was trained on")
    return state
