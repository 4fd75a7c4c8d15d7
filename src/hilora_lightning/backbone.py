"""Build the frozen timm backbone: any timm ViT by name, or one of the small ViTs that ship inside.

``create_backbone`` is a thin layer over ``timm.create_model``: ``pretrained=True`` uses timm's
hub weights (needs a network), ``pretrained_file=`` loads weights from a local file through timm's
``pretrained_cfg_overlay=dict(file=...)`` (works offline). Two names select a tiny ViT that ships
inside this package (:data:`EMBEDDED_BACKBONES`): ``"hilora-digits-vit"``, pretrained by
``scripts/pretrain_digits_backbone.py`` on a source split of scikit-learn's handwritten digits (the
demo's and the tests' backbone), and ``"hilora-mnist-vit"``, pretrained by
``scripts/pretrain_mnist_backbone.py`` on MNIST (the Fashion-MNIST federations' backbone). They are
how the package gets a backbone that has learned something without a network.

Example:
    >>> from hilora_lightning.backbone import create_backbone
    >>> vit = create_backbone("hilora-digits-vit", num_classes=10)
    >>> vit.patch_embed.img_size
    (32, 32)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg_value
from torch import nn

__all__ = ["EMBEDDED_BACKBONE", "EMBEDDED_BACKBONES", "EMBEDDED_VIT_KWARGS", "EmbeddedBackbone", "create_backbone",
           "embedded_weights_path", "timm_args"]

@dataclasses.dataclass(frozen=True)
class EmbeddedBackbone:
    """A small pretrained ViT that ships inside the package (reproduced by a script in ``scripts/``).

    Attributes:
        arch: the timm architecture name.
        kwargs: ``timm.create_model`` arguments that shape it (image size, patch, width, depth, heads).
        file: the ``.safetensors`` file under ``hilora_lightning/assets``.
        num_classes: classes of the head stored in the file.
    """

    arch: str
    kwargs: Mapping[str, Any]
    file: str
    num_classes: int = 10

    def weights_path(self) -> Path:
        """Path of the weights inside the installed package."""
        return Path(str(resources.files("hilora_lightning") / "assets" / self.file))


#: Name of the tiny digits ViT shipped with the package (the demo's backbone).
EMBEDDED_BACKBONE = "hilora-digits-vit"
#: timm architecture of the embedded backbones.
EMBEDDED_ARCH = "vit_tiny_patch16_224"
#: digits ViT: 0.46M parameters, 32 px, patch 4 (64 tokens), dim 96, depth 4
EMBEDDED_VIT_KWARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 4,
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 3,
}
EMBEDDED_NUM_CLASSES = 10
#: The backbones that ship inside the package, by the name ``create_backbone`` and configs use:
#: ``hilora-digits-vit`` (scikit-learn digits, ``scripts/pretrain_digits_backbone.py``) and
#: ``hilora-mnist-vit`` (MNIST, 32 px, patch 8: 16 tokens; ``scripts/pretrain_mnist_backbone.py``), the
#: backbone of the Fashion-MNIST federations.
EMBEDDED_BACKBONES: dict[str, EmbeddedBackbone] = {
    EMBEDDED_BACKBONE: EmbeddedBackbone(EMBEDDED_ARCH, EMBEDDED_VIT_KWARGS, "digits_vit.safetensors"),
    "hilora-mnist-vit": EmbeddedBackbone(
        EMBEDDED_ARCH, {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3},
        "mnist_vit.safetensors"),
}


def embedded_weights_path(name: str = EMBEDDED_BACKBONE) -> Path:
    """Path of an embedded backbone's ``.safetensors`` weights inside the installed package."""
    return EMBEDDED_BACKBONES[name].weights_path()


def timm_args(name: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """The timm architecture and ``create_model`` arguments behind ``name`` (an embedded name or timm's).

    Example:
        >>> timm_args("hilora-mnist-vit")[1]["patch_size"]
        8
    """
    spec = EMBEDDED_BACKBONES.get(name)
    return (spec.arch, {**spec.kwargs, **kwargs}) if spec is not None else (name, dict(kwargs))


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
        name: a timm model name, or an embedded backbone (:data:`EMBEDDED_BACKBONES`:
            ``"hilora-digits-vit"``, ``"hilora-mnist-vit"``).
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
    spec = EMBEDDED_BACKBONES.get(name)
    if spec is not None:
        pretrained_file = pretrained_file or spec.weights_path()
        name, kwargs = timm_args(name, **kwargs)
        # the shipped file carries a 10-class head; keep it when the class count matches
        overlay.update(num_classes=spec.num_classes, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
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
