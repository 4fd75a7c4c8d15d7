"""Build the frozen timm backbone: any timm ViT by name, or the embedded digits ViT.

``create_backbone`` is a thin layer over ``timm.create_model``: ``pretrained=True`` uses timm's
hub weights (needs a network), ``pretrained_file=`` loads weights from a local file through timm's
``pretrained_cfg_overlay=dict(file=...)`` (works offline). The name ``"hilora-digits-vit"`` selects
the tiny ViT that ships inside this package, pretrained by ``scripts/pretrain_digits_backbone.py`` on
a source split of scikit-learn's handwritten digits; it is how the demo and the tests get a
backbone that has learned something without a network.

Example:
    >>> from hilora_lightning.backbone import create_backbone
    >>> vit = create_backbone("hilora-digits-vit", num_classes=10)
    >>> vit.patch_embed.img_size
    (32, 32)
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg_value
from torch import nn

__all__ = ["EMBEDDED_BACKBONE", "EMBEDDED_VIT_KWARGS", "create_backbone", "embedded_weights_path"]

#: Name of the tiny pretrained ViT shipped with the package.
EMBEDDED_BACKBONE = "hilora-digits-vit"
#: timm architecture of the embedded backbone: 0.46M parameters, 32 px, patch 4, dim 96, depth 4.
EMBEDDED_ARCH = "vit_tiny_patch16_224"
EMBEDDED_VIT_KWARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 3,
}
EMBEDDED_NUM_CLASSES = 10


def embedded_weights_path() -> Path:
    """Path of the embedded backbone's ``.safetensors`` weights inside the installed package."""
    return Path(str(resources.files("hilora_lightning") / "assets" / "digits_vit.safetensors"))


def _file_head_classes(path: Path, name: str) -> int:
    """Rows of the classifier weight stored in ``path`` (``-1`` if there is none or it is unreadable)."""
    try:
        classifier = get_pretrained_cfg_value(name, "classifier") or "head"
    except Exception:  # an unregistered name: timm will raise its own clear error later
        classifier = "head"
    key = f"{classifier}.weight"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                return int(fh.get_slice(key).get_shape()[0]) if key in fh.keys() else -1
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        return int(state[key].shape[0]) if key in state else -1
    except Exception:
        return -1


def create_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a timm model by name with a fresh (or pretrained) classification head.

    Args:
        name: a timm model name, or ``"hilora-digits-vit"`` for the embedded backbone.
        num_classes: classes of the head.
        pretrained: load timm's pretrained weights (downloads unless cached).
        pretrained_file: load pretrained weights from this local file instead (``.safetensors``,
            ``.pth``, ``.bin``; a head whose class count differs from ``num_classes`` is dropped).
        **kwargs: passed to ``timm.create_model`` (``img_size``, ``drop_path_rate``, ...).

    Raises:
        FileNotFoundError: ``pretrained_file`` does not exist.
        ValueError: ``num_classes`` is not a positive int.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    overlay: dict[str, Any] = {}
    if name == EMBEDDED_BACKBONE:
        name = EMBEDDED_ARCH
        kwargs = {**EMBEDDED_VIT_KWARGS, **kwargs}
        pretrained_file = pretrained_file or embedded_weights_path()
        # the shipped file carries a 10-class digits head; keep it when the class count matches
        overlay.update(num_classes=EMBEDDED_NUM_CLASSES, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained_file {str(path)!r} does not exist; pass the path of a weight file for {name!r} "
                "(.safetensors/.pth), or pretrained=True on a machine with network access"
            )
        overlay["file"] = str(path)
        # timm drops the file's head exactly when the cfg's class count differs from num_classes,
        # so tell it the head size the file really has (-1 when it cannot be read: head dropped)
        overlay.setdefault("num_classes", _file_head_classes(path, name))
        pretrained = True
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
