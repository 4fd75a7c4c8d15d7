"""Inject tiered adapters into any timm ViT (or any ``nn.Module``) and take them out again.

Injection walks ``named_modules()``, matches each ``nn.Linear`` path against the target specs and
swaps it in place for a :class:`~hilora_lightning.layer.TieredLoRALinear` that keeps the original as
``base_layer``; :func:`unload` puts the originals back.

Example:
    >>> import timm
    >>> from hilora_lightning.config import AdapterConfig
    >>> from hilora_lightning.inject import inject_tiers, unload
    >>> vit = timm.create_model("test_vit", pretrained=False, num_classes=4)
    >>> layers = inject_tiers(vit, AdapterConfig(targets="paper"))
    >>> sorted(layers)[:1]
    ['blocks.0.attn.qkv']
    >>> restored = unload(vit)
    >>> sorted(restored) == sorted(layers)
    True
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from hilora_lightning.config import AdapterConfig, TargetSpec
from hilora_lightning.errors import TargetNotFoundError
from hilora_lightning.layer import TieredLoRALinear
from hilora_lightning.tiers import Tier

__all__ = ["find_tiered_layers", "inject_tiers", "matches_target", "set_active", "set_trainable", "unload"]


def matches_target(path: str, spec: TargetSpec) -> bool:
    """Whether module ``path`` matches ``spec`` (suffix on dot boundaries, or ``re:`` full match)."""
    if spec.pattern.startswith("re:"):
        return re.fullmatch(spec.pattern[3:], path) is not None
    return path == spec.pattern or path.endswith("." + spec.pattern)


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    return f"{type(model).__name__}({arch})" if arch else type(model).__name__


def _candidates(model: nn.Module, limit: int = 16) -> list[str]:
    seen: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            general = re.sub(r"\.\d+\.", ".*.", f".{name}.").strip(".")
            if general not in seen:
                seen.append(general)
    return seen[:limit]


def find_tiered_layers(model: nn.Module) -> dict[str, TieredLoRALinear]:
    """All :class:`TieredLoRALinear` modules of ``model`` by path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TieredLoRALinear)}


def inject_tiers(model: nn.Module, config: AdapterConfig, seed: int = 0) -> dict[str, TieredLoRALinear]:
    """Wrap every target ``nn.Linear`` of ``model`` in a :class:`TieredLoRALinear`, in place.

    Args:
        model: e.g. a model from ``timm.create_model(name, pretrained=...)``.
        config: ranks / alphas / targets.
        seed: base seed of the initial ``A`` factors (same seed, same factors).

    Returns:
        The new layers by module path.

    Raises:
        RuntimeError: ``model`` already holds tiered layers.
        TargetNotFoundError: no ``nn.Linear`` matched; the message lists candidate paths.
    """
    if find_tiered_layers(model):
        raise RuntimeError(
            f"{_model_name(model)} already has tiered adapters injected; call unload(model) before injecting again"
        )
    specs = config.target_specs()
    chosen: list[tuple[str, nn.Linear, TargetSpec]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for spec in specs:
            if matches_target(name, spec):
                chosen.append((name, module, spec))
                break
    if not chosen:
        raise TargetNotFoundError(
            f"no nn.Linear in {_model_name(model)} matched targets {[s.pattern for s in specs]}; "
            f"candidate Linear paths: {_candidates(model)}. Use a preset ('paper', 'all_linear') or one of "
            "these paths as a suffix pattern"
        )
    layers: dict[str, TieredLoRALinear] = {}
    for name, module, spec in chosen:
        layer = TieredLoRALinear(module, config, segments=spec.slices, path=name, seed=seed)
        _set_child(model, name, layer)
        layers[name] = layer
    return layers


def unload(model: nn.Module) -> dict[str, nn.Linear]:
    """Put the original Linear modules back (merged weights are unmerged first); returns them by path."""
    restored: dict[str, nn.Linear] = {}
    for name, layer in find_tiered_layers(model).items():
        layer.unmerge()
        _set_child(model, name, layer.base_layer)
        restored[name] = layer.base_layer
    return restored


def set_active(model: nn.Module, tiers: Iterable[Tier | str]) -> None:
    """Activate exactly ``tiers`` on every tiered layer of ``model``."""
    tiers = list(tiers)
    for layer in find_tiered_layers(model).values():
        layer.set_active(tiers)


def set_trainable(model: nn.Module, tiers: Iterable[Tier | str]) -> None:
    """Make exactly ``tiers`` trainable on every tiered layer of ``model``."""
    tiers = list(tiers)
    for layer in find_tiered_layers(model).values():
        layer.set_trainable(tiers)


def _set_child(model: nn.Module, path: str, child: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, child)
