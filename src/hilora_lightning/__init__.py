"""hilora-lightning: HiLoRA (hierarchical LoRA for personalized federated learning) for Lightning.

Example:
    >>> from hilora_lightning import AdapterConfig, HiLoRAViT, Tier
    >>> model = HiLoRAViT(backbone="hilora-digits-vit", num_classes=10, adapter=AdapterConfig())
    >>> model.stage is Tier.ROOT
    True
"""

from __future__ import annotations

from hilora_lightning.backbone import EMBEDDED_BACKBONE, create_backbone
from hilora_lightning.config import AdapterConfig, TargetSpec, TierConfig
from hilora_lightning.errors import AdapterStateError, HiLoraError, NonFiniteError, TargetNotFoundError
from hilora_lightning.inject import find_tiered_layers, inject_tiers, unload
from hilora_lightning.layer import TieredLoRALinear
from hilora_lightning.model import HiLoRAViT
from hilora_lightning.state import export_tier, import_tier, load_tier_file, save_tier_file
from hilora_lightning.tiers import Tier

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_BACKBONE",
    "AdapterConfig",
    "AdapterStateError",
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
