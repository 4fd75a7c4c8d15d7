"""hilora-lightning: HiLoRA (hierarchical LoRA for personalized federated learning) for Lightning.

The package namespace is lazy: ``import hilora_lightning.strategy.aggregation`` (pure math) loads
neither Lightning nor timm; ``hilora_lightning.HiLoRAViT`` imports the model on first use.

Example:
    >>> from hilora_lightning import AdapterConfig, HiLoRAViT, Tier
    >>> model = HiLoRAViT(backbone="hilora-digits-vit", num_classes=10, adapter=AdapterConfig())
    >>> model.stage is Tier.ROOT
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hilora_lightning._lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_EXPORTS = {
    "EMBEDDED_BACKBONE": "backbone",
    "create_backbone": "backbone",
    "AdapterConfig": "config",
    "TargetSpec": "config",
    "TierConfig": "config",
    "AdapterStateError": "errors",
    "HiLoraError": "errors",
    "NonFiniteError": "errors",
    "TargetNotFoundError": "errors",
    "find_tiered_layers": "inject",
    "inject_tiers": "inject",
    "unload": "inject",
    "TieredLoRALinear": "layer",
    "HiLoRAViT": "model",
    "export_tier": "state",
    "import_tier": "state",
    "load_tier_file": "state",
    "save_tier_file": "state",
    "Tier": "tiers",
}

if TYPE_CHECKING:  # static names for type checkers and IDEs; at run time they resolve lazily
    from hilora_lightning.backbone import EMBEDDED_BACKBONE, create_backbone
    from hilora_lightning.config import AdapterConfig, TargetSpec, TierConfig
    from hilora_lightning.errors import AdapterStateError, HiLoraError, NonFiniteError, TargetNotFoundError
    from hilora_lightning.inject import find_tiered_layers, inject_tiers, unload
    from hilora_lightning.layer import TieredLoRALinear
    from hilora_lightning.model import HiLoRAViT
    from hilora_lightning.state import export_tier, import_tier, load_tier_file, save_tier_file
    from hilora_lightning.tiers import Tier


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

__all__ = [
    "AdapterConfig",
    "AdapterStateError",
    "EMBEDDED_BACKBONE",
    "HiLoRAViT",
    "HiLoraError",
    "NonFiniteError",
    "TargetNotFoundError",
    "TargetSpec",
    "Tier",
    "TierConfig",
    "TieredLoRALinear",
    "__version__",
    "create_backbone",
    "export_tier",
    "find_tiered_layers",
    "import_tier",
    "inject_tiers",
    "load_tier_file",
    "save_tier_file",
    "unload",
]
